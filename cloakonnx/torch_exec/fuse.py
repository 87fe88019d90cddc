"""Plan-time fusions: fewer, bigger torch kernels for the patterns third-party exports leave behind.

Exporters that skip their own graph optimisation (Paddle, tf2onnx, Keras, torch.onnx without
constant folding) leave eval-mode BatchNormalization after each convolution, and spell hard-swish,
hard-sigmoid and GELU as chains of Add/Clip/Div/Mul/Erf. Each such op is a full pass over the
activations forward and again backward, so on a MobileNetV3 these chains cost as much as the
convolutions. The planner calls :func:`fuse` on its pruned node list, after constant folding (so
constants made by Constant nodes or folded subgraphs count), and gets back a list where

* BatchNormalization is folded into the weights of the Conv, ConvTranspose or Gemm before it;
* ``Clip(x + 3, 0, 6) / 6`` (or ``* 1/6``) is one HardSigmoid(alpha=1/6, beta=0.5);
* ``x * HardSigmoid(x)`` (alpha=1/6, beta=0.5) and ``x * Clip(x + 3, 0, 6) / 6`` are one HardSwish;
* ``0.5 * x * (1 + Erf(x / sqrt(2)))`` (in any operand order, ``x * 0.7071..`` too) is one Gelu;
* a Conv read only by a HardSwish runs in the HardSwish's step, with the activation fused into
  the convolution (the Conv step only hands its inputs on).

A pattern is only replaced when it matches exactly: its constants within 1e-6, every intermediate
tensor read by the next node of the pattern alone and not a requested output. Anything else is
left as it was. Folding changes the weights only, so input gradients are those of the graph as
written (up to float rounding). ``OnnxTorchModule(model, fuse=False)`` turns all of this off.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Callable, NamedTuple

import onnx
import torch
from onnx import helper

from .ops.conv import CONV_HARD_SWISH, DEFERRED_CONV
from .registry import _OPS, NodeContext, _OpVersion
from .tensors import _empty

_TOL = 1e-6  # how close a pattern's constants must be to the textbook values


class PlanNode(NamedTuple):
    """A node as the planner holds it: the proto (for input/output names), its handler, parsed
    attributes and context."""

    node: onnx.NodeProto
    entry: _OpVersion
    attrs: dict
    ctx: NodeContext


class _Graph:
    """The node list with who produces and how often something reads each tensor, and the
    constants (which fusions extend with the weights they fold)."""

    def __init__(self, nodes: list[PlanNode], consts: dict[str, torch.Tensor], keep: set[str]):
        self.nodes = nodes
        self.consts = consts
        self.keep = keep
        self.producer = {o: pn for pn in nodes for o in pn.node.output if o}
        self.readers = Counter(i for pn in nodes for i in pn.node.input if i)

    def sole(self, name: str, op_type: str) -> PlanNode | None:
        """The ``op_type`` node making ``name``, when only one node reads ``name`` and nobody asked
        for it: then the node can disappear into a fusion."""
        pn = self.producer.get(name)
        if pn is None or pn.node.op_type != op_type or self.readers[name] != 1 or name in self.keep:
            return None
        return pn

    def scalar(self, name: str) -> float | None:
        """A one-element floating constant's value (rank 0 or 1, so it broadcasts like a scalar)."""
        t = self.consts.get(name)
        if t is None or not t.is_floating_point() or t.numel() != 1 or t.dim() > 1:
            return None
        return float(t.reshape(()))

    def is_scalar(self, name: str, value: float) -> bool:
        v = self.scalar(name)
        return v is not None and abs(v - value) <= _TOL

    def new_const(self, hint: str, value: torch.Tensor) -> str:
        name = f"{hint}::fused"
        while name in self.consts or name in self.producer or name in self.readers:
            name += "_"
        self.consts[name] = value
        return name


def _node(op_type: str, inputs: list[str], outputs: list[str], attrs: dict, parts: list[PlanNode],
          entry: _OpVersion | None = None) -> PlanNode:
    """A step standing for ``parts``; the newest handler of ``op_type`` unless ``entry`` is given
    (fused steps are the executor's own, whatever opset the model imports)."""
    entry = entry or _OPS[op_type][-1]
    name = "+".join(p.ctx.name for p in parts)
    proto = helper.make_node(op_type, inputs, outputs, name=name)
    return PlanNode(proto, entry, attrs, NodeContext(name, op_type, parts[-1].ctx.opset, entry.since, list(outputs)))


