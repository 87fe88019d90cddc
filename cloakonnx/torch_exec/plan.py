"""The planner: checks a model against the op table and turns its graph into an execution plan.

Everything that reads the model happens here, once per model, so that running it (module.py) is
a plain loop over steps: inline local functions, list every unsupported op at once, order the
nodes, resolve each node's handler, parse its attributes, fold all-constant subgraphs, prune what
the requested outputs do not need, fuse what third-party exports leave unfused (fuse.py), keep
constant shape inputs on the host, assign slots and work out where each intermediate can be freed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx
import torch
from onnx import TensorProto

from ..errors import CloakError
from .fuse import PlanNode, fuse as fuse_nodes
from .registry import Handler, NodeContext, _OpVersion, _resolve, version_gap
from .tensors import _FLOAT32_STANDINS, _UNPARSED, _attrs, _sparse_to_dense, tensor_from_proto

DEFAULT_DOMAINS = ("", "ai.onnx")


class UnsupportedOpsError(CloakError):
    """The model uses ops (or op settings) the torch executor cannot run; all are listed at once.

    ``ops`` holds (op_type, opset of its domain) pairs; ``reasons`` why, where there is more to say
    than that the op is missing; ``since_versions`` the op's since_version at that opset, for the ops
    that are refused because the executor has not been verified against that version of the op.
    """

    def __init__(self, ops: list[tuple[str, int]], reasons: dict[tuple[str, int], str] | None = None,
                 since_versions: dict[tuple[str, int], int] | None = None):
        self.ops = list(ops)
        self.reasons = dict(reasons or {})
        self.since_versions = dict(since_versions or {})
        parts = []
        for op_type, version in self.ops:
            domain, _, name = op_type.rpartition("::")
            since = self.since_versions.get((op_type, version))
            text = f"{domain or 'ai.onnx'}::{name} (opset {version}{f', since_version {since}' if since is not None else ''})"
            if (op_type, version) in self.reasons:
                text += f": {self.reasons[(op_type, version)]}"
            parts.append(text)
        super().__init__(
            f"the torch executor does not support {len(self.ops)} op(s) used by this model: "
            + "; ".join(parts)
            + ". Re-export the model with a supported opset, or ask for these ops to be added."
        )


# --------------------------------------------------------------------------------------------
# Model analysis
# --------------------------------------------------------------------------------------------


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline model-local functions, so their bodies are checked and run like any other node."""
    if len(model.functions):
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for imp in model.opset_import:
        out["" if imp.domain in DEFAULT_DOMAINS else imp.domain] = imp.version
    return out


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _scan(model: onnx.ModelProto) -> tuple[dict[tuple[str, int], str | None], dict[tuple[str, int], int]]:
    """Every unsupported (op, opset) with a reason when the op exists but a version or a setting is
    missing, and the since_version of each op refused for its version."""
    opsets = _opsets(model)
    bad: dict[tuple[str, int], str | None] = {}
    since: dict[tuple[str, int], int] = {}

    def visit(graph: onnx.GraphProto):
        for node in graph.node:
            domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
            version = opsets.get(domain, 0)
            key = (_op_key(node), version)
            if domain:  # no handler serves another domain
                bad.setdefault(key, None)
                continue
            entry = _resolve(node.op_type, version)
            if entry is None:
                gap = version_gap(node.op_type, version)
                bad[key] = gap[1] if gap else None
                if gap and gap[0] is not None:
                    since[key] = gap[0]
                continue
            attrs = _attrs(node)
            reason = None
            if any(v is _UNPARSED for v in attrs.values()):
                reason = "subgraph or type attributes"
            elif entry.check is not None:
                ctx = NodeContext(node.name, node.op_type, version, entry.since, list(node.output))
                reason = entry.check(attrs, ctx)
            if reason is not None:
                bad[key] = reason
            for a in node.attribute:  # nested graphs are unsupported; still list their ops
                for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                    visit(g)

    visit(model.graph)
    return bad, since


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """Ops this executor cannot run, as sorted unique (op_type, opset of its domain); [] if none.

    Ops outside the default ONNX domain are named ``domain::op_type``.
    """
    return sorted(_scan(_prepared(model))[0])


