"""The main job: attack, stream statistics, score, choose a mask, write it, and report what it buys."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .config import AUTO, FINETUNE, LEARNED, MASK, HardenConfig
from .curve import CurvePoint, choose_point, clean_drop_bound, counts_for, mask_curve
from .data import Dataset
from .finetune import WeightSearch, search_weights
from .errors import CloakError
from .graph import CloakRecord, apply_mask, check_writable_dir, fold_mask, save_model, uses_external_data
from .graph.fold_next import fold_into_consumers
from .graph.record import FOLDED, MUL, is_soft, set_metadata
from .layers import search_layers
from .learn import learn_stage
from .mask import DEFAULT_FRACTION, count_for, mask_top, ranking, score_features
from .pipeline import Prepared, prepare
from .runner import collect_features
from .search import Baseline, MaskSearch
from .strength import judge_adaptively
from .timing import StageTimer

log = logging.getLogger(__name__)

__all__ = ["HardenConfig", "HardenReport", "harden"]


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
    stages: dict  # wall-clock seconds per stage
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
    scores: list[float] | None = None  # per-feature scores of the first round, with ``curve``
    stages_cpu: dict = field(default_factory=dict)  # process CPU seconds per stage (for benchmarks)
    masks: list[dict] = field(default_factory=list)  # per masked tensor: width, values zeroed and scaled
    learning: dict | None = None  # learned masks: tensors, seconds, steps, loss history
    ray: dict | None = None  # with --ray: the cluster's address, the workers and the shards run
    threads: int = 0  # torch and onnxruntime intra-op threads used (--threads)

    def to_dict(self) -> dict:
        return asdict(self)


def harden(model_path: str | Path, data: str | Path | Dataset, config: HardenConfig) -> HardenReport:
    """Harden ``model_path`` with a DeepCloak mask (or, with ``method="finetune"``, fine-tuned weights:
    :mod:`cloakonnx.finetune`); write it atomically and return the report.

    With ``max_clean_drop`` the number of features is chosen on the validation split (the best
    adversarial accuracy within the clean-accuracy budget); if nothing helps, the model is written
    unchanged. With ``rounds`` > 1 each round attacks the model hardened so far and adds to the mask.
    """
    start, timer = time.perf_counter(), StageTimer()
    model_path = Path(model_path)
    out_path = output_path(model_path, config.output)
    with timer.data_wait():
        p = prepare(model_path, data, config)
        try:
            check_needs_head(p, config)
            log.info("hardening with %s", config.describe_method())
            with timer("evaluation"):
                base = evaluate_original(p, config)
            search, config = run_search(p, config, base, timer)
            with timer("surgery"):
                hardened = hardened_model(p, config, search)
            with timer("evaluation"):
                final = evaluate_hardened(p, config, base, search)
                warn_if_weaker(base, final, search.changed)
        finally:
            p.close()
        with timer("write"):
            save_model(hardened, out_path, external=uses_external_data(model_path))
    stages, stages_cpu = timer.rounded()
    width, masked = search.width, search.masked
    return HardenReport(
        model=str(model_path), output=str(out_path), feature_tensor=search.primary, features=width,
        masked=masked, newly_masked=masked - search.previously, fraction=masked / width if width else 0.0,
        score=config.score, attack=dict(p.attack.to_dict(), fallback=p.fallback),
        clean_accuracy={"original": base.clean, "hardened": final["clean"]},
        adversarial_accuracy={"original": base.adv_accuracy, "hardened_transfer": final["transfer"],
                              "hardened_adaptive": final["adaptive"]},
        calibration=search.calibration, samples={"calibration": len(p.calib), "validation": len(p.val)},
        seconds=round(time.perf_counter() - start, 3), stages=stages, providers=list(p.providers), device=p.device,
        seed=config.seed, versions=versions(), inputs_sha256=input_hashes(model_path, data),
        mask_added=search.changed, max_clean_drop=config.selection_budget(),
        budget_confidence=config.budget_confidence if config.selection_budget() is not None else None,
        rounds=search.rounds, curve=search.curve,
        scores=search.scores.tolist() if config.curve and search.scores is not None else None, stages_cpu=stages_cpu,
        masks=search.describe(), learning=search.learning, ray=p.backend.describe(), threads=p.threads,
    )


# --- the stages, in the order harden runs them ---------------------------------------------------------


def output_path(model_path: Path, output: Path | None) -> Path:
    """Where the hardened model goes (default ``<model>.cloaked.onnx``), checked before any work."""
    out = Path(output) if output else model_path.with_name(model_path.stem + ".cloaked.onnx")
    if out.resolve() == model_path.resolve():
        raise CloakError(f"the output path is the input model {model_path}; choose another with -o PATH")
    check_writable_dir(out.parent)
    return out


def check_needs_head(p: Prepared, config: HardenConfig) -> None:
    """Options that evaluate masks through the linear head need the head's input as the feature tensor."""
    if config.fold and config.single_tensor and p.target.head is None:
        raise CloakError("--fold multiplies the mask into the linear head's weights; it cannot be used with a "
                         "custom --feature-tensor (use the Mul form)")
    if (config.max_clean_drop is not None or config.curve) and p.target.head is None:
        raise CloakError("--max-clean-drop and --plot need the model's linear head after the feature tensor "
                         "(they evaluate masks in numpy); use --fraction with a custom --feature-tensor")
    n_val = len(p.val)
    if config.max_clean_drop is not None and config.budget_confidence:
        floor = clean_drop_bound(np.ones(n_val, bool), np.ones(n_val, bool), config.budget_confidence)
        if floor > config.max_clean_drop:
            log.warning("with %d validation samples the clean-drop bound at confidence %g is at least %.2f points "
                        "even for a mask that changes no prediction, above the %g-point budget: no mask can be "
                        "chosen; use more data, a larger --val-split, or --budget-confidence 0", n_val,
                        config.budget_confidence, floor, config.max_clean_drop)
    if config.max_clean_drop is not None and not config.budget_confidence and 100.0 / n_val > config.max_clean_drop / 2:
        log.warning("the validation split has %d samples (one sample = %.2f points), coarse for a %g-point budget: "
                    "the budget holds on this split but may not on new data; use more data, a larger --val-split "
                    "or --budget-confidence", n_val, 100.0 / n_val, config.max_clean_drop)


