"""Plan-time fusions of the torch executor (torch_exec/fuse.py), and the LRN op.

Every fused graph is checked three ways: the plan holds the fused step and none of the parts,
outputs agree with onnxruntime (CPU), and input gradients agree with the same graph run node for
node (``OnnxTorchModule(model, fuse=False)``). Graphs that must not fuse (a constant off by a
little, an intermediate with a second reader or asked for as an output) keep their parts.
"""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.torch_exec import OnnxTorchModule

RNG = np.random.default_rng(0)


def r(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, x_shape, outputs=("y",), inits=None, opset=17):
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model


def ops(module: OnnxTorchModule) -> list[str]:
    return [step.ctx.op_type for step in module._plan]


def ort_run(model, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def assert_close(got, ref, rtol=1e-4, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, what
    scale = max(float(np.abs(ref).max()), 1e-12)
    assert float(np.abs(got - ref).max()) <= rtol * scale, f"{what}: max diff {np.abs(got - ref).max()} of {scale}"


def input_grad(module, x, weights):
    xi = torch.from_numpy(x).requires_grad_()
    out = module(xi)
    out = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad((out * weights).sum(), xi)
    return grad.numpy()


def check_fused(model, x, expected_ops=None):
    """Outputs vs onnxruntime, input gradients vs the unfused plan; returns the fused module."""
    fused, plain = OnnxTorchModule(model), OnnxTorchModule(model, fuse=False)
    if expected_ops is not None:
        assert ops(fused) == expected_ops
    refs = ort_run(model, x)
    got = fused(torch.from_numpy(x))
    got = got if isinstance(got, tuple) else (got,)
    for i, (g, e) in enumerate(zip(got, refs)):
        assert_close(g.detach().numpy(), e, what=f"output {i}")
    weights = torch.from_numpy(RNG.standard_normal(refs[0].shape).astype(np.float32))
    assert_close(input_grad(fused, x, weights), input_grad(plain, x, weights), what="input gradient")
    return fused


# --------------------------------------------------------------------------------------------
# BatchNormalization folded into Conv, ConvTranspose, Gemm
# --------------------------------------------------------------------------------------------


def bn_params(c, prefix="bn"):
    return {f"{prefix}_scale": (RNG.uniform(0.5, 1.5, c)).astype(np.float32), f"{prefix}_bias": r(c),
            f"{prefix}_mean": r(c, scale=0.5), f"{prefix}_var": RNG.uniform(0.2, 2.0, c).astype(np.float32)}


def bn_node(x, y, prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")], [y],
                            **attrs)


def conv_bn(op_type="Conv", group=1, bias=True, c_in=4, c_out=6, **attrs):
    w_shape = (c_out, c_in // group, 3, 3) if op_type == "Conv" else (c_in, c_out // group, 3, 3)
    inits = {"w": r(*w_shape, scale=0.3), **bn_params(c_out)}
    if bias:
        inits["b"] = r(c_out)
    conv = helper.make_node(op_type, ["x", "w", "b"] if bias else ["x", "w"], ["t"], group=group, **attrs)
    return _model([conv, bn_node("t", "y", epsilon=1e-3)], [2, c_in, 7, 7], inits=inits), r(2, c_in, 7, 7)


BN_CASES = {
    "conv": lambda: conv_bn(pads=[1, 0, 1, 2], strides=[2, 1]),
    "conv_group2": lambda: conv_bn(group=2),
    "conv_depthwise": lambda: conv_bn(group=4, c_out=8),
    "conv_no_bias": lambda: conv_bn(bias=False, dilations=[2, 2]),
    "conv_transpose": lambda: conv_bn("ConvTranspose", strides=[2, 2], output_padding=[1, 0]),
    "conv_transpose_group2": lambda: conv_bn("ConvTranspose", group=2, c_out=6, pads=[1, 1, 0, 0]),
    "conv_transpose_no_bias": lambda: conv_bn("ConvTranspose", bias=False, group=4, c_out=8),
}


@pytest.mark.parametrize("name", list(BN_CASES))
def test_batchnorm_folds_into_convolution(name):
    model, x = BN_CASES[name]()
    op_type = model.graph.node[0].op_type
    fused = check_fused(model, x, [op_type])
    assert len(fused.state_dict()) == 2  # the folded weight and bias, no BN parameters
    assert ops(OnnxTorchModule(model, fuse=False)) == [op_type, "BatchNormalization"]


@pytest.mark.parametrize("trans_b, c_shape, alpha, beta", [(1, (5,), 1.0, 1.0), (0, (5,), 0.5, 2.0), (1, None, 1.0, 1.0),
                                                           (0, (3, 5), 1.0, 0.5), (1, (), 2.0, 1.0)])
def test_batchnorm_folds_into_gemm(trans_b, c_shape, alpha, beta):
    inits = {"w": r(5, 4) if trans_b else r(4, 5), **bn_params(5)}
    ins = ["x", "w"]
    if c_shape is not None:
        inits["c"] = r(*c_shape)
        ins.append("c")
    gemm = helper.make_node("Gemm", ins, ["t"], transB=trans_b, alpha=alpha, beta=beta)
    model = _model([gemm, bn_node("t", "y")], [3, 4], inits=inits)
    check_fused(model, r(3, 4), ["Gemm"])


def test_batchnorm_folds_in_every_inference_form():
    """BatchNormalization 7 (spatial defaults to 1) and 15 both fold; the opset-7 spatial=0 form does not."""
    for opset, attrs, expected in ((7, {}, ["Conv"]), (15, {}, ["Conv"]), (7, {"spatial": 0}, ["Conv", "BatchNormalization"])):
        model, x = conv_bn()
        model.opset_import[0].version = opset
        bn = model.graph.node[1]
        bn.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        if opset < 9 and attrs.get("spatial") == 0:  # per-activation statistics: (C, H, W)
            shape = (6, 5, 5)
            for init in model.graph.initializer:
                if init.name.startswith("bn_"):
                    base = numpy_helper.to_array(init)
                    init.CopyFrom(numpy_helper.from_array(np.broadcast_to(base[:, None, None], shape).copy(), init.name))
        check_fused(model, x, expected)


def test_batchnorm_is_not_folded_when_the_conv_output_has_another_reader():
    model, x = conv_bn()
    model.graph.node.append(helper.make_node("Add", ["y", "t"], ["z"]))
    model.graph.output[0].name = "z"
    check_fused(model, x, ["Conv", "BatchNormalization", "Add"])


def test_batchnorm_is_not_folded_when_the_conv_output_is_wanted():
    model, x = conv_bn()
    both = OnnxTorchModule(model, outputs=["y", "t"])
    assert ops(both) == ["Conv", "BatchNormalization"]
    y, t = both(torch.from_numpy(x))
    ref = ort_run(model, x)[0]
    assert_close(y.detach().numpy(), ref)
    assert ops(OnnxTorchModule(model, outputs=["y"])) == ["Conv"]


def test_batchnorm_is_not_folded_without_constant_weights_or_statistics():
    # the weight is a graph input
    model, x = conv_bn()
    w = model.graph.initializer[[i.name for i in model.graph.initializer].index("w")]
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.dims)))
    model.graph.initializer.remove(w)
    assert ops(OnnxTorchModule(model)) == ["Conv", "BatchNormalization"]
    # the running mean depends on the input
    model, x = conv_bn()
    model.graph.node.insert(0, helper.make_node("ReduceMean", ["x"], ["s"], keepdims=0))
    model.graph.node.insert(1, helper.make_node("Mul", ["bn_mean", "s"], ["bn_mean2"]))
    model.graph.node[3].input[3] = "bn_mean2"
    check_fused(model, x, ["ReduceMean", "Mul", "Conv", "BatchNormalization"])


