"""The ``cloakonnx`` command line: each command is the list of its argument groups (``cli_args``, as
Polygraphy's ``tools/args/``), and a body that builds its typed config from them and calls one library
function. The groups only one command uses are defined here, next to it.

User errors (CloakError) print ``cloakonnx: error: ...`` and exit 1; usage errors exit 2 (click's
convention); tracebacks appear only with ``--debug``.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import replace

import click

from . import __version__
from .cli_args import (ArgGroup, AttackArgs, Command, DataArgs, JoinsInputShapes, LearnArgs, MaskArgs, ModelArgs,
                       Option, OutputArgs, PreprocessArgs, RayArgs, RuntimeArgs, SeedArgs, ThreadsArgs, as_optional_path,
                       as_path,
                       negated, parse_names, parse_pair)
from .errors import CloakError

log = logging.getLogger("cloakonnx")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, so click's test runner and redirections see it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging(quiet: bool) -> None:
    """Show cloakonnx's own INFO lines on stderr; leave other libraries' loggers (torch's) alone."""
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("cloakonnx: %(message)s"))
        log.addHandler(handler)


def _fail(message: str, code: int = 1):
    click.echo(f"cloakonnx: error: {message}", err=True)
    sys.exit(code)


def handles_errors(fn):
    """Turn CloakError into one clear line and exit 1; Ctrl-C into exit 130; all without traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except CloakError as exc:
            if debug:
                raise
            _fail(str(exc))
        except KeyboardInterrupt:
            if debug:
                raise
            # The finally blocks that remove partial files have already run. Leave at once: a normal
            # exit runs interpreter shutdown, where CPython restores the default SIGINT action and a
            # late or repeated Ctrl-C would kill the process with -SIGINT instead of exit 130.
            resume = kwargs.get("resume")
            saved = f"; the finished attacks are in {resume}: rerun the same command to continue" if resume else ""
            click.echo(f"cloakonnx: error: interrupted; no model or report was written{saved}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    return wrapper


class _Group(click.Group):
    command_class = JoinsInputShapes  # every command reads --input-shapes as Polygraphy does


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cloakonnx")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors (no progress or status).")
def main(debug: bool, quiet: bool) -> None:
    """Harden ONNX image classifiers against adversarial inputs, from the .onnx and labelled data.

    By default cloakonnx fine-tunes the graph's own weights against an adaptive attacker (no
    training code needed), chooses their strength on held-out data within a clean-accuracy budget,
    and keeps them only if they beat the original; when they gain nothing it learns per-channel
    masks instead. The paper's method (DeepCloak: one constant Mul zeroing the head's most
    attack-sensitive features) is --score absdiff. The result runs anywhere ONNX runs.

    \b
    Start here:   cloakonnx demo
    Your model:   cloakonnx inspect model.onnx
                  cloakonnx harden model.onnx --data calib.npz -o model.cloaked.onnx
    """
    _configure_logging(quiet)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    from .allocator import keep_freed_memory

    keep_freed_memory()  # attack steps reuse freed activations instead of faulting in fresh pages


# --- the commands: each is the list of its argument groups, and a body that calls one library function ---

DATA_SHAPES = ("Every dim but the batch must match the data's samples (an image folder is resized to the given H,W "
               "unless --size is given).")


# harden, sweep and evaluate read the same data and model; harden and sweep also mask alike. (A group
# holds no state: one instance serves every command that lists it.)
DATA = (DataArgs(), PreprocessArgs(), ModelArgs(DATA_SHAPES), SeedArgs())
MASKING = (*DATA, MaskArgs(), LearnArgs(),
           AttackArgs(10, "10 here, for speed: it crafts calibration inputs; evaluate defaults to 20 to measure"),
           RuntimeArgs(), RayArgs())


INSPECT = Command(ModelArgs("inspect checks them against the model and shows them next to the declared shapes.",
                            input_name=False), OutputArgs(report=False))


@main.command()
@INSPECT
@handles_errors
def inspect(**kw) -> None:
    """Show MODEL's inputs, outputs, opset, classification head, feature tensor and any cloak mask."""
    from .graph import inspect_model
    from .report import format_inspect

    args = INSPECT.parse(kw)
    args.output.emit(inspect_model(args.model, **args.fields).to_dict(), format_inspect)


class HardenArgs(ArgGroup):
    """Where harden writes the model, and how it hardens and checks it."""

    options = (
        Option("-o", "--output", type=click.Path(dir_okay=False),
               help="Hardened model path [default: MODEL.cloaked.onnx].", to="output", convert=as_optional_path),
        Option("--rounds", type=int, default=1, show_default=True,
               help="Rounds of hardening: each attacks the model hardened so far and adds to the mask.", to="rounds"),
        Option("--no-adaptive", is_flag=True, help="Skip the adaptive attack on the hardened model (faster).",
               to="adaptive", convert=negated),
        Option("--fold", is_flag=True,
               help="Multiply each mask into the weights that read it (the head's; a feature map's next Conv, "
                    "Gemm or MatMul where exact) instead of adding a Mul: same outputs, no extra node where it "
                    "folds.",
               to="fold"),
    )


