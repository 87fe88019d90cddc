"""What every command shares: the Runner (one model as an onnxruntime session and a torch callable),
loading and checking a model with its data, crafting, calibrating, accuracy, and a stage timer.

``harden``, ``sweep``, ``evaluate`` and ``check`` are peers above this module; none imports another.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .attacks import ATTACKS, AttackConfig
from .batching import BatchChoice
from .config import CommonConfig, MaskConfig
from .data import Dataset, ImageTransform, Preprocess, load_data, split, validate
from .errors import CloakError
from .graph import Target, fixed_size, is_qdq, load_model, resolve_target, select_input, show_shape, with_outputs
from .runtime import batch_size_for, run_batch
from .sources import DATA_WAIT, batch_bounds, prefetched

log = logging.getLogger(__name__)


class StageTimer:
    """Wall-clock and process-CPU seconds per named stage, added up over repeated entries.

    The report shows the wall times; benchmarks on shared machines read the CPU times."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu

    @contextmanager
    def data_wait(self):
        """Adds the time spent blocked on data while inside (``sources.DATA_WAIT``) as the stage
        "data wait"; it overlaps the stages it happened in."""
        before = DATA_WAIT.seconds
        try:
            yield
        finally:
            self.wall["data wait"] = self.wall.get("data wait", 0.0) + DATA_WAIT.seconds - before

    def rounded(self) -> tuple[dict[str, float], dict[str, float]]:
        return ({k: round(v, 3) for k, v in self.wall.items()}, {k: round(v, 3) for k, v in self.cpu.items()})


def predict(session, x: np.ndarray, feed: Callable[[np.ndarray], np.ndarray], logits: str | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Predicted classes for box-space inputs ``x``; ``feed`` maps them to the model's input."""
    bs = batch_size_for(session, batch_size)
    outputs = [logits] if logits else [session.get_outputs()[0].name]
    preds = []
    for xb in prefetched(x, batch_bounds(len(x), bs)):
        (out,) = run_batch(session, feed(xb), outputs)
        preds.append(out.reshape(len(out), -1).argmax(1))
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def accuracy(session, x: np.ndarray, y: np.ndarray, feed, logits: str | None = None, batch_size: int = 256) -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict(session, x, feed, logits, batch_size) == y).mean())


def collect_features(session, feature: str, x: np.ndarray, feed, batch_size: int = 256) -> np.ndarray:
    """The feature tensor for every sample of ``x`` (used for the validation split only)."""
    bs = batch_size_for(session, batch_size)
    parts = [run_batch(session, feed(xb), [feature])[0] for xb in prefetched(x, batch_bounds(len(x), bs))]
    f = np.concatenate(parts)
    return f.reshape(len(f), -1)


