"""The ``cloakonnx`` command line: each command parses options and calls one library function.

User errors (CloakError) print ``cloakonnx: error: ...`` and exit 1; usage errors exit 2 (click's
convention); tracebacks appear only with ``--debug``.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .cli_args import (JoinsInputShapes, attack_options, common_fields, data_options, data_source, input_shapes_option, mask_config,
                       masking_options, parse_eps, parse_input_shapes, parse_pair, runtime_options)
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
            click.echo("cloakonnx: error: interrupted; nothing was written", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    return wrapper


def _emit(data: dict, as_json: bool, report: str | None, human, plot: str | None = None, plotter=None) -> None:
    """Plot (if asked), write the JSON report (if asked), then print the table or the JSON."""
    from .report import to_json, write_report

    if plot:
        plotter(data, plot)
    if report:
        write_report(data, report)
    if as_json:
        click.echo(to_json(data))
    else:
        click.echo(human(data))
        if report:
            click.echo(f"report written to {report}")


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout instead of the table.")
report_option = click.option("--report", type=click.Path(dir_okay=False), help="Also write the JSON report to PATH.")


class _Group(click.Group):
    command_class = JoinsInputShapes  # every command reads --input-shapes as Polygraphy does


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cloakonnx")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors (no progress or status).")
def main(debug: bool, quiet: bool) -> None:
    """Harden ONNX image classifiers against adversarial inputs, with no retraining.

    cloakonnx crafts adversarial inputs, measures which features of the tensor feeding the final
    linear layer they move most, and writes a model in which one constant Mul zeroes those
    features (the DeepCloak method). The result runs anywhere ONNX runs.

    \b
    Start here:   cloakonnx demo
    Your model:   cloakonnx inspect model.onnx
                  cloakonnx harden model.onnx --data calib.npz -o model.cloaked.onnx
    """
    _configure_logging(quiet)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


@main.command()
@click.argument("model", type=click.Path())
@click.option("--logits", "logits", metavar="NAME", help="Graph output that carries the logits (if there are several).")
@input_shapes_option("inspect checks them against the model and shows them next to the declared shapes.")
@json_option
@handles_errors
def inspect(model: str, logits: str | None, input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Show MODEL's inputs, outputs, opset, classification head, feature tensor and any cloak mask."""
    from .graph import inspect_model
    from .report import format_inspect

    info = inspect_model(model, logits, parse_input_shapes(input_shapes))
    _emit(info.to_dict(), as_json, None, format_inspect)



@main.command()
@masking_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Hardened model path [default: MODEL.cloaked.onnx].")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Rounds of hardening: each attacks the model hardened so far and adds to the mask.")
@click.option("--no-adaptive", is_flag=True, help="Skip the adaptive attack on the hardened model (faster).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the trade-off curve of this run.")
@click.option("--fold", is_flag=True,
              help="Multiply the mask into the head's weights: same outputs, exactly the original's node count.")
@json_option
@report_option
@handles_errors
def harden(model, output, rounds, no_adaptive, plot, fold, as_json, report, **kw) -> None:
    """Write a hardened copy of MODEL with a DeepCloak mask chosen on --data, and report what it buys.

    \b
    Examples:
      cloakonnx harden model.onnx --data calib.npz -o model.cloaked.onnx \\
          --attack pgd --eps 0.1 --fraction 0.05 --report report.json
      cloakonnx harden model.onnx --data calib.npz --eps 0.1 --max-clean-drop 1 --plot curve.png
    """
    from .config import HardenConfig
    from .harden import harden as run
    from .report import format_harden, plot_harden

    data = data_source(kw)
    config = mask_config(HardenConfig, kw, output=Path(output) if output else None, rounds=rounds,
                          adaptive=not no_adaptive, curve=bool(plot), fold=fold)
    _emit(run(model, data, config).to_dict(), as_json, report, format_harden, plot, plot_harden)


@main.command()
@masking_options
@click.option("--scores", default="absdiff,normalised,margin", show_default=True,
              help="Comma-separated scores to compare; add 'learned' to compare the learned mask too (it trains "
                   "a mask first, so it is much the slowest).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the curves and the score distribution.")
