"""Accuracy of ONNX models through onnxruntime: the numbers that hold at serving time."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from .attacks.base import AttackConfig
from .data import Dataset, Preprocess
from .errors import CloakError
from .model import is_qdq, select_input
from .runtime import batch_size_for, run_batch

log = logging.getLogger(__name__)


def predict(session, x: np.ndarray, feed: Callable[[np.ndarray], np.ndarray], logits: str | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Predicted classes for box-space inputs ``x``; ``feed`` maps them to the model's input."""
    bs = batch_size_for(session, batch_size)
    outputs = [logits] if logits else [session.get_outputs()[0].name]
    preds = []
    for s in range(0, len(x), bs):
        (out,) = run_batch(session, feed(x[s : s + bs]), outputs)
        preds.append(out.reshape(len(out), -1).argmax(1))
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def accuracy(session, x: np.ndarray, y: np.ndarray, feed, logits: str | None = None, batch_size: int = 256) -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict(session, x, feed, logits, batch_size) == y).mean())


class Runner:
    """One model two ways: an onnxruntime session (the truth at serving time) and a torch callable
    with gradients (for attacks), both taking box-space inputs."""

    def __init__(self, model: onnx.ModelProto, logits: str, extra_outputs: Sequence[str], preprocess: Preprocess,
                 input_name: str | None = None, providers: Sequence[str] | None = None, device: str = "cpu"):
        from .runtime import make_session
        from .stats import with_outputs
        from .torch_exec import OnnxTorchModule, UnsupportedOpsError

        self.input = select_input(model, input_name)
        self.preprocess = preprocess
        self.logits = logits
        self.session = make_session(with_outputs(model, list(extra_outputs)) if extra_outputs else model, providers)
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
        first = self.input.shape[0] if self.input.shape else None
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None

    def attack_batch(self, requested: int | None, attack_name: str, sample_shape: tuple[int, ...]):
        """The attack batch (a :class:`~cloakonnx.batching.BatchChoice`): the model's fixed batch, the
        user's ``requested`` size, or for gradient attacks one measured to fit the device."""
        from .attacks import ATTACKS
        from .batching import CPU_CAP, BatchChoice, auto_batch

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
        from .attacks import ATTACKS
        from .errors import CloakError

        cls = ATTACKS.get(attack_name)
        if cls is not None and not cls.needs_gradients:
            return self.ort_model()
        if self.torch_model is None:
            raise CloakError(f"{self.unsupported}; use a gradient-free attack (--attack square)")
        return self.torch_model


# --------------------------------------------------------------------------------------------
# cloakonnx evaluate: what a (hardened) model resists, under every threat model
# --------------------------------------------------------------------------------------------

# The fixed "standard" set, in the spirit of AutoAttack: two APGD losses and Square, fixed settings.
STANDARD_PRESET = (
    ("apgd-ce", dict(steps=100, restarts=1)),
    ("apgd-dlr", dict(steps=100, restarts=1)),
    ("square", dict(queries=5000)),
)


@dataclass
class EvaluateConfig:
    """Which attacks, at which budgets, against which threat models."""

    attacks: tuple[str, ...] = ("fgsm", "pgd", "square")
    eps: tuple[float, ...] = (8 / 255,)
    norm: str = "linf"
    steps: int = 20
    restarts: int = 1
    queries: int = 1000
    preset: str | None = None  # "standard" overrides attacks and their settings
    reference: Path | None = None  # the unhardened model, for transfer attacks
    preprocess: Preprocess = field(default_factory=Preprocess)
    input_name: str | None = None
    output_name: str | None = None
    image_size: tuple[int, int] | None = None
    max_samples: int | None = None
    seed: int = 0
    batch_size: int | None = None  # attack batch; None: sized to the device
    device: str | None = None
    providers: Sequence[str] | None = None
    sanity: bool = True  # also run the large-eps check


