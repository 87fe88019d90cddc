"""QDQ quantization: QuantizeLinear and DequantizeLinear with a straight-through gradient.

These are what onnxruntime.quantization's QDQ format and TensorRT's explicit quantization emit.
QuantizeLinear's integer output is carried as a float tensor holding the integer values, with a
straight-through gradient (zero where the value saturates beyond the range, as torch's
fake_quantize); DequantizeLinear turns it back. Forward values equal onnxruntime's. A file of its
own because the gradient rule is a deliberate choice that attacks depend on.
"""
from __future__ import annotations

import torch
from onnx import TensorProto

from ...errors import CloakError
from ..registry import op
from ..tensors import _DTYPES, _empty, _norm_axis, _onnx_dtype

_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


def _check_q(attrs, ctx):
    if attrs.get("block_size", 0):
        return "blocked quantization (block_size)"
    out = attrs.get("output_dtype", 0)
    if out and _DTYPES.get(out) not in _QRANGE:
        return f"output_dtype {TensorProto.DataType.Name(out)}"
    if attrs.get("precision", 0) not in (0, TensorProto.FLOAT):  # 23: the division's precision
        return f"precision {TensorProto.DataType.Name(attrs['precision'])}"
    return None


def _check_dq(attrs, ctx):
    if attrs.get("block_size", 0):
        return "blocked quantization (block_size)"
    if attrs.get("output_dtype", 0) not in (0, TensorProto.FLOAT):  # 23: float16/bfloat16 outputs
        return f"output_dtype {TensorProto.DataType.Name(attrs['output_dtype'])}"
    return None


def _per_axis(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A scale or zero point, scalar or 1-D along ``axis``, shaped to broadcast against ``x``."""
    t = t.to(torch.float32)
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[_norm_axis(axis, x.dim())] = -1
    return t.reshape(shape)


# 13: per-axis, 19: float16/bfloat16 inputs and float8 (not held), 21: block_size, output_dtype, 16-bit,
# 23: precision, 24+: types the executor does not hold
@op("QuantizeLinear", 10, 13, 19, 21, 23, 24, 25, 28, check=_check_q)
def _quantize_linear(inputs, attrs, ctx):
    x, scale = inputs[0].to(torch.float32), inputs[1]
    zp = inputs[2] if len(inputs) > 2 and not _empty(inputs[2]) else None
    qtype = zp.dtype if zp is not None else (_onnx_dtype(attrs["output_dtype"]) if attrs.get("output_dtype")
                                              else torch.uint8)
    if qtype not in _QRANGE:
        raise CloakError(f"QuantizeLinear to {qtype} is not supported by the torch executor")
    lo, hi = _QRANGE[qtype]
    axis = attrs.get("axis", 1)
    v = x / _per_axis(scale, x, axis)
    if zp is not None:
        v = v + _per_axis(zp, x, axis)
    # Straight through where lo <= v <= hi, boundaries included: torch.clamp's own gradient is zero
    # at the boundary, which froze every input pixel at the bottom of the box (digits' background
    # is exactly 0) and made gradient attacks through QDQ graphs much weaker than transfer.
    inside = ((v >= lo) & (v <= hi)).to(v.dtype).detach()
    return (v * inside + (torch.round(v).clamp(lo, hi) - v * inside).detach(),)


@op("DequantizeLinear", 10, 13, 19, 21, 23, 24, 25, 28, check=_check_dq)  # 23: output_dtype
def _dequantize_linear(inputs, attrs, ctx):
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 and not _empty(inputs[2]) else None
    axis = attrs.get("axis", 1)
    y = x.to(torch.float32)
    if zp is not None:
        y = y - _per_axis(zp, y, axis)
    return (y * _per_axis(scale, y, axis),)
