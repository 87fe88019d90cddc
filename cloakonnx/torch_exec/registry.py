"""The op table: which torch handler runs an ONNX op at a given opset.

Every handler registers itself with :func:`op`, naming the since_versions it serves and the facts
the planner needs about it (a ``check`` for settings it cannot run, ``host_inputs`` read only as
Python numbers). The handler used for a node is the one with the largest since_version not above
the model's opset for the default domain. This module is the bottom of the package: the op
families import it, the planner reads it, and it imports nothing from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

Handler = Callable[[list, dict, "NodeContext"], Sequence]
Check = Callable[[dict, "NodeContext"], "str | None"]


@dataclass
class _OpVersion:
    since: int
    fn: Handler
    check: Check | None
    host_inputs: tuple[int, ...] = ()  # input positions only ever turned into Python numbers


_OPS: dict[str, list[_OpVersion]] = {}


def op(name: str, *versions: int, check: Check | None = None, host_inputs: tuple[int, ...] = ()):
    """Register a handler for ``name`` from each of ``versions`` (ONNX since_version) on.

    ``check(attrs, ctx)`` returns why a node's settings are unsupported, or None; ``host_inputs``
    are the input positions the handler only reads as Python numbers (shapes, axes, pads, sizes),
    which the planner keeps on the CPU when they are constant (an op declares the same positions
    for all its versions, attribute forms without such an input included). Registering a
    since_version that already has a handler raises ValueError, and then registers none of
    ``versions``.
    """

    def register(fn: Handler) -> Handler:
        taken = {e.since for e in _OPS.get(name, ())}
        for v in versions:
            if v in taken:
                raise ValueError(f"the torch executor already has a handler for {name} since opset {v}")
            taken.add(v)
        entries = _OPS.setdefault(name, [])
        for v in versions:
            entries.append(_OpVersion(v, fn, check, tuple(host_inputs)))
        entries.sort(key=lambda e: e.since)
        return fn

    return register


def _resolve(op_type: str, opset: int) -> _OpVersion | None:
    """The handler with the largest since_version <= opset, or None."""
    best = None
    for entry in _OPS.get(op_type, ()):
        if entry.since <= opset:
            best = entry
    return best


def supported_ops() -> dict[str, list[int]]:
    """Op type -> the since_versions that have their own handler (for docs and diagnostics)."""
    return {name: [e.since for e in entries] for name, entries in sorted(_OPS.items())}


@dataclass
class NodeContext:
    """What a handler may need about its node besides inputs and attributes; built once."""

    name: str
    op_type: str
    opset: int
    since: int
    outputs: list[str]
    cache: dict = field(default_factory=dict)  # handler-owned memo (e.g. resize indices per shape)

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def wants(self, i: int) -> bool:
        """True when output ``i`` exists and has a name (optional outputs may be omitted)."""
        return i < len(self.outputs) and bool(self.outputs[i])
