"""The planner: checks a model against the op table and turns its graph into an execution plan.

Everything that reads the model happens here, once per model, so that running it (module.py) is
a plain loop over steps: inline local functions, list every unsupported op at once, order the
nodes, resolve each node's handler, parse its attributes, fold all-constant subgraphs, prune what
the requested outputs do not need, fuse what third-party exports leave unfused (fuse.py), keep
constant shape inputs on the host, assign slots and work out where each intermediate can be freed.
``If`` nodes are inlined when their condition is certain at plan time, else become one step that
runs a sub-plan per branch (control.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx
import torch
from onnx import TensorProto, helper

from ..errors import CloakError
from .control import CONTROL_FLOW_REASON, Flow, has_if, localize, node_deps, subgraphs
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
            for g in subgraphs(node):  # list the ops of nested graphs too (If runs its branches)
                visit(g)
            entry = _resolve(node.op_type, version)
            if entry is None:
                gap = version_gap(node.op_type, version)
                bad[key] = gap[1] if gap else (CONTROL_FLOW_REASON if subgraphs(node) else None)
                if gap and gap[0] is not None:
                    since[key] = gap[0]
                continue
            attrs = _attrs(node)
            if node.op_type == "If":  # its branches are graphs, which the planner reads itself
                attrs = {k: v for k, v in attrs.items() if k not in ("then_branch", "else_branch")}
            reason = None
            if any(v is _UNPARSED for v in attrs.values()):
                reason = "subgraph or type attributes"
            elif entry.check is not None:
                ctx = NodeContext(node.name, node.op_type, version, entry.since, list(node.output))
                reason = entry.check(attrs, ctx)
            if reason is not None:
                bad[key] = reason

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
    return _toposort_nodes(list(graph.node), known)


def _toposort_nodes(nodes: list[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input, and every outer tensor a subgraph reads, comes first."""
    available = set(known) | {""}
    order, pending = [], [(node, node_deps(node)) for node in nodes]
    while pending:
        rest = []
        for node, deps in pending:
            if all(i in available for i in deps):
                order.append(node)
                available.update(node.output)
            else:
                rest.append((node, deps))
        if len(rest) == len(pending):
            missing = sorted({i for _, deps in rest for i in deps if i not in available})
            raise CloakError(f"the ONNX graph has inputs no node produces: {', '.join(missing[:10])}")
        pending = rest
    return order


def _uses_wide_or_narrow_floats(model: onnx.ModelProto) -> bool:
    return _graph_uses_wide_or_narrow_floats(model.graph)


def _graph_uses_wide_or_narrow_floats(g: onnx.GraphProto) -> bool:
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
    return any(t in _FLOAT32_STANDINS for t in types) or any(
        _graph_uses_wide_or_narrow_floats(sub) for node in g.node for sub in subgraphs(node))


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

    flow = Flow(graph, consts, _NO_FOLD, _FOLD_MAX_ELEMENTS) if has_if(graph) else None
    steps = _fold(nodes, consts, opset, fuse, flow)
    lay = _lay_out(steps, consts, input_names, output_names, fuse)

    const_slots: list[tuple[int, str]] = []
    buffers: dict[str, torch.Tensor] = {}
    buffer_of: dict[int, str] = {}
    for s, name in lay.const_slots:
        tensor = consts[name]
        bname = buffer_of.get(id(tensor))
        if bname is None:  # one buffer per distinct tensor (Identity of a weight shares it)
            bname = f"c{len(buffer_of)}"
            buffer_of[id(tensor)] = bname
            buffers[bname] = tensor
        const_slots.append((s, bname))
    return Plan(
        opset=opset,
        computes_in_float32=computes_in_float32,
        input_names=input_names,
        input_is_float=input_is_float,
        output_names=output_names,
        input_slots=lay.input_slots,
        steps=lay.steps,
        buffers=buffers,
        const_slots=const_slots,
        output_slots=lay.output_slots,
        env_template=lay.env_template,
    )


def _fold(nodes: list[onnx.NodeProto], consts: dict[str, torch.Tensor], opset: int, fuse: bool,
          flow: Flow | None) -> list[PlanNode]:
    """Resolve handlers and fold nodes whose inputs are all constant (Constant nodes included);
    with ``flow`` (graphs with If), inline each If decided at plan time and plan the others."""
    steps: list[PlanNode] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        entry = _resolve(node.op_type, opset)
        if flow is not None and node.op_type == "If":
            taken = flow.decide(node.input[0])
            if taken is not None:
                stack.extend(reversed(_inline(node, taken, flow)))
                continue
            pn = _runtime_if(node, entry, opset, fuse, flow)
            steps.append(pn)
            flow.record(pn)
            continue
        attrs = _attrs(node)
        ctx = NodeContext(node.name or node.op_type, node.op_type, opset, entry.since, list(node.output))
        if all(i == "" or i in consts for i in node.input) and node.op_type not in _NO_FOLD:
            folded = _try_fold(entry, node, attrs, ctx, consts)
            if folded is not None:
                for name, value in zip(node.output, folded):
                    if name:
                        consts[name] = value
                continue
        pn = PlanNode(node, entry, attrs, ctx)
        steps.append(pn)
        if flow is not None:
            flow.record(pn)
    return steps


