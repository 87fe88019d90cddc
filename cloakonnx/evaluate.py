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
from .pipeline import load_checked, open_backend, resolve_device
from .presets import MIN_CLASSES, THREAT_ORDER, attack_plan
from .resume import Progress, fingerprint
from .runner import Runner
from .runtime import resolve_providers, run_batch, use_threads
from .sanity import large_eps_reaches_chance, model_checks, sanity_checks
from .data import DATA_WAIT

log = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "EvaluateReport", "evaluate", "sanity_checks"]

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
    attacks: dict  # name -> the settings that attack uses
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
    threads: int = 0  # torch and onnxruntime intra-op threads used (--threads)
    data_wait_seconds: float = 0.0  # time blocked waiting for the next batch of data (part of ``seconds``)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Session:
    """What one evaluation works with: the model, the optional reference, the data and where the
    attacks run."""

    config: EvaluateConfig
    runner: Runner
    reference: Runner | None
    ds: Dataset
    n_classes: int
    backend: object  # backend.LocalBackend or distributed.RayBackend
    device: str
    notes: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)  # the rows done, saved as they finish with --resume


def evaluate(model_path: str | Path, data: str | Path | Dataset, config: EvaluateConfig) -> EvaluateReport:
    """Clean accuracy and accuracy under adaptive, transfer and gradient-free attacks, for each eps."""
    t0, waited = time.perf_counter(), DATA_WAIT.seconds
    config.validate()
    threads = use_threads(config.threads)
    attack_cfgs = attack_plan(config)
    for eps in config.eps:
        for cfg in attack_cfgs:
            replace(cfg, eps=eps).validate(config.preprocess.bounds)
    device = resolve_device(config.device)
    providers = resolve_providers(config.providers)
    runner = _runner(model_path, config, device)
    reference = _runner(config.reference, config, device) if config.reference is not None else None
    ds, n_classes = load_checked(data, runner, config)
    progress = Progress.open(config.resume, lambda: fingerprint(model_path, data, ds, config, device))
    if config.max_samples is not None and len(ds) > config.max_samples:
        ds = ds.subset(np.sort(np.random.default_rng(config.seed).permutation(len(ds))[: config.max_samples]))
    notes: list[str] = []
    runner = on_logits(runner, ds, config, device, notes)
    reference = on_logits(reference, ds, config, device, notes) if reference is not None else None
    s = Session(config, runner, reference, ds, n_classes, open_backend(config, device), device, notes, progress)
    try:
        report = _evaluate(s, model_path, attack_cfgs, providers, t0)
        report.data_wait_seconds, report.threads = round(DATA_WAIT.seconds - waited, 3), threads
        return report
    except KeyboardInterrupt:
        if progress.path is not None:
            log.warning("interrupted: %d attack run(s) are saved in %s; the same command continues from there",
                        len(progress.done), progress.path)
        raise
    finally:
        s.backend.close()


def model_notes(runner: Runner) -> list[str]:
    """What the report must say about how the model was attacked."""
    notes = []
    if runner.torch_model is None:
        notes.append(f"{runner.unsupported}: gradient attacks were skipped, only gradient-free ones ran")
    if runner.computes_in_float32:
        notes.append("the model is fp16: gradients were computed in float32 by the torch executor")
    if runner.quantized:
        notes.append("the model is QDQ-quantized: gradients pass its rounding straight through (BPDA, Athalye et "
                     "al. 2018)")
    return notes


def runnable_attacks(attack_cfgs: list[AttackConfig], n_classes: int, notes: list[str]) -> list[AttackConfig]:
    """The attacks this model can take (DLR losses need three classes); the others are noted."""
    runnable = []
    for cfg in attack_cfgs:
        if n_classes < MIN_CLASSES.get(cfg.name, 0):
            notes.append(f"{cfg.name} was skipped: it needs at least {MIN_CLASSES[cfg.name]} classes, the model "
                         f"has {n_classes}")
        else:
            runnable.append(cfg)
    return runnable


def _evaluate(s: Session, model_path, attack_cfgs: list[AttackConfig], providers, t0: float) -> EvaluateReport:
    """The attacks, the checks and the report (``evaluate`` after loading)."""
    config, runner, ds = s.config, s.runner, s.ds
    s.notes.extend(model_notes(runner))
    clean_pred = runner.predict(ds.x, config.ort_batch_size)
    clean = float((clean_pred == ds.y).mean())
    # AutoAttack's way (presets, --cumulative): each attack only on the points still robust
    cumulative = config.preset is not None or config.cumulative
    runs = [(base, threat, source) for base in runnable_attacks(attack_cfgs, s.n_classes, s.notes)
            for threat, source in _sources(base.name, runner, s.reference)]
    if cumulative:
        runs.sort(key=lambda run: THREAT_ORDER.index(run[1]))
    s.progress.start(clean_pred == ds.y)
    robust = attack_rows(s, runs, clean_pred == ds.y, cumulative)
    results, failures = list(s.progress.results), list(s.progress.failures)
    checks = all_checks(s, results, robust, clean, cumulative, failures)
    if failures:
        s.notes.append(f"{len(failures)} attack run(s) failed (see failures): the robust accuracy is an upper bound")
    return EvaluateReport(
        model=str(model_path), reference=str(config.reference) if config.reference else None, samples=len(ds),
        norm=config.attack.norm, eps=list(config.eps), clean_accuracy=clean, results=results, robust_accuracy=robust,
        checks=checks, attacks={c.name: c.describe() for c in attack_cfgs}, notes=s.notes,
        seconds=round(time.perf_counter() - t0, 3), failures=failures, providers=list(providers), device=s.device,
        seed=config.seed, cumulative=cumulative, ray=s.backend.describe(), summary={
            "clean_accuracy": clean, "robust_accuracy": robust, "norm": config.attack.norm, "eps": list(config.eps),
            "n": len(ds), "attacks": sorted({r["attack"] for r in results}),
            "unreliable": bool(failures) or not all(c["ok"] for c in checks)},
    )