HARDEN = Command(*MASKING, HardenArgs(), OutputArgs(plot="Write a PNG of the trade-off curve of this run."))


@main.command()
@HARDEN
@handles_errors
def harden(**kw) -> None:
    """Write a hardened copy of MODEL, learned on --data, and report what it buys.

    By default (--method auto) it fine-tunes the model's weights against an adaptive attacker and
    applies them at the strength chosen on validation within a 1-point clean budget; only when that
    gains nothing (or the weights cannot be trained) does it learn soft masks on every stage instead.
    It writes nothing new if neither beats the original.

    \b
    Examples:
      cloakonnx harden model.onnx --data calib.npz --eps 0.1 -o model.cloaked.onnx --report report.json
      cloakonnx harden model.onnx --data calib.npz --eps 0.1 --method mask --fold   # masks, folded away
      cloakonnx harden model.onnx --data calib.npz --eps 0.1 --score absdiff --max-clean-drop 1 --plot curve.png
    """
    from .config import HardenConfig
    from .harden import harden as run
    from .plots import plot_harden
    from .report import format_harden

    args = HARDEN.parse(kw)
    config = args.config(HardenConfig, curve=bool(args.output.plot))  # the curve is computed for the plot
    args.output.emit(run(args.model, args.data, config).to_dict(), format_harden, plot_harden)


class SweepArgs(ArgGroup):
    """The scores sweep compares: ``parsed.scores``."""

    options = (Option("--scores", default="absdiff,normalised,margin", show_default=True, convert=parse_names,
                      help="Comma-separated scores to compare; add 'learned' to compare the learned mask too (it "
                           "trains a mask first, so it is much the slowest)."),)

    def parse(self, values, parsed) -> None:
        parsed.scores = values.scores


SWEEP = Command(*MASKING, SweepArgs(), OutputArgs(plot="Write a PNG of the curves and the score distribution."))


@main.command()
@SWEEP
@handles_errors
def sweep(**kw) -> None:
    """Show the whole trade-off: clean and adversarial accuracy against the share of features masked,
    for every score, on the validation split. Writes no model.

    \b
    Example:
      cloakonnx sweep model.onnx --data calib.npz --eps 0.1 --max-clean-drop 1 --plot curve.png
    """
    from .config import MaskConfig
    from .plots import plot_sweep
    from .report import format_sweep
    from .sweep import sweep as run

    args = SWEEP.parse(kw)
    report = run(args.model, args.data, args.config(MaskConfig), args.scores)
    args.output.emit(report.to_dict(), format_sweep, plot_sweep)


class EvaluateArgs(ArgGroup):
    """Which attacks evaluate runs, against which threat models, on how many samples."""

    options = (
        Option("--reference", type=click.Path(), to="reference", convert=as_optional_path,
               help="The original (unhardened) model: adds transfer attacks crafted on it."),
        Option("--attack", "attacks", default="fgsm,pgd,square", show_default=True, to="attacks", convert=parse_names,
               help="Comma-separated attacks: fgsm, pgd, apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square."),
        Option("--preset", type=click.Choice(["standard", "plus", "fast"]), default=None, to="preset",
               help="A fixed, documented set, each attack only on the points still robust (AutoAttack's way). "
                    "standard: AutoAttack's standard version: APGD-CE, APGD-T and FAB-T (100 steps, 9 target "
                    "classes), Square (5000 queries). plus: AutoAttack's plus version: APGD-CE, APGD-DLR and "
                    "untargeted FAB with 5 restarts each, Square (5000 queries), APGD-T, FAB-T. "
                    "fast: APGD-CE and APGD-T."),
        Option("--cumulative", is_flag=True, to="cumulative",
               help="Run each --attack only on the points still robust after the ones before, as the presets "
                    "do: the same worst case, each row then the accuracy after that attack and those before, and "
                    "the later attacks (Square above all) run on fewer samples."),
        Option("--max-samples", type=int, default=None, help="Evaluate a random subset of this size.",
               to="max_samples"),
        Option("--no-large-eps-check", is_flag=True, to="sanity", convert=negated,
               help="Skip the sanity check that PGD at a huge eps reaches chance (one more attack on up to 200 "
                    "samples: slow on large models)."),
        Option("--resume", type=click.Path(dir_okay=False), to="resume", convert=as_optional_path,
               help="Save finished attacks to FILE as they complete, and continue from it if it exists (same "
                    "arguments and data only)."),
    )