@dataclass
class _Layout:
    slots: dict[str, int]
    input_slots: list[int]
    steps: list[_Step]
    const_slots: list[tuple[int, str]]  # (slot, constant's name), sorted by name
    output_slots: list[int]
    env_template: list


def _lay_out(steps: list[PlanNode], consts: dict[str, torch.Tensor], input_names: list[str],
             output_names: list[str], fuse: bool) -> _Layout:
    """Prune, fuse, assign slots and free intermediates after their last reader."""
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
    const_slots = [(slot_of(name), name) for name in sorted(device_consts)]
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
    return _Layout(slot, input_slots, plan, const_slots, output_slots, [host.get(i) for i in range(len(slot) + 2)])


# --------------------------------------------------------------------------------------------
# If: inlined when decided at plan time, else a step that runs one of two sub-plans
# --------------------------------------------------------------------------------------------


def run_steps(steps: list[_Step], env: list) -> None:
    """Run ``steps`` over the slots in ``env``, freeing each intermediate after its last reader."""
    for step in steps:
        try:
            outs = step.fn([env[i] for i in step.ins], step.attrs, step.ctx)
        except CloakError:
            raise
        except Exception as exc:
            ctx = step.ctx
            raise CloakError(f"{ctx.op_type} node {ctx.name!r} (opset {ctx.opset}) failed in the torch executor: {exc}") from exc
        for s, o in zip(step.outs, outs):
            env[s] = o
        for s in step.free:
            env[s] = None


def iter_steps(steps: list[_Step]):
    """Every step, those of the sub-plans of run-time If steps included."""
    for step in steps:
        yield step
        for sub in step.attrs.values():
            if isinstance(sub, SubPlan):
                yield from iter_steps(sub.steps)


@dataclass
class SubPlan:
    """One branch of an If decided per call: steps over slots of its own, filled from the If
    step's inputs after the condition (``feed``: (position among them, slot))."""

    steps: list[_Step]
    feed: list[tuple[int, int]]
    output_slots: list[int]
    env_template: list
    reads: list[str]  # the outer tensors and constants it is fed, by name

    def run(self, values: Sequence) -> tuple:
        env = list(self.env_template)
        for k, s in self.feed:
            env[s] = values[k]
        run_steps(self.steps, env)
        return tuple(env[s] for s in self.output_slots)


def _inline(node: onnx.NodeProto, taken: bool, flow: Flow) -> list[onnx.NodeProto]:
    """The taken branch's nodes, renamed to run in the If's place (its outputs become the If's)."""
    nodes, _, inits = localize(node, "then_branch" if taken else "else_branch", flow.taken, to_outputs=True)
    flow.consts.update(inits)
    made = {o for n in nodes for o in n.output}
    return _toposort_nodes(nodes, {r for n in nodes for r in node_deps(n) if r not in made})


def _plan_branch(node: onnx.NodeProto, which: str, opset: int, fuse: bool, flow: Flow) -> tuple[SubPlan, dict[str, int]]:
    nodes, out_names, inits = localize(node, which, flow.taken, to_outputs=False)
    consts = flow.consts  # shared: the branch's constants get unique names, and the outer plan feeds them
    consts.update(inits)
    made = {o for n in nodes for o in n.output}
    reads = list(dict.fromkeys(r for r in [r for n in nodes for r in node_deps(n)] + out_names if r and r not in made))
    nodes = _toposort_nodes(nodes, set(reads))
    input_names = [r for r in reads if r not in consts]
    lay = _lay_out(_fold(nodes, consts, opset, fuse, flow), consts, input_names, out_names, fuse)
    used = {s for step in lay.steps for s in step.ins} | set(lay.output_slots)
    fed = [n for n, s in zip(input_names, lay.input_slots) if s in used] + [n for _, n in lay.const_slots]
    sub = SubPlan(lay.steps, [], lay.output_slots, lay.env_template, fed)
    return sub, lay.slots


def _runtime_if(node: onnx.NodeProto, entry: _OpVersion, opset: int, fuse: bool, flow: Flow) -> PlanNode:
    """An If whose condition is only known per call: one step reading the condition and every
    tensor either branch needs, holding both branches as sub-plans."""
    subs = {which: _plan_branch(node, which, opset, fuse, flow) for which in ("then_branch", "else_branch")}
    names = list(dict.fromkeys(n for sub, _ in subs.values() for n in sub.reads))
    for sub, slots in subs.values():
        sub.feed = [(k, slots[n]) for k, n in enumerate(names) if n in sub.reads]
    step_node = helper.make_node("If", [node.input[0]] + names, list(node.output), name=node.name)
    ctx = NodeContext(node.name or node.op_type, node.op_type, opset, entry.since, list(node.output))
    return PlanNode(step_node, entry, {which: sub for which, (sub, _) in subs.items()}, ctx)
