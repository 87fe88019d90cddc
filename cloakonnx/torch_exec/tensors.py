"""ONNX tensors and attributes as torch values, and the small conversions handlers share.

Kept apart from the op families so that they all use one dtype mapping (float16, bfloat16 and
float64 are computed in float32) and one reading of attributes, and so that the planner can parse
initializers and attributes without importing any handler.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from ..errors import CloakError

# ONNX element type -> torch dtype used for computing. Low/high precision floats run in float32.
_FLOAT32_STANDINS = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float32,
    TensorProto.BFLOAT16: torch.float32,
    TensorProto.DOUBLE: torch.float32,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}


# --------------------------------------------------------------------------------------------
# Run-time values as Python numbers, axes and pads
# --------------------------------------------------------------------------------------------


def _ints(t) -> list[int] | None:
    """A run-time int tensor (or list) as Python ints; None stays None."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _floats(t) -> list[float] | None:
    if t is None:
        return None
    return [float(v) for v in t.reshape(-1).tolist()]


def _scalar(t):
    return t.reshape(-1)[0].item() if isinstance(t, torch.Tensor) else t


def _empty(t) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.numel() == 0)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _norm_axes(axes, rank: int) -> list[int]:
    return [_norm_axis(int(a), rank) for a in axes]


def _pt_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads for trailing axes -> torch F.pad order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        out += [int(b), int(e)]
    return out


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


# --------------------------------------------------------------------------------------------
# ONNX protos -> torch
# --------------------------------------------------------------------------------------------


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (and not also contiguous, as a 1x1 image is)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _onnx_dtype(elem_type: int) -> torch.dtype:
    try:
        return _DTYPES[elem_type]
    except KeyError:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise CloakError(f"the torch executor cannot hold ONNX tensors of type {name}") from None


def tensor_from_proto(proto: onnx.TensorProto) -> torch.Tensor:
    """An ONNX TensorProto as a torch tensor, floats in float32."""
    dtype = _onnx_dtype(proto.data_type)
    arr = numpy_helper.to_array(proto)
    if proto.data_type in _FLOAT32_STANDINS:
        arr = arr.astype(np.float32)
    arr = np.array(arr, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.from_numpy(arr.astype(np.int64)).to(dtype)
    return torch.from_numpy(arr).to(dtype)


def _sparse_to_dense(sp: onnx.SparseTensorProto) -> torch.Tensor:
    values = tensor_from_proto(sp.values).reshape(-1)
    idx = tensor_from_proto(sp.indices).to(torch.int64)
    shape = list(sp.dims)
    dense = torch.zeros(int(np.prod(shape)) if shape else 1, dtype=values.dtype)
    if idx.dim() == 2:  # coordinates -> linear indices
        strides = torch.tensor([int(np.prod(shape[i + 1 :])) for i in range(len(shape))])
        idx = (idx * strides).sum(1)
    dense[idx.reshape(-1)] = values
    return dense.reshape(shape)


_UNPARSED = object()  # an attribute no supported op takes (graphs, type protos)


def _parse_attr(a: onnx.AttributeProto):
    A = onnx.AttributeProto
    if a.type == A.FLOAT:
        return float(a.f)
    if a.type == A.INT:
        return int(a.i)
    if a.type == A.STRING:
        return a.s.decode("utf-8", "replace")
    if a.type == A.FLOATS:
        return [float(v) for v in a.floats]
    if a.type == A.INTS:
        return [int(v) for v in a.ints]
    if a.type == A.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings]
    if a.type == A.TENSOR:
        return tensor_from_proto(a.t)
    if a.type == A.SPARSE_TENSOR:
        return _sparse_to_dense(a.sparse_tensor)
    if a.type == A.TENSORS:
        return [tensor_from_proto(t) for t in a.tensors]
    return _UNPARSED  # graphs, type protos: no supported op takes them


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: _parse_attr(a) for a in node.attribute}
