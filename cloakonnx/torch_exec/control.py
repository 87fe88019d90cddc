"""Control flow for the planner: how an ``If`` node becomes plain steps, or one step that picks a
branch per call.

Only ``If`` is run (ops/control.py registers it); ``Loop``, ``Scan`` and other ops with graph
attributes are refused by the planner's scan. For each If, the planner (plan.py) asks
:meth:`Flow.decide` whether its condition is certain at plan time: a constant, or computed from
constants and from shapes the graph fixes (shapes.py). If it is, the taken branch's nodes are
inlined in place of the If (:func:`localize` with ``to_outputs``): the names the branch defines are
prefixed so they cannot collide with the outer graph's, and the branch's outputs are renamed to the
If's outputs. If it is not, both branches are planned as sub-plans and the If becomes one step that
reads the condition on the host (one sync per call) and runs the chosen sub-plan; autograd sees
whichever branch ran. Subgraph nodes may read outer-scope tensors by name: :func:`outer_refs` lists
them, so that topological order and liveness count them as the If's inputs.
"""
from __future__ import annotations

from typing import Iterable

import onnx
import torch
from onnx import helper

from ..errors import CloakError
from .fuse import PlanNode
from .shapes import UNKNOWN, Known, from_const, from_value_info, infer
from .tensors import _sparse_to_dense, tensor_from_proto

CONTROL_FLOW_REASON = "control flow other than If is not supported; gradient-free attacks (Square) still work"
_MAX_DEPTH = 64  # how far back a condition is traced through the nodes that compute it


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If's branches, Loop's body, ...)."""
    out = []
    for a in node.attribute:
        out.extend(a.graphs)
        if a.HasField("g"):
            out.append(a.g)
    return out


def outer_refs(graph: onnx.GraphProto) -> list[str]:
    """The names ``graph`` (and the graphs nested in it) read from enclosing scopes, in first-use order."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {sp.values.name for sp in graph.sparse_initializer}
    local |= {o for n in graph.node for o in n.output}
    out: dict[str, None] = {}
    for node in graph.node:
        for name in list(node.input) + [r for g in subgraphs(node) for r in outer_refs(g)]:
            if name and name not in local:
                out.setdefault(name)
    for vi in graph.output:
        if vi.name not in local:
            out.setdefault(vi.name)
    return list(out)