class Runner:
    """One model two ways: an onnxruntime session (the truth at serving time) and a torch callable
    with gradients (for attacks), both taking box-space inputs. ``input_shapes`` (--input-shapes) are
    checked against the model here, before any session is built; the input's shape is the given one."""

    def __init__(self, model: onnx.ModelProto, logits: str, extra_outputs: Sequence[str], preprocess: Preprocess,
                 input_name: str | None = None, providers: Sequence[str] | None = None, device: str = "cpu",
                 input_shapes: dict | None = None):
        from .runtime import make_session
        from .torch_exec import OnnxTorchModule, UnsupportedOpsError

        self.model = model
        self._args = dict(logits=logits, extra_outputs=tuple(extra_outputs), preprocess=preprocess,
                          input_name=input_name, providers=providers, device=device, input_shapes=input_shapes)
        self.cluster = None  # a distributed.Cluster: attacks then run on its workers
        declared = select_input(model, input_name)
        self.input = select_input(model, input_name, input_shapes)
        self.preprocess = preprocess
        self.logits = logits
        runnable = with_outputs(model, list(extra_outputs)) if extra_outputs else model
        self.session = make_session(runnable, providers)
        self.input_dtype = np.dtype(self.input.dtype) if self.input.dtype != "unknown" else np.dtype(np.float32)
        self.device = device
        self.unsupported: UnsupportedOpsError | None = None
        self.torch_model = None
        try:
            module = OnnxTorchModule(model, outputs=[logits]).to(device).eval()
            self.torch_model = preprocess.torch_wrap(module, len(self.input.shape))
            self.computes_in_float32 = bool(getattr(module, "computes_in_float32", False))
        except UnsupportedOpsError as exc:
            self.unsupported = exc
            self.computes_in_float32 = False
        self._batch_choices: dict = {}
        self.quantized = is_qdq(model)
        # the model's declared batch: the data sets the batch, whatever batch --input-shapes was written with
        self.fixed_batch = fixed_size(declared.shape[0]) if declared.shape else None

    @classmethod
    def for_config(cls, model: onnx.ModelProto, logits: str, extra_outputs: Sequence[str], config: CommonConfig,
                   device: str) -> "Runner":
        return cls(model, logits, extra_outputs, config.preprocess, config.input_name, config.providers, device,
                   config.input_shapes)

    def rebuild_args(self) -> dict:
        """The arguments that rebuild this Runner from its model elsewhere (a Ray worker)."""
        return dict(self._args)

    def attack_batch(self, requested: int | None, attack_name: str, sample_shape: tuple[int, ...]) -> BatchChoice:
        """The attack batch: the model's fixed batch, the user's ``requested`` size, or for gradient
        attacks one measured to fit the device."""
        from .batching import CPU_CAP, auto_batch

        if self.fixed_batch:
            return BatchChoice(self.fixed_batch, None, None, "the model's fixed batch")
        if requested:
            return BatchChoice(requested, None, None, "--batch-size")
        cls = ATTACKS.get(attack_name)
        if self.torch_model is None or cls is None or not cls.needs_gradients:
            return BatchChoice(CPU_CAP, None, None, "gradient-free: no backward pass to size")
        key = (self.device, tuple(sample_shape))
        if key not in self._batch_choices:
            choice = auto_batch(self.torch_model, tuple(sample_shape), self.device, self.preprocess.bounds)
            log.info("attack batch %d (%s)", choice.size, choice.reason)
            self._batch_choices[key] = choice
        return self._batch_choices[key]

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Box space -> the model's input (normalisation and dtype)."""
        return self.preprocess.to_model(x).astype(self.input_dtype, copy=False)

    def ort_model(self):
        """A torch-callable view of the onnxruntime session (no gradients), for gradient-free attacks."""
        import torch

        def call(x: "torch.Tensor") -> "torch.Tensor":
            xn = x.detach().cpu().numpy()
            bs = batch_size_for(self.session, 256)
            outs = [run_batch(self.session, self.feed(xn[s : s + bs]), [self.logits])[0] for s in range(0, len(xn), bs)]
            out = np.concatenate(outs).reshape(len(xn), -1).astype(np.float32)
            return torch.from_numpy(out).to(x.device)

        return call

    def model_for(self, attack_name: str):
        """The callable an attack needs: the torch graph for gradient attacks, onnxruntime otherwise."""
        cls = ATTACKS.get(attack_name)
        if cls is not None and not cls.needs_gradients:
            return self.ort_model()
        if self.torch_model is None:
            raise CloakError(f"{self.unsupported}; use a gradient-free attack (--attack square)")
        return self.torch_model

    def craft(self, config: AttackConfig, ds: Dataset, device: str, desc: str, batch: int) -> np.ndarray:
        """Adversarial versions of ``ds.x`` crafted on this model (through the graph it runs)."""
        from .sources import OutputRows

        if self.cluster is not None:
            return self.cluster.craft(self, ds, config, batch, device, desc)
        out = OutputRows(ds.x, "adversarial")  # numpy for numpy inputs, else a temporary file
        for _, _, adv in self.craft_batches(config, ds, device, desc, batch):
            out.write(adv)
        return out.result()

    def craft_batches(self, config: AttackConfig, ds: Dataset, device: str, desc: str, batch: int):
        """``craft``, a batch at a time: ``(start, clean batch, adversarial batch)``."""
        from .attacks import craft_batches

        return craft_batches(self.model_for(config.name), config, ds.x, ds.y, self.preprocess.bounds, device, desc,
                             batch, fixed_batch=bool(self.fixed_batch), index=ds.index)

    def survivors(self, source: "Runner", config: AttackConfig, ds: Dataset, device: str, batch: int,
                  ort_batch_size: int, desc: str = "") -> np.ndarray:
        """Which samples of ``ds`` this model still classifies correctly after ``config`` crafted on
        ``source``, a batch at a time: one bit per sample is all that is kept."""
        return np.concatenate([self.predict(adv, ort_batch_size) == ds.y[start : start + len(adv)]
                               for start, _, adv in source.craft_batches(config, ds, device, desc, batch)])

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return predict(self.session, x, self.feed, self.logits, batch_size)

    def accuracy(self, ds: Dataset, batch_size: int = 256, x: np.ndarray | None = None) -> float:
        """Accuracy on ``ds`` (or on ``x``, e.g. adversarial versions of ``ds.x``, with ``ds.y``)."""
        return accuracy(self.session, ds.x if x is None else x, ds.y, self.feed, self.logits, batch_size)

    def num_classes(self, ds: Dataset) -> int:
        """Width of the logits, read from one real forward pass (works for any head)."""
        (logits,) = run_batch(self.session, self.feed(ds.x[:1]), [self.logits])
        return int(np.prod(logits.shape[1:]))


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
                       config.data_workers)
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

    def craft(self, runner: Runner, ds: Dataset, desc: str) -> np.ndarray:
        """``ds`` attacked through ``runner`` (the original, or a hardened version) with the chosen attack."""
        return runner.craft(self.attack, ds, self.device, desc, self.attack_batch.size)

    def close(self) -> None:
        """Release the Ray workers, if any."""
        if self.runner.cluster is not None:
            self.runner.cluster.close()

    def runner_for(self, model: onnx.ModelProto, config: CommonConfig) -> Runner:
        """A Runner for a rewritten copy of the model (same logits, feature tensor, settings and cluster)."""
        runner = Runner.for_config(model, self.target.logits, [self.target.feature], config, self.device)
        runner.cluster = self.runner.cluster
        return runner


