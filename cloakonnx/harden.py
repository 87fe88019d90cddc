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
from .mask import count_for, mask_top, ranking, score_features
from .batching import BatchChoice
from .evaluate import Runner
from .model import (Head, check_writable_dir, find_head, find_mask, load_model, logits_output, save_model, select_input,
                    uses_external_data)
from .sweep import DEFAULT_FRACTIONS
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
    max_clean_drop: float | None = None  # percentage points; None: mask exactly ``fraction``
    # The drop's one-sided upper confidence bound on new data must also be within the budget
    # (cloakonnx.sweep.clean_drop_bound); 0 uses the validation point estimate alone.
    budget_confidence: float = 0.9
    rounds: int = 1
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # candidates for --max-clean-drop
    plot: Path | None = None
    fold: bool = False  # multiply the mask into the head's weights instead of adding a Mul node


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
    mask_added: bool = True
    max_clean_drop: float | None = None
    budget_confidence: float | None = None
    rounds: list[dict] = field(default_factory=list)
    curve: list[dict] | None = None

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
        from .fold import folded_mask

        head = find_head(model, output)
        return Target(head.feature, head.logits, head, head.mask if head.mask is not None else folded_mask(model))
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
    if out.resolve() == model_path.resolve():
        raise CloakError(f"the output path is the input model {model_path}; choose another with -o PATH")
    check_writable_dir(out.parent)


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


@dataclass
class Prepared:
    """What every command that attacks a model needs, loaded and checked once."""

    model_path: Path
    model: onnx.ModelProto
    target: Target
    runner: Runner
    calib: Dataset
    val: Dataset
    attack: AttackConfig
    fallback: str | None
    attack_batch: BatchChoice
    device: str
    providers: tuple[str, ...]


def prepare(model_path: str | Path, data: str | Path | Dataset, config: HardenConfig) -> Prepared:
    """Load and validate the model and data, split them, and choose the attack."""
    import torch

    from .runtime import resolve_providers

    model_path = Path(model_path)
    bounds = config.preprocess.bounds
    config.attack.validate(bounds)
    count_for(config.fraction, 1)  # validates the fraction before any work
    if config.rounds < 1:
        raise CloakError(f"--rounds must be at least 1, got {config.rounds}")
    if config.max_clean_drop is not None and config.max_clean_drop < 0:
        raise CloakError(f"--max-clean-drop must be non-negative, got {config.max_clean_drop:g}")
    if not (config.budget_confidence == 0 or 0.5 <= config.budget_confidence < 1):
        raise CloakError(f"--budget-confidence must be 0 (point estimate only) or in [0.5, 1), "
                         f"got {config.budget_confidence:g}")
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
    validate(ds, inp.shape, bounds, None)
    validate(ds, inp.shape, bounds, _num_classes(runner, ds))
    calib, val = split(ds, config.val_split, config.seed)
    log.info("model %s: feature tensor %r, %s; %d calibration / %d validation samples; providers %s; torch on %s",
             model_path.name, target.feature, f"{target.head.kind} head" if target.head else "custom tensor",
             len(calib), len(val), ", ".join(providers), device)
    attack, fallback = choose_attack(runner, config.attack)
    batch = runner.attack_batch(attack.batch_size, attack.name, ds.x.shape[1:])
    attack = replace(attack, batch_size=batch.size)  # the report records the size used
    return Prepared(model_path, model, target, runner, calib, val, attack, fallback, batch, device, providers)


def _craft(p: Prepared, runner: Runner, ds: Dataset, desc: str) -> np.ndarray:
    return craft(runner.model_for(p.attack.name), p.attack, ds.x, ds.y, p.runner.preprocess.bounds, p.device, desc,
                 p.attack_batch.size, fixed_batch=bool(runner.fixed_batch))