@json_option
@report_option
@handles_errors
def sweep(model, scores, plot, as_json, report, **kw) -> None:
    """Show the whole trade-off: clean and adversarial accuracy against the share of features masked,
    for every score, on the validation split. Writes no model.

    \b
    Example:
      cloakonnx sweep model.onnx --data calib.npz --eps 0.1 --max-clean-drop 1 --plot curve.png
    """
    from .config import MaskConfig
    from .report import format_sweep, plot_sweep
    from .sweep import sweep as run

    data = data_source(kw)
    names = tuple(s.strip() for s in scores.split(",") if s.strip())
    _emit(run(model, data, mask_config(MaskConfig, kw), names).to_dict(), as_json, report, format_sweep, plot,
          plot_sweep)


@main.command()
@click.argument("model", type=click.Path())
@data_options
@click.option("--reference", type=click.Path(), help="The original (unhardened) model: adds transfer attacks crafted on it.")
@click.option("--attack", "attacks", default="fgsm,pgd,square", show_default=True,
              help="Comma-separated attacks: fgsm, pgd, apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square.")
@click.option("--preset", type=click.Choice(["standard", "plus", "fast"]), default=None,
              help="A fixed, documented set, each attack only on the points still robust (AutoAttack's way). "
                   "standard: AutoAttack's standard version: APGD-CE, APGD-T and FAB-T (100 steps, 9 target "
                   "classes), Square (5000 queries). plus: AutoAttack's plus version: APGD-CE, APGD-DLR and "
                   "untargeted FAB with 5 restarts each, Square (5000 queries), APGD-T, FAB-T. "
                   "fast: APGD-CE and APGD-T.")
@attack_options(20, "20 here, to measure robustness; harden and sweep default to 10 for speed")
@runtime_options
@click.option("--max-samples", type=int, default=None, help="Evaluate a random subset of this size.")
@click.option("--no-large-eps-check", is_flag=True,
              help="Skip the sanity check that PGD at a huge eps reaches chance (one more attack on up to 200 "
                   "samples: slow on large models).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of accuracy against eps.")
@json_option
@report_option
@handles_errors
def evaluate(model, reference, attacks, preset, max_samples, no_large_eps_check, plot, as_json, report,
             **kw) -> None:
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
    from .report import format_evaluate, plot_evaluate

    data, eps = data_source(kw), tuple(parse_eps(kw.pop("eps")))
    names = tuple(a.strip() for a in attacks.split(",") if a.strip())
    config = EvaluateConfig(**common_fields(kw, "pgd", eps[0]), attacks=names, eps=eps, preset=preset,
                            reference=Path(reference) if reference else None, max_samples=max_samples,
                            sanity=not no_large_eps_check)
    result = run(model, data, config).to_dict()
    _emit(result, as_json, report, format_evaluate, plot, plot_evaluate)
    if result["failures"]:
        sys.exit(3)


@main.command()
@click.option("--out", "out", default="cloakonnx-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the trained model, its data, the hardened model and the report.")
@click.option("--epochs", type=int, default=15, show_default=True, help="Training epochs for the digits CNN.")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@report_option
@handles_errors
def demo(out, epochs, seed, as_json, report) -> None:
    """Run the whole job on real data: train a CNN on scikit-learn's digits, export it, harden it.

    Needs no download and finishes in about a minute on two CPU cores.
    """
    from .demo import DemoOptions, run_demo
    from .report import format_harden

    result = run_demo(DemoOptions(out=Path(out), epochs=epochs, seed=seed))
    data = dict(result.report, demo={"held_out_accuracy": result.test_accuracy, "train_seconds": result.train_seconds,
                                     "data": str(result.data), "test_data": str(result.test_data)})
    report_path = report or str(Path(out) / "report.json")
    _emit(data, as_json, report_path, format_harden)
    if not as_json:
        click.echo(f"next: cloakonnx evaluate {result.report['output']} --data {result.test_data} "
                   f"--reference {result.model} --eps 0.05,0.1")
        click.echo(f"      cloakonnx harden {result.model} --data {result.data} --eps 0.1 --score learned "
                   "(a learned mask: stronger, about 30 s more)")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--batch", type=int, default=2, show_default=True, help="Batch size for dynamic batch dimensions.")
@click.option("--bounds", default="0,1", show_default=True, help="LOW,HIGH box to draw random inputs from.")
@input_shapes_option("Needed for inputs with dynamic dims besides the batch (height, width); a given shape sets "
                     "its batch too.")
@json_option
@handles_errors
def check(model, batch, bounds, input_shapes, as_json) -> None:
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

    shapes = parse_input_shapes(input_shapes)
    result = check_model(load_model(model), batch=batch, bounds=parse_pair(bounds, "--bounds"), input_shapes=shapes)
    data = dict(result.to_dict(), model=model, ok=result.ok)
    _emit(data, as_json, None, format_check)
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
