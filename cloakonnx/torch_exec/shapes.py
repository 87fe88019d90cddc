"""Plan-time facts about tensor shapes, so that an ``If`` whose condition depends only on shapes is
decided once, when the plan is built (control.py), instead of on every call.

Exporters write such conditions as chains like ``Equal(Gather(Shape(t), 1), 1)`` on a tensor whose
shape is partly fixed by the graph itself: a convolution's channel count comes from its weight, a
Reshape's target from constants. :func:`infer` propagates what is certain about each tensor, a
:class:`Known`: its rank and those dims that hold for every input the graph accepts, and for
small integer vectors (shapes, indices) those elements that are certain. Nothing is assumed about
the graph's inputs beyond their declared rank: their declared dims are not trusted, since the
executor runs whatever shape it is given. An op without a rule here yields nothing (the rule
says "unknown"), so every fact is one that holds at run time; a condition that cannot be shown
from them is evaluated per call instead.

Registers no op and reads no handler; the planner calls it only for graphs that contain an If.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable, Sequence

import onnx
import torch

from .tensors import _DTYPES

_VALUE_LIMIT = 64  # longest int vector whose elements are tracked


@dataclass(frozen=True)
class Known:
    """What is certain about a tensor: ``shape`` (None when even the rank is unknown; a dim None
    when that dim is), and for rank-0/1 integer tensors ``value``, its elements (None where
    unknown); ``dtype`` is the value's dtype."""

    shape: tuple | None
    value: tuple | None = None
    dtype: torch.dtype = torch.int64

    def full_value(self) -> torch.Tensor | None:
        """The tensor itself, when its rank (0 or 1) and every element are known."""
        if self.value is None or self.shape is None or len(self.shape) > 1 or any(v is None for v in self.value):
            return None
        if len(self.shape) == 1 and self.shape[0] != len(self.value):
            return None
        t = torch.tensor(list(self.value), dtype=self.dtype)
        return t.reshape(()) if len(self.shape) == 0 else t


UNKNOWN = Known(None)


def from_const(t: torch.Tensor) -> Known:
    value = None
    if t.dim() <= 1 and t.numel() <= _VALUE_LIMIT and not t.is_floating_point() and not t.is_complex():
        value = tuple(int(v) for v in t.reshape(-1).tolist())
    return Known(tuple(int(d) for d in t.shape), value, t.dtype)


def from_value_info(vi: onnx.ValueInfoProto) -> Known:
    """A graph input: its declared rank only (its declared dims are not trusted)."""
    t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if t is None or not t.HasField("shape"):
        return UNKNOWN
    return Known(tuple(None for _ in t.shape.dim))


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------

_SAME_SHAPE = {
    "Abs", "Neg", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Erf", "Sin", "Cos", "Not", "IsNaN", "IsInf", "Elu", "Celu", "Selu", "LeakyRelu", "ThresholdedRelu",
    "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "Gelu", "Shrink", "Clip", "Softmax", "LogSoftmax",
    "Hardmax", "LRN", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "LpNormalization", "Dropout", "CumSum", "Trilu", "QuantizeLinear", "DequantizeLinear", "CastLike",
}
_BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or",
    "Xor", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "Where",
}
_REDUCE = {
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
}
_POOL = {"MaxPool", "AveragePool", "LpPool"}


def _prod(dims) -> int | None:
    return None if any(d is None for d in dims) else prod(dims)


def _norm(axis: int, rank: int) -> int | None:
    axis = axis + rank if axis < 0 else axis
    return axis if 0 <= axis < rank else None


def _ints_of(k: Known | None) -> list[int] | None:
    """A fully known int vector/scalar as a list, else None."""
    if k is None or k.value is None or any(v is None for v in k.value):
        return None
    return list(k.value)