def _calibrate(p: Prepared, runner: Runner, config: HardenConfig, stages: dict, desc: str):
    """Attack the calibration split through ``runner`` and stream the feature statistics."""
    from .stats import stream_stats

    t = time.perf_counter()
    adv = _craft(p, runner, p.calib, f"attack calibration{desc}")
    stages["attack"] = stages.get("attack", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    weight = p.target.head.weight if p.target.head is not None else None
    stats, clean, adv_acc = stream_stats(runner.session, p.target.feature, p.target.logits, p.calib.x, adv,
                                         p.calib.y, runner.feed, config.batch_size, head_weight=weight)
    stages["statistics"] = stages.get("statistics", 0.0) + time.perf_counter() - t
    return stats, clean, adv_acc


def harden(model_path: str | Path, data: str | Path | Dataset, config: HardenConfig) -> HardenReport:
    """Harden ``model_path`` with a DeepCloak mask; write it atomically and return the report.

    With ``max_clean_drop`` the number of features is chosen on the validation split (the best
    adversarial accuracy within the clean-accuracy budget); if nothing helps, the model is written
    unchanged. With ``rounds`` > 1 each round attacks the model hardened so far and adds to the mask.
    """
    from .evaluate import accuracy
    from .sweep import choose_point, collect_features, counts_for, mask_curve

    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    model_path = Path(model_path)
    out_path = Path(config.output) if config.output else default_output(model_path)
    check_output_path(model_path, out_path)
    p = prepare(model_path, data, config)
    target, runner, val = p.target, p.runner, p.val
    if config.fold and target.head is None:
        raise CloakError("--fold multiplies the mask into the linear head's weights; it cannot be used with a "
                         "custom --feature-tensor (use the Mul form)")
    if (config.max_clean_drop is not None or config.plot) and target.head is None:
        raise CloakError("--max-clean-drop and --plot need the model's linear head after the feature tensor "
                         "(they evaluate masks in numpy); use --fraction with a custom --feature-tensor")
    feed, logits = runner.feed, target.logits
    if config.max_clean_drop is not None and not config.budget_confidence and 100.0 / len(val) > config.max_clean_drop / 2:
        log.warning("the validation split has %d samples (one sample = %.2f points), coarse for a %g-point budget: "
                    "the budget holds on this split but may not on new data; use more data, a larger --val-split "
                    "or --budget-confidence", len(val), 100.0 / len(val), config.max_clean_drop)

    t = time.perf_counter()
    clean_o = accuracy(runner.session, val.x, val.y, feed, logits, config.batch_size)
    adv_val0 = _craft(p, runner, val, " validation")  # crafted on the original: the transfer set
    adv_o = accuracy(runner.session, adv_val0, val.y, feed, logits, config.batch_size)
    stages["evaluation"] = time.perf_counter() - t

    mask, current, cur_runner = target.existing_mask, p.model, runner
    previously = 0 if mask is None else int((mask == 0).sum())
    rounds: list[dict] = []
    curve = None
    f_val_clean = None
    calib_figures: dict = {}
    width = ndim = 0
    for r in range(config.rounds):
        stats, calib_clean, calib_adv = _calibrate(p, cur_runner, config, stages, f" (round {r + 1})")
        width, ndim = stats.width, stats.ndim
        if r == 0:
            calib_figures = {"clean_accuracy": calib_clean, "adversarial_accuracy": calib_adv}
        t = time.perf_counter()
        order = ranking(score_features(stats, config.score), mask)
        adv_val_r = adv_val0 if r == 0 else _craft(p, cur_runner, val, f" validation (round {r + 1})")
        k = count_for(config.fraction, width)
        if config.max_clean_drop is not None or (config.plot and r == 0):
            if f_val_clean is None:
                f_val_clean = collect_features(runner.session, target.feature, val.x, feed, config.batch_size)
            f_val_adv = collect_features(runner.session, target.feature, adv_val_r, feed, config.batch_size)
            already = 0 if mask is None else int((mask == 0).sum())
            points = mask_curve(target.head, order, counts_for(config.fractions, width, already), f_val_clean,
                                f_val_adv, val.y, mask, config.budget_confidence or 0.9)
            if r == 0:
                curve = points
            if config.max_clean_drop is not None:
                chosen = choose_point(points, clean_o, config.max_clean_drop, use_bound=bool(config.budget_confidence))
                k = 0 if chosen is None else chosen.added
        stages["selection"] = stages.get("selection", 0.0) + time.perf_counter() - t
        if k == 0:
            log.info("round %d: no mask improves adversarial accuracy within the clean-accuracy budget", r + 1)
            rounds.append({"round": r + 1, "added": 0, "masked": previously if mask is None else int((mask == 0).sum())})
            break
        t = time.perf_counter()
        prev_runner = cur_runner
        mask = mask_top(order, k, width, mask)
        current = apply_mask(current, target.feature, mask, ndim)
        stages["surgery"] = stages.get("surgery", 0.0) + time.perf_counter() - t
        cur_runner = Runner(current, logits, [target.feature], config.preprocess, config.input_name,
                            config.providers, p.device)
        t = time.perf_counter()
        rounds.append({"round": r + 1, "added": k, "masked": int((mask == 0).sum())})
        if config.rounds > 1:  # with one round these are the final figures, computed below
            rounds[-1].update(
                clean_accuracy=accuracy(cur_runner.session, val.x, val.y, feed, logits, config.batch_size),
                adversarial_accuracy_before=accuracy(prev_runner.session, adv_val_r, val.y, feed, logits),
                adversarial_accuracy_after=accuracy(cur_runner.session, adv_val_r, val.y, feed, logits))
        stages["evaluation"] += time.perf_counter() - t

    masked = previously if mask is None else int((mask == 0).sum())
    changed = masked > previously
    t = time.perf_counter()
    if changed:
        record = {"version": __version__, "masked": masked, "fraction": masked / width, "score": config.score,
                  "feature_tensor": target.feature, "attack": p.attack.to_dict(), "seed": config.seed,
                  "rounds": len(rounds), "max_clean_drop": config.max_clean_drop,
                  "budget_confidence": config.budget_confidence if config.max_clean_drop is not None else None,
                  "form": "folded" if config.fold else "mul"}
        meta = {
            METADATA_PREFIX + "version": __version__,
            METADATA_PREFIX + "feature_tensor": target.feature,
            METADATA_PREFIX + "features": str(width),
            METADATA_PREFIX + "masked": str(masked),
            METADATA_PREFIX + "fraction": repr(masked / width),
            METADATA_PREFIX + "score": config.score,
            METADATA_PREFIX + "attack": json.dumps(p.attack.to_dict(), sort_keys=True),
            METADATA_PREFIX + "form": "mul",
            METADATA_PREFIX + "history": history_entry(p.model, record),
        }
        if config.fold:
            from .fold import fold_mask

            hardened = fold_mask(p.model, mask, meta)
        else:
            hardened = apply_mask(p.model, target.feature, mask, ndim, meta)
    else:
        hardened = p.model  # nothing helps: the original graph, unchanged
    stages["surgery"] = stages.get("surgery", 0.0) + time.perf_counter() - t

    t = time.perf_counter()
    hard = cur_runner if changed else runner
    clean_h = accuracy(hard.session, val.x, val.y, feed, logits, config.batch_size)
    adv_transfer = accuracy(hard.session, adv_val0, val.y, feed, logits, config.batch_size)
    adv_adaptive = None
    if config.adaptive:
        adv_h = _craft(p, hard, val, " hardened (adaptive)") if changed else adv_val0
        adv_adaptive = accuracy(hard.session, adv_h, val.y, feed, logits, config.batch_size)
    stages["evaluation"] += time.perf_counter() - t
    if config.rounds == 1 and rounds and rounds[0]["added"]:
        rounds[0].update(clean_accuracy=clean_h, adversarial_accuracy_before=adv_o,
                         adversarial_accuracy_after=adv_transfer)

    t = time.perf_counter()
    save_model(hardened, out_path, external=uses_external_data(model_path))
    stages["write"] = time.perf_counter() - t

    hashes = {"model": sha256_file(model_path)}
    if not isinstance(data, Dataset) and Path(data).is_file():
        hashes["data"] = sha256_file(data)
    report = HardenReport(
        model=str(model_path), output=str(out_path), feature_tensor=target.feature, features=width,
        masked=masked, newly_masked=masked - previously, fraction=masked / width if width else 0.0,
        score=config.score, attack=dict(p.attack.to_dict(), fallback=p.fallback),
        clean_accuracy={"original": clean_o, "hardened": clean_h},
        adversarial_accuracy={"original": adv_o, "hardened_transfer": adv_transfer, "hardened_adaptive": adv_adaptive},
        calibration=calib_figures, samples={"calibration": len(p.calib), "validation": len(val)},
        seconds=round(time.perf_counter() - t_start, 3), stages={k: round(v, 3) for k, v in stages.items()},
        providers=list(p.providers), device=p.device, seed=config.seed, versions=versions(), inputs_sha256=hashes,
        mask_added=changed, max_clean_drop=config.max_clean_drop,
        budget_confidence=config.budget_confidence if config.max_clean_drop is not None else None, rounds=rounds,
        curve=[c.to_dict() for c in curve] if curve else None,
    )
    if config.plot:
        from .report import plot_sweep

        plot_sweep({"model": str(model_path), "curves": {config.score: report.curve},
                    "scores": {config.score: score_features(stats, config.score).tolist()},
                    "chosen": {config.score: {"masked": masked, "fraction": report.fraction,
                                              "clean_accuracy": clean_h, "adversarial_accuracy": adv_transfer}},
                    "best": {"score": config.score}}, config.plot)
    return report


def _num_classes(runner: Runner, ds: Dataset) -> int:
    """Width of the logits, read from one real forward pass (works for any head)."""
    from .runtime import run_batch

    (logits,) = run_batch(runner.session, runner.feed(ds.x[:1]), [runner.logits])
    return int(np.prod(logits.shape[1:]))