def test_folded_weights_shared_with_another_conv_stay_intact():
    """One weight read by two convolutions, one of them followed by a BN: the other keeps the original."""
    model, x = conv_bn()
    model.graph.node.append(helper.make_node("Conv", ["x", "w", "b"], ["u"]))
    model.graph.node.append(helper.make_node("Add", ["y", "u"], ["z"]))
    model.graph.output[0].name = "z"
    check_fused(model, x, ["Conv", "Conv", "Add"])


# --------------------------------------------------------------------------------------------
# Activations written out as arithmetic
# --------------------------------------------------------------------------------------------

X = r(2, 3, 5, 5, scale=3.0)
K = {"three": np.float32(3.0), "zero": np.float32(0.0), "six": np.float32(6.0), "sixth": np.float32(1 / 6),
     "half": np.float32(0.5), "one": np.float32(1.0), "sqrt2": np.float32(math.sqrt(2)),
     "inv_sqrt2": np.array([1 / math.sqrt(2)], np.float32)}


def N(op_type, ins, out, **attrs):
    return helper.make_node(op_type, ins, [out], **attrs)


def relu6_plus3(x="x", out="r", add_order=("x", "three")):
    return [N("Add", [x if a == "x" else a for a in add_order], "a"), N("Clip", ["a", "zero", "six"], out)]


