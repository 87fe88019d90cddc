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


def _emit(data: dict, as_json: bool, report: str | None, human) -> None:
    from .report import to_json, write_report

    if report:
        write_report(data, report)
    if as_json:
        click.echo(to_json(data))
    else:
        click.echo(human(data))
        if report:
            click.echo(f"report written to {report}")


def _pair(text: str | None, what: str, cast=float):
    if text is None:
        return None
    from .data import parse_floats

    values = parse_floats(text, what)
    if values is None or len(values) != 2:
        raise CloakError(f"{what} takes two comma-separated values, got {text!r}")
    return tuple(cast(v) for v in values)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout instead of the table.")
batch_size_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=None,
    help="Samples per attack batch [default: sized to the device's free memory; at most 128 on CPU, 1024 on CUDA].")
report_option = click.option("--report", type=click.Path(dir_okay=False), help="Also write the JSON report to PATH.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@json_option
@handles_errors
def inspect(model: str, logits: str | None, as_json: bool) -> None:
    """Show MODEL's inputs, outputs, opset, classification head, feature tensor and any cloak mask."""
    from .model import inspect_model
    from .report import format_inspect

    _emit(inspect_model(model, logits).to_dict(), as_json, None, format_inspect)


_HARDEN_OPTIONS = [
    click.argument("model", type=click.Path()),
    click.option("--data", "data", required=True, type=click.Path(),
                 help="Labelled data: .npz with x (N x input shape, in --bounds) and y (int labels), "
                      "or a folder of class sub-folders of images."),
    click.option("--attack", type=click.Choice(["pgd", "fgsm", "apgd-ce", "apgd-dlr", "square"]), default="pgd",
                 show_default=True, help="Attack used to find the features adversarial noise moves."),
    click.option("--eps", type=float, default=8 / 255, show_default="8/255",
                 help="Perturbation budget, in the units of --bounds."),
    click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True),
    click.option("--steps", type=int, default=10, show_default=True, help="Iterations of gradient attacks."),
    click.option("--step-size", type=float, default=None, help="PGD step size [default: 2.5 * eps / steps]."),
    click.option("--restarts", type=int, default=1, show_default=True, help="Random restarts (worst case kept)."),
    click.option("--no-random-start", is_flag=True, help="Start PGD at the clean input."),
    click.option("--queries", type=int, default=1000, show_default=True, help="Query budget of --attack square."),
    click.option("--fraction", type=float, default=0.01, show_default=True,
                 help="Share of features to zero, in [0, 1) (ignored with --max-clean-drop)."),
    click.option("--max-clean-drop", type=float, default=None, metavar="PTS",
                 help="Choose the share on the validation split: best adversarial accuracy with clean accuracy "
                      "at most PTS percentage points below the original's. No gain, no mask."),
    click.option("--budget-confidence", type=float, default=0.9, show_default=True, metavar="P",
                 help="With --max-clean-drop: also require the drop's upper confidence bound (P, one-sided) to be "
                      "within the budget, so that it holds on new data, not just on a lucky validation split. "
                      "0: the validation point estimate alone."),
    click.option("--score", type=click.Choice(["absdiff", "normalised", "margin"]), default="absdiff",
                 show_default=True,
                 help="absdiff: mean |f(x') - f(x)| (the paper's); normalised: absdiff / clean std; "
                      "margin: push of the true-vs-adversarial logit margin through the head's weights."),
    click.option("--val-split", type=float, default=0.2, show_default=True,
                 help="Share of the data held out for choosing and reporting, never used for scoring."),
    click.option("--bounds", default="0,1", show_default=True, help="LOW,HIGH box the data lives in."),
    click.option("--mean", default=None, help="Per-channel mean applied between the box and the model, e.g. 0.485,0.456,0.406."),
    click.option("--std", default=None, help="Per-channel std, with --mean."),
    click.option("--size", default=None, metavar="H,W", help="Resize images from an image folder to H,W."),
    click.option("--feature-tensor", metavar="NAME", help="Mask this tensor instead of the head's input (4-D: per channel)."),
    click.option("--input", "input_name", metavar="NAME", help="Model input to use (if there are several)."),
    click.option("--logits", "logits", metavar="NAME", help="Graph output that carries the logits (if there are several)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Makes splits and attacks repeatable."),
    batch_size_option,
    click.option("--device", default=None, help="torch device for attacks [default: cuda if available, else cpu]."),
    click.option("--providers", default=None, help="Comma-separated onnxruntime providers [default: CUDA if it loads, else CPU]."),
]


