"""Typed options for every command, each checked by its own ``validate()`` before any work is done.

One meaning per name: ``attack.batch_size`` is the attack batch (torch), ``ort_batch_size`` the
onnxruntime batch, ``logits`` the graph output that carries the logits, ``output`` a file path.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .attacks.base import AttackConfig
from .curve import DEFAULT_FRACTIONS
from .data import Preprocess
from .errors import CloakError
from .graph import check_input_shapes
from .mask import SCORES, count_for

LEARNED = "learned"  # the score learned against an adaptive attacker (cloakonnx.learn)
ALL_SCORES = (*SCORES, LEARNED)
MASK_VALUES = ("binary", "soft")
INNER_ATTACKS = ("pgd", "fgsm")
MASK, FINETUNE = "mask", "finetune"  # the methods: a mask (DeepCloak), or fine-tuned weights
METHODS = (MASK, FINETUNE)
AUTO = "auto"  # harden's default: fine-tuned weights; learned masks when fine-tuning writes nothing
BOTH = "both"  # both methods, the one more robust on validation written (about twice auto's time)
HARDEN_METHODS = (AUTO, BOTH, *METHODS)
FINETUNE_PARAMS = ("all", "norm", "head")
# The clean budget (points) of the methods that always choose how strongly to apply what they learned
# (fine-tuning, masks on several tensors) when --max-clean-drop is not given: one point, held with
# --budget-confidence's bound on new data (the validation split is enlarged until that is possible).
DEFAULT_CLEAN_DROP = 1.0
DEFAULT_LR = {MASK: 0.1, FINETUNE: 1e-3}  # Adam's step: on mask logits theta; on the weights themselves
DEFAULT_STEPS = {MASK: 100, FINETUNE: 300}  # learning steps: masks converge sooner than weights
# Samples per learning step. Weights learn about as well from 32 as from 128 at a quarter of the cost
# per step (demo: 71.7% and 70.8% on validation, 70.75% and 72.14% on the test digits; PP-LCNet:
# 99.8% on validation), and batches of 128 on a 224x224 model take 26-64 s a step on one CPU thread.
DEFAULT_BATCH = {MASK: 128, FINETUNE: 32}
# The inner attacker: FGSM with a random start is as good as PGD-5 for masks and 3 times cheaper; the
# weights, which can move much further, overfit to it (catastrophic overfitting): on the demo PGD-5
# bought 7 more points of validation robustness (benchmarks/learning_speed.py, docs/results.md).
DEFAULT_INNER_ATTACK = {MASK: "fgsm", FINETUNE: "pgd"}
# Fine-tuning stops once the mean loss of the last 10 steps is below this: the inner attacker no longer
# finds anything to learn from (PP-LCNet got there in about 50 of 100 steps; the demo never does). 0: off.
DEFAULT_STOP_LOSS = {MASK: 0.0, FINETUNE: 0.01}
# ... and, every this many steps, once as many of up to 128 validation samples survive the inner attack
# as were right, clean, before learning, less 1% (early stopping on held-out data; learn.EarlyStop). 0: off.
DEFAULT_STOP_EVERY = {MASK: 0, FINETUNE: 25}
# When the default step size makes fine-tuning's loss rise over its first 20 steps (or, with the early
# stop on, the clean accuracy of its validation samples fall by 20 points: learn.WRECK_DROP), it starts again
# from the original weights with a step this many times smaller, at most LR_BACKOFFS times: 1e-3 wrecked
# PP-LCNet (clean 100% -> 80%), 1e-4 took its validation worst case from 31.7% to 99.8%; on the demo
# 1e-3 beat 3e-4 and 1e-4 (70.8%, 68.9%, 65.8%).
LR_BACKOFF, LR_BACKOFFS = 10.0, 2


@dataclass
class LearnConfig:
    """How a mask (or, with fine-tuning, the weights) is learned: steps of 128 samples, each against
    an attack crafted on the current model. On the demo, masks learned against FGSM with a random
    start (Wong et al., 2020) in 100 steps were as robust on validation as with FGSM or PGD-5 in 300,
    3 and 8 times faster (benchmarks/learning_speed.py); weights get 300 steps against PGD-5
    (DEFAULT_STEPS, DEFAULT_INNER_ATTACK)."""

    steps: int | None = None  # outer steps, one batch each; None: the method's (DEFAULT_STEPS), set by MaskConfig
    batch_size: int | None = None  # samples per step; None: the method's (DEFAULT_BATCH)
    lr: float | None = None  # Adam's step; None: the method's default (DEFAULT_LR: 0.1 on theta, 1e-3 on weights)
    init: float = 3.0  # sigmoid(3) = 0.95: every feature starts almost fully on
    inner_attack: str | None = None  # "fgsm" (random start, one step of 1.25 eps), "pgd" (inner_steps steps);
    # None: the method's (DEFAULT_INNER_ATTACK)
    inner_steps: int = 5
    sparsity: float = 0.0  # weight of mean(m) in the loss: pushes more values towards 0
    stop_loss: float | None = None  # stop when the last 10 steps' mean loss is below it; None: DEFAULT_STOP_LOSS; 0: off
    stop_every: int | None = None  # attack a validation probe every this many steps, stop when it is robust;
    # None: DEFAULT_STOP_EVERY; 0: off

    def validate(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise CloakError(f"--learn-steps must be at least 1, got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CloakError(f"--learn-batch must be at least 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise CloakError(f"--learn-lr must be positive, got {self.lr:g}")
        if self.inner_attack is not None and self.inner_attack not in INNER_ATTACKS:
            raise CloakError(f"--learn-attack must be one of {', '.join(INNER_ATTACKS)}, got {self.inner_attack!r}")
        if self.inner_steps < 1:
            raise CloakError(f"--learn-attack-steps must be at least 1, got {self.inner_steps}")
        if self.sparsity < 0:
            raise CloakError(f"--learn-sparsity must be non-negative, got {self.sparsity:g}")
        if self.stop_loss is not None and not self.stop_loss >= 0:
            raise CloakError(f"--learn-stop-loss must be non-negative, got {self.stop_loss:g}")
        if self.stop_every is not None and self.stop_every < 0:
            raise CloakError(f"--learn-stop-every must be non-negative, got {self.stop_every}")

    def with_defaults_for(self, method: str) -> "LearnConfig":
        """This config with its steps and inner attack set: the ones given, else ``method``'s defaults."""
        steps = DEFAULT_STEPS[method] if self.steps is None else self.steps
        inner = DEFAULT_INNER_ATTACK[method] if self.inner_attack is None else self.inner_attack
        stop = DEFAULT_STOP_LOSS[method] if self.stop_loss is None else self.stop_loss
        batch = DEFAULT_BATCH[method] if self.batch_size is None else self.batch_size
        every = DEFAULT_STOP_EVERY[method] if self.stop_every is None else self.stop_every
        return replace(self, steps=steps, inner_attack=inner, stop_loss=stop, batch_size=batch, stop_every=every)

    def lr_for(self, method: str) -> float:
        """The step size: the one given, else ``method``'s default."""
        return DEFAULT_LR[method] if self.lr is None else self.lr