def evaluate_original(p: Prepared, config: HardenConfig) -> Baseline:
    bs = config.ort_batch_size
    clean = p.runner.accuracy(p.val, bs)
    adv = p.adversarial(p.runner, p.val, " validation")  # crafted on the original: the transfer set
    return Baseline(clean, adv, p.runner.accuracy(p.val, bs, adv))


def run_search(p: Prepared, config: HardenConfig, base: Baseline,
               timer: StageTimer) -> tuple[MaskSearch, HardenConfig]:
    """The one place the method is chosen: fine-tuned weights, a mask on one tensor, masks on several, or
    (``auto``, ``both``) the first or the last. Returns the search and the configuration it ran with."""
    if config.two_candidates:
        return search_both(p, config, base, timer)
    if config.method == FINETUNE:
        return search_weights(p, config, base, timer), config
    return (search_mask if config.single_tensor else search_layers)(p, config, base, timer), config


def search_both(p: Prepared, config: HardenConfig, base: Baseline,
                timer: StageTimer) -> tuple[MaskSearch, HardenConfig]:
    """Fine-tuned weights and learned masks on every stage, each at the strength chosen on validation and
    guarded on its own. ``both`` writes the one with the higher worst case under the guard's attacks, the
    masks on a tie. ``auto`` (the default) learns the masks only when the weights gain nothing: the weights
    won on every model measured (docs/results.md) and serve at the original's latency. Neither gains: the
    model is written unchanged. A method the model does not allow (integer weights) leaves the other."""
    runs: dict[str, tuple[MaskSearch, HardenConfig]] = {}
    masks, weights = config.candidates()
    for i, candidate in enumerate((weights, masks) if config.method == AUTO else (masks, weights)):
        if config.method == AUTO and FINETUNE in runs and runs[FINETUNE][0].changed:
            break
        run = search_layers if candidate.method == MASK else search_weights
        try:
            runs[candidate.method] = run(p, candidate, base, timer), candidate
        except CloakError as e:
            if runs or i == 0:  # the first candidate may fail; the second then decides
                log.warning("%s is not possible on this model (%s); going on without it", candidate.describe_method(), e)
                continue
            raise
    summaries = {method: candidate_summary(search) for method, (search, _) in runs.items()}
    kept = max(summaries, key=lambda m: (summaries[m]["guard"] if summaries[m]["written"] else -1.0, m == MASK))
    search, chosen = runs[kept]
    search.learning.update(candidates=summaries, kept=kept if search.changed else None, chooser=config.method)
    worst = "; ".join(f"{m} {100 * s['guard']:.2f}%" if s["written"] else f"{m}: no gain"
                      for m, s in summaries.items())
    log.info("kept %s (worst case on validation: original %s; %s)",
             ("fine-tuned weights" if kept == FINETUNE else "learned masks") if search.changed
             else "the original: neither beats it", "-" if base.guard is None else f"{100 * base.guard:.2f}%", worst)
    return search, chosen


