"""The command line's argument groups, shared by harden, sweep and evaluate (as Polygraphy's
``args/``): each group declares its click options once and builds its part of the typed config."""
from __future__ import annotations

import re

import click

from .errors import CloakError


def parse_pair(text: str | None, what: str, cast=float, square: bool = False):
    """``LOW,HIGH`` or ``H,W``; with ``square`` a single value N means ``N,N`` (as image tools read a size)."""
    if text is None:
        return None
    from .data import parse_floats

    values = parse_floats(text, what)
    if square and values is not None and len(values) == 1:
        values = values * 2
    if values is None or len(values) != 2:
        raise CloakError(f"{what} takes two comma-separated values{' (or one, for a square)' if square else ''}, "
                         f"got {text!r}")
    return tuple(cast(v) for v in values)


INPUT_SHAPES_SYNTAX = "NAME:[D0,D1,...]"
_SHAPE_ITEM = r"\s*(\S+?):\[([^\]]*)\]\s*"  # NAME:[...]; the name is everything before ":[" (``input:0`` works)


def join_input_shapes(args: list[str]) -> list[str]:
    """Polygraphy takes several shapes after one ``--input-shapes``; a click option takes one value, so
    the ``NAME:[...]`` words that follow it are joined into its value (space-separated)."""
    out: list[str] = []
    joining = False
    for arg in args:
        if joining and re.fullmatch(_SHAPE_ITEM, arg):
            out[-1] += " " + arg
            continue
        joining = arg.startswith("--input-shapes=") or (bool(out) and out[-1] == "--input-shapes")
        out.append(arg)
    return out


