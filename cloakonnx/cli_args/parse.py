"""Parsers of option values. Each takes the value and the option's flag (``--bounds``), which names the
option in its error, so that an ``Option`` can use it as its ``convert``."""
from __future__ import annotations

import re
from pathlib import Path

import click

from ..errors import CloakError


def parse_floats(text: str | None, what: str) -> list[float] | None:
    """Parse '0.5,0.5,0.5' style options with an error that names the option."""
    if text is None or text == "":
        return None
    try:
        return [float(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise CloakError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_pair(text: str | None, what: str, cast=float, square: bool = False):
    """``LOW,HIGH`` or ``H,W``; with ``square`` a single value N means ``N,N`` (as image tools read a size)."""
    if text is None:
        return None
    values = parse_floats(text, what)
    if square and values is not None and len(values) == 1:
        values = values * 2
    if values is None or len(values) != 2:
        raise CloakError(f"{what} takes two comma-separated values{' (or one, for a square)' if square else ''}, "
                         f"got {text!r}")
    return tuple(cast(v) for v in values)


def parse_size(text: str | None, what: str) -> tuple[int, int] | None:
    """``H,W``, or N for ``N,N``."""
    return parse_pair(text, what, int, square=True)


def parse_eps(text: str, what: str = "--eps") -> list[float]:
    """``0.1``, ``8/255`` or a comma-separated list of them."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        num, _, den = part.partition("/")
        try:
            values.append(float(num) / float(den) if den else float(num))
        except (ValueError, ZeroDivisionError):
            raise CloakError(f"{what} takes numbers or fractions such as 8/255, got {text!r}") from None
    return values


def parse_one_eps(text: str, what: str) -> float:
    """One budget (harden and sweep craft their calibration inputs at one eps)."""
    eps = parse_eps(text, what)
    if len(eps) != 1:
        raise CloakError(f"{what} takes one value here, got {len(eps)}")
    return eps[0]


def parse_eps_list(text: str, what: str) -> tuple[float, ...]:
    return tuple(parse_eps(text, what))


def parse_names(text: str, _what: str) -> tuple[str, ...]:
    """``a, b,c`` -> ('a', 'b', 'c'): comma-separated names, spaces and empty names dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def parse_providers(text: str | None, _what: str) -> tuple[str, ...] | None:
    """Comma-separated onnxruntime providers, taken as written; None (or empty): the default."""
    return tuple(p for p in text.split(",") if p) if text else None


def as_path(text: str, _what: str) -> Path:
    return Path(text)


def as_optional_path(text: str | None, _what: str) -> Path | None:
    """A path, or None when the option is not given (or empty)."""
    return Path(text) if text else None


def as_tuple(values, _what: str) -> tuple | None:
    """A ``multiple=True`` option's values; None when it was not given (the config's default)."""
    return tuple(values) or None


def negated(flag: bool, _what: str) -> bool:
    """A ``--no-X`` flag fills the field ``X``."""
    return not flag


# --- --input-shapes, in Polygraphy's syntax ---------------------------------------------------------------

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


def parse_input_shapes(values, what: str = "--input-shapes") -> dict[str, tuple[int, ...]]:
    """Polygraphy's ``--input-shapes NAME:[D0,D1,...]``: each value holds one or more shapes,
    space-separated, and the option may be repeated."""

    def malformed(value: str) -> CloakError:
        return CloakError(f"{what} takes {INPUT_SHAPES_SYNTAX} for each input, e.g. "
                          f"{what} input:[1,3,224,224]; got {value!r}")

    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        if not re.fullmatch(f"(?:{_SHAPE_ITEM})+", value):
            raise malformed(value)
        for name, body in re.findall(_SHAPE_ITEM, value):
            dims = [d.strip() for d in body.split(",")] if body.strip() else []
            if not all(re.fullmatch(r"[+-]?\d+", d) for d in dims):
                raise malformed(value)
            if name in shapes:
                raise CloakError(f"{what} gives {name!r} twice")
            shapes[name] = tuple(int(d) for d in dims)
    return shapes