def _broadcast(shapes: Sequence[tuple | None]) -> tuple | None:
    if not shapes or any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        known = [d for d in dims if d is not None]
        not_one = [d for d in known if d != 1]
        if not_one:  # broadcasting only lets 1 stretch, so any other known dim is the result
            out.append(not_one[0])
        elif len(known) == len(dims):
            out.append(1)
        else:
            out.append(None)
    return tuple(out)


def _with_value(shape: tuple | None, value: tuple | None, dtype: torch.dtype) -> Known:
    if shape is None or len(shape) > 1 or value is None:
        return Known(shape)
    if len(shape) == 1 and shape[0] is not None and shape[0] != len(value):
        return Known(shape)
    return Known(shape, value, dtype)


def _axes(node: onnx.NodeProto, attrs: dict, ins: list, pos: int) -> tuple[bool, list[int] | None]:
    """(known, axes) from input ``pos`` when given, else the ``axes`` attribute (None: absent)."""
    if len(node.input) > pos and node.input[pos]:
        axes = _ints_of(ins[pos])
        return axes is not None, axes
    return True, attrs.get("axes")


def infer(node: onnx.NodeProto, attrs: dict, get: Callable[[str], Known]) -> list[Known]:
    """What is certain about each output of ``node``, given ``get(name)`` for its inputs."""
    ins = [get(i) if i else None for i in node.input]
    n_out = len(node.output)
    try:
        first = _rule(node.op_type, node, attrs, ins)
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError):
        first = None
    return [first if (k == 0 and first is not None) else UNKNOWN for k in range(n_out)]


def _rule(op: str, node, attrs: dict, ins: list) -> Known | None:
    x = ins[0] if ins else None
    xs = x.shape if x is not None else None
    rule = RULES.get(op)
    return rule(node, attrs, ins, x, xs) if rule is not None else None


# One-line rules: the input itself, its shape, the inputs' broadcast shape, its element count.
def _identity(node, attrs: dict, ins: list, x, xs) -> Known | None: return x
def _same_shape(node, attrs: dict, ins: list, x, xs) -> Known | None: return Known(xs)
def _broadcasting(node, attrs: dict, ins: list, x, xs) -> Known | None: return Known(_broadcast([k.shape if k is not None else None for k in ins]))
def _size(node, attrs: dict, ins: list, x, xs) -> Known | None: return Known((), (_prod(xs) if xs is not None else None,))


def _cast(node, attrs: dict, ins: list, x, xs) -> Known | None:
    to = _DTYPES.get(attrs.get("to"))
    if to is None or to == torch.bool or to.is_floating_point:
        return Known(xs)
    return _with_value(xs, x.value, to)


def _shape(node, attrs: dict, ins: list, x, xs) -> Known | None:
    if xs is None:
        return Known((None,))
    dims = xs[slice(attrs.get("start", 0), attrs.get("end", None))]
    return Known((len(dims),), tuple(dims))


def _gather(node, attrs: dict, ins: list, x, xs) -> Known | None:
    idx = ins[1]
    if xs is None or idx is None or idx.shape is None:
        return None
    axis = _norm(attrs.get("axis", 0), len(xs))
    shape = xs[:axis] + idx.shape + xs[axis + 1:]
    picks = _ints_of(idx)
    if len(xs) != 1 or x.value is None or picks is None or xs[0] is None:
        return Known(shape)
    n = xs[0]
    if any(not -n <= p < n for p in picks):
        return Known(shape)
    return _with_value(shape, tuple(x.value[p] for p in picks), x.dtype)


def _unsqueeze(node, attrs: dict, ins: list, x, xs) -> Known | None:
    ok, axes = _axes(node, attrs, ins, 1)
    if xs is None or not ok or axes is None:
        return None
    rank = len(xs) + len(axes)
    axes = sorted(_norm(a, rank) for a in axes)
    dims = list(xs)
    for a in axes:
        dims.insert(a, 1)
    return _with_value(tuple(dims), x.value, x.dtype)