class JoinsInputShapes(click.Command):
    """A command that reads ``--input-shapes a:[...] b:[...]`` as Polygraphy does."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, join_input_shapes(args))


def parse_input_shapes(values) -> dict[str, tuple[int, ...]]:
    """Polygraphy's ``--input-shapes NAME:[D0,D1,...]``: each value holds one or more shapes,
    space-separated, and the option may be repeated."""

    def malformed(value: str) -> CloakError:
        return CloakError(f"--input-shapes takes {INPUT_SHAPES_SYNTAX} for each input, e.g. "
                          f"--input-shapes input:[1,3,224,224]; got {value!r}")

    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        if not re.fullmatch(f"(?:{_SHAPE_ITEM})+", value):
            raise malformed(value)
        for name, body in re.findall(_SHAPE_ITEM, value):
            dims = [d.strip() for d in body.split(",")] if body.strip() else []
            if not all(re.fullmatch(r"[+-]?\d+", d) for d in dims):
                raise malformed(value)
            if name in shapes:
                raise CloakError(f"--input-shapes gives {name!r} twice")
            shapes[name] = tuple(int(d) for d in dims)
    return shapes


def group(*decorators):
    """One decorator from several click options (a Polygraphy-style argument group)."""

    def apply(fn):
        for option in reversed(decorators):
            fn = option(fn)
        return fn

    return apply


def input_shapes_option(use: str):
    """``--input-shapes``, with what the command does with it (``use``) in its help."""
    return click.option(
        "--input-shapes", "input_shapes", multiple=True, metavar=INPUT_SHAPES_SYNTAX,
        help=f"Shapes to run inputs with, in Polygraphy's syntax, e.g. --input-shapes input:[1,3,224,224]. "
             f"Several inputs: space-separated after one --input-shapes (a:[1,3] b:[1,5]), or the option "
             f"repeated. {use} Quote a value where the shell expands [...].")


# --- argument groups, shared by harden, sweep and evaluate ----------------------------------------------

data_options = group(
    click.option("--data", "data", type=click.Path(),
                 help="Labelled data, read a batch at a time: .npz with x (N x input shape, in --bounds) and y "
                      "(int labels); a folder holding x.npy and y.npy (or X.npy,Y.npy); or a folder of class "
                      "sub-folders of images, decoded as needed."),
    click.option("--data-loader-script", "data_loader_script", metavar="FILE.py[:FUNC]",
                 help="Instead of --data: FUNC (default load_data) in FILE.py yields (x, y) batches, as "
                      "Polygraphy's option of that name. Read once, into a temporary file."),
    click.option("--bounds", default="0,1", show_default=True, help="LOW,HIGH box the data lives in."),
    click.option("--mean", default=None,
                 help="Per-channel mean applied between the box and the model, e.g. 0.485,0.456,0.406."),
    click.option("--std", default=None, help="Per-channel std, with --mean."),
    click.option("--size", default=None, metavar="H,W",
                 help="Resize images from an image folder to H,W (one value N: N,N)."),
    click.option("--resize", type=click.IntRange(min=1), default=None, metavar="S",
                 help="Image folders: resize the short side to S, keeping the aspect (torchvision's Resize)..."),
    click.option("--crop", type=click.IntRange(min=1), default=None, metavar="C",
                 help="...then cut the centred C x C square (CenterCrop), e.g. --resize 256 --crop 224."),
    click.option("--data-workers", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Threads decoding images, ahead of the attack [default: min(4, cores)]."),
    click.option("--input", "input_name", metavar="NAME", help="Model input to use (if there are several)."),
    input_shapes_option("Every dim but the batch must match the data's samples (an image folder is resized to "
                        "the given H,W unless --size is given)."),
    click.option("--logits", "logits", metavar="NAME",
                 help="Graph output that carries the logits (if there are several)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Makes splits and attacks repeatable."),
)


def attack_options(default_steps: int, why_steps: str):
    """Settings every attack shares. ``--steps`` defaults differ on purpose; ``why_steps`` says why."""
    return group(
        click.option("--eps", default="8/255", show_default=True, metavar="EPS",
                     help="Perturbation budget in the units of --bounds (a number or a fraction such as 8/255)."),
        click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True),
        click.option("--steps", type=int, default=default_steps, show_default=True,
                     help=f"Iterations of gradient attacks ({why_steps})."),
        click.option("--step-size", type=float, default=None, help="PGD step size [default: 2.5 * eps / steps]."),
        click.option("--restarts", type=int, default=1, show_default=True, help="Random restarts (worst case kept)."),
        click.option("--no-random-start", is_flag=True, help="Start PGD at the clean input."),
        click.option("--queries", type=int, default=1000, show_default=True, help="Query budget of Square."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Samples per attack batch [default: sized to the device's free memory; at most 128 on "
                          "CPU, 1024 on CUDA]."),
    )


runtime_options = group(
    click.option("--device", default=None, help="torch device for attacks [default: cuda if available, else cpu]."),
    click.option("--providers", default=None,
                 help="Comma-separated onnxruntime providers [default: CUDA if it loads, else CPU]."),
    click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="Run the attacks on a Ray cluster (pip install \"cloakonnx[ray]\"): alone, a local Ray "
                      "instance; 'auto' or an address (host:6379, ray://host:10001) joins a running cluster. "
                      "Same results as without it."),
    click.option("--ray-workers", "ray_workers", type=click.IntRange(min=1), default=None, metavar="N",
                 help="With --ray: workers [default: one per GPU when the cluster has GPUs, else one per CPU]; "
                      "each gets its share of the cores as torch and onnxruntime threads."),
)

mask_options = group(
    click.option("--attack", type=click.Choice(["pgd", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"]),
                 default="pgd",
                 show_default=True, help="Attack used to find the features adversarial noise moves."),
    click.option("--fraction", type=float, default=None,
                 help="Share of features to zero, in [0, 1) (ignored with --max-clean-drop) [default: 0.01; with "
                      "--score learned, the features the learning switched off]."),
    click.option("--max-clean-drop", type=float, default=None, metavar="PTS",
                 help="Choose the share on the validation split: best adversarial accuracy with clean accuracy "
                      "at most PTS percentage points below the original's. No gain, no mask."),
    click.option("--budget-confidence", type=float, default=0.9, show_default=True, metavar="P",
                 help="With --max-clean-drop: also require the drop's upper confidence bound (P, one-sided) to be "
                      "within the budget, so that it holds on new data, not just on a lucky validation split. "
                      "0: the validation point estimate alone."),
    click.option("--score", type=click.Choice(["absdiff", "normalised", "margin", "learned"]), default="absdiff",
                 show_default=True,
                 help="absdiff: mean |f(x') - f(x)| (the paper's); normalised: absdiff / clean std; "
                      "margin: push of the true-vs-adversarial logit margin through the head's weights; "
                      "learned: mask values trained against an adaptive attacker, weights frozen (slower, "
                      "usually much stronger)."),
    click.option("--mask-values", type=click.Choice(["binary", "soft"]), default="binary", show_default=True,
                 help="binary: the paper's 0/1 mask; soft (with --score learned): the learned multipliers, "
                      "still one constant Mul per tensor."),
    click.option("--val-split", type=float, default=0.2, show_default=True,
                 help="Share of the data held out for choosing and reporting, never used for scoring."),
    click.option("--val-max", type=click.IntRange(min=1), default=10000, show_default=True, metavar="N",
                 help="At most N held-out samples (the rest go to calibration). Memory holds, per held-out "
                      "sample, its label, its results and (for --max-clean-drop/--plot) two rows of the feature "
                      "tensor; the inputs themselves are read a batch at a time."),
    click.option("--feature-tensor", "feature_tensors", metavar="NAME", multiple=True,
                 help="Mask this tensor instead of the head's input (4-D: per channel). Several times, or "
                      "'auto' (the head's input and the last activation of each resolution stage), with "
                      "--score learned: one mask per tensor, learned jointly."),
)

learn_options = group(
    click.option("--learn-steps", type=click.IntRange(min=1), default=300, show_default=True,
                 help="--score learned: optimiser steps, one calibration batch each."),
    click.option("--learn-batch", type=click.IntRange(min=1), default=128, show_default=True,
                 help="--score learned: calibration samples per step."),
    click.option("--learn-lr", type=float, default=0.1, show_default=True, help="--score learned: Adam's step size."),
    click.option("--learn-attack", type=click.Choice(["pgd", "fgsm"]), default="pgd", show_default=True,
                 help="--score learned: the inner attacker (fgsm: random start and one step, faster)."),
    click.option("--learn-attack-steps", type=click.IntRange(min=1), default=5, show_default=True,
                 help="--score learned: steps of the inner PGD."),
    click.option("--learn-sparsity", type=float, default=0.0, show_default=True,
                 help="--score learned: weight of the mean mask value in the loss (more features off)."),
)


def data_source(kw: dict):
    """--data or --data-loader-script (exactly one), consumed from ``kw``."""
    from .data import LoaderScript

    data, script = kw.pop("data"), kw.pop("data_loader_script")
    if (data is None) == (script is None):
        raise click.UsageError("give the data with --data PATH or --data-loader-script FILE.py[:FUNC] (one of them)")
    return LoaderScript(script) if script else data


def parse_eps(text: str) -> list[float]:
    """``0.1``, ``8/255`` or a comma-separated list of them."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        num, _, den = part.partition("/")
        try:
            values.append(float(num) / float(den) if den else float(num))
        except (ValueError, ZeroDivisionError):
            raise CloakError(f"--eps takes numbers or fractions such as 8/255, got {text!r}") from None
    return values


