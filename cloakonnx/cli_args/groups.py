"""The argument groups harden, sweep and evaluate share (inspect and check use some of them), each with
the part of the config it fills; ``cloakonnx.cli`` holds the groups of one command only."""
from __future__ import annotations

from dataclasses import dataclass

import click

from .base import Argument, ArgGroup, Option, Parsed
from .parse import (INPUT_SHAPES_SYNTAX, as_tuple, negated, parse_eps_list, parse_floats, parse_input_shapes,
                    parse_one_eps, parse_pair, parse_providers, parse_size)


class DataArgs(ArgGroup):
    """--data or --data-loader-script (exactly one): ``parsed.data``, the data argument of the library call."""

    options = (
        Option("--data", "data", type=click.Path(),
               help="Labelled data, read a batch at a time: .npz with x (N x input shape, in --bounds) and y "
                    "(int labels); a folder holding x.npy and y.npy (or X.npy,Y.npy); or a folder of class "
                    "sub-folders of images, decoded as needed."),
        Option("--data-loader-script", "data_loader_script", metavar="FILE.py[:FUNC]",
               help="Instead of --data: FUNC (default load_data) in FILE.py yields (x, y) batches, as "
                    "Polygraphy's option of that name. Read once, into a temporary file."),
    )

    def parse(self, values, parsed: Parsed) -> None:
        from ..data import LoaderScript

        if (values.data is None) == (values.data_loader_script is None):
            raise click.UsageError("give the data with --data PATH or --data-loader-script FILE.py[:FUNC] "
                                   "(one of them)")
        parsed.data = LoaderScript(values.data_loader_script) if values.data_loader_script else values.data


class PreprocessArgs(ArgGroup):
    """The box the data lives in, its normalisation, and how image folders are decoded."""

    options = (
        Option("--bounds", default="0,1", show_default=True, help="LOW,HIGH box the data lives in.",
               to="preprocess.bounds", convert=parse_pair),
        Option("--mean", default=None,
               help="Per-channel mean applied between the box and the model, e.g. 0.485,0.456,0.406.",
               to="preprocess.mean", convert=parse_floats),
        Option("--std", default=None, help="Per-channel std, with --mean.", to="preprocess.std", convert=parse_floats),
        Option("--size", default=None, metavar="H,W", help="Resize images from an image folder to H,W (one value N: "
               "N,N).", to="image_size", convert=parse_size),
        Option("--resize", type=click.IntRange(min=1), default=None, metavar="S",
               help="Image folders: resize the short side to S, keeping the aspect (torchvision's Resize)...",
               to="resize"),
        Option("--crop", type=click.IntRange(min=1), default=None, metavar="C",
               help="...then cut the centred C x C square (CenterCrop), e.g. --resize 256 --crop 224.", to="crop"),
        Option("--data-workers", type=click.IntRange(min=1), default=None, metavar="N",
               help="Threads decoding images, ahead of the attack [default: min(4, cores)].", to="data_workers"),
    )


class ModelArgs(ArgGroup):
    """MODEL (``parsed.model``), and which of its inputs and outputs to use and at which shapes.
    ``shapes_use`` says in --input-shapes' help what the command does with the shapes."""

    def __init__(self, shapes_use: str, input_name: bool = True, logits: bool = True):
        self.options = (
            Argument("model", type=click.Path()),
            *([Option("--input", "input_name", metavar="NAME", help="Model input to use (if there are several).",
                      to="input_name")] if input_name else []),
            Option("--input-shapes", "input_shapes", multiple=True, metavar=INPUT_SHAPES_SYNTAX,
                   help=f"Shapes to run inputs with, in Polygraphy's syntax, e.g. --input-shapes input:[1,3,224,224]. "
                        f"Several inputs: space-separated after one --input-shapes (a:[1,3] b:[1,5]), or the option "
                        f"repeated. {shapes_use} Quote a value where the shell expands [...].",
                   to="input_shapes", convert=parse_input_shapes),
            *([Option("--logits", "logits", metavar="NAME",
                      help="Graph output that carries the logits (if there are several).", to="logits")]
              if logits else []),
        )

    def parse(self, values, parsed: Parsed) -> None:
        super().parse(values, parsed)
        parsed.model = values.model


