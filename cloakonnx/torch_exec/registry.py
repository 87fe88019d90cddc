"""The op table: which torch handler runs an ONNX op at a given opset.

The table is keyed by (op_type, since_version). Every handler registers itself with :func:`op`,
naming each since_version it has been checked against (the spec's changes between versions read,
and the handler made to follow them or the version left out), and the facts the planner needs
about it (a ``check`` for settings it cannot run, ``host_inputs`` read only as Python numbers).
A node is resolved as onnx2torch does: ``onnx.defs`` gives the since_version of the op's schema
at the model's opset, and exactly that key is looked up; a version without an entry is refused
(:func:`version_gap` says why), never served by the handler of an older or newer version.
No handler serves a domain other than the default ONNX one (com.microsoft, ai.onnx.ml, ...):
nodes of such domains are refused, as before. This module is the bottom of the package: the op
families import it, the planner reads it, and it imports nothing from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import onnx

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
    """Register a handler for ``name`` at each of ``versions``, ONNX since_versions of the op.

    A version serves only the opsets whose schema of ``name`` has that since_version; every version
    a handler has been checked against is listed (``@op("Gemm", 1, 6, 7, 9, 11, 13)``).

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


@lru_cache(maxsize=None)
def since_version(op_type: str, opset: int, domain: str = "") -> int | None:
    """The since_version of ``op_type``'s schema at ``opset`` of ``domain`` (``onnx.defs``), or None
    when onnx has no such op at that opset, or the opset is newer than the installed onnx knows
    (a version it cannot name cannot have been checked)."""
    if not domain and opset > onnx.defs.onnx_opset_version():
        return None
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version
    except onnx.defs.SchemaError:
        return None


def _resolve(op_type: str, opset: int) -> _OpVersion | None:
    """The handler registered for exactly the since_version ``op_type`` has at ``opset``, or None."""
    since = since_version(op_type, opset)
    return next((e for e in _OPS.get(op_type, ()) if e.since == since), None) if since is not None else None


def version_gap(op_type: str, opset: int) -> tuple[int | None, str] | None:
    """Why a known op has no handler at ``opset``: (its since_version there or None, the reason);
    None when the op has never been registered (an op the executor lacks altogether)."""
    if op_type not in _OPS:
        return None
    if opset > onnx.defs.onnx_opset_version():
        return None, f"opset {opset} is newer than the installed onnx knows ({onnx.defs.onnx_opset_version()})"
    since = since_version(op_type, opset)
    if since is None:
        return None, "no such op at this opset"
    return since, "not verified by cloakonnx's executor"


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
