"""``cloakonnx evaluate``: what a (hardened) model resists, under every threat model, measured
through onnxruntime: the numbers that hold at serving time."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .attacks import ATTACKS, AttackConfig
from .config import EvaluateConfig
from .data import Dataset
from .errors import CloakError
from .graph import find_head, load_model, logits_output
from .pipeline import Runner, load_checked, open_cluster, resolve_device
from .runtime import resolve_providers, run_batch
from .sources import DATA_WAIT

log = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "EvaluateReport", "evaluate", "sanity_checks"]

# Fixed, documented sets with fixed settings, run AutoAttack's way: each attack only on the points
# still robust after the ones before it, so each row is the robust accuracy so far.
# The settings are the reference implementation's (fra31/auto-attack, 100 iterations; torchattacks'
# AutoAttack class keeps its attacks' default of 10). "standard" is AutoAttack's standard version
# (Croce & Hein 2020): APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square with 5,000 queries.
# "plus" is its plus version: APGD-CE, APGD-DLR and untargeted FAB with 5 restarts, Square, then
# APGD-T and FAB-T. "fast", for quick iterations: APGD-CE and APGD-T.
PRESETS = {
    "standard": (("apgd-ce", dict(steps=100, restarts=1)), ("apgd-t", dict(steps=100, restarts=1)),
                 ("fab-t", dict(steps=100, restarts=1)), ("square", dict(queries=5000))),
    "plus": (("apgd-ce", dict(steps=100, restarts=5)), ("apgd-dlr", dict(steps=100, restarts=5)),
             ("fab", dict(steps=100, restarts=5)), ("square", dict(queries=5000)),
             ("apgd-t", dict(steps=100, restarts=1)), ("fab-t", dict(steps=100, restarts=1))),
    "fast": (("apgd-ce", dict(steps=100, restarts=1)), ("apgd-t", dict(steps=100, restarts=1))),
}
THREAT_ORDER = ("adaptive", "transfer", "gradient-free")
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 3}  # DLR losses compare the top three logits


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
    failures: list[dict] = field(default_factory=list)  # {eps, attack, threat, error}: attacks that could not run
    # RobustBench-style: clean and robust accuracy, norm, eps, n, the attacks run, and whether a check
    # or an attack failed (then the evaluation may be unreliable)
    summary: dict = field(default_factory=dict)
    cumulative: bool = False  # presets: each row is the robust accuracy after that attack and the ones before
    providers: list[str] = field(default_factory=list)
    device: str = "cpu"
    seed: int = 0
    ray: dict | None = None  # with --ray: the cluster's address, the workers and the shards run
    data_wait_seconds: float = 0.0  # time blocked waiting for the next batch of data (part of ``seconds``)

    def to_dict(self) -> dict:
        return asdict(self)


def _attack_configs(config: EvaluateConfig) -> list[AttackConfig]:
    if config.preset is not None and config.preset not in PRESETS:
        raise CloakError(f"unknown --preset {config.preset!r}; choose from {', '.join(PRESETS)}")
    plan = PRESETS[config.preset] if config.preset else tuple((a, {}) for a in config.attacks)
    out = []
    for name, settings in plan:
        if name not in ATTACKS:
            raise CloakError(f"unknown attack {name!r}; choose from {', '.join(sorted(ATTACKS))}")
        if config.preset:  # fixed settings: only the norm and the batch come from the user
            cfg = AttackConfig(name=name, eps=config.eps[0], norm=config.attack.norm, seed=config.seed,
                               batch_size=config.attack.batch_size, **settings)
        else:
            cfg = replace(config.attack, name=name, eps=config.eps[0], seed=config.seed)
        out.append(cfg)
    return out


def evaluate(model_path: str | Path, data: str | Path | Dataset, config: EvaluateConfig) -> EvaluateReport:
    """Clean accuracy and accuracy under adaptive, transfer and gradient-free attacks, for each eps."""
    t0, waited = time.perf_counter(), DATA_WAIT.seconds
    config.validate()
    bounds = config.preprocess.bounds
    attack_cfgs = _attack_configs(config)
    for eps in config.eps:
        for cfg in attack_cfgs:
            replace(cfg, eps=eps).validate(bounds)
    device = resolve_device(config.device)
    providers = resolve_providers(config.providers)
    runner = _runner(model_path, config, device)
    reference = _runner(config.reference, config, device) if config.reference is not None else None
    ds, n_classes = load_checked(data, runner, config)
    if config.max_samples is not None and len(ds) > config.max_samples:
        ds = ds.subset(np.sort(np.random.default_rng(config.seed).permutation(len(ds))[: config.max_samples]))
    notes: list[str] = []
    runner = on_logits(runner, ds, config, device, notes)
    reference = on_logits(reference, ds, config, device, notes) if reference is not None else None
    cluster = open_cluster(config, device)
    for r in (runner, reference):
        if r is not None:
            r.cluster = cluster
    try:
        report = _evaluate(model_path, config, ds, n_classes, runner, reference, attack_cfgs, notes, device,
                           providers, t0)
        report.data_wait_seconds = round(DATA_WAIT.seconds - waited, 3)
        return report
    finally:
        if cluster is not None:
            cluster.close()


def _evaluate(model_path, config: EvaluateConfig, ds: Dataset, n_classes: int, runner: Runner,
              reference: Runner | None, attack_cfgs: list[AttackConfig], notes: list[str], device: str,
              providers, t0: float) -> EvaluateReport:
    """The attacks, the checks and the report (``evaluate`` after loading)."""
    if runner.torch_model is None:
        notes.append(f"{runner.unsupported}: gradient attacks were skipped, only gradient-free ones ran")
    if runner.computes_in_float32:
        notes.append("the model is fp16: gradients were computed in float32 by the torch executor")
    if runner.quantized:
        notes.append("the model is QDQ-quantized: gradients pass its rounding straight through (BPDA, Athalye et "
                     "al. 2018)")

    clean_pred = runner.predict(ds.x, config.ort_batch_size)
    clean = float((clean_pred == ds.y).mean())
    runnable = []
    for cfg in attack_cfgs:
        if n_classes < MIN_CLASSES.get(cfg.name, 0):
            notes.append(f"{cfg.name} was skipped: it needs at least {MIN_CLASSES[cfg.name]} classes, the model "
                         f"has {n_classes}")
        else:
            runnable.append(cfg)
    cumulative = config.preset is not None  # AutoAttack's way: each attack on the points still robust
    results: list[dict] = []
    failures: list[dict] = []
    robust: dict[str, float] = {}
    runs = [(base, threat, source) for base in runnable for threat, source in _sources(base.name, runner, reference)]
    if cumulative:  # AutoAttack's order: every white-box attack first, then transfer, then gradient-free
        runs.sort(key=lambda run: THREAT_ORDER.index(run[1]))
    for eps in config.eps:
        survived = clean_pred == ds.y
        for base, threat, source in runs:
            cfg = replace(base, eps=eps)
            idx = np.flatnonzero(survived) if cumulative else np.arange(len(ds))
            try:
                ok = _survivors(runner, source, cfg, ds.subset(idx), device, threat, config)
            except CloakError as exc:  # keep what finished; name what did not
                log.warning("%s (%s, eps=%g) failed: %s", cfg.name, threat, eps, exc)
                failures.append({"eps": eps, "attack": cfg.name, "threat": threat, "error": str(exc)})
                continue
            now = survived.copy() if cumulative else np.zeros(len(ds), bool)
            now[idx] = ok
            survived &= now
            results.append({"eps": eps, "attack": cfg.name, "threat": threat, "accuracy": float(now.mean())})
        robust[repr(eps)] = float(survived.mean())
    check_batch = (runner.attack_batch(config.attack.batch_size, "pgd", ds.x.shape[1:]).size
                   if runner.torch_model is not None else 1)
    checks = sanity_checks(results, robust, clean, len(ds), cumulative) + model_checks(runner, ds, check_batch)
    if config.sanity and runner.torch_model is not None:
        try:
            checks.append(_large_eps_check(runner, ds, config, device, n_classes))
        except CloakError as exc:
            failures.append({"eps": None, "attack": "pgd", "threat": "sanity: large eps", "error": str(exc)})
    if failures:
        notes.append(f"{len(failures)} attack run(s) failed (see failures): the robust accuracy is an upper bound")
    for c in checks:
        if not c["ok"]:
            log.warning("SANITY CHECK FAILED: %s: %s", c["name"], c["detail"])
    return EvaluateReport(
        model=str(model_path), reference=str(config.reference) if config.reference else None, samples=len(ds),
        norm=config.attack.norm, eps=list(config.eps), clean_accuracy=clean, results=results, robust_accuracy=robust,
        checks=checks, attacks={c.name: c.to_dict() for c in attack_cfgs}, notes=notes,
        seconds=round(time.perf_counter() - t0, 3), failures=failures, providers=list(providers), device=device,
        seed=config.seed, cumulative=cumulative, ray=runner.cluster.describe() if runner.cluster else None, summary={
            "clean_accuracy": clean, "robust_accuracy": robust, "norm": config.attack.norm, "eps": list(config.eps),
            "n": len(ds), "attacks": sorted({r["attack"] for r in results}),
            "unreliable": bool(failures) or not all(c["ok"] for c in checks)},
    )


def _survivors(runner: Runner, source: Runner, cfg: AttackConfig, ds: Dataset, device: str, threat: str,
               config: EvaluateConfig) -> np.ndarray:
    """Which samples of ``ds`` the model still classifies correctly after ``cfg`` crafted on ``source``."""
    if len(ds) == 0:
        return np.zeros(0, bool)
    batch = source.attack_batch(config.attack.batch_size, cfg.name, ds.x.shape[1:]).size
    desc = f"{cfg.name} eps={cfg.eps:g} {threat}"
    if source.cluster is not None:
        return source.cluster.survivors(runner, source, ds, cfg, batch, device, config.ort_batch_size, desc)
    return runner.survivors(source, cfg, ds, device, batch, config.ort_batch_size, desc)


def _sources(name: str, runner: Runner, reference: Runner | None) -> list[tuple[str, Runner]]:
    """Where an attack is crafted: on the model itself (adaptive, or gradient-free through
    onnxruntime), and on the reference model (transfer) for gradient attacks."""
    if not ATTACKS[name].needs_gradients:
        return [("gradient-free", runner)]
    return [(threat, source) for threat, source in (("adaptive", runner), ("transfer", reference))
            if source is not None and source.torch_model is not None]


def sanity_checks(results: list[dict], robust: dict, clean: float, n: int, cumulative: bool = False) -> list[dict]:
    """The checks the field recommends (Carlini et al. 2019): failures hint at masked gradients or bugs.
    With ``cumulative`` results (presets) the last check is AutoAttack's: a transfer or gradient-free
    attack must not break many points that the white-box attacks before it left robust."""
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
        if cumulative:  # rows are robust accuracy so far: a non-adaptive row must not break many more points
            previous = clean
            for r in here:
                if r["threat"] != "adaptive" and previous - r["accuracy"] > tol:
                    weaker.append(f"eps={eps:g}: {r['threat']} {r['attack']} broke {100 * (previous - r['accuracy']):.1f}% "
                                  "more that the white-box attacks before it did not")
                previous = r["accuracy"]
            continue
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


def _large_eps_check(runner: Runner, ds: Dataset, config: EvaluateConfig, device: str, n_classes: int) -> dict:
    """At a budget that covers half the box, a working attack brings accuracy to about chance."""
    bounds = config.preprocess.bounds
    width = bounds[1] - bounds[0]
    sub = ds.subset(np.arange(min(len(ds), 200)))
    eps = 0.5 * width if config.attack.norm == "linf" else 0.5 * width * float(np.sqrt(np.prod(ds.x.shape[1:])))
    cfg = AttackConfig(name="pgd", eps=eps, norm=config.attack.norm, steps=20, seed=config.seed,
                       batch_size=config.attack.batch_size)
    batch = runner.attack_batch(config.attack.batch_size, "pgd", sub.x.shape[1:]).size
    adv = runner.craft(cfg, sub, device, "sanity: large eps", batch)
    acc = float((runner.predict(adv) == sub.y).mean())
    chance = 1.0 / max(n_classes, 1)
    ok = acc <= chance + 0.1
    return {"name": "a large eps brings accuracy to about chance", "ok": ok,
            "detail": f"PGD at eps={eps:g}: {100 * acc:.1f}% (chance {100 * chance:.1f}%)"}


def on_logits(runner: Runner, ds: Dataset, config: EvaluateConfig, device: str, notes: list[str]) -> Runner:
    """AutoAttack's "use logits" check: when the output holds probabilities (non-negative rows that
    sum to 1), attack the linear head's output before the Softmax instead, when the head is known."""
    (out,) = run_batch(runner.session, runner.feed(ds.x[:64]), [runner.logits])
    out = out.reshape(len(out), -1).astype(np.float64)
    if not (np.all(out >= 0) and np.allclose(out.sum(1), 1.0, atol=1e-3)):
        return runner
    try:
        head = find_head(runner.model, config.logits)
    except CloakError:
        head = None
    if head is None or head.output == runner.logits:
        log.warning("the output %r holds probabilities and no pre-Softmax tensor was found: gradient attacks run "
                    "on probabilities, which weakens them", runner.logits)
        notes.append(f"the output {runner.logits!r} holds probabilities and no pre-Softmax tensor was found: "
                     "gradient attacks ran on probabilities (weaker); export the logits")
        return runner
    log.warning("the output %r holds probabilities: attacking the pre-Softmax tensor %r", runner.logits, head.output)
    notes.append(f"the output {runner.logits!r} holds probabilities (non-negative, rows sum to 1): attacks ran on "
                 f"the pre-Softmax tensor {head.output!r}")
    return Runner.for_config(runner.model, head.output, [head.output], config, device)