def candidate_summary(search: MaskSearch) -> dict:
    """What one of ``auto``'s candidates would write: its strength, clean and adaptive accuracy there
    (validation), the guard's worst case and its learning seconds."""
    learning = search.learning
    strength = learning.get("alpha", learning.get("strength"))
    point = next((pt for pt in search.curve or [] if pt["alpha"] == strength), None)
    guard = learning.get("guard") or {}
    return {"written": bool(search.changed), "strength": strength,
            "clean_accuracy": None if point is None else point["clean_accuracy"],
            "adversarial_accuracy": None if point is None else point["adversarial_accuracy"],
            "guard": guard.get("hardened") if search.changed else None, "guard_attack": guard.get("attack"),
            "learning_seconds": learning.get("seconds")}


def search_mask(p: Prepared, config: HardenConfig, base: Baseline, timer: StageTimer) -> MaskSearch:
    """Rounds of calibrate -> score -> choose on one tensor; each round attacks the model hardened so far."""
    feature, mask = p.target.feature, p.target.existing_mask
    previously = 0 if mask is None else int((mask == 0).sum())
    search = MaskSearch(feature, p.runner, {feature: mask}, {}, previously)
    f_val_clean = None
    for r in range(config.rounds):
        stats, calib_clean, calib_adv = p.calibrate(search.runner, config.ort_batch_size, timer, f" (round {r + 1})")
        search.widths[feature], search.ranks[feature] = stats.width, stats.ndim
        learned = learn_stage(p, config, search, timer, [feature])[feature] if config.score == LEARNED else None
        with timer("selection"):
            scores = 1.0 - learned if learned is not None else score_features(stats, config.score)
            scale = learned if config.mask_values == "soft" else None
            order = ranking(scores, search.mask)
            adv_val = base.adv if r == 0 else p.adversarial(search.runner, p.val, f" validation (round {r + 1})")
            k = default_count(config, stats.width, order, learned)
            if config.max_clean_drop is not None or (config.curve and r == 0):
                if f_val_clean is None:
                    f_val_clean = collect_features(p.runner.session, feature, p.val.x, p.runner.feed,
                                                   config.ort_batch_size)
                points = _curve(p, config, order, search, f_val_clean, adv_val, scale)
                if config.max_clean_drop is not None:
                    chosen = choose_point(points, base.clean, config.max_clean_drop,
                                          use_bound=bool(config.budget_confidence))
                    k = 0 if chosen is None else chosen.added
        if r == 0:
            search.calibration = {"clean_accuracy": calib_clean, "adversarial_accuracy": calib_adv}
            search.scores = scores
            search.curve = [pt.to_dict() for pt in points] if config.max_clean_drop is not None or config.curve else None
        if k == 0:
            log.info("round %d: no mask improves adversarial accuracy within the clean-accuracy budget", r + 1)
            search.rounds.append({"round": r + 1, "added": 0, "masked": search.masked})
            break
        _add_round(p, config, search, order, k, adv_val, timer, scale)
    if config.score == LEARNED and search.changed:  # cut by transfer accuracy: judged adaptively too
        with timer("selection"):
            strength = judge_adaptively(p, config, base, search.runner, "learned mask")
        search.learning["guard"] = strength.guard
        if strength.chosen is None:  # the input model's masks stay
            search.masks, search.runner = dict(search.initial), p.runner
            search.rounds = [{"round": 1, "added": 0, "masked": search.previously}]
    return search


