"""The main job: attack, stream statistics, score, mask, write, and report what the mask buys."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from . import __version__
from .attacks import AttackConfig, craft
from .data import Dataset, Preprocess, load_data, split, validate
from .errors import CloakError
from .mask import count_for, score_features, select_mask
from .evaluate import Runner
from .model import Head, find_head, find_mask, load_model, logits_output, save_model, select_input
from .surgery import METADATA_PREFIX, apply_mask, history_entry

log = logging.getLogger(__name__)


@dataclass
class HardenConfig:
    """Everything ``harden`` needs besides the model and the data."""

    output: Path | None = None  # default: <model>.cloaked.onnx next to the model
    attack: AttackConfig = field(default_factory=AttackConfig)
    fraction: float = 0.01
    score: str = "absdiff"
    val_split: float = 0.2
    preprocess: Preprocess = field(default_factory=Preprocess)
    feature_tensor: str | None = None
    input_name: str | None = None
    output_name: str | None = None
    image_size: tuple[int, int] | None = None  # for image folders
    seed: int = 0
    batch_size: int = 256  # onnxruntime batches
    device: str | None = None  # torch device for attacks; default cuda when available
    providers: Sequence[str] | None = None
    adaptive: bool = True  # also attack the hardened model itself


@dataclass
class Target:
    """What gets masked: the feature tensor, the logits output, and what is known about them."""

    feature: str
    logits: str
    head: Head | None
    existing_mask: np.ndarray | None


@dataclass
class HardenReport:
    model: str
    output: str
    feature_tensor: str
    features: int
    masked: int
    newly_masked: int
    fraction: float
    score: str
    attack: dict
    clean_accuracy: dict
    adversarial_accuracy: dict
    calibration: dict
    samples: dict
    seconds: float
    stages: dict
    providers: list[str]
    device: str
    seed: int
    versions: dict
    inputs_sha256: dict

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import onnxruntime
    import torch

    return {"cloakonnx": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": np.__version__}


def resolve_target(model: onnx.ModelProto, feature_tensor: str | None, output: str | None) -> Target:
    """The head's input by default; any float tensor with ``--feature-tensor``."""
    if feature_tensor is None:
        head = find_head(model, output)
        return Target(head.feature, head.logits, head, head.mask)
    logits = logits_output(model, output)
    try:
        head = find_head(model, logits)
        head = head if head.feature == feature_tensor else None
    except CloakError:
        head = None
    found = find_mask(model, feature_tensor)
    known = {o for n in model.graph.node for o in n.output}
    if feature_tensor not in known:
        raise CloakError(f"no tensor named {feature_tensor!r} is produced in the model; "
                         "`cloakonnx inspect MODEL` shows the feature tensor")
    return Target(feature_tensor, logits, head, None if found is None else found[1])


def default_output(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".cloaked.onnx")