@dataclass
class EvaluateReport:
    model: str
    reference: str | None
    samples: int
    norm: str
    eps: list[float]
    clean_accuracy: float
    results: list[dict]  # {eps, attack, threat, accuracy}
    robust_accuracy: dict  # str(eps) -> worst case over every attack and threat, per sample
    checks: list[dict]  # {name, ok, detail}
    attacks: dict  # name -> settings
    notes: list[str]
    seconds: float
    providers: list[str]
    device: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def _attack_configs(config: EvaluateConfig) -> list[AttackConfig]:
    from .attacks import ATTACKS

    if config.preset not in (None, "standard"):
        raise CloakError(f"unknown --preset {config.preset!r}; the only preset is 'standard'")
    plan = STANDARD_PRESET if config.preset else tuple(
        (a, dict(steps=config.steps, restarts=config.restarts, queries=config.queries)) for a in config.attacks)
    out = []
    for name, settings in plan:
        if name not in ATTACKS:
            raise CloakError(f"unknown attack {name!r}; choose from {', '.join(sorted(ATTACKS))}")
        out.append(AttackConfig(name=name, eps=config.eps[0], norm=config.norm, seed=config.seed,
                                batch_size=config.batch_size, **settings))
    return out


def evaluate(model_path: str | Path, data: str | Path | Dataset, config: EvaluateConfig) -> EvaluateReport:
    """Clean accuracy and accuracy under adaptive, transfer and gradient-free attacks, for each eps."""
    import time

    import torch

    from .attacks import ATTACKS, craft
    from .data import load_data, validate
    from .model import load_model, logits_output
    from .runtime import resolve_providers

    t0 = time.perf_counter()
    if not config.eps:
        raise CloakError("--eps needs at least one value")
    bounds = config.preprocess.bounds
    attack_cfgs = _attack_configs(config)
    for eps in config.eps:
        for cfg in attack_cfgs:
            replace(cfg, eps=eps).validate(bounds)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    providers = resolve_providers(config.providers)

    model = load_model(model_path)
    logits = logits_output(model, config.output_name)
    runner = Runner(model, logits, [], config.preprocess, config.input_name, config.providers, device)
    reference = None
    if config.reference is not None:
        ref_model = load_model(config.reference)
        ref_logits = logits_output(ref_model, config.output_name)
        reference = Runner(ref_model, ref_logits, [], config.preprocess, config.input_name, config.providers, device)

    if isinstance(data, Dataset):
        ds = data
    else:
        shape = runner.input.shape
        channels = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else 3
        ds = load_data(data, config.image_size, channels, bounds)
    validate(ds, runner.input.shape, bounds, None)
    n_classes = int(run_batch(runner.session, runner.feed(ds.x[:1]), [logits])[0].reshape(1, -1).shape[1])
    validate(ds, runner.input.shape, bounds, n_classes)
    if config.max_samples is not None and len(ds) > config.max_samples:
        ds = ds.subset(np.sort(np.random.default_rng(config.seed).permutation(len(ds))[: config.max_samples]))
    notes: list[str] = []
    if runner.torch_model is None:
        notes.append(f"{runner.unsupported}: gradient attacks were skipped, only gradient-free ones ran")
    if runner.computes_in_float32:
        notes.append("the model is fp16: gradients were computed in float32 by the torch executor")
    if runner.quantized:
        notes.append("the model is QDQ-quantized: gradients pass its rounding straight through (BPDA, Athalye et "
                     "al. 2018)")

    clean_pred = predict(runner.session, ds.x, runner.feed, logits)
    clean = float((clean_pred == ds.y).mean())
    results: list[dict] = []
    robust: dict[str, float] = {}
    for eps in config.eps:
        survived = clean_pred == ds.y
        for base in attack_cfgs:
            cfg = replace(base, eps=eps)
            gradient_free = not ATTACKS[cfg.name].needs_gradients
            sources = [("gradient-free" if gradient_free else "adaptive", runner)]
            if reference is not None and not gradient_free:
                sources.append(("transfer", reference))
            for threat, source in sources:
                if source.torch_model is None and not gradient_free:
                    continue
                batch = source.attack_batch(config.batch_size, cfg.name, ds.x.shape[1:]).size
                adv = craft(source.model_for(cfg.name), cfg, ds.x, ds.y, bounds, device,
                            f"{cfg.name} eps={eps:g} {threat}", batch, fixed_batch=bool(source.fixed_batch))
                ok = predict(runner.session, adv, runner.feed, logits) == ds.y
                survived &= ok
                results.append({"eps": eps, "attack": cfg.name, "threat": threat, "accuracy": float(ok.mean())})
        robust[repr(eps)] = float(survived.mean())

    checks = sanity_checks(results, robust, clean, len(ds))
    if config.sanity and runner.torch_model is not None:
        checks.append(_large_eps_check(runner, ds, config, bounds, device, n_classes, logits))
    for c in checks:
        if not c["ok"]:
            log.warning("SANITY CHECK FAILED: %s: %s", c["name"], c["detail"])
    return EvaluateReport(
        model=str(model_path), reference=str(config.reference) if config.reference else None, samples=len(ds),
        norm=config.norm, eps=list(config.eps), clean_accuracy=clean, results=results, robust_accuracy=robust,
        checks=checks, attacks={c.name: c.to_dict() for c in attack_cfgs}, notes=notes,
        seconds=round(time.perf_counter() - t0, 3), providers=list(providers), device=device, seed=config.seed,
    )