def _raise_if_unsupported(model: onnx.ModelProto) -> None:
    bad, since = _scan(model)
    if bad:
        keys = sorted(bad)
        raise UnsupportedOpsError(keys, {k: v for k, v in bad.items() if v}, since)


def _toposort(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced first (stable for sorted graphs)."""
    nodes = list(graph.node)
    available = set(known) | {""}
    order, pending = [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                order.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})
            raise CloakError(f"the ONNX graph has inputs no node produces: {', '.join(missing[:10])}")
        pending = rest
    return order


def _uses_wide_or_narrow_floats(model: onnx.ModelProto) -> bool:
    g = model.graph
    types = [t.data_type for t in g.initializer]
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types.append(vi.type.tensor_type.elem_type)
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.type == onnx.AttributeProto.INT:
                types.append(a.i)
            if a.type == onnx.AttributeProto.TENSOR:
                types.append(a.t.data_type)
    return any(t in _FLOAT32_STANDINS for t in types)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

# Ops worth folding when all inputs are constant; big broadcasts stay lazy (see _try_fold).
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FOLD_MAX_ELEMENTS = 1 << 22


@dataclass
class _Step:
    fn: Handler
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    attrs: dict
    ctx: NodeContext
    free: tuple[int, ...] = ()


@dataclass
class Plan:
    """What OnnxTorchModule runs: steps over numbered slots, and the constants that fill slots."""

    opset: int
    computes_in_float32: bool
    input_names: list[str]
    input_is_float: list[bool]
    output_names: list[str]
    input_slots: list[int]
    steps: list[_Step]
    buffers: dict[str, torch.Tensor]  # buffer name -> constant, in registration order
    const_slots: list[tuple[int, str]]  # (slot, buffer name): device constants, set per call
    output_slots: list[int]
    env_template: list  # one entry per slot: host-side constants where they live, else None


def _try_fold(entry: _OpVersion, node: onnx.NodeProto, attrs: dict, ctx: NodeContext, consts: dict):
    ins = [consts[i] if i else None for i in node.input]
    budget = max(_FOLD_MAX_ELEMENTS, 2 * sum(t.numel() for t in ins if t is not None))
    try:
        with torch.no_grad():
            outs = entry.fn(ins, attrs, ctx)
    except Exception as exc:  # noqa: BLE001 - report with the node's name
        raise CloakError(f"{node.op_type} node {ctx.name!r} failed on constant inputs: {exc}") from exc
    outs = list(outs)
    if any(isinstance(o, torch.Tensor) and o.numel() > budget for o in outs):
        return None
    return [o.contiguous() if isinstance(o, torch.Tensor) and not o.is_contiguous() else o for o in outs]


def build_plan(model: onnx.ModelProto, outputs: Sequence[str] | None = None, fuse: bool = True) -> Plan:
    """The execution plan for ``model``, computing ``outputs`` (default: the graph's outputs);
    ``fuse=False`` runs the nodes as written (no BatchNorm folding or activation fusion)."""
    model = _prepared(model)
    _raise_if_unsupported(model)
    graph = model.graph
    opset = _opsets(model).get("", 1)
    computes_in_float32 = _uses_wide_or_narrow_floats(model)

    consts: dict[str, torch.Tensor] = {t.name: tensor_from_proto(t) for t in graph.initializer}
    for sp in graph.sparse_initializer:
        consts[sp.values.name] = _sparse_to_dense(sp)
    input_names = [i.name for i in graph.input if i.name not in consts]
    input_is_float = [
        i.type.tensor_type.elem_type in _FLOAT32_STANDINS | {TensorProto.FLOAT} for i in graph.input if i.name not in consts
    ]
    output_names = list(outputs) if outputs is not None else [o.name for o in graph.output]

    nodes = _toposort(graph, set(consts) | set(input_names))
    produced = set(consts) | set(input_names) | {o for n in nodes for o in n.output}
    missing = [o for o in output_names if o not in produced]
    if missing:
        raise CloakError(f"no tensor named {', '.join(map(repr, missing))} in the graph")

    # Resolve handlers and fold nodes whose inputs are all constant (Constant nodes included).
    steps: list[PlanNode] = []
    for node in nodes:
        entry = _resolve(node.op_type, opset)
        attrs = _attrs(node)
        ctx = NodeContext(node.name or node.op_type, node.op_type, opset, entry.since, list(node.output))
        if all(i == "" or i in consts for i in node.input) and node.op_type not in _NO_FOLD:
            folded = _try_fold(entry, node, attrs, ctx, consts)
            if folded is not None:
                for name, value in zip(node.output, folded):
                    if name:
                        consts[name] = value
                continue
        steps.append(PlanNode(node, entry, attrs, ctx))

    # Keep only what the requested outputs depend on.
    needed = set(output_names)
    kept: list[PlanNode] = []
    for pn in reversed(steps):
        if any(o in needed for o in pn.node.output if o):
            kept.append(pn)
            needed.update(i for i in pn.node.input if i)
    kept.reverse()
    if fuse:
        kept = fuse_nodes(kept, consts, set(output_names))

    # Slots: 0 always holds None (omitted optional inputs); 1 swallows unnamed outputs.
    slot: dict[str, int] = {}

    def slot_of(name: str) -> int:
        if name == "":
            return 0
        if name not in slot:
            slot[name] = len(slot) + 2
        return slot[name]

    input_slots = [slot_of(n) for n in input_names]
    # Constant shape/axes/pads/sizes inputs are only ever read as Python numbers (the handler's
    # host_inputs): they get a CPU copy in a slot of their own, so reading them never waits on a GPU.
    host: dict[int, torch.Tensor] = {}
    plan = []
    for node, entry, attrs, ctx in kept:
        ins = []
        for j, name in enumerate(node.input):
            if j in entry.host_inputs and name in consts:
                s = slot_of("host:" + name)
                host[s] = consts[name]
                ins.append(s)
            else:
                ins.append(slot_of(name))
        outs = tuple(slot_of(o) if o else 1 for o in node.output)
        plan.append(_Step(entry.fn, tuple(ins), outs, attrs, ctx))
    device_consts = {n for n in consts if n in slot} | (set(output_names) & set(consts))
    const_slots: list[tuple[int, str]] = []
    buffers: dict[str, torch.Tensor] = {}
    buffer_of: dict[int, str] = {}
    for name in sorted(device_consts):
        tensor = consts[name]
        bname = buffer_of.get(id(tensor))
        if bname is None:  # one buffer per distinct tensor (Identity of a weight shares it)
            bname = f"c{len(buffer_of)}"
            buffer_of[id(tensor)] = bname
            buffers[bname] = tensor
        const_slots.append((slot_of(name), bname))
    output_slots = [slot_of(o) for o in output_names]

    # Liveness: free each intermediate right after its last reader.
    keep = set(output_slots) | {s for s, _ in const_slots} | set(host) | {0}
    last: dict[int, int] = {}
    for k, step in enumerate(plan):
        for s in step.ins:
            last[s] = k
        for s in step.outs:  # never-read outputs die where they are born
            last.setdefault(s, k)
    for k, step in enumerate(plan):
        step.free = tuple(sorted({s for s in step.ins + step.outs if last.get(s) == k and s not in keep}))
    return Plan(
        opset=opset,
        computes_in_float32=computes_in_float32,
        input_names=input_names,
        input_is_float=input_is_float,
        output_names=output_names,
        input_slots=input_slots,
        steps=plan,
        buffers=buffers,
        const_slots=const_slots,
        output_slots=output_slots,
        env_template=[host.get(i) for i in range(len(slot) + 2)],
    )