def default_count(config: HardenConfig, width: int, order: np.ndarray, learned: np.ndarray | None) -> int:
    """How many features to mask without a budget: ``fraction`` of them; by default 1%, or for a
    learned mask the features the learning switched off (value below 0.5)."""
    if config.fraction is not None:
        return count_for(config.fraction, width)
    if learned is not None:
        return int((learned[order] < 0.5).sum())
    return count_for(DEFAULT_FRACTION, width)


def _curve(p: Prepared, config: HardenConfig, order, search: MaskSearch, f_val_clean, adv_val,
           scale) -> list[CurvePoint]:
    """The trade-off on validation for this round's ranking, computed through the head in numpy."""
    f_val_adv = collect_features(p.runner.session, p.target.feature, adv_val, p.runner.feed, config.ort_batch_size)
    counts = counts_for(config.fractions, search.width, search.masked if search.mask is not None else 0)
    return mask_curve(p.target.head, order, counts, f_val_clean, f_val_adv, p.val.y, search.mask,
                      config.budget_confidence or 0.9, scale)


def _add_round(p: Prepared, config: HardenConfig, search: MaskSearch, order, k: int, adv_val, timer,
               scale: np.ndarray | None) -> None:
    """Mask ``k`` more features (soft: and scale the rest) and move the search to the model hardened so far."""
    feature = search.primary
    with timer("surgery"):
        mask = mask_top(order, k, search.width, search.mask)
        search.masks[feature] = mask if scale is None else (mask * scale).astype(np.float32)
        current = apply_mask(search.runner.model, feature, search.mask, search.ranks[feature])
    before, search.runner = search.runner, p.runner_for(current, config)
    with timer("evaluation"):
        search.rounds.append({"round": len(search.rounds) + 1, "added": k, "masked": search.masked})
        if config.rounds > 1:  # with one round these are the final figures, computed by evaluate_hardened
            bs = config.ort_batch_size
            search.rounds[-1].update(clean_accuracy=search.runner.accuracy(p.val, bs),
                                     adversarial_accuracy_before=before.accuracy(p.val, bs, adv_val),
                                     adversarial_accuracy_after=search.runner.accuracy(p.val, bs, adv_val))