def harden_options(fn):
    for option in reversed(_HARDEN_OPTIONS):
        fn = option(fn)
    return fn


def _harden_config(kw: dict, **extra):
    """HardenConfig from the shared options (consumes them from ``kw``)."""
    from .attacks import AttackConfig
    from .data import Preprocess, parse_floats
    from .harden import HardenConfig

    return HardenConfig(
        attack=AttackConfig(name=kw["attack"], eps=kw["eps"], norm=kw["norm"], steps=kw["steps"],
                            step_size=kw["step_size"], random_start=not kw["no_random_start"],
                            restarts=kw["restarts"], queries=kw["queries"], seed=kw["seed"],
                            batch_size=kw["batch_size"]),
        fraction=kw["fraction"], score=kw["score"], val_split=kw["val_split"], max_clean_drop=kw["max_clean_drop"],
        budget_confidence=kw["budget_confidence"],
        preprocess=Preprocess(_pair(kw["bounds"], "--bounds"), parse_floats(kw["mean"], "--mean"),
                              parse_floats(kw["std"], "--std")),
        feature_tensor=kw["feature_tensor"], input_name=kw["input_name"], output_name=kw["logits"],
        image_size=_pair(kw["size"], "--size", int), seed=kw["seed"], device=kw["device"],
        providers=tuple(p for p in kw["providers"].split(",") if p) if kw["providers"] else None,
        **extra,
    )


@main.command()
@harden_options
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
def harden(output, rounds, no_adaptive, plot, fold, as_json, report, **kw) -> None:
    """Write a hardened copy of MODEL with a DeepCloak mask chosen on --data, and report what it buys.

    \b
    Examples:
      cloakonnx harden model.onnx --data calib.npz -o model.cloaked.onnx \\
          --attack pgd --eps 0.1 --fraction 0.05 --report report.json
      cloakonnx harden model.onnx --data calib.npz --eps 0.1 --max-clean-drop 1 --plot curve.png
    """
    from .harden import harden as run
    from .report import format_harden

    model, data = kw.pop("model"), kw.pop("data")
    config = _harden_config(kw, output=Path(output) if output else None, rounds=rounds, adaptive=not no_adaptive,
                            plot=Path(plot) if plot else None, fold=fold)
    _emit(run(model, data, config).to_dict(), as_json, report, format_harden)


@main.command()
@harden_options
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the curves and the score distribution.")
@json_option
@report_option
@handles_errors
def sweep(plot, as_json, report, **kw) -> None:
    """Show the whole trade-off: clean and adversarial accuracy against the share of features masked,
    for every score, on the validation split. Writes no model.

    \b
    Example:
      cloakonnx sweep model.onnx --data calib.npz --eps 0.1 --max-clean-drop 1 --plot curve.png
    """
    from .report import format_sweep, plot_sweep
    from .sweep import sweep as run

    model, data = kw.pop("model"), kw.pop("data")
    result = run(model, data, _harden_config(kw)).to_dict()
    if plot:
        plot_sweep(result, plot)
    _emit(result, as_json, report, format_sweep)


@main.command()
@click.argument("model", type=click.Path())
@click.option("--data", "data", required=True, type=click.Path(), help="Labelled held-out data (.npz or image folder).")
@click.option("--reference", type=click.Path(), help="The original (unhardened) model: adds transfer attacks crafted on it.")
@click.option("--attack", "attacks", default="fgsm,pgd,square", show_default=True,
              help="Comma-separated attacks: fgsm, pgd, apgd-ce, apgd-dlr, square.")