class SeedArgs(ArgGroup):
    """One seed for the splits and every attack."""

    options = (Option("--seed", type=int, default=0, show_default=True, help="Makes splits and attacks repeatable.",
                      to=("seed", "attack.seed")),)


class AttackArgs(ArgGroup):
    """Settings every attack shares: ``attack`` (an AttackConfig). ``--steps`` defaults differ on purpose;
    ``why_steps`` says why. With ``several_eps`` (evaluate), --eps takes a list: ``eps``, the first also
    in ``attack``."""

    def __init__(self, default_steps: int, why_steps: str, several_eps: bool = False):
        self.several_eps = several_eps
        eps_to = ("eps", "attack.eps") if several_eps else "attack.eps"
        self.options = (
            Option("--eps", default="8/255", show_default=True, metavar="EPS",
                   help="Perturbation budget in the units of --bounds (a number or a fraction such as 8/255).",
                   to=eps_to, convert=parse_eps_list if several_eps else parse_one_eps),
            Option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True,
                   help="The ball --eps bounds: linf (each input value moves at most eps) or l2 (each sample's "
                        "perturbation has an L2 norm of at most eps).", to="attack.norm"),
            Option("--steps", type=int, default=default_steps, show_default=True,
                   help=f"Iterations of gradient attacks ({why_steps}).", to="attack.steps"),
            Option("--step-size", type=float, default=None, help="PGD step size [default: 2.5 * eps / steps].",
                   to="attack.step_size"),
            Option("--restarts", type=int, default=1, show_default=True, help="Random restarts (worst case kept).",
                   to="attack.restarts"),
            Option("--no-random-start", is_flag=True, help="Start PGD at the clean input.", to="attack.random_start",
                   convert=negated),
            Option("--queries", type=int, default=1000, show_default=True, help="Query budget of Square.",
                   to="attack.queries"),
            Option("--batch-size", type=click.IntRange(min=1), default=None,
                   help="Samples per attack batch [default: sized to the device's free memory; at most 128 on "
                        "CPU, 1024 on CUDA].", to="attack.batch_size"),
        )

    def parse(self, values, parsed: Parsed) -> None:
        super().parse(values, parsed)
        if self.several_eps:
            parsed.fields["attack.eps"] = values.eps[0]  # the shared settings, checked with each budget in turn