def hardened_model(p: Prepared, config: HardenConfig, search: MaskSearch) -> onnx.ModelProto:
    """The original graph with the final masks and their record; unchanged if nothing helps. Each
    mask is a constant Mul, or with ``--fold`` multiplied into the weights that read it: the head's
    for its input (``fold_mask``), the next layers' for a feature map where that is exact
    (``fold_into_consumers``); a tensor that also feeds an Add, a Concat or an output keeps its Mul."""
    if not search.changed:
        return p.model
    if isinstance(search, WeightSearch):
        return search.model  # written and recorded by search_weights
    several = len(search.masks) > 1
    soft = any(is_soft(m) for m in search.masks.values() if m is not None)
    model, folded = fold_feature_maps(p, config, search) if config.fold else (p.model, set())
    described = search.describe()
    if config.fold and several:
        head = p.target.feature if p.target.head is not None else None
        described = [dict(d, form=FOLDED if d["tensor"] in folded or d["tensor"] == head else MUL) for d in described]
    record = CloakRecord(
        feature_tensor=",".join(search.masks) if several else search.primary, features=search.width,
        masked=search.masked, score=config.score, attack=p.attack.to_dict(), seed=config.seed,
        rounds=len(search.rounds), max_clean_drop=config.selection_budget(),
        budget_confidence=config.budget_confidence if config.selection_budget() is not None else None,
        form=FOLDED if config.fold else MUL, mask_values="soft" if soft else None,
        masks=described if several else None)
    meta = record.metadata(p.model)
    if folded:  # a copy already; the Muls and the head's fold below set the same entries again
        set_metadata(model, meta)
    for tensor, mask in search.masks.items():
        if mask is None or tensor in folded:
            continue
        if config.fold and p.target.head is not None and tensor == p.target.feature:
            model = fold_mask(model, mask, meta)
        else:
            model = apply_mask(model, tensor, mask, search.ranks.get(tensor, 2), meta)
    return model


def fold_feature_maps(p: Prepared, config: HardenConfig, search: MaskSearch) -> tuple[onnx.ModelProto, set[str]]:
    """``--fold`` for the masks inside the network: each multiplied into the layers that read it
    where that is exact; the others are left for a Mul."""
    model, folded = p.model, set()
    for tensor, mask in search.masks.items():
        if mask is None or (p.target.head is not None and tensor == p.target.feature):
            continue
        result = fold_into_consumers(model, tensor, mask)
        if result is None:
            log.info("--fold: %r also feeds a residual, a concatenation or an output: it keeps its Mul", tensor)
            continue
        model, _ = result
        folded.add(tensor)
    if folded:
        log.info("--fold: folded the masks of %s into the next layers' weights", ", ".join(map(repr, sorted(folded))))
    return model, folded


def warn_if_weaker(base: Baseline, final: dict, changed: bool) -> None:
    """A change that leaves the model easier to attack directly is written only when the user asked
    for it (a fixed --fraction has no budget or guard); say so loudly, not just in the table."""
    if changed and final["adaptive"] is not None and final["adaptive"] < base.adv_accuracy:
        log.warning("the hardened model is LESS robust against the adaptive attacker on validation (%.1f%% -> %.1f%%): "
                    "do not deploy it as a defence; harden's default (no --score/--fraction) chooses and checks "
                    "its change against the adaptive attacker", 100 * base.adv_accuracy, 100 * final["adaptive"])


def evaluate_hardened(p: Prepared, config: HardenConfig, base: Baseline, search: MaskSearch) -> dict:
    """Clean, transfer and (unless turned off) adaptive accuracy of the hardened model on validation."""
    hard, bs = search.runner, config.ort_batch_size
    result = {"clean": hard.accuracy(p.val, bs), "transfer": hard.accuracy(p.val, bs, base.adv), "adaptive": None}
    if config.adaptive:
        adv = p.adversarial(hard, p.val, " hardened (adaptive)") if search.changed else base.adv
        result["adaptive"] = hard.accuracy(p.val, bs, adv)
    if config.rounds == 1 and search.rounds and search.rounds[0]["added"]:
        search.rounds[0].update(clean_accuracy=result["clean"], adversarial_accuracy_before=base.adv_accuracy,
                                adversarial_accuracy_after=result["transfer"])
    return result


# --- provenance ------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_hashes(model_path: Path, data) -> dict:
    hashes = {"model": sha256_file(model_path)}
    if isinstance(data, (str, Path)) and Path(data).is_file():
        hashes["data"] = sha256_file(data)
    return hashes


def versions() -> dict:
    import onnxruntime
    import torch

    return {"cloakonnx": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": np.__version__}