def model_checks(runner: Runner, ds: Dataset, batch: int = 32) -> list[dict]:
    """AutoAttack's automatic checks on the model itself: the same outputs for the same input (no
    randomness), and the share of samples whose input gradient is exactly zero (``batch`` at a time)."""
    import torch
    import torch.nn.functional as F

    x = ds.x[:200]
    first, second = (run_batch(runner.session, runner.feed(x), [runner.logits])[0] for _ in range(2))
    checks = [{"name": "the same input gives the same output", "ok": bool(np.array_equal(first, second)),
               "detail": "ok" if np.array_equal(first, second) else "onnxruntime outputs differ between two runs"}]
    if runner.torch_model is None:
        return checks
    zeros = 0
    for s in range(0, len(x), batch):  # in attack-sized batches: a large model's activations add up
        xt = torch.from_numpy(x[s : s + batch]).to(runner.device).requires_grad_(True)
        yt = torch.from_numpy(ds.y[: len(x)][s : s + batch]).to(runner.device)
        (grad,) = torch.autograd.grad(F.cross_entropy(runner.torch_model(xt), yt, reduction="sum"), xt)
        zeros += int((grad.flatten(1).abs().amax(1) == 0).sum())
    zero = zeros / len(x)
    checks.append({"name": "input gradients are non-zero", "ok": zero == 0.0,
                   "detail": "ok" if zero == 0 else f"{100 * zero:.1f}% of samples have an exactly zero input "
                                                    "gradient (masked gradients, or a model saturated on them)"})
    return checks


def _runner(model_path: str | Path, config: EvaluateConfig, device: str) -> Runner:
    model = load_model(model_path)
    return Runner.for_config(model, logits_output(model, config.logits), [], config, device)