def _other(pn: PlanNode, name: str) -> str | None:
    """The other input of a two-input node one of whose inputs is ``name``."""
    a, b = pn.node.input[0], pn.node.input[1]
    return b if a == name else a if b == name else None


# --------------------------------------------------------------------------------------------
# BatchNormalization folded into the weights before it
# --------------------------------------------------------------------------------------------


def _bn_affine(g: _Graph, bn: PlanNode) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s, t) in float64 with BN(y) = s * y + t per channel, for an inference-form BN on constants."""
    if bn.node.op_type != "BatchNormalization" or len(bn.node.input) < 5 or any(bn.node.output[1:]):
        return None
    if bn.attrs.get("training_mode", 0) or (bn.ctx.since < 9 and bn.attrs.get("spatial", 1) == 0):
        return None
    params = [g.consts.get(n) for n in bn.node.input[1:5]]
    if any(p is None or not p.is_floating_point() or p.dim() != 1 for p in params):
        return None
    scale, bias, mean, var = (p.double() for p in params)
    if not scale.shape == bias.shape == mean.shape == var.shape:
        return None
    s = scale / torch.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    return s, bias - mean * s


def _fold_bn(g: _Graph, bn: PlanNode) -> tuple[PlanNode, list[PlanNode]] | None:
    affine = _bn_affine(g, bn)
    if affine is None:
        return None
    s, t = affine
    x = bn.node.input[0]
    prev = g.producer.get(x)
    if prev is None or prev.node.op_type not in ("Conv", "ConvTranspose", "Gemm") or g.sole(x, prev.node.op_type) is None:
        return None
    ins = list(prev.node.input)
    if len(ins) < 2 or ins[1] not in g.consts or (len(ins) > 2 and ins[2] and ins[2] not in g.consts):
        return None
    w = g.consts[ins[1]]
    b = g.consts[ins[2]] if len(ins) > 2 and ins[2] else None
    if not w.is_floating_point() or (b is not None and not b.is_floating_point()):
        return None
    m = s.numel()
    attrs = dict(prev.attrs)
    w64 = w.double()
    if prev.node.op_type == "Conv":  # weight (M, C/group, k...): output channels on axis 0
        if w.dim() < 3 or w.shape[0] != m or (b is not None and b.shape != (m,)):
            return None
        w_new = w64 * s.reshape((m,) + (1,) * (w.dim() - 1))
        b_new = (b.double() * s if b is not None else 0) + t
    elif prev.node.op_type == "ConvTranspose":  # weight (C, M/group, k...): output o = group*M/group + axis-1 index
        group = attrs.get("group", 1)
        if w.dim() < 3 or w.shape[0] % group or w.shape[1] * group != m or (b is not None and b.shape != (m,)):
            return None
        w_new = (w64.reshape((group, w.shape[0] // group) + tuple(w.shape[1:]))
                 * s.reshape((group, 1, m // group) + (1,) * (w.dim() - 2))).reshape(w.shape)
        b_new = (b.double() * s if b is not None else 0) + t
    else:  # Gemm: y = alpha * A B + beta * C, output columns are the channels
        trans_b = attrs.get("transB", 0)
        if w.dim() != 2 or w.shape[0 if trans_b else 1] != m or (b is not None and b.dim() > 2):
            return None
        w_new = w64 * (s.reshape(m, 1) if trans_b else s.reshape(1, m))
        c = b.double() * attrs.get("beta", 1.0) if b is not None else 0
        b_new = c * s + t  # broadcasts like C did, now with the channel terms folded in
        attrs["beta"] = 1.0
    w_name = g.new_const(ins[1], w_new.to(w.dtype))
    b_name = g.new_const(bn.node.output[0] + "::bias", b_new.to(w.dtype))
    fused = _node(prev.node.op_type, [ins[0], w_name, b_name], [bn.node.output[0]], attrs, [prev, bn], prev.entry)
    return fused, [prev, bn]


# --------------------------------------------------------------------------------------------
# Activations spelt out as arithmetic
# --------------------------------------------------------------------------------------------


def _clip_bounds(g: _Graph, pn: PlanNode) -> tuple[float, float] | None:
    """(min, max) of a Clip with constant bounds (attributes before opset 11, inputs since)."""
    if pn.ctx.since < 11:
        return pn.attrs.get("min", -math.inf), pn.attrs.get("max", math.inf)
    ins = list(pn.node.input) + ["", ""]
    bounds = []
    for name, default in ((ins[1], -math.inf), (ins[2], math.inf)):
        value = g.scalar(name) if name else default
        if name in g.consts and _empty(g.consts[name]):  # an empty tensor also means "no bound"
            value = default
        if value is None:
            return None
        bounds.append(value)
    return bounds[0], bounds[1]


def _over_six(g: _Graph, pn: PlanNode) -> str | None:
    """What ``pn`` divides by 6 (``a / 6``, ``a * 1/6``, ``1/6 * a``), else None."""
    ins = pn.node.input
    if pn.node.op_type == "Div" and g.is_scalar(ins[1], 6.0):
        return ins[0]
    if pn.node.op_type == "Mul":
        for a, k in ((ins[0], ins[1]), (ins[1], ins[0])):
            if g.is_scalar(k, 1 / 6):
                return a
    return None


def _relu6_of_x_plus_3(g: _Graph, name: str) -> tuple[str, list[PlanNode]] | None:
    """(x, [Add, Clip]) when ``name`` is ``Clip(x + 3, 0, 6)`` made for one reader."""
    clip = g.sole(name, "Clip")
    if clip is None or _clip_bounds(g, clip) != (0.0, 6.0):
        return None
    add = g.sole(clip.node.input[0], "Add")
    if add is None:
        return None
    for x, k in ((add.node.input[0], add.node.input[1]), (add.node.input[1], add.node.input[0])):
        if g.is_scalar(k, 3.0) and x not in g.consts:
            return x, [add, clip]
    return None


def _hard_sigmoid(g: _Graph, pn: PlanNode) -> tuple[PlanNode, list[PlanNode]] | None:
    """``Clip(x + 3, 0, 6) / 6`` -> HardSigmoid(x), and ``x * Clip(x + 3, 0, 6) / 6`` -> HardSwish(x)."""
    a = _over_six(g, pn)
    if a is None:
        return None
    found = _relu6_of_x_plus_3(g, a)
    if found is not None:
        x, parts = found
        return _node("HardSigmoid", [x], list(pn.node.output), {"alpha": 1 / 6, "beta": 0.5}, parts + [pn]), parts + [pn]
    mul = g.sole(a, "Mul")  # (x * relu6(x + 3)) / 6, as Keras writes hard-swish
    if mul is None:
        return None
    for x, r in ((mul.node.input[0], mul.node.input[1]), (mul.node.input[1], mul.node.input[0])):
        found = _relu6_of_x_plus_3(g, r)
        if found is not None and found[0] == x:
            parts = found[1] + [mul, pn]
            return _node("HardSwish", [x], list(pn.node.output), {}, parts), parts
    return None


def _hard_swish(g: _Graph, pn: PlanNode) -> tuple[PlanNode, list[PlanNode]] | None:
    """``x * HardSigmoid(x)`` with torch's alpha=1/6, beta=0.5 -> HardSwish(x)."""
    if pn.node.op_type != "Mul":
        return None
    for x, h in ((pn.node.input[0], pn.node.input[1]), (pn.node.input[1], pn.node.input[0])):
        hs = g.sole(h, "HardSigmoid")
        if (hs is not None and hs.node.input[0] == x and abs(hs.attrs.get("alpha", 0.2) - 1 / 6) <= _TOL
                and abs(hs.attrs.get("beta", 0.5) - 0.5) <= _TOL):
            return _node("HardSwish", [x], list(pn.node.output), {}, [hs, pn]), [hs, pn]
    return None