@click.option("--preset", type=click.Choice(["standard"]), default=None,
              help="A fixed, documented set (APGD-CE, APGD-DLR 100 steps; Square 5000 queries), worst case per sample.")
@click.option("--eps", default="0.03137", show_default="8/255",
              help="One or more budgets, comma-separated, e.g. 0.03,0.06,0.1.")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="Iterations of gradient attacks.")
@click.option("--restarts", type=int, default=1, show_default=True)
@click.option("--queries", type=int, default=1000, show_default=True, help="Query budget of Square.")
@click.option("--max-samples", type=int, default=None, help="Evaluate a random subset of this size.")
@click.option("--bounds", default="0,1", show_default=True, help="LOW,HIGH box the data lives in.")
@click.option("--mean", default=None, help="Per-channel mean applied between the box and the model.")
@click.option("--std", default=None, help="Per-channel std, with --mean.")
@click.option("--size", default=None, metavar="H,W", help="Resize images from an image folder to H,W.")
@click.option("--input", "input_name", metavar="NAME", help="Model input to use (if there are several).")
@click.option("--logits", "logits", metavar="NAME", help="Graph output that carries the logits.")
@click.option("--seed", type=int, default=0, show_default=True)
@batch_size_option
@click.option("--device", default=None, help="torch device for attacks [default: cuda if available, else cpu].")
@click.option("--providers", default=None, help="Comma-separated onnxruntime providers.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of accuracy against eps.")
@json_option
@report_option
@handles_errors
def evaluate(model, data, reference, attacks, preset, eps, norm, steps, restarts, queries, max_samples, bounds, mean,
             std, size, input_name, logits, seed, batch_size, device, providers, plot, as_json, report) -> None:
    """Measure what MODEL resists: clean accuracy, and accuracy under adaptive (white-box, through
    MODEL itself, mask included), transfer (crafted on --reference) and gradient-free attacks.

    \b
    Example:
      cloakonnx evaluate model.cloaked.onnx --data test.npz --reference model.onnx --eps 0.05,0.1
    """
    from .data import Preprocess, parse_floats
    from .evaluate import EvaluateConfig
    from .evaluate import evaluate as run
    from .report import format_evaluate, plot_evaluate

    config = EvaluateConfig(
        attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()), eps=tuple(parse_floats(eps, "--eps") or ()),
        norm=norm, steps=steps, restarts=restarts, queries=queries, preset=preset,
        reference=Path(reference) if reference else None,
        preprocess=Preprocess(_pair(bounds, "--bounds"), parse_floats(mean, "--mean"), parse_floats(std, "--std")),
        input_name=input_name, output_name=logits, image_size=_pair(size, "--size", int), max_samples=max_samples,
        seed=seed, batch_size=batch_size, device=device,
        providers=tuple(p for p in providers.split(",") if p) if providers else None,
    )
    result = run(model, data, config).to_dict()
    if plot:
        plot_evaluate(result, plot)
    _emit(result, as_json, report, format_evaluate)


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


@main.command()
@click.argument("model", type=click.Path())
@click.option("--batch", type=int, default=2, show_default=True, help="Batch size for dynamic batch dimensions.")
@click.option("--bounds", default="0,1", show_default=True, help="LOW,HIGH box to draw random inputs from.")
@json_option
@handles_errors
def check(model, batch, bounds, as_json) -> None:
    """Check that cloakonnx's torch executor reproduces MODEL (outputs and usable gradients).

    Exit 0 only when every output matches onnxruntime within tolerance and input gradients are
    finite and non-zero. Unsupported ops are all listed at once.
    """
    from .check import check_model
    from .model import load_model
    from .report import format_check

    result = check_model(load_model(model), batch=batch, bounds=_pair(bounds, "--bounds"))
    data = dict(result.to_dict(), model=model, ok=result.ok)
    _emit(data, as_json, None, format_check)
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
