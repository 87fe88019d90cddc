"""Ops that make tensors from attributes or scalars: Constant, ConstantOfShape, Range.

The planner folds them (their inputs are constant in exported models), so they run once per model.
"""
from __future__ import annotations

import torch

from ...errors import CloakError
from ..registry import op
from ..tensors import _ints, _scalar


def _check_constant(attrs, ctx):
    if "value_string" in attrs or "value_strings" in attrs:
        return "string constants"
    return None


@op("Constant", 1, 9, 11, 12, 13, 19, 21, 23, 24, 25, check=_check_constant)  # 11: sparse_value, 12: value_*
def _constant(inputs, attrs, ctx):
    for key in ("value", "sparse_value"):
        if key in attrs:
            return (attrs[key],)
    if "value_float" in attrs:
        return (torch.tensor(attrs["value_float"], dtype=torch.float32),)
    if "value_floats" in attrs:
        return (torch.tensor(attrs["value_floats"], dtype=torch.float32),)
    if "value_int" in attrs:
        return (torch.tensor(attrs["value_int"], dtype=torch.int64),)
    if "value_ints" in attrs:
        return (torch.tensor(attrs["value_ints"], dtype=torch.int64),)
    raise CloakError(f"Constant node {ctx.name!r}: string constants are not supported")


@op("ConstantOfShape", 9, 20, 21, 23, 24, 25)
def _constant_of_shape(inputs, attrs, ctx):
    value = attrs.get("value")
    shape = _ints(inputs[0])
    device = inputs[0].device
    if value is None:
        return (torch.zeros(shape, dtype=torch.float32, device=device),)
    return (torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype, device=device),)


@op("Range", 11, 27)  # 27: stash_type, float16 math in float32 (as the executor computes it)
def _range(inputs, attrs, ctx):
    start, limit, delta = inputs
    return (torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype, device=start.device),)