def _erf_plus_one(g: _Graph, name: str) -> tuple[str, list[PlanNode]] | None:
    """(x, [Div or Mul, Erf, Add]) when ``name`` is ``1 + Erf(x / sqrt(2))`` made for one reader."""
    add = g.sole(name, "Add")
    if add is None:
        return None
    e = _other(add, next((i for i in add.node.input if g.is_scalar(i, 1.0)), ""))
    erf = g.sole(e, "Erf") if e else None
    if erf is None:
        return None
    scaled = erf.node.input[0]
    for op_type, k in (("Div", math.sqrt(2)), ("Mul", 1 / math.sqrt(2))):
        pn = g.sole(scaled, op_type)
        if pn is None:
            continue
        ins = pn.node.input
        for x, c in ((ins[0], ins[1]), (ins[1], ins[0])) if op_type == "Mul" else ((ins[0], ins[1]),):
            if g.is_scalar(c, k) and x not in g.consts:
                return x, [pn, erf, add]
    return None


def _gelu(g: _Graph, pn: PlanNode) -> tuple[PlanNode, list[PlanNode]] | None:
    """``(x * (1 + Erf(x / sqrt 2))) * 0.5`` or ``(x * 0.5) * (1 + Erf(x / sqrt 2))`` -> Gelu(x)."""
    if pn.node.op_type != "Mul":
        return None
    ins = list(pn.node.input)
    half = next((i for i in ins if g.is_scalar(i, 0.5)), None)
    if half is not None:  # 0.5 last: the rest is x * (1 + erf)
        mul = g.sole(_other(pn, half), "Mul")
        pairs = [(mul.node.input[0], mul.node.input[1]), (mul.node.input[1], mul.node.input[0])] if mul else []
        for x, a in pairs:
            found = _erf_plus_one(g, a)
            if found is not None and found[0] == x:
                parts = found[1] + [mul, pn]
                return _node("Gelu", [x], list(pn.node.output), {"approximate": "none"}, parts), parts
        return None
    for h, a in ((ins[0], ins[1]), (ins[1], ins[0])):  # 0.5 first: (x * 0.5) * (1 + erf)
        mul = g.sole(h, "Mul")
        x = _other(mul, next((i for i in mul.node.input if g.is_scalar(i, 0.5)), "")) if mul else None
        found = _erf_plus_one(g, a) if x else None
        if found is not None and found[0] == x:
            parts = found[1] + [mul, pn]
            return _node("Gelu", [x], list(pn.node.output), {"approximate": "none"}, parts), parts
    return None