def common_fields(kw: dict, name: str, eps: float) -> dict:
    """The CommonConfig fields from the data, attack and runtime groups (consumes them from ``kw``)."""
    from .attacks import AttackConfig
    from .data import Preprocess, parse_floats

    from .config import RayConfig

    providers = kw.pop("providers")
    ray, ray_workers = kw.pop("ray"), kw.pop("ray_workers")
    if ray_workers is not None and ray is None:
        raise click.UsageError("--ray-workers needs --ray")
    return dict(
        ray=None if ray is None else RayConfig(address=None if ray == "local" else ray, workers=ray_workers),
        attack=AttackConfig(name=name, eps=eps, norm=kw.pop("norm"), steps=kw.pop("steps"),
                            step_size=kw.pop("step_size"), random_start=not kw.pop("no_random_start"),
                            restarts=kw.pop("restarts"), queries=kw.pop("queries"), seed=kw["seed"],
                            batch_size=kw.pop("batch_size")),
        preprocess=Preprocess(parse_pair(kw.pop("bounds"), "--bounds"), parse_floats(kw.pop("mean"), "--mean"),
                              parse_floats(kw.pop("std"), "--std")),
        input_name=kw.pop("input_name"), logits=kw.pop("logits"),
        input_shapes=parse_input_shapes(kw.pop("input_shapes")),
        image_size=parse_pair(kw.pop("size"), "--size", int, square=True), resize=kw.pop("resize"),
        crop=kw.pop("crop"), data_workers=kw.pop("data_workers"),
        seed=kw.pop("seed"), device=kw.pop("device"),
        providers=tuple(p for p in providers.split(",") if p) if providers else None,
    )


def mask_config(cls, kw: dict, **extra):
    """HardenConfig or MaskConfig from the shared groups (consumes them from ``kw``)."""
    eps = parse_eps(kw.pop("eps"))
    if len(eps) != 1:
        raise CloakError(f"--eps takes one value here, got {len(eps)}")
    common = common_fields(kw, kw.pop("attack"), eps[0])
    from .config import LearnConfig

    learn = LearnConfig(steps=kw.pop("learn_steps"), batch_size=kw.pop("learn_batch"), lr=kw.pop("learn_lr"),
                        inner_attack=kw.pop("learn_attack"), inner_steps=kw.pop("learn_attack_steps"),
                        sparsity=kw.pop("learn_sparsity"))
    return cls(**common, fraction=kw.pop("fraction"), score=kw.pop("score"), val_split=kw.pop("val_split"),
               val_max=kw.pop("val_max"),
               max_clean_drop=kw.pop("max_clean_drop"), budget_confidence=kw.pop("budget_confidence"),
               feature_tensors=tuple(kw.pop("feature_tensors")), mask_values=kw.pop("mask_values"), learn=learn,
               **extra)


# harden and sweep take the same model, data, mask, attack and runtime options.
masking_options = group(
    click.argument("model", type=click.Path()), data_options, mask_options, learn_options,
    attack_options(10, "10 here, for speed: it crafts calibration inputs; evaluate defaults to 20 to measure"),
    runtime_options,
)
