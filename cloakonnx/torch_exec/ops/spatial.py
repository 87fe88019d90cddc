"""Window geometry shared by convolution and pooling: explicit pads from ``pads`` or ``auto_pad``.

Registers no op; it exists so that conv.py and pool.py compute padding one way, as onnxruntime does.
"""
from __future__ import annotations


def _auto_pads(auto_pad: str, sizes, kernel, strides, dilations):
    """SAME_UPPER/SAME_LOWER/VALID -> explicit (begins, ends), as onnxruntime computes them."""
    begins, ends = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        if auto_pad == "VALID":
            begins.append(0)
            ends.append(0)
            continue
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins, ends


def _spatial_pads(x, attrs, kernel, strides, dilations):
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", ""):
        return _auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations)
    pads = attrs.get("pads", [0] * (2 * n))
    return pads[:n], pads[n:]