EVALUATE = Command(*DATA, EvaluateArgs(),
                   AttackArgs(20, "20 here, to measure robustness; harden and sweep default to 10 for speed",
                              several_eps=True),
                   RuntimeArgs(), RayArgs(), OutputArgs(plot="Write a PNG of accuracy against eps."))


@main.command()
@EVALUATE
@handles_errors
def evaluate(**kw) -> None:
    """Measure what MODEL resists: clean accuracy, and accuracy under adaptive (white-box, through
    MODEL itself, mask included), transfer (crafted on --reference) and gradient-free attacks.

    --eps takes several budgets, comma-separated, e.g. 0.03,0.06,0.1. Exit status: 0, or 3 when an attack
    could not run (the others' results are still reported, and the failure is named).

    The data is read a batch at a time and each batch is attacked, judged and dropped: memory holds one
    survival bit per sample, whatever the size of the data.

    \b
    Example:
      cloakonnx evaluate model.cloaked.onnx --data test.npz --reference model.onnx --eps 0.05,0.1
    """
    from .config import EvaluateConfig
    from .evaluate import evaluate as run
    from .plots import plot_evaluate
    from .report import format_evaluate

    args = EVALUATE.parse(kw)
    result = run(args.model, args.data, args.config(EvaluateConfig)).to_dict()
    args.output.emit(result, format_evaluate, plot_evaluate)
    if result["failures"]:
        sys.exit(3)


class DemoArgs(ArgGroup):
    """Where the demo writes, and how it trains (DemoOptions)."""

    options = (
        Option("--out", "out", default="cloakonnx-demo", show_default=True, type=click.Path(file_okay=False),
               help="Folder for the trained model, its data, the hardened model and the report.", to="out",
               convert=as_path),
        Option("--epochs", type=int, default=15, show_default=True, help="Training epochs for the digits CNN.",
               to="epochs"),
        Option("--seed", type=int, default=0, show_default=True,
               help="Makes the training, the splits and the attacks repeatable.", to="seed"),
    )


DEMO = Command(DemoArgs(), ThreadsArgs(), OutputArgs())


@main.command()
@DEMO
@handles_errors
def demo(**kw) -> None:
    """Run the whole job on real data: train a CNN on scikit-learn's digits, export it, harden it with
    the default (fine-tuned weights; learned masks when those gain nothing) and, for comparison, with
    the paper's mask.

    Needs no download and finishes in one to two minutes on two CPU cores.
    """
    from .demo import PAPER_FRACTION, DemoOptions, run_demo
    from .report import format_comparison, format_harden

    args = DEMO.parse(kw)
    options = args.config(DemoOptions)
    result = run_demo(options)
    paper = f"paper's mask (--score absdiff --fraction {PAPER_FRACTION:g})"
    data = dict(result.report, demo={"held_out_accuracy": result.test_accuracy, "train_seconds": result.train_seconds,
                                     "data": str(result.data), "test_data": str(result.test_data),
                                     "paper": result.paper})
    output = replace(args.output, report=args.output.report or str(options.out / "report.json"))
    output.emit(data, format_harden)
    if not output.as_json:
        click.echo("\n" + format_comparison({paper: result.paper, "the default (--method auto)": result.report}))
        click.echo(f"next: cloakonnx evaluate {result.report['output']} --data {result.test_data} "
                   f"--reference {result.model} --eps 0.1 --preset standard")


class CheckArgs(ArgGroup):
    """The random inputs on which check compares the two executors."""

    options = (
        Option("--batch", type=int, default=2, show_default=True, help="Batch size for dynamic batch dimensions.",
               to="batch"),
        Option("--bounds", default="0,1", show_default=True, help="LOW,HIGH box to draw random inputs from.",
               to="bounds", convert=parse_pair),
    )


CHECK = Command(CheckArgs(), ModelArgs("Needed for inputs with dynamic dims besides the batch (height, width); a "
                                       "given shape sets its batch too.", input_name=False, logits=False),
                ThreadsArgs(), OutputArgs(report=False))


@main.command()
@CHECK
@handles_errors
def check(**kw) -> None:
    """Check that cloakonnx's torch executor reproduces MODEL (outputs and usable gradients).

    Exit 0 only when every output matches onnxruntime within tolerance and input gradients are
    finite and non-zero. Unsupported ops are all listed at once.

    \b
    Example, for a model exported with a dynamic height and width:
      cloakonnx check model.onnx --input-shapes 'input:[2,3,224,224]'
    """
    from .check import check_model
    from .graph import load_model
    from .report import format_check

    args = CHECK.parse(kw)
    from .runtime import resolve_threads

    fields = dict(args.fields, threads=resolve_threads(args.fields.get("threads")))
    result = check_model(load_model(args.model), **fields)
    args.output.emit(dict(result.to_dict(), model=args.model, ok=result.ok), format_check)
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
