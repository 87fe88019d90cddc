"""The executor's own input-gradient paths, checked against torch's autograd of the same graph.

Stems (few input channels, a large kernel at a stride) get their input gradient by phases
(ops/conv.py, _PhasedConv): a stride-1 convolution of the output gradient and a pixel shuffle.
The sums are those of the transposed convolution in another order, so in float64 the gradients
agree to rounding. The rule that picks the path is checked both ways: a 3x3/2 stem, a stride-1
conv and a conv with many input channels keep torch's own backward.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.torch_exec import OnnxTorchModule

RNG = np.random.default_rng(0)


def _conv_model(c_in, c_out, kernel, attrs, x_shape):
    w = RNG.standard_normal((c_out, c_in, *kernel)).astype(np.float32)
    b = RNG.standard_normal(c_out).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, torch.from_numpy(w).double(), torch.from_numpy(b).double()


def _torch_pads(attrs, kernel, size, stride):
    """ONNX pads or auto_pad as (left, right, top, bottom) for F.pad."""
    if attrs.get("auto_pad") == "SAME_UPPER":
        pads = []
        for k, n in zip(kernel, size):
            total = max((-(-n // stride) - 1) * stride + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return (*pads[1], *pads[0])
    p = attrs.get("pads", [0, 0, 0, 0])
    return (p[1], p[3], p[0], p[2])


CASES = {  # name: (c_in, c_out, kernel, attrs, x_shape, phased)
    "resnet_stem_7x7s2": (3, 8, (7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}, (2, 3, 33, 30), True),
    "patchify_4x4s4": (3, 6, (4, 4), {"strides": [4, 4]}, (2, 3, 16, 18), True),
    "asymmetric_same_upper_5x6s3": (2, 5, (5, 6), {"strides": [3, 3], "auto_pad": "SAME_UPPER"}, (1, 2, 19, 20), True),
    "windows_miss_the_edge_8x8s2": (1, 4, (8, 8), {"strides": [2, 2]}, (2, 1, 13, 13), True),
    "uneven_pads_4x4s2": (4, 3, (4, 4), {"strides": [2, 2], "pads": [0, 1, 2, 3]}, (2, 4, 12, 11), True),
    "stem_3x3s2_left_to_torch": (3, 8, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (2, 3, 16, 16), False),
    "stride_1_left_to_torch": (3, 8, (7, 7), {"pads": [3, 3, 3, 3]}, (2, 3, 12, 12), False),
    "many_channels_left_to_torch": (8, 4, (7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}, (2, 8, 16, 16), False),
}


def _backward_nodes(out):
    """The names of the autograd nodes ``out`` was made by."""
    names, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("channels_last", [True, False])
def test_stem_input_gradient_by_phases_matches_torch(name, channels_last):
    c_in, c_out, kernel, attrs, x_shape, phased = CASES[name]
    model, w, b = _conv_model(c_in, c_out, kernel, attrs, x_shape)
    executor = OnnxTorchModule(model, channels_last=channels_last).double()
    stride = attrs.get("strides", [1, 1])[0]
    x = torch.from_numpy(RNG.uniform(-1, 1, x_shape)).requires_grad_(True)
    out = executor(x)
    assert ("_PhasedConvBackward" in _backward_nodes(out)) == phased
    weights = torch.from_numpy(RNG.standard_normal(tuple(out.shape)))
    (got,) = torch.autograd.grad(out, x, weights)

    xr = x.detach().clone().requires_grad_(True)
    ref_out = F.conv2d(F.pad(xr, _torch_pads(attrs, kernel, x_shape[2:], stride)), w, b, stride)
    assert ref_out.shape == out.shape
    torch.testing.assert_close(out.detach(), ref_out.detach(), rtol=1e-9, atol=1e-9)
    (want,) = torch.autograd.grad(ref_out, xr, weights)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    layout = torch.channels_last if channels_last and c_in > 1 else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout)


def test_phases_leave_weight_gradients_to_torch():
    """Fine-tuning makes the weights require gradients: then torch's own backward runs, and the weight
    gets its gradient."""
    model, _, _ = _conv_model(*CASES["resnet_stem_7x7s2"][:5])
    executor = OnnxTorchModule(model)
    w = next(b for b in executor.buffers() if b.dim() == 4)
    w.requires_grad_(True)
    x = torch.rand(2, 3, 33, 30, requires_grad=True)
    out = executor(x)
    assert "_PhasedConvBackward" not in _backward_nodes(out)
    out.sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_global_average_pool_hands_its_gradient_on_channels_last():
    """adaptive_avg_pool2d's backward gives an NCHW gradient for a channels-last input; the executor's
    GlobalAveragePool hands it on channels-last (the same values), so the layers before it stay in
    oneDNN's fast layout."""
    from cloakonnx.torch_exec.ops.pool import _global_avg_pool

    x = torch.from_numpy(RNG.standard_normal((4, 16, 7, 7)).astype(np.float32))
    weights = torch.from_numpy(RNG.standard_normal((4, 16, 1, 1)).astype(np.float32))
    grads = {}
    for layout in (torch.channels_last, torch.contiguous_format):
        xi = x.contiguous(memory_format=layout).requires_grad_(True)
        (y,) = _global_avg_pool([xi], {}, None)
        (grads[layout],) = torch.autograd.grad(y, xi, weights)
        torch.testing.assert_close(y.detach(), x.mean((2, 3), keepdim=True), rtol=1e-6, atol=1e-6)
    assert grads[torch.channels_last].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grads[torch.channels_last], grads[torch.contiguous_format])


def test_stem_benchmark_times_both_paths_and_they_agree():
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("stem_grads")
    threads = torch.get_num_threads()
    try:
        result = bench.run(bench.parse_args(["--batch", "1", "--repeats", "1", "--layouts", "channels-last"]))
    finally:
        torch.set_num_threads(threads)
    assert [row["stem"] for row in result["rows"]] == list(bench.STEMS)
    assert all(row["max_relative_grad_difference"] < 1e-5 and row["median_ms"]["phases"] > 0 for row in result["rows"])
    assert "phases/oneDNN" in bench.table(result)