def check_output_path(model_path: Path, out: Path) -> None:
    """Fail before any work is done if the result could not be written."""
    import os

    if out.resolve() == model_path.resolve():
        raise CloakError(f"the output path is the input model {model_path}; choose another with -o PATH")
    folder = out.parent
    if not folder.is_dir():
        raise CloakError(f"output directory does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise CloakError(f"output directory is not writable: {folder}")


def choose_attack(runner: Runner, wanted: AttackConfig) -> tuple[AttackConfig, str | None]:
    """The attack to use: the one asked for, or Square through onnxruntime when the torch executor
    cannot differentiate this graph (and then say why)."""
    from .attacks import ATTACKS

    cls = ATTACKS.get(wanted.name)
    if runner.torch_model is not None or cls is None or not cls.needs_gradients:
        return wanted, None
    reason = f"the torch executor lacks {', '.join(f'{o} (opset {v})' for o, v in runner.unsupported.ops)}"
    log.warning("%s: crafting with the gradient-free Square attack through onnxruntime instead of %s",
                reason, wanted.name)
    return replace(wanted, name="square", norm="linf"), reason


def harden(model_path: str | Path, data: str | Path | Dataset, config: HardenConfig) -> HardenReport:
    """Harden ``model_path`` with a DeepCloak mask; write it atomically and return the report."""
    import torch

    from .evaluate import accuracy
    from .runtime import resolve_providers
    from .stats import stream_stats

    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    model_path = Path(model_path)
    out_path = Path(config.output) if config.output else default_output(model_path)
    check_output_path(model_path, out_path)
    bounds = config.preprocess.bounds
    config.attack.validate(bounds)
    count_for(config.fraction, 1)  # validates the fraction before any work

    model = load_model(model_path)
    target = resolve_target(model, config.feature_tensor, config.output_name)
    inp = select_input(model, config.input_name)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    providers = resolve_providers(config.providers)
    torch.manual_seed(config.seed)

    if isinstance(data, Dataset):
        ds = data
    else:
        channels = inp.shape[1] if len(inp.shape) == 4 and isinstance(inp.shape[1], int) else 3
        ds = load_data(data, config.image_size, channels, bounds)
    runner = Runner(model, target.logits, [target.feature], config.preprocess, config.input_name,
                    config.providers, device)
    n_classes = _num_classes(runner, ds)
    validate(ds, inp.shape, bounds, n_classes)
    calib, val = split(ds, config.val_split, config.seed)
    log.info("model %s: feature tensor %r, %s; %d calibration / %d validation samples; providers %s; torch on %s",
             model_path.name, target.feature, f"{target.head.kind} head" if target.head else "custom tensor",
             len(calib), len(val), ", ".join(providers), device)

    attack_cfg, fallback = choose_attack(runner, config.attack)
    attack_bs = runner.fixed_batch or attack_cfg.batch_size
    t = time.perf_counter()
    adv_calib = craft(runner.model_for(attack_cfg.name), attack_cfg, calib.x, calib.y, bounds, device,
                      "attack calibration", attack_bs)
    stages["attack"] = time.perf_counter() - t

    t = time.perf_counter()
    stats, calib_clean, calib_adv = stream_stats(runner.session, target.feature, target.logits, calib.x, adv_calib,
                                                 calib.y, runner.feed, config.batch_size)
    stages["statistics"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = score_features(stats, config.score)
    mask = select_mask(scores, config.fraction, target.existing_mask)
    previously = 0 if target.existing_mask is None else int((target.existing_mask == 0).sum())
    masked = int((mask == 0).sum())
    stages["selection"] = time.perf_counter() - t

    t = time.perf_counter()
    record = {"version": __version__, "masked": masked, "fraction": config.fraction, "score": config.score,
              "feature_tensor": target.feature, "attack": attack_cfg.to_dict(), "seed": config.seed}
    meta = {
        METADATA_PREFIX + "version": __version__,
        METADATA_PREFIX + "feature_tensor": target.feature,
        METADATA_PREFIX + "features": str(stats.width),
        METADATA_PREFIX + "masked": str(masked),
        METADATA_PREFIX + "fraction": repr(config.fraction),
        METADATA_PREFIX + "score": config.score,
        METADATA_PREFIX + "attack": json.dumps(attack_cfg.to_dict(), sort_keys=True),
        METADATA_PREFIX + "form": "mul",
        METADATA_PREFIX + "history": history_entry(model, record),
    }
    hardened = apply_mask(model, target.feature, mask, stats.ndim, meta)
    stages["surgery"] = time.perf_counter() - t

    t = time.perf_counter()
    hard = Runner(hardened, target.logits, [], config.preprocess, config.input_name, config.providers, device)
    feed = runner.feed
    clean_o = accuracy(runner.session, val.x, val.y, feed, target.logits, config.batch_size)
    clean_h = accuracy(hard.session, val.x, val.y, feed, target.logits, config.batch_size)
    adv_val = craft(runner.model_for(attack_cfg.name), attack_cfg, val.x, val.y, bounds, device, "attack validation",
                    attack_bs)
    adv_o = accuracy(runner.session, adv_val, val.y, feed, target.logits, config.batch_size)
    adv_transfer = accuracy(hard.session, adv_val, val.y, feed, target.logits, config.batch_size)
    adv_adaptive = None
    if config.adaptive:
        adv_val_h = craft(hard.model_for(attack_cfg.name), attack_cfg, val.x, val.y, bounds, device, "attack hardened",
                          attack_bs)
        adv_adaptive = accuracy(hard.session, adv_val_h, val.y, feed, target.logits, config.batch_size)
    stages["evaluation"] = time.perf_counter() - t

    t = time.perf_counter()
    save_model(hardened, out_path)
    stages["write"] = time.perf_counter() - t

    hashes = {"model": sha256_file(model_path)}
    if not isinstance(data, Dataset) and Path(data).is_file():
        hashes["data"] = sha256_file(data)
    return HardenReport(
        model=str(model_path), output=str(out_path), feature_tensor=target.feature, features=stats.width,
        masked=masked, newly_masked=masked - previously, fraction=config.fraction, score=config.score,
        attack=dict(attack_cfg.to_dict(), fallback=fallback),
        clean_accuracy={"original": clean_o, "hardened": clean_h},
        adversarial_accuracy={"original": adv_o, "hardened_transfer": adv_transfer, "hardened_adaptive": adv_adaptive},
        calibration={"clean_accuracy": calib_clean, "adversarial_accuracy": calib_adv},
        samples={"calibration": len(calib), "validation": len(val)},
        seconds=round(time.perf_counter() - t_start, 3), stages={k: round(v, 3) for k, v in stages.items()},
        providers=list(providers), device=device, seed=config.seed, versions=versions(), inputs_sha256=hashes,
    )


def _num_classes(runner: Runner, ds: Dataset) -> int:
    """Width of the logits, read from one real forward pass (works for any head)."""
    from .runtime import run_batch

    if len(ds) == 0:
        raise CloakError(f"the dataset {ds.source} is empty")
    sample = ds.x[:1]
    want = [d for d in runner.input.shape[1:]]
    if sample.shape[1:] != tuple(d if isinstance(d, int) and d > 0 else s for d, s in zip(want, sample.shape[1:])) \
            or len(want) != sample.ndim - 1:
        validate(ds, runner.input.shape, runner.preprocess.bounds, 1 << 30)  # raises the shape error
    (logits,) = run_batch(runner.session, runner.feed(sample), [runner.logits])
    return int(np.prod(logits.shape[1:]))