def prepare(model_path: str | Path, data: str | Path | Dataset, config: MaskConfig) -> Prepared:
    """Load and validate the model and data, split them, and choose the attack."""
    import torch

    from .runtime import resolve_providers

    config.validate()
    model_path = Path(model_path)
    model = load_model(model_path)
    target = resolve_target(model, config.feature_tensor, config.logits)
    select_input(model, config.input_name, config.input_shapes)
    device = resolve_device(config.device)
    providers = resolve_providers(config.providers)
    torch.manual_seed(config.seed)
    runner = Runner.for_config(model, target.logits, [target.feature], config, device)
    ds, _ = load_checked(data, runner, config)
    calib, val = split(ds, config.val_split, config.seed, val_max=config.val_max)
    log.info("model %s: feature tensor %r, %s; %d calibration / %d validation samples; providers %s; torch on %s",
             model_path.name, target.feature, f"{target.head.kind} head" if target.head else "custom tensor",
             len(calib), len(val), ", ".join(providers), device)
    attack, fallback = choose_attack(runner, config.attack)
    batch = runner.attack_batch(attack.batch_size, attack.name, ds.x.shape[1:])
    attack = replace(attack, batch_size=batch.size)  # the report records the size used
    runner.cluster = open_cluster(config, device)
    return Prepared(model_path, model, target, runner, calib, val, attack, fallback, batch, device, providers)


def open_cluster(config: CommonConfig, device: str):
    """The Ray cluster the attacks run on (``config.ray``), or None to run them here."""
    if config.ray is None:
        return None
    from .distributed import Cluster

    return Cluster(config.ray, device, Runner)


def calibrate(p: Prepared, runner: Runner, ort_batch_size: int, timer: StageTimer, desc: str = ""):
    """Attack the calibration split through ``runner`` and stream the feature statistics:
    (FeatureStats, clean accuracy, adversarial accuracy) on the calibration split."""
    from .stats import StatsStream

    weight = p.target.head.weight if p.target.head is not None else None
    if runner.cluster is not None:  # attack and statistics both run on the workers
        with timer("attack"):
            return runner.cluster.calibrate(runner, p.calib, p.attack, p.attack_batch.size, p.device, p.target.feature,
                                            p.target.logits, weight, ort_batch_size, f"attack calibration{desc}")
    stream = StatsStream(runner.session, p.target.feature, p.target.logits, runner.feed, ort_batch_size, weight)
    batches = runner.craft_batches(p.attack, p.calib, p.device, f"attack calibration{desc}", p.attack_batch.size)
    while True:  # one batch at a time: attack it, add its statistics, drop it
        with timer("attack"):
            item = next(batches, None)
        if item is None:
            break
        start, clean, adv = item
        with timer("statistics"):
            stream.add(clean, adv, p.calib.y[start : start + len(adv)])
    with timer("statistics"):
        return stream.finish()


@dataclass
class Baseline:
    """The original model on the validation split; ``adv`` was crafted on it (the transfer set)."""

    clean: float
    adv: np.ndarray
    adv_accuracy: float


@dataclass
class MaskSearch:
    """Where the search for a mask ended: the mask per tensor, and the model hardened so far.

    ``masks`` holds every masked tensor's final values (flat: per feature, or per channel of a 4-D
    tensor), earlier masks of the input model included; ``primary`` is the tensor the report's flat
    fields describe (the head's input when it is masked)."""

    primary: str
    runner: Runner  # the model hardened so far (the original when nothing was added)
    masks: dict[str, np.ndarray | None]
    ranks: dict[str, int]
    previously: int  # features already zeroed in the input model, over all masked tensors
    widths: dict[str, int] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    curve: list | None = None
    scores: np.ndarray | None = None
    learning: dict | None = None  # seconds, steps and loss history of a learned mask

    @property
    def mask(self) -> np.ndarray | None:
        return self.masks.get(self.primary)

    @property
    def width(self) -> int:
        return sum(self.widths.values())

    @property
    def masked(self) -> int:
        zeros = sum(int((m == 0).sum()) for m in self.masks.values() if m is not None)
        return zeros if any(m is not None for m in self.masks.values()) else self.previously

    @property
    def changed(self) -> bool:
        return self.masked > self.previously

    def describe(self) -> list[dict]:
        """One entry per masked tensor: its width and how many values are zeroed or scaled."""
        return [{"tensor": t, "rank": self.ranks.get(t, 2), "width": self.widths.get(t, 0),
                 "zeroed": int((m == 0).sum()), "scaled": int(((m > 0) & (m < 1)).sum())}
                for t, m in self.masks.items() if m is not None]