def node_deps(node: onnx.NodeProto) -> list[str]:
    """What must be computed before ``node`` runs: its inputs, and for a node with subgraphs the
    outer tensors they read."""
    subs = subgraphs(node)
    if not subs:
        return list(node.input)
    return list(node.input) + [r for g in subs for r in outer_refs(g)]


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name ``graph`` and its nested graphs mention."""
    names = {vi.name for vi in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer} | {sp.values.name for sp in graph.sparse_initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for g in subgraphs(node):
            names |= all_names(g)
    return names


def has_if(graph: onnx.GraphProto) -> bool:
    return any(n.op_type == "If" or any(has_if(g) for g in subgraphs(n)) for n in graph.node)


def _mint(base: str, taken: set[str]) -> str:
    name = base
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _rename_graph(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename, in place, the outer-scope names a nested graph reads (its own names stay, and
    shadow the outer ones they repeat)."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {sp.values.name for sp in graph.sparse_initializer} | {o for n in graph.node for o in n.output}
    if not local.isdisjoint(mapping):
        mapping = {k: v for k, v in mapping.items() if k not in local}
    for node in graph.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        for g in subgraphs(node):
            _rename_graph(g, mapping)
    for vi in graph.output:
        vi.name = mapping.get(vi.name, vi.name)


def branch(node: onnx.NodeProto, which: str) -> onnx.GraphProto:
    g = next((a.g for a in node.attribute if a.name == which and a.HasField("g")), None)
    if g is None:
        raise CloakError(f"If node {node.name!r} has no {which} graph")
    if len(g.output) != len(node.output):
        raise CloakError(f"If node {node.name!r}: its {which} has {len(g.output)} outputs, the node {len(node.output)}")
    return g


def localize(node: onnx.NodeProto, which: str, taken: set[str], to_outputs: bool):
    """The nodes of If ``node``'s ``which`` branch with every name the branch defines prefixed
    (``<If name>/then/<name>``, made unique against ``taken``), its initializers under their new
    names, and its output names.

    With ``to_outputs`` the branch's outputs are renamed to the If's outputs (for inlining); an
    output the branch does not compute itself (an outer tensor, an initializer, or one output
    twice) gets an Identity node. Returns (nodes, output names, {name: constant}).
    """
    g = branch(node, which)
    tag = f"{node.name or 'If'}/{which.split('_')[0]}"
    made = [o for n in g.node for o in n.output if o]
    own = [t.name for t in g.initializer] + [sp.values.name for sp in g.sparse_initializer] + made
    mapping = {name: _mint(f"{tag}/{name}", taken) for name in dict.fromkeys(own)}
    identities = []
    if to_outputs:
        claimed: set[str] = set()
        made_set = set(made)
        pending = []
        for vi, target in zip(g.output, node.output):
            if not target:
                continue
            if vi.name in made_set and vi.name not in claimed:
                claimed.add(vi.name)
                mapping[vi.name] = target
            else:
                pending.append((vi.name, target))
        for k, (src, target) in enumerate(pending):
            identities.append(helper.make_node("Identity", [mapping.get(src, src)], [target], name=f"{tag}/output{k}"))
    consts = {mapping[t.name]: tensor_from_proto(t) for t in g.initializer}
    for sp in g.sparse_initializer:
        consts[mapping[sp.values.name]] = _sparse_to_dense(sp)
    nodes = []
    for n in g.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.input[:] = [mapping.get(i, i) for i in n.input]
        m.output[:] = [mapping.get(o, o) for o in n.output]
        m.name = f"{tag}/{n.name or n.op_type}"
        for sub in subgraphs(m):
            _rename_graph(sub, mapping)
        nodes.append(m)
    return nodes + identities, [mapping.get(vi.name, vi.name) for vi in g.output], consts


class Flow:
    """The planner's state for graphs with If: certain facts about tensors (shapes.py), the step
    that makes each tensor, and the names taken, shared by the sub-plans of run-time branches."""

    def __init__(self, graph: onnx.GraphProto, consts: dict[str, torch.Tensor], no_fold: Iterable[str], fold_max: int):
        self.consts = consts
        self.taken = all_names(graph) | set(consts)
        self.known: dict[str, Known] = {vi.name: from_value_info(vi) for vi in graph.input if vi.name not in consts}
        self.producer: dict[str, PlanNode] = {}
        self._no_fold = set(no_fold) | {"If"}
        self._fold_max = fold_max
        self._memo: dict[str, torch.Tensor | None] = {}

    def fact(self, name: str) -> Known:
        if name in self.consts:
            return from_const(self.consts[name])
        return self.known.get(name, UNKNOWN)

    def record(self, pn: PlanNode) -> None:
        """Note what is certain about the outputs of a node that stays a step."""
        for name, known in zip(pn.node.output, infer(pn.node, pn.attrs, self.fact)):
            if name:
                self.known[name] = known
                self.producer[name] = pn

    def decide(self, cond: str) -> bool | None:
        """The condition's value when it is certain at plan time, else None."""
        value = self.evaluate(cond)
        if value is None or value.numel() != 1:
            return None
        return bool(value.reshape(-1)[0])

    def evaluate(self, name: str, depth: int = 0) -> torch.Tensor | None:
        """``name``'s value when it follows from constants and certain shapes, else None: a fully
        known fact, or the handler of its node run on such values."""
        if name in self.consts:
            return self.consts[name]
        if name in self._memo:
            return self._memo[name]
        value = self.known.get(name, UNKNOWN).full_value()
        pn = self.producer.get(name)
        if value is None and pn is not None and depth < _MAX_DEPTH and pn.node.op_type not in self._no_fold:
            ins = []
            for i in pn.node.input:
                v = self.evaluate(i, depth + 1) if i else None
                if i and v is None:
                    break
                ins.append(v)
            else:
                try:
                    with torch.no_grad():
                        outs = pn.entry.fn(ins, pn.attrs, pn.ctx)
                    value = outs[list(pn.node.output).index(name)]
                except Exception:  # noqa: BLE001 - then the If is decided per call, where errors name the node
                    value = None
                if not isinstance(value, torch.Tensor) or value.numel() > self._fold_max:
                    value = None
        self._memo[name] = value
        return value