class MaskArgs(ArgGroup):
    """How harden and sweep score features and choose the mask (MaskConfig)."""

    options = (
        Option("--attack", type=click.Choice(["pgd", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"]),
               default="pgd", show_default=True, help="Attack used to find the features adversarial noise moves.",
               to="attack.name"),
        Option("--fraction", type=float, default=None,
               help="Share of features to zero, in [0, 1) (ignored with --max-clean-drop) [default: 0.01; with "
                    "--score learned, the features the learning switched off].", to="fraction"),
        Option("--max-clean-drop", type=float, default=None, metavar="PTS",
               help="Choose the share on the validation split: best adversarial accuracy with clean accuracy "
                    "at most PTS percentage points below the original's. No gain, no mask.", to="max_clean_drop"),
        Option("--budget-confidence", type=float, default=0.9, show_default=True, metavar="P",
               help="With --max-clean-drop: also require the drop's upper confidence bound (P, one-sided) to be "
                    "within the budget, so that it holds on new data, not just on a lucky validation split. "
                    "0: the validation point estimate alone.", to="budget_confidence"),
        Option("--score", type=click.Choice(["absdiff", "normalised", "margin", "learned"]), default=None,
               help="learned: mask values trained against an adaptive attacker, weights frozen; "
                    "absdiff: mean |f(x') - f(x)| (the paper's); normalised: absdiff / clean std; "
                    "margin: push of the true-vs-adversarial logit margin through the head's weights "
                    "[default: harden learns soft masks on every stage (learned, --feature-tensor auto, "
                    "--mask-values soft); sweep: absdiff].", to="score"),
        Option("--mask-values", type=click.Choice(["binary", "soft"]), default=None,
               help="binary: the paper's 0/1 mask; soft (with --score learned): the learned multipliers, "
                    "still one constant Mul per tensor [default: soft for harden's default, else binary].",
               to="mask_values"),
        Option("--val-split", type=float, default=0.2, show_default=True,
               help="Share of the data held out for choosing and reporting, never used for scoring.",
               to="val_split"),
        Option("--val-max", type=click.IntRange(min=1), default=10000, show_default=True, metavar="N",
               help="At most N held-out samples (the rest go to calibration). Memory holds, per held-out "
                    "sample, its label, its results and (for --max-clean-drop/--plot) two rows of the feature "
                    "tensor; the inputs themselves are read a batch at a time.", to="val_max"),
        Option("--feature-tensor", "feature_tensors", metavar="NAME", multiple=True,
               help="Mask this tensor instead of the head's input (4-D: per channel). Several times, or "
                    "'auto' (the head's input and the last activation of each resolution stage), with "
                    "--score learned: one mask per tensor, learned jointly [default: auto for harden's default, "
                    "else the head's input].", to="feature_tensors", convert=as_tuple),
        Option("--method", type=click.Choice(["auto", "both", "mask", "finetune"]), default=None,
               help="mask: DeepCloak masks, weights untouched; finetune: the weights trained against an adaptive "
                    "attacker on the calibration split (--learn-* settings), then moved from the original's by the "
                    "share chosen on validation; auto (harden only): finetune, and the masks when that gains nothing; "
                    "both (harden only): both, the one more robust on validation against the adaptive attacker "
                    "written (about twice auto's time). No gain, no change. [default: harden: auto, or mask "
                    "when an option shapes a mask (--score, --feature-tensor, --mask-values, --fraction, --rounds, "
                    "--plot); sweep: mask, and sweep --method finetune shows every share's clean and adaptive "
                    "accuracy].", to="method"),
        Option("--finetune-params", type=click.Choice(["all", "norm", "head"]), default="all", show_default=True,
               help="--method finetune: the weights to move: all (linear layers and normalisations), norm "
                    "(normalisation scales and biases) or head (the final layer).", to="finetune_params"),
    )


class LearnArgs(ArgGroup):
    """How a mask is learned with --score learned (``learn``, a LearnConfig)."""

    options = (
        Option("--learn-steps", type=click.IntRange(min=1), default=None,
               help="--score learned or --method finetune: optimiser steps, one calibration batch each "
                    "[default: 100 for masks, 300 for weights].", to="learn.steps"),
        Option("--learn-batch", type=click.IntRange(min=1), default=None,
               help="--score learned or --method finetune: calibration samples per step [default: 128 for "
                    "masks, 32 for weights].", to="learn.batch_size"),
        Option("--learn-lr", type=float, default=None,
               help="--score learned or --method finetune: Adam's step size [default: 0.1 on mask values, 1e-3 "
                    "on weights].", to="learn.lr"),
        Option("--learn-attack", type=click.Choice(["fgsm", "pgd"]), default=None,
               help="--score learned or --method finetune: the inner attacker (fgsm: random start and one step "
                    "of 1.25 eps; pgd: --learn-attack-steps steps, slower) [default: fgsm for masks, pgd for "
                    "weights, which overfit to FGSM].",
               to="learn.inner_attack"),
        Option("--learn-attack-steps", type=click.IntRange(min=1), default=5, show_default=True,
               help="--score learned or --method finetune: steps of the inner PGD.", to="learn.inner_steps"),
        Option("--learn-sparsity", type=float, default=0.0, show_default=True,
               help="--score learned: weight of the mean mask value in the loss (more features off).",
               to="learn.sparsity"),
        Option("--learn-stop-loss", type=click.FloatRange(min=0), default=None,
               help="Stop learning once the mean loss of the last 10 steps is below this (the inner attacker "
                    "finds nothing left to learn from); 0: run every step [default: 0.01 for weights, 0 for "
                    "masks].", to="learn.stop_loss"),
        Option("--learn-stop-every", type=click.IntRange(min=0), default=None, metavar="N",
               help="Every N steps, attack up to 128 validation samples with the inner attacker and stop learning "
                    "once as many survive as were right before learning, less 1%; 0: never [default: 25 for "
                    "weights, 0 for masks].",
               to="learn.stop_every"),
    )


class ThreadsArgs(ArgGroup):
    """How many threads torch and onnxruntime use (``threads``)."""

    options = (
        Option("--threads", type=click.IntRange(min=1), default=None, metavar="N", to="threads",
               help="Threads for torch, onnxruntime and image decoding [default: $CLOAKONNX_THREADS, else "
                    "torch's (OMP_NUM_THREADS) up to the cores this process may use]. Beside other jobs, 1 each "
                    "avoids thrashing."),
    )


class RuntimeArgs(ArgGroup):
    """Where the attacks (torch) and the model (onnxruntime) run, and on how many threads."""

    options = (
        *ThreadsArgs.options,
        Option("--device", default=None, help="torch device for attacks [default: cuda if available, else cpu].",
               to="device"),
        Option("--providers", default=None,
               help="Comma-separated onnxruntime providers [default: CUDA if it loads, else CPU].", to="providers",
               convert=parse_providers),
    )


class RayArgs(ArgGroup):
    """Attacks on a Ray cluster: ``ray``, a RayConfig, or None without --ray."""

    options = (
        Option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
               help="Run the attacks on a Ray cluster (pip install \"cloakonnx[ray]\"): alone, a local Ray "
                    "instance; 'auto' or an address (host:6379, ray://host:10001) joins a running cluster. "
                    "Same results as without it."),
        Option("--ray-workers", "ray_workers", type=click.IntRange(min=1), default=None, metavar="N",
               help="With --ray: workers [default: one per GPU when the cluster has GPUs, else one per CPU]; "
                    "each gets its share of the cores as torch and onnxruntime threads."),
    )

    def parse(self, values, parsed: Parsed) -> None:
        from ..config import RayConfig

        if values.ray_workers is not None and values.ray is None:
            raise click.UsageError("--ray-workers needs --ray")
        parsed.fields["ray"] = None if values.ray is None else RayConfig(
            address=None if values.ray == "local" else values.ray, workers=values.ray_workers)


@dataclass
class Output:
    """How a command shows its result: a table or JSON on stdout, a JSON report file, a plot."""

    as_json: bool = False
    report: str | None = None
    plot: str | None = None

    def emit(self, data: dict, human, plotter=None) -> None:
        """Plot (if asked), write the JSON report (if asked), then print the table or the JSON."""
        from ..report import to_json, write_report

        if self.plot:
            plotter(data, self.plot)
        if self.report:
            write_report(data, self.report)
        if self.as_json:
            click.echo(to_json(data))
        else:
            click.echo(human(data))
            if self.report:
                click.echo(f"report written to {self.report}")


class OutputArgs(ArgGroup):
    """--plot (given its help), --json and --report (unless ``report`` is False): ``parsed.output``."""

    def __init__(self, plot: str | None = None, report: bool = True):
        self.options = (
            *([Option("--plot", type=click.Path(dir_okay=False), help=plot)] if plot else []),
            Option("--json", "as_json", is_flag=True, help="Print JSON to stdout instead of the table."),
            *([Option("--report", type=click.Path(dir_okay=False), help="Also write the JSON report to FILE.")]
              if report else []),
        )

    def parse(self, values, parsed: Parsed) -> None:
        parsed.output = Output(**vars(values))