def attack_rows(s: Session, runs: list, correct: np.ndarray, cumulative: bool) -> dict:
    """Run every (eps, attack, threat) row that ``s.progress`` has not done yet, recording each as
    it finishes (with --resume, saved then); the robust accuracy per eps, worst case per sample."""
    robust, position = {}, -1
    for i, eps in enumerate(s.config.eps):
        tally = Tally(s.progress.survivors_at(i, correct), cumulative)
        for base, threat, source in runs:
            cfg, position = replace(base, eps=eps), position + 1
            if s.progress.is_done(position, eps, cfg.name, threat):
                continue
            idx, started = tally.targets(), time.perf_counter()
            try:
                ok = _survivors(s, source, cfg, s.ds.subset(idx), threat)
            except CloakError as exc:  # keep what finished; name what did not
                log.warning("%s (%s, eps=%g) failed: %s", cfg.name, threat, eps, exc)
                s.progress.finished(i, eps, cfg.name, threat, tally.survived, error=str(exc))
                continue
            accuracy = tally.record(idx, ok)
            s.progress.finished(i, eps, cfg.name, threat, tally.survived, accuracy)
            log.info("%s %s at eps %g: %.2f%% (%d samples, %.0f s); worst case so far %.2f%%", cfg.name, threat, eps,
                     100 * accuracy, len(idx), time.perf_counter() - started, 100 * tally.robust())
        robust[repr(eps)] = tally.robust()
    return robust


class Tally:
    """Per-sample survival over the rows of one eps. Cumulative (AutoAttack's way): each attack runs
    only on the points still robust, and its row is the robust accuracy so far. Otherwise each attack
    runs on every sample and its row is its own accuracy. Either way ``robust`` is the worst case per
    sample over every row."""

    def __init__(self, correct: np.ndarray, cumulative: bool):
        self.survived, self.cumulative = correct.copy(), cumulative

    def targets(self) -> np.ndarray:
        return np.flatnonzero(self.survived) if self.cumulative else np.arange(len(self.survived))

    def record(self, idx: np.ndarray, ok: np.ndarray) -> float:
        """Add one attack's survivors (``ok`` for the samples ``idx``); the row's accuracy."""
        now = self.survived.copy() if self.cumulative else np.zeros(len(self.survived), bool)
        now[idx] = ok
        self.survived &= now
        return float(now.mean())

    def robust(self) -> float:
        return float(self.survived.mean())


def all_checks(s: Session, results: list[dict], robust: dict, clean: float, cumulative: bool,
               failures: list[dict]) -> list[dict]:
    """The sanity checks on the results and on the model (:mod:`cloakonnx.sanity`); each failure is logged."""
    config, runner, ds = s.config, s.runner, s.ds
    check_batch = (runner.attack_batch(config.attack.batch_size, "pgd", ds.x.shape[1:]).size
                   if runner.torch_model is not None else 1)
    checks = sanity_checks(results, robust, clean, len(ds), cumulative) + model_checks(runner, ds, check_batch)
    if config.sanity and runner.torch_model is not None:
        try:
            checks.append(large_eps_reaches_chance(s.backend, runner, ds, config.attack.norm, config.preprocess.bounds,
                                                   config.seed, config.attack.batch_size, s.device, s.n_classes))
        except CloakError as exc:
            failures.append({"eps": None, "attack": "pgd", "threat": "sanity: large eps", "error": str(exc)})
    for c in checks:
        if not c["ok"]:
            log.warning("SANITY CHECK FAILED: %s: %s", c["name"], c["detail"])
    return checks


def _survivors(s: Session, source: Runner, cfg: AttackConfig, ds: Dataset, threat: str) -> np.ndarray:
    """Which samples of ``ds`` the model still classifies correctly after ``cfg`` crafted on ``source``."""
    if len(ds) == 0:
        return np.zeros(0, bool)
    batch = source.attack_batch(s.config.attack.batch_size, cfg.name, ds.x.shape[1:]).size
    desc = f"{cfg.name} eps={cfg.eps:g} {threat}"
    return s.backend.survivors(s.runner, source, cfg, ds, s.device, batch, s.config.ort_batch_size, desc)


def _sources(name: str, runner: Runner, reference: Runner | None) -> list[tuple[str, Runner]]:
    """Where an attack is crafted: on the model itself (adaptive, or gradient-free through
    onnxruntime), and on the reference model (transfer) for gradient attacks."""
    if not ATTACKS[name].needs_gradients:
        return [("gradient-free", runner)]
    return [(threat, source) for threat, source in (("adaptive", runner), ("transfer", reference))
            if source is not None and source.torch_model is not None]


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
        _note(notes, f"the output {runner.logits!r} holds probabilities and no pre-Softmax tensor was found: "
                     "gradient attacks ran on probabilities (weaker); export the logits")
        return runner
    _note(notes, f"the output {runner.logits!r} holds probabilities (non-negative, rows sum to 1): attacks ran on "
                 f"the pre-Softmax tensor {head.output!r}")
    return Runner.for_config(runner.model, head.output, [head.output], config, device)


def _note(notes: list[str], note: str) -> None:
    """Warn and keep ``note`` once: the model and its --reference usually share their output names."""
    if note not in notes:
        log.warning("%s", note)
        notes.append(note)


def _runner(model_path: str | Path, config: EvaluateConfig, device: str) -> Runner:
    model = load_model(model_path)
    return Runner.for_config(model, logits_output(model, config.logits), [], config, device)
