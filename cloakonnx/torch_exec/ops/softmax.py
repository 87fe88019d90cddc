"""The softmax family: Softmax, LogSoftmax, Hardmax.

One file because all three changed meaning together in opset 13 (a 2-D coercion at ``axis``
before, a plain axis after), and one factory builds both forms for each.
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from ..registry import op
from ..tensors import _norm_axis


def _softmax_like(fn):
    def legacy(inputs, attrs, ctx):
        """Opset < 13: coerce to 2-D at ``axis`` (default 1), normalise rows, restore shape."""
        x = inputs[0]
        axis = _norm_axis(attrs.get("axis", 1), x.dim())
        if axis == x.dim() - 1:
            return (fn(x, -1),)
        shape = x.shape
        rows = int(np.prod(shape[:axis])) if axis else 1
        return (fn(x.reshape(rows, -1), 1).reshape(shape),)

    def modern(inputs, attrs, ctx):
        return (fn(inputs[0], attrs.get("axis", -1)),)

    return legacy, modern


def _hardmax(x, dim):
    return F.one_hot(x.argmax(dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


for _name, _fn in {"Softmax": F.softmax, "LogSoftmax": F.log_softmax, "Hardmax": _hardmax}.items():
    _legacy, _modern = _softmax_like(_fn)
    op(_name, 1, 11)(_legacy)  # 11 allows a negative axis
    op(_name, 13)(_modern)