@dataclass
class RayConfig:
    """``address``: None starts a local Ray instance; ``auto`` or an address joins a running cluster.
    ``workers``: actors to run (None: one per GPU when the cluster has GPUs, else one per CPU)."""

    address: str | None = None
    workers: int | None = None
    threads: int | None = None  # torch and onnxruntime threads per worker; None: the cluster's CPUs / workers
    retries: int = 2  # a worker that dies is restarted and its shard retried this many times

    def validate(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise CloakError(f"--ray-workers must be at least 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise CloakError(f"the threads per Ray worker must be at least 1, got {self.threads}")
        if self.retries < 0:
            raise CloakError(f"the Ray retries must be non-negative, got {self.retries}")


@dataclass
class CommonConfig:
    """What every command that attacks a model shares: the data's box, the model's names, the
    runtime, and the attack (for ``evaluate``, the settings every attack shares)."""

    attack: AttackConfig = field(default_factory=AttackConfig)
    preprocess: Preprocess = field(default_factory=Preprocess)
    input_name: str | None = None
    logits: str | None = None  # the graph output that carries the logits; None: found from the head
    image_size: tuple[int, int] | None = None  # image folders: resize straight to H,W (--size)
    resize: int | None = None  # image folders: the short side to this, then
    crop: int | None = None  # a centred square of this side (torchvision's Resize + CenterCrop)
    data_workers: int | None = None  # threads decoding images; None: min(4, cores)
    # input name -> the shape to run it with (--input-shapes); all but the batch dim must match the data
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    ort_batch_size: int = 256  # onnxruntime batches (statistics, accuracy)
    device: str | None = None  # torch device for attacks; None: cuda when available
    # torch and onnxruntime intra-op threads, and the cap on data workers; None: $CLOAKONNX_THREADS,
    # else torch's own setting up to the cores this process may run on (runtime.resolve_threads)
    threads: int | None = None
    providers: Sequence[str] | None = None  # onnxruntime providers; None: CUDA if it loads, else CPU
    ray: RayConfig | None = None  # run the attacks on a Ray cluster (cloakonnx.distributed); None: here

    def validate(self) -> None:
        self.attack.validate(self.preprocess.bounds)
        check_input_shapes(self.input_shapes)
        if self.ray is not None:
            self.ray.validate()
        if self.ort_batch_size < 1:
            raise CloakError(f"the onnxruntime batch must be at least 1, got {self.ort_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise CloakError(f"--threads must be at least 1, got {self.threads}")


@dataclass
class MaskConfig(CommonConfig):
    """How a mask is scored and chosen: shared by ``harden`` and ``sweep``."""

    val_split: float = 0.2
    # validation keeps its feature rows and per-sample results in memory: at most this many samples
    # (the rest of the held-out share goes to calibration); None: no cap
    val_max: int | None = 10000
    # The tensors to mask: () is the head's input; several (or ("auto",)) need score="learned".
    # None (with score and mask_values None): the command's default method (``resolve_method``).
    feature_tensors: tuple[str, ...] | None = None
    score: str | None = None
    # Share of features to mask; None: 1% for the statistical scores, and for "learned" the features
    # the learning switched off (value below 0.5).
    fraction: float | None = None
    mask_values: str | None = None  # "soft" (learned only): the learned multipliers; "binary": 0/1
    learn: LearnConfig = field(default_factory=LearnConfig)
    max_clean_drop: float | None = None  # percentage points; None: mask exactly ``fraction``
    # The drop's one-sided upper confidence bound on new data must also be within the budget
    # (cloakonnx.curve.clean_drop_bound); 0 uses the validation point estimate alone.
    budget_confidence: float = 0.9
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # candidates for max_clean_drop and sweep
    # "mask"; (harden only) "finetune": the weights trained against an adaptive attacker (cloakonnx.finetune);
    # "auto" (harden's default): fine-tuned weights, learned masks when they write nothing; "both": both, the
    # more robust on validation written. None: the command's default.
    method: str | None = None
    finetune_params: str = "all"  # with "finetune": "all", "norm" (normalisation only) or "head"
    learned_by_default = False  # class attribute: whether an unset score means the learned masks on every stage
    methods = METHODS  # class attribute: the methods this command runs

    def __post_init__(self) -> None:
        self.resolve_method()

    def resolve_method(self) -> None:
        """Fill what was left unset. ``harden``'s default (``learned_by_default``) is method "auto": the
        weights fine-tuned against an adaptive attacker, and when that gains nothing, masks learned on
        every stage (``--feature-tensor auto``), soft; either at the strength chosen within the clean
        budget. The paper's method is ``score="absdiff"``: a binary mask on the head's input. ``sweep``
        and an explicit score keep the head's input and binary values unless told otherwise."""
        if self.method is None:  # options that shape a mask ask for the mask method
            shaped = (self.score, self.mask_values) != (None, None) or self.feature_tensors is not None
            self.method = AUTO if self.learned_by_default and not shaped and not self.paper_knobs() else MASK
        default = self.score is None and self.learned_by_default and self.method in (MASK, AUTO, BOTH)
        if default and self.method == MASK and self.feature_tensors is None and self.paper_knobs():
            default = False  # they shape the paper's mask on the head's input: they ask for it
        if self.score is None:
            self.score = LEARNED if default else "absdiff"
        if self.feature_tensors is None:
            self.feature_tensors = ("auto",) if default else ()
        if self.mask_values is None:
            self.mask_values = "soft" if default else "binary"
        if not self.two_candidates:  # auto's and both's candidates (``candidates``) take their method's defaults
            self.learn = self.learn.with_defaults_for(self.method if self.method in DEFAULT_STEPS else MASK)

    @property
    def two_candidates(self) -> bool:
        """``auto`` and ``both`` choose between learned masks and fine-tuned weights (``candidates``)."""
        return self.method in (AUTO, BOTH)

    def candidates(self) -> tuple["MaskConfig", "MaskConfig"]:
        """``method="auto"`` or ``"both"``: the learned masks' configuration and the fine-tuned weights',
        each with its own learning defaults (steps, inner attack); the options both take are shared."""
        return (replace(self, method=MASK),
                replace(self, method=FINETUNE, score=None, feature_tensors=None, mask_values=None,
                        **({"fold": False} if hasattr(self, "fold") else {})))

    @property
    def feature_tensor(self) -> str | None:
        """The one tensor to mask when there is one (None: the head's input, or several)."""
        return self.feature_tensors[0] if self.single_tensor and self.feature_tensors else None

    @property
    def single_tensor(self) -> bool:
        return len(self.feature_tensors) <= 1 and self.feature_tensors != ("auto",)

    def describe_method(self) -> str:
        """One line for the log: what this configuration hardens with."""
        if self.method == AUTO:
            masks, weights = self.candidates()
            return f"{weights.describe_method()}; {masks.describe_method()} if that gains nothing"
        if self.method == BOTH:
            masks, weights = self.candidates()
            return (f"{masks.describe_method()}, then {weights.describe_method()}; the one more robust against "
                    "the adaptive attacker on validation is written")
        if self.method == FINETUNE:
            return f"fine-tuning the weights ({self.finetune_params}) against an adaptive attacker"
        where = "every stage (--feature-tensor auto)" if self.feature_tensors == ("auto",) else (
            ", ".join(self.feature_tensors) if self.feature_tensors else "the head's input")
        if self.score == LEARNED:
            return f"{self.mask_values} masks learned against an adaptive attacker on {where}"
        return f"a {self.mask_values} mask on {where} by the {self.score} score" + (
            " (the paper's method)" if self.score == "absdiff" else "")

    def paper_knobs(self) -> list[str]:
        """The options given that shape a mask on one tensor by count (the paper's knobs)."""
        return ["--fraction"] if self.fraction is not None else []

    def selection_budget(self) -> float | None:
        """The clean budget, in points, a choice on validation is held to: ``max_clean_drop``, or
        DEFAULT_CLEAN_DROP for the methods that always choose a strength (fine-tuning, masks on
        several tensors: harden's default); None when nothing is chosen under a budget."""
        if self.max_clean_drop is not None:
            return self.max_clean_drop
        return DEFAULT_CLEAN_DROP if self.method == FINETUNE or not self.single_tensor else None

    def validate(self) -> None:
        super().validate()
        if self.fraction is not None:
            count_for(self.fraction, 1)
        if self.score not in ALL_SCORES:
            raise CloakError(f"unknown score {self.score!r}; choose one of {', '.join(ALL_SCORES)}")
        if self.mask_values not in MASK_VALUES:
            raise CloakError(f"--mask-values must be one of {', '.join(MASK_VALUES)}, got {self.mask_values!r}")
        if self.score != LEARNED and (self.mask_values == "soft" or not self.single_tensor):
            raise CloakError("soft mask values and masks on several tensors need learned values: add --score learned")
        if "auto" in self.feature_tensors and len(self.feature_tensors) > 1:
            raise CloakError("--feature-tensor auto proposes the tensors itself; give it alone")
        if self.method not in self.methods:
            raise CloakError(f"--method must be one of {', '.join(self.methods)} here, got {self.method!r}")
        if self.finetune_params not in FINETUNE_PARAMS:
            raise CloakError(f"--finetune-params must be one of {', '.join(FINETUNE_PARAMS)}, "
                             f"got {self.finetune_params!r}")
        if self.score == LEARNED or self.method == FINETUNE:
            self.learn.validate()
        if self.val_max is not None and self.val_max < 1:
            raise CloakError(f"--val-max must be at least 1, got {self.val_max}")
        if self.max_clean_drop is not None and self.max_clean_drop < 0:
            raise CloakError(f"--max-clean-drop must be non-negative, got {self.max_clean_drop:g}")
        if not (self.budget_confidence == 0 or 0.5 <= self.budget_confidence < 1):
            raise CloakError(f"--budget-confidence must be 0 (point estimate only) or in [0.5, 1), "
                             f"got {self.budget_confidence:g}")


@dataclass
class HardenConfig(MaskConfig):
    """Everything ``harden`` needs besides the model and the data."""

    output: Path | None = None  # default: <model>.cloaked.onnx next to the model
    rounds: int = 1
    adaptive: bool = True  # also attack the hardened model itself
    curve: bool = False  # also report the trade-off curve and feature scores (the CLI's --plot draws them)
    fold: bool = False  # multiply the mask into the head's weights instead of adding a Mul node
    learned_by_default = True
    methods = HARDEN_METHODS

    def paper_knobs(self) -> list[str]:
        return super().paper_knobs() + [name for name, used in (("--rounds", self.rounds > 1),
                                                                ("--plot", self.curve)) if used]

    def validate(self) -> None:
        super().validate()
        if self.rounds < 1:
            raise CloakError(f"--rounds must be at least 1, got {self.rounds}")
        if not self.single_tensor and self.paper_knobs():
            knobs = self.paper_knobs()
            raise CloakError(f"{', '.join(knobs)} {'shapes' if len(knobs) == 1 else 'shape'} a mask on one tensor (by "
                             "default the head's "
                             "input); masks on several tensors are learned jointly and their strength is chosen on "
                             "validation. Drop --feature-tensor auto, or name one tensor")
        if self.method == FINETUNE:
            mask_only = [name for name, used in (("--fold", self.fold), ("--rounds", self.rounds > 1),
                                                 ("--fraction", self.fraction is not None), ("--plot", self.curve),
                                                 ("--score learned", self.score == LEARNED),
                                                 ("--mask-values soft", self.mask_values == "soft"),
                                                 ("--feature-tensor", bool(self.feature_tensors))) if used]
            if mask_only:
                raise CloakError(f"{', '.join(mask_only)} shape a mask; --method finetune moves the weights instead")


def _evaluate_attack() -> AttackConfig:
    # 20 steps, not harden's 10: evaluation measures robustness, so it attacks harder by default.
    return AttackConfig(steps=20)


@dataclass
class EvaluateConfig(CommonConfig):
    """Which attacks, at which budgets, against which threat models. ``attack`` holds the settings
    every attack shares (norm, steps, restarts, queries, batch); its name and eps are set per run."""

    attack: AttackConfig = field(default_factory=_evaluate_attack)
    attacks: tuple[str, ...] = ("fgsm", "pgd", "square")
    eps: tuple[float, ...] = (8 / 255,)
    preset: str | None = None  # "standard" overrides attacks and their settings
    cumulative: bool = False  # each of ``attacks`` only on the points still robust (presets always are)
    reference: Path | None = None  # the unhardened model, for transfer attacks
    max_samples: int | None = None
    sanity: bool = True  # also run the large-eps check
    resume: Path | None = None  # save finished attack rows here, and continue from it (cloakonnx.resume)

    def validate(self) -> None:
        if not self.eps:
            raise CloakError("--eps needs at least one value")
        for eps in self.eps:  # the shared settings, with each budget in turn
            CommonConfig.validate(replace(self, attack=replace(self.attack, eps=eps)))
        if self.max_samples is not None and self.max_samples < 1:
            raise CloakError(f"--max-samples must be at least 1, got {self.max_samples}")
        if self.resume is not None and (Path(self.resume).is_dir() or not Path(self.resume).parent.is_dir()):
            raise CloakError(f"--resume {self.resume} must be a file in an existing folder")
