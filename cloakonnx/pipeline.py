"""What every command shares: loading and checking a model with its data, the split, the choice of
the attack and of the backend that runs it, and ``Prepared``, what a masking command starts from.

``harden``, ``sweep``, ``evaluate`` and ``check`` are peers above this module; none imports another.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from .attacks import ATTACKS, AttackConfig
from .backend import LocalBackend
from .batching import BatchChoice
from .config import CommonConfig, MaskConfig
from .curve import validation_needed
from .data import Dataset, ImageTransform, load_data, split, validate
from .errors import CloakError
from .graph import Target, fixed_size, load_model, resolve_target, select_input, show_shape
from .runner import Runner
from .runtime import resolve_threads, use_threads
from .timing import StageTimer

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_checked(data: str | Path | Dataset, runner: Runner, config: CommonConfig) -> tuple[Dataset, int]:
    """The data, checked against the model (shape, NaN, box) and its classes (labels); and the
    number of classes. A shape given with --input-shapes must match the data's in all but the batch
    dim; an image folder is resized to its H,W unless --size is given."""
    bounds = config.preprocess.bounds
    shape = runner.input.shape
    given = config.input_shapes.get(runner.input.name)
    if isinstance(data, Dataset):
        ds = data
    else:
        channels = (fixed_size(shape[1]) or 3) if len(shape) == 4 else 3
        from_shapes = given is not None and len(given) == 4 and config.resize is None and config.crop is None
        size = config.image_size or (tuple(given[2:]) if from_shapes else None)
        ds = load_data(data, size, channels, bounds, ImageTransform(size, config.resize, config.crop),
                       config.data_workers or min(4, resolve_threads(config.threads)))
    if given is not None and tuple(ds.x.shape[1:]) != tuple(given[1:]):
        raise CloakError(f"--input-shapes gives {runner.input.name!r} as {show_shape(given)}, but the data's samples "
                         f"are {show_shape(ds.x.shape[1:])} (x is {tuple(ds.x.shape)}): they must agree in every "
                         "dim but the batch")
    ds = validate(ds, shape, bounds, None)
    n_classes = runner.num_classes(ds)
    validate(ds, shape, bounds, n_classes)
    return ds, n_classes


def choose_attack(runner: Runner, wanted: AttackConfig) -> tuple[AttackConfig, str | None]:
    """The attack to use: the one asked for, or Square through onnxruntime when the torch executor
    cannot differentiate this graph (and then say why)."""
    cls = ATTACKS.get(wanted.name)
    if runner.torch_model is not None or cls is None or not cls.needs_gradients:
        return wanted, None
    reason = f"the torch executor lacks {', '.join(f'{o} (opset {v})' for o, v in runner.unsupported.ops)}"
    log.warning("%s: crafting with the gradient-free Square attack through onnxruntime instead of %s",
                reason, wanted.name)
    return replace(wanted, name="square", norm="linf"), reason


@dataclass
class Prepared:
    """What every command that masks a model needs, loaded and checked once."""

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
    backend: LocalBackend  # or distributed.RayBackend: where the attacks run
    threads: int  # torch and onnxruntime intra-op threads (--threads)

    def adversarial(self, runner: Runner, ds: Dataset, desc: str) -> np.ndarray:
        """``ds`` attacked through ``runner`` (the original, or a hardened version) with the chosen attack."""
        return self.backend.craft(runner, self.attack, ds, self.device, desc, self.attack_batch.size)

    def calibrate(self, runner: Runner, ort_batch_size: int, timer: StageTimer, desc: str = ""):
        """Attack the calibration split through ``runner`` and stream the feature statistics:
        (FeatureStats, clean accuracy, adversarial accuracy) on the calibration split."""
        weight = self.target.head.weight if self.target.head is not None else None
        return self.backend.calibrate(runner, self.calib, self.attack, self.attack_batch.size, self.device,
                                      self.target.feature, self.target.logits, weight, ort_batch_size,
                                      f"attack calibration{desc}", timer)

    def close(self) -> None:
        """Release the backend (Ray's workers)."""
        self.backend.close()

    def runner_for(self, model: onnx.ModelProto, config: CommonConfig) -> Runner:
        """A Runner for a rewritten copy of the model (same logits, feature tensor and settings)."""
        return Runner.for_config(model, self.target.logits, self.target.runner_outputs, config, self.device)


def prepare(model_path: str | Path, data: str | Path | Dataset, config: MaskConfig) -> Prepared:
    """Load and validate the model and data, split them, and choose the attack."""
    import torch

    from .runtime import resolve_providers

    config.validate()
    threads = use_threads(config.threads)
    model_path = Path(model_path)
    model = load_model(model_path)
    target = resolve_target(model, config.feature_tensor, config.logits)
    select_input(model, config.input_name, config.input_shapes)
    device = resolve_device(config.device)
    providers = resolve_providers(config.providers)
    torch.manual_seed(config.seed)
    if target.head is not None and target.logits != target.head.logits:
        log.info("the output %r holds probabilities (a Softmax of the head): the attacks use the head's own output %r",
                 target.head.logits, target.logits)
    runner = Runner.for_config(model, target.logits, target.runner_outputs, config, device)
    ds, _ = load_checked(data, runner, config)
    calib, val = split(ds, validation_share(config, len(ds)), config.seed, val_max=config.val_max)
    log.info("model %s: feature tensor %r, %s; %d calibration / %d validation samples; providers %s; torch on %s",
             model_path.name, target.feature, f"{target.head.kind} head" if target.head else "custom tensor",
             len(calib), len(val), ", ".join(providers), device)
    attack, fallback = choose_attack(runner, config.attack)
    batch = runner.attack_batch(attack.batch_size, attack.name, ds.x.shape[1:])
    attack = replace(attack, batch_size=batch.size)  # the report records the size used
    backend = open_backend(config, device)
    return Prepared(model_path, model, target, runner, calib, val, attack, fallback, batch, device, providers,
                    backend, threads)


SIZED_FOR_BROKEN = 2  # validation is sized so that a change breaking this many predictions can pass the bound


def validation_share(config: MaskConfig, n: int) -> float:
    """``--val-split``, enlarged (up to half the data) when a choice under a clean budget with a
    confidence bound needs more validation samples than that to pass a change that breaks
    ``SIZED_FOR_BROKEN`` correct predictions (almost every useful change breaks one or two)."""
    budget = config.selection_budget()
    if budget is None or not config.budget_confidence or n == 0:
        return config.val_split
    needed = validation_needed(budget, config.budget_confidence, SIZED_FOR_BROKEN)
    if needed is None:
        return config.val_split
    share = min(0.5, needed / n)
    if share <= config.val_split:
        return config.val_split
    log.info("validation split enlarged to %d of %d samples: a %g-point clean budget at confidence %g needs %d "
             "for a change that breaks %d correct predictions to pass", round(share * n), n, budget,
             config.budget_confidence, needed, SIZED_FOR_BROKEN)
    return share


def open_backend(config: CommonConfig, device: str):
    """Where the attacks run: on the Ray cluster of ``config.ray``, or in this process."""
    if config.ray is None:
        return LocalBackend()
    from .distributed import RayBackend

    return RayBackend(config.ray, device)