ACTIVATIONS = {  # name: (nodes, opset, the plan expected)
    "hardsigmoid_div": (relu6_plus3() + [N("Div", ["r", "six"], "y")], 17, ["HardSigmoid"]),
    "hardsigmoid_mul_sixth": (relu6_plus3(add_order=("three", "x")) + [N("Mul", ["sixth", "r"], "y")], 13,
                              ["HardSigmoid"]),
    "hardsigmoid_clip_attributes": ([N("Add", ["x", "three"], "a"), N("Clip", ["a"], "r", min=0.0, max=6.0),
                                     N("Div", ["r", "six"], "y")], 9, ["HardSigmoid"]),
    "hardswish_x_times_hardsigmoid": (relu6_plus3() + [N("Div", ["r", "six"], "h"), N("Mul", ["x", "h"], "y")], 13,
                                      ["HardSwish"]),
    "hardswish_keras": (relu6_plus3() + [N("Mul", ["x", "r"], "m"), N("Div", ["m", "six"], "y")], 13, ["HardSwish"]),
    "hardswish_keras_mul": (relu6_plus3() + [N("Mul", ["r", "x"], "m"), N("Mul", ["m", "sixth"], "y")], 13,
                            ["HardSwish"]),
    "hardswish_native_hardsigmoid": ([N("HardSigmoid", ["x"], "h", alpha=1 / 6, beta=0.5), N("Mul", ["h", "x"], "y")], 13,
                                     ["HardSwish"]),
    "hardswish_native": ([N("HardSwish", ["x"], "y")], 14, ["HardSwish"]),
    "hardsigmoid_native_onnx_default": ([N("HardSigmoid", ["x"], "y")], 13, ["HardSigmoid"]),
    "hardsigmoid_native_torch": ([N("HardSigmoid", ["x"], "y", alpha=1 / 6, beta=0.5)], 13, ["HardSigmoid"]),
    "gelu_div": ([N("Div", ["x", "sqrt2"], "d"), N("Erf", ["d"], "e"), N("Add", ["e", "one"], "a"),
                  N("Mul", ["x", "a"], "m"), N("Mul", ["m", "half"], "y")], 17, ["Gelu"]),
    "gelu_mul_half_first": ([N("Mul", ["inv_sqrt2", "x"], "d"), N("Erf", ["d"], "e"), N("Add", ["one", "e"], "a"),
                             N("Mul", ["x", "half"], "h"), N("Mul", ["a", "h"], "y")], 13, ["Gelu"]),
    "gelu_half_times": ([N("Div", ["x", "sqrt2"], "d"), N("Erf", ["d"], "e"), N("Add", ["e", "one"], "a"),
                         N("Mul", ["a", "x"], "m"), N("Mul", ["half", "m"], "y")], 17, ["Gelu"]),
    "gelu_native": ([N("Gelu", ["x"], "y")], 20, ["Gelu"]),
    "gelu_native_tanh": ([N("Gelu", ["x"], "y", approximate="tanh")], 20, ["Gelu"]),
    # must not fuse: HardSigmoid's ONNX default slope is 0.2, not torch's 1/6
    "x_times_onnx_hardsigmoid": ([N("HardSigmoid", ["x"], "h"), N("Mul", ["x", "h"], "y")], 13, ["HardSigmoid", "Mul"]),
    # must not fuse: 1/sqrt(2) rounded to 4 digits is off by more than 1e-6
    "gelu_rounded_constant": ([N("Mul", ["x", "k0707"], "d"), N("Erf", ["d"], "e"), N("Add", ["e", "one"], "a"),
                               N("Mul", ["x", "a"], "m"), N("Mul", ["m", "half"], "y")], 17, ["Mul", "Erf", "Add", "Mul", "Mul"]),
    # must not fuse: x + 3.01
    "hardsigmoid_wrong_offset": ([N("Add", ["x", "k301"], "a"), N("Clip", ["a", "zero", "six"], "r"),
                                  N("Div", ["r", "six"], "y")], 17, ["Add", "Clip", "Div"]),
    # the sigmoid part fuses; multiplied by another tensor than its input it is no hard-swish
    "hardsigmoid_times_other": (relu6_plus3() + [N("Div", ["r", "six"], "h"), N("Neg", ["x"], "n"),
                                                 N("Mul", ["n", "h"], "y")], 13, ["HardSigmoid", "Neg", "Mul"]),
}
EXTRA_CONSTS = {"k0707": np.float32(0.7071), "k301": np.float32(3.01)}