def _squeeze(node, attrs: dict, ins: list, x, xs) -> Known | None:
    ok, axes = _axes(node, attrs, ins, 1)
    if xs is None or not ok:
        return None
    if axes is None:
        if any(d is None for d in xs):
            return None
        dims = tuple(d for d in xs if d != 1)
    else:
        drop = {_norm(a, len(xs)) for a in axes}
        dims = tuple(d for i, d in enumerate(xs) if i not in drop)
    return _with_value(dims, x.value, x.dtype)


def _concat(node, attrs: dict, ins: list, x, xs) -> Known | None:
    shapes = [k.shape if k is not None else None for k in ins if k is not None]
    if not shapes or any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
        return None
    rank = len(shapes[0])
    axis = _norm(attrs.get("axis", 1), rank)
    dims = []
    for i in range(rank):
        col = [s[i] for s in shapes]
        if i == axis:
            dims.append(None if any(d is None for d in col) else sum(col))
        else:
            dims.append(next((d for d in col if d is not None), None))
    value = None
    if rank == 1:
        parts = []
        for k in ins:
            if k is None:
                continue
            if k.value is not None:
                parts.extend(k.value)
            elif k.shape[0] is not None:
                parts.extend([None] * k.shape[0])
            else:
                parts = None
                break
        value = tuple(parts) if parts is not None else None
    return _with_value(tuple(dims), value, x.dtype if x is not None else torch.int64)


def _slice(node, attrs: dict, ins: list, x, xs) -> Known | None:
    if xs is None:
        return None
    if len(node.input) > 1:
        starts, ends = _ints_of(ins[1]), _ints_of(ins[2])
        axes = _ints_of(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts or [])))
        steps = _ints_of(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts or [])
    else:
        starts, ends = attrs.get("starts"), attrs.get("ends")
        axes = attrs.get("axes", list(range(len(starts or []))))
        steps = [1] * len(starts or [])
    if starts is None or ends is None or axes is None or steps is None:
        return Known(tuple(None for _ in xs))
    dims = list(xs)
    value = x.value
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _norm(a, len(xs))
        if dims[a] is None:
            value = None
            continue
        piece = slice(s, e, st)
        dims[a] = len(range(*piece.indices(dims[a])))
        if value is not None and len(xs) == 1:
            value = tuple(value[piece])
    return _with_value(tuple(dims), value if len(xs) == 1 else None, x.dtype)


def _reshape(node, attrs: dict, ins: list, x, xs) -> Known | None:
    target = list(attrs["shape"]) if len(node.input) < 2 else (list(ins[1].value) if ins[1] is not None and ins[1].value is not None else None)
    if target is None:
        n = ins[1].shape[0] if ins[1] is not None and ins[1].shape is not None else None
        return Known(tuple(None for _ in range(n))) if n is not None else None
    allowzero = bool(attrs.get("allowzero", 0))
    dims = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero:
            dims.append(xs[i] if xs is not None and i < len(xs) else None)
        elif t is None or t == -1:
            dims.append(None)
        else:
            dims.append(t)
    if -1 in target and xs is not None:
        total, rest = _prod(xs), _prod([d for d, t in zip(dims, target) if t != -1])
        if total is not None and rest:
            dims[target.index(-1)] = total // rest
    value = x.value if x is not None and len(dims) <= 1 else None
    return _with_value(tuple(dims), value, x.dtype if x is not None else torch.int64)


def _flatten(node, attrs: dict, ins: list, x, xs) -> Known | None:
    if xs is None:
        return None
    axis = attrs.get("axis", 1)
    axis = axis + len(xs) if axis < 0 else axis
    return Known((_prod(xs[:axis]), _prod(xs[axis:])))


def _transpose(node, attrs: dict, ins: list, x, xs) -> Known | None:
    if xs is None:
        return None
    perm = attrs.get("perm") or list(range(len(xs) - 1, -1, -1))
    return Known(tuple(xs[p] for p in perm))