def sanity_checks(results: list[dict], robust: dict, clean: float, n: int) -> list[dict]:
    """The checks the field recommends (Carlini et al. 2019): failures hint at masked gradients or bugs."""
    tol = 1.0 / max(n, 1) + 0.01
    checks = []
    by_series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in results:
        by_series.setdefault((r["attack"], r["threat"]), []).append((r["eps"], r["accuracy"]))
    bad = [f"{a} ({t})" for (a, t), pts in by_series.items()
           if any(b[1] > a_[1] + tol for a_, b in zip(sorted(pts), sorted(pts)[1:]))]
    checks.append({"name": "accuracy falls as eps grows", "ok": not bad,
                   "detail": "rises with eps for " + ", ".join(bad) if bad else "monotone for every attack"})
    above_clean = [f"{r['attack']} ({r['threat']}) eps={r['eps']:g}" for r in results if r["accuracy"] > clean + tol]
    checks.append({"name": "no attack beats clean accuracy", "ok": not above_clean,
                   "detail": ", ".join(above_clean) if above_clean else "ok"})
    weaker = []
    for eps in sorted({r["eps"] for r in results}):
        here = [r for r in results if r["eps"] == eps]
        white = [r["accuracy"] for r in here if r["threat"] == "adaptive"]
        others = [r for r in here if r["threat"] != "adaptive"]
        if white:
            for r in others:
                if min(white) > r["accuracy"] + tol:
                    weaker.append(f"eps={eps:g}: white-box {100 * min(white):.1f}% > {r['threat']} "
                                  f"{r['attack']} {100 * r['accuracy']:.1f}%")
    checks.append({"name": "white-box is no weaker than transfer or gradient-free", "ok": not weaker,
                   "detail": "; ".join(weaker) if weaker else "ok"})
    return checks


def _large_eps_check(runner: Runner, ds: Dataset, config: EvaluateConfig, bounds, device, n_classes: int,
                     logits: str) -> dict:
    """At a budget that covers half the box, a working attack brings accuracy to about chance."""
    from .attacks import craft

    width = bounds[1] - bounds[0]
    sub = ds.subset(np.arange(min(len(ds), 200)))
    eps = 0.5 * width if config.norm == "linf" else 0.5 * width * float(np.sqrt(np.prod(ds.x.shape[1:])))
    cfg = AttackConfig(name="pgd", eps=eps, norm=config.norm, steps=20, seed=config.seed, batch_size=config.batch_size)
    batch = runner.attack_batch(config.batch_size, "pgd", sub.x.shape[1:]).size
    adv = craft(runner.torch_model, cfg, sub.x, sub.y, bounds, device, "sanity: large eps", batch,
                fixed_batch=bool(runner.fixed_batch))
    acc = float((predict(runner.session, adv, runner.feed, logits) == sub.y).mean())
    chance = 1.0 / max(n_classes, 1)
    ok = acc <= chance + 0.1
    return {"name": "a large eps brings accuracy to about chance", "ok": ok,
            "detail": f"PGD at eps={eps:g}: {100 * acc:.1f}% (chance {100 * chance:.1f}%)"}