# --------------------------------------------------------------------------------------------
# Conv + HardSwish
# --------------------------------------------------------------------------------------------


def _conv_hard_swish(nodes: list[PlanNode], consts: dict[str, torch.Tensor], keep: set[str]) -> list[PlanNode]:
    """A Conv read only by a HardSwish hands its inputs on (ops/conv.py), and the HardSwish step runs
    the convolution with the activation fused in; both steps stay in the plan under their names."""
    g = _Graph(nodes, consts, keep)
    swap: dict[int, PlanNode] = {}
    for pn in nodes:
        conv = g.sole(pn.node.input[0], "Conv") if pn.node.op_type == "HardSwish" else None
        if conv is None or len(conv.node.input) < 2:
            continue
        swap[id(conv)] = conv._replace(entry=replace(DEFERRED_CONV, since=conv.entry.since))
        swap[id(pn)] = pn._replace(entry=replace(CONV_HARD_SWISH, since=pn.entry.since))
    return [swap.get(id(pn), pn) for pn in nodes]


# --------------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------------

Matcher = Callable[[_Graph, PlanNode], "tuple[PlanNode, list[PlanNode]] | None"]
# In order: HardSigmoid made by the second pass is what the third turns into HardSwish.
_PASSES: tuple[Matcher, ...] = (_fold_bn, _hard_sigmoid, _hard_swish, _gelu)


def _apply(nodes: list[PlanNode], consts: dict[str, torch.Tensor], keep: set[str], match: Matcher) -> list[PlanNode]:
    """One pass: each match's fused step takes the place of its last node, the rest are dropped."""
    g = _Graph(nodes, consts, keep)
    replace: dict[int, PlanNode] = {}
    dropped: set[int] = set()
    for pn in nodes:
        if id(pn) in dropped or id(pn) in replace:
            continue
        found = match(g, pn)
        if found is None:
            continue
        fused, parts = found
        if any(id(p) in dropped or id(p) in replace for p in parts):
            continue  # overlaps an earlier match of this pass
        dropped.update(id(p) for p in parts[:-1])
        replace[id(parts[-1])] = fused
    return [replace.get(id(pn), pn) for pn in nodes if id(pn) not in dropped]


def fuse(nodes: list[PlanNode], consts: dict[str, torch.Tensor], keep: set[str]) -> list[PlanNode]:
    """``nodes`` (in execution order) with the fusions above applied; ``consts`` gains the folded
    weights, ``keep`` names the tensors that must stay visible (the requested outputs)."""
    for match in _PASSES:
        nodes = _apply(nodes, consts, keep, match)
    return _conv_hard_swish(nodes, consts, keep)  # last: it reads the HardSwish steps made above