def _conv(node, attrs: dict, ins: list, x, xs) -> Known | None:
    """Conv and ConvTranspose: batch and channel count (from the weight); spatial dims unknown."""
    w = ins[1]
    if xs is None or w is None or w.shape is None or len(xs) < 2:
        return Known(xs and tuple(None for _ in xs))
    channels = w.shape[0] if node.op_type == "Conv" else (w.shape[1] * attrs.get("group", 1) if w.shape[1] is not None else None)
    return Known((xs[0], channels) + tuple(None for _ in xs[2:]))


def _pool(node, attrs: dict, ins: list, x, xs) -> Known | None:
    """Windowed pooling: batch and channels kept; spatial dims unknown."""
    if xs is None or len(xs) < 2:
        return None
    return Known(xs[:2] + tuple(None for _ in xs[2:]))


def _global_pool(node, attrs: dict, ins: list, x, xs) -> Known | None:
    if xs is None or len(xs) < 2:
        return None
    return Known(xs[:2] + tuple(1 for _ in xs[2:]))


def _pad(node, attrs: dict, ins: list, x, xs) -> Known | None:
    if xs is None:
        return None
    pads = attrs.get("pads", attrs.get("paddings")) if len(node.input) < 2 else _ints_of(ins[1])
    axes = list(range(len(xs)))
    if len(node.input) > 3 and node.input[3]:
        axes = _ints_of(ins[3])
    if pads is None or axes is None:
        return Known(tuple(None for _ in xs))
    dims = list(xs)
    n = len(axes)
    for i, a in enumerate(axes):
        a = _norm(a, len(xs))
        if dims[a] is not None:
            dims[a] += pads[i] + pads[n + i]
    return Known(tuple(dims))


def _matmul(node, attrs: dict, ins: list, x, xs) -> Known | None:
    b = ins[1]
    if xs is None or b is None or b.shape is None or len(xs) < 2 or len(b.shape) < 2:
        return None
    batch = _broadcast([xs[:-2], b.shape[:-2]])
    return Known(batch + (xs[-2], b.shape[-1]))


def _gemm(node, attrs: dict, ins: list, x, xs) -> Known | None:
    b = ins[1]
    if xs is None or b is None or b.shape is None or len(xs) != 2 or len(b.shape) != 2:
        return None
    rows = xs[1] if attrs.get("transA", 0) else xs[0]
    cols = b.shape[0] if attrs.get("transB", 0) else b.shape[1]
    return Known((rows, cols))


def _reduce(node, attrs: dict, ins: list, x, xs) -> Known | None:
    """Reduce* ops and ArgMax/ArgMin: reduced axes become 1 (keepdims) or are dropped."""
    if xs is None:
        return None
    keep = attrs.get("keepdims", 1)
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [attrs.get("axis", 0)]
    else:
        ok, axes = _axes(node, attrs, ins, 1)
        if not ok:
            return None
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return Known(xs)
            axes = list(range(len(xs)))
    axes = {_norm(a, len(xs)) for a in axes}
    if keep:
        return Known(tuple(1 if i in axes else d for i, d in enumerate(xs)))
    return Known(tuple(d for i, d in enumerate(xs) if i not in axes))


RULES: dict[str, Callable] = {
    **dict.fromkeys(_SAME_SHAPE, _same_shape), **dict.fromkeys(_BROADCAST, _broadcasting),
    **dict.fromkeys(_POOL, _pool), **dict.fromkeys(_REDUCE | {"ArgMax", "ArgMin"}, _reduce),
    "Identity": _identity, "Cast": _cast, "Shape": _shape, "Size": _size, "Gather": _gather,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat, "Slice": _slice, "Reshape": _reshape,
    "Flatten": _flatten, "Transpose": _transpose, "Conv": _conv, "ConvTranspose": _conv, "Pad": _pad,
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool, "MatMul": _matmul, "Gemm": _gemm,
}