def activation_model(name, outputs=("y",)):
    nodes, opset, expected = ACTIVATIONS[name]
    names = {i for n in nodes for i in n.input}
    inits = {k: v for k, v in {**K, **EXTRA_CONSTS}.items() if k in names}
    return _model(nodes, X.shape, outputs, inits, opset), expected


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_patterns(name):
    model, expected = activation_model(name)
    check_fused(model, X, expected)


def test_fused_activations_are_the_torch_kernels():
    """The plan runs F.hardswish, F.hardsigmoid and F.gelu: the same numbers to the last bit."""
    x = torch.from_numpy(X)
    for name, fn in (("hardswish_keras", torch.nn.functional.hardswish), ("hardsigmoid_div", torch.nn.functional.hardsigmoid),
                     ("hardsigmoid_native_torch", torch.nn.functional.hardsigmoid), ("gelu_div", torch.nn.functional.gelu)):
        torch.testing.assert_close(OnnxTorchModule(activation_model(name)[0])(x), fn(x), rtol=0, atol=0)


def test_activation_is_not_fused_when_an_intermediate_is_read_elsewhere():
    # the Clip output is also a graph output, then read by a second node
    model, _ = activation_model("hardswish_keras", outputs=("y", "r"))
    assert ops(OnnxTorchModule(model)) == ["Add", "Clip", "Mul", "Div"]
    assert ops(OnnxTorchModule(model, outputs=["y"])) == ["HardSwish"]
    nodes = relu6_plus3() + [N("Div", ["r", "six"], "h"), N("Mul", ["x", "h"], "m"), N("Add", ["m", "a"], "y")]
    model = _model(nodes, X.shape, inits={k: K[k] for k in ("three", "zero", "six")}, opset=13)
    check_fused(model, X, ["Add", "Clip", "Div", "Mul", "Add"])
    # Erf's input is also read by the output node
    nodes = list(ACTIVATIONS["gelu_div"][0])
    nodes[-1] = N("Mul", ["m", "half"], "g")
    nodes.append(N("Add", ["g", "d"], "y"))
    model = _model(nodes, X.shape, inits={k: K[k] for k in ("sqrt2", "one", "half")})
    check_fused(model, X, ["Div", "Erf", "Add", "Mul", "Mul", "Add"])


def test_fusion_chain_conv_bn_hardswish():
    """Conv + BN + decomposed hard-swish, as a Paddle export writes a MobileNetV3 block: two steps."""
    model, x = conv_bn()
    nodes = list(model.graph.node) + relu6_plus3("y", "r") + [N("Mul", ["y", "r"], "m"), N("Div", ["m", "six"], "z")]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inits.update({k: K[k] for k in ("three", "zero", "six")})
    model = _model(nodes, [2, 4, 7, 7], outputs=("z",), inits=inits)
    check_fused(model, x, ["Conv", "HardSwish"])


# --------------------------------------------------------------------------------------------
# LRN
# --------------------------------------------------------------------------------------------


def lrn_reference(x, size, alpha, beta, bias):
    """The ONNX definition, channel by channel (onnxruntime's CPU kernel only takes odd sizes)."""
    c = x.shape[1]
    before, after = (size - 1) // 2, math.ceil((size - 1) / 2)
    sq = np.zeros_like(x, dtype=np.float64)
    for i in range(c):
        sq[:, i] = (x[:, max(0, i - before):min(c, i + after + 1)].astype(np.float64) ** 2).sum(1)
    return x / (bias + alpha / size * sq) ** beta


@pytest.mark.parametrize("size", [1, 3, 5, 4])
def test_lrn(size):
    x = r(2, 7, 4, 5, scale=2.0)
    attrs = {"size": size, "alpha": 0.3, "beta": 0.8, "bias": 1.5}
    model = _model([helper.make_node("LRN", ["x"], ["y"], **attrs)], x.shape)
    module = OnnxTorchModule(model)
    xi = torch.from_numpy(x).requires_grad_()
    y = module(xi)
    ref = ort_run(model, x)[0] if size % 2 else lrn_reference(x, **attrs)
    assert_close(y.detach().numpy(), ref, rtol=1e-5)
    (grad,) = torch.autograd.grad((y * torch.from_numpy(r(*x.shape))).sum(), xi)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    double = module.double()
    xd = torch.from_numpy(x[:1, :, :2, :2]).double().requires_grad_()
    assert torch.autograd.gradcheck(double, (xd,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_lrn_even_size_window_is_onnx_not_torch():
    """For even sizes torch's F.local_response_norm centres the window a channel later than ONNX."""
    x = r(1, 6, 2, 2)
    attrs = {"size": 4, "alpha": 0.5, "beta": 0.75, "bias": 1.0}
    got = OnnxTorchModule(_model([helper.make_node("LRN", ["x"], ["y"], **attrs)], x.shape))(torch.from_numpy(x)).numpy()
    assert_close(got, lrn_reference(x, **attrs), rtol=1e-5)
    torch_lrn = torch.nn.functional.local_response_norm(torch.from_numpy(x), 4, 0.5, 0.75, 1.0).numpy()
    assert np.abs(torch_lrn - got).max() > 1e-3


# --------------------------------------------------------------------------------------------
# A real export: torchvision MobileNetV3-small with BatchNormalization left in the graph
# --------------------------------------------------------------------------------------------


def export_mobilenet_v3(path, opset, size=64):
    """mobilenet_v3_small(weights=None), eval, with non-trivial BN statistics; no constant folding, so
    BatchNormalization stays (as in Paddle exports); below opset 14 hard-swish is ``x * HardSigmoid(x)``."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.rand(1, 3, size, size),), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    finally:
        logging.disable(logging.NOTSET)
    return onnx.load(str(path))


@pytest.mark.parametrize("opset", [17, 13])
def test_mobilenet_v3_small_export(tmp_path, opset):
    model = export_mobilenet_v3(tmp_path / "mnv3.onnx", opset)
    graph_ops = [n.op_type for n in model.graph.node]
    assert graph_ops.count("BatchNormalization") == 34  # the exporter left them unfolded
    x = np.random.default_rng(1).uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)
    fused = check_fused(model, x)
    plain = OnnxTorchModule(model, fuse=False)
    assert "BatchNormalization" not in ops(fused) and ops(plain).count("BatchNormalization") == 34
    assert ops(fused).count("HardSwish") == 19 and ops(plain).count("HardSwish") == (19 if opset >= 14 else 0)
    assert len(fused._plan) == len(plain._plan) - 34 - (19 if opset < 14 else 0)


@pytest.mark.parametrize("name", ["conv", "conv_depthwise", "conv_transpose_group2"])
def test_channels_last_gives_the_same_outputs_and_gradients(name):
    """On CPU a graph with convolutions runs channels-last by default (weights and input); the values and
    input gradients are those of the contiguous layout, and the output comes back contiguous."""
    model, x = BN_CASES[name]()
    auto, plain = OnnxTorchModule(model), OnnxTorchModule(model, channels_last=False)
    out = auto(torch.from_numpy(x))
    assert auto._layout_is_channels_last and not plain._layout_is_channels_last
    weights4d = [b for b in auto.buffers() if b.dim() == 4]
    assert weights4d and all(b.is_contiguous(memory_format=torch.channels_last) for b in weights4d)
    assert out.is_contiguous()
    assert_close(out.detach(), plain(torch.from_numpy(x)).detach(), 1e-5, name)
    weights = torch.from_numpy(r(*out.shape))
    assert_close(input_grad(auto, x, weights), input_grad(plain, x, weights), 1e-5, name)
    # a graph without convolutions keeps torch's default layout: bit-identical activations
    assert not OnnxTorchModule(_model([N("Relu", ["x"], "y")], x.shape))._has_conv
