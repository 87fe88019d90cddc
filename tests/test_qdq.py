"""QDQ-quantized models: QuantizeLinear/DequantizeLinear in the executor, the head behind them,
and folding the mask into an integer weight.

The executor must reproduce onnxruntime's QDQ semantics exactly (compared with basic graph
optimizations, which keep each op as specified); onnxruntime's fused integer kernels round
differently, which ``check`` reports separately.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.torch_exec import OnnxTorchModule, unsupported_ops

RNG = np.random.default_rng(0)


def _qdq_model(opset: int, x_shape, scale, zp, axis=None, dequantize_only=False, quantize_only=False, **q_attrs):
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s")]
    ins = ["x", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(np.asarray(zp), "z"))
        ins.append("z")
    attrs = {} if axis is None else {"axis": axis}
    if dequantize_only:
        nodes = [helper.make_node("DequantizeLinear", ins, ["y"], **attrs)]
        x_type = helper.np_dtype_to_tensor_dtype(np.asarray(zp).dtype if zp is not None else np.dtype(np.uint8))
    elif quantize_only:
        nodes = [helper.make_node("QuantizeLinear", ins, ["y"], **attrs, **q_attrs)]
        x_type = TensorProto.FLOAT
    else:
        nodes = [helper.make_node("QuantizeLinear", ins, ["q"], **attrs, **q_attrs),
                 helper.make_node("DequantizeLinear", ["q"] + ins[1:], ["y"], **attrs)]
        x_type = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", x_type, list(x_shape))],
                              [helper.make_value_info("y", onnx.TypeProto())], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return onnx.shape_inference.infer_shapes(model)


def _ort(model, x, fuse=False):
    opts = ort.SessionOptions()
    if not fuse:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = (RNG.standard_normal((2, 3, 4, 4)) * 3).astype(np.float32)

CASES = [
    dict(id="v10_uint8", opset=10, scale=0.05, zp=np.uint8(128)),
    dict(id="v10_int8", opset=10, scale=0.02, zp=np.int8(-3)),
    dict(id="v13_no_zero_point", opset=13, scale=0.03, zp=None),
    dict(id="v13_per_channel_axis1", opset=13, scale=[0.01, 0.05, 0.1], zp=np.array([0, 5, -7], np.int8), axis=1),
    dict(id="v13_per_channel_axis_neg", opset=13, scale=[0.02, 0.03, 0.04, 0.05], zp=np.array([1, 2, 3, 4], np.uint8),
         axis=-1),
    dict(id="v19_uint8", opset=19, scale=0.04, zp=np.uint8(10)),
    dict(id="v21_int16", opset=21, scale=0.001, zp=np.int16(-100)),
    dict(id="v21_uint16", opset=21, scale=0.0005, zp=np.uint16(30000)),
    dict(id="saturating", opset=13, scale=0.001, zp=np.uint8(0)),  # most values clip at 0 or 255
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
@pytest.mark.parametrize("form", ["pair", "quantize", "dequantize"])
def test_qdq_matches_onnxruntime(case, form):
    kw = dict(axis=case.get("axis"), dequantize_only=form == "dequantize", quantize_only=form == "quantize")
    model = _qdq_model(case["opset"], X.shape, case["scale"], case["zp"], **kw)
    assert unsupported_ops(model) == []
    if form == "dequantize":
        dtype = np.asarray(case["zp"]).dtype if case["zp"] is not None else np.dtype(np.uint8)
        info = np.iinfo(dtype)
        x = RNG.integers(info.min, int(info.max) + 1, X.shape).astype(dtype)
    else:
        x = X
    ref = _ort(model, x)
    got = OnnxTorchModule(model)(torch.from_numpy(x.copy())).detach().numpy()
    np.testing.assert_array_equal(got.astype(np.float64), ref.astype(np.float64))  # exact, integers included


def test_straight_through_gradient_is_one_inside_the_range_and_zero_where_saturated():
    """Boundaries included: an input pixel exactly at the bottom of the range (0 here, like the digits'
    background) must still get a gradient, or attacks can never move it (torch.clamp gives 0 there)."""
    model = _qdq_model(13, (1, 7), 0.1, np.uint8(0))
    x = torch.tensor([[-1.0, 0.0, 0.05, 0.33, 10.0, 25.4, 40.0]], requires_grad=True)  # range is [0, 25.5]
    (grad,) = torch.autograd.grad(OnnxTorchModule(model)(x).sum(), x)
    np.testing.assert_array_equal(grad.numpy(), [[0, 1, 1, 1, 1, 1, 0]])


def test_gradient_attacks_through_a_qdq_model_are_as_strong_as_transfer_from_the_float_model(qdq_digits,
                                                                                              digits_files):
    """FGSM through the QDQ graph must do at least as well as FGSM crafted on the float model it came
    from (it did far worse while the input's zero pixels had zero gradient)."""
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.backend import craft
    from cloakonnx.data import Preprocess
    from cloakonnx.runner import Runner
    from cloakonnx.graph import load_model

    data = np.load(digits_files[1])
    x, y = data["x"][:200], data["y"][:200].astype(np.int64)
    qdq = Runner(load_model(qdq_digits[0]), "logits", [], Preprocess(), providers=["CPUExecutionProvider"])
    flt = Runner(load_model(digits_files[0]), "logits", [], Preprocess(), providers=["CPUExecutionProvider"])
    cfg = AttackConfig(name="fgsm", eps=0.1)

    def accuracy(adv):
        return float((qdq.session.run(None, {"input": adv})[0].argmax(1) == y).mean())

    through = accuracy(craft(qdq.torch_model, cfg, x, y, batch_size=64))
    transfer = accuracy(craft(flt.torch_model, cfg, x, y, batch_size=64))
    assert through <= transfer + 0.03, (through, transfer)


def test_blocked_quantization_is_reported_unsupported():
    model = _qdq_model(21, (4, 4), np.full((4, 2), 0.1, np.float32), np.zeros((4, 2), np.uint8), axis=1,
                       block_size=2)
    ops = unsupported_ops(model)
    assert ("QuantizeLinear", 21) in ops


# --- a real QDQ classifier: the digits CNN through onnxruntime's own static quantizer -------------------


@pytest.fixture(scope="module")
def qdq_digits(digits_files, tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model_path, data_path = digits_files
    x = np.load(data_path)["x"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i : i + 32]} for i in range(0, 128, 32)])

        def get_next(self):
            return next(self.batches, None)

    out = tmp_path_factory.mktemp("qdq") / "digits.qdq.onnx"
    quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out, data_path


def test_check_passes_on_a_quantized_model_and_reports_the_fused_kernels(qdq_digits):
    from cloakonnx.check import check_model

    result = check_model(str(qdq_digits[0]), batch=16)
    assert result.ok, result.to_dict()
    assert result.outputs[0].max_abs == 0.0  # the executor reproduces the unfused QDQ semantics exactly
    assert result.quantized is not None and result.quantized["fused_top1_agreement"] >= 0.9


def test_head_is_found_behind_the_logits_quantization(qdq_digits):
    from cloakonnx.graph import find_head, load_model

    head = find_head(load_model(qdq_digits[0]))
    assert head.kind == "Gemm" and head.width == 64 and head.logits == "logits"
    assert head.feature.endswith("DequantizeLinear_Output")
    assert head.weight.dtype == np.float32 and np.count_nonzero(head.weight) > 0.9 * head.weight.size


def test_harden_a_quantized_model_in_both_forms(qdq_digits, tmp_path):
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.harden import HardenConfig, harden
    from cloakonnx.graph import find_head, load_model

    model_path, data_path = qdq_digits
    reports = {}
    for fold in (False, True):
        out = tmp_path / f"h{int(fold)}.onnx"
        reports[fold] = harden(model_path, data_path, HardenConfig(
            output=out, attack=AttackConfig(name="pgd", eps=0.1, steps=5), fraction=0.1, fold=fold, adaptive=False))
        assert reports[fold].attack["fallback"] is None  # gradients, not the Square fallback
    original, mul, folded = (load_model(p) for p in (model_path, tmp_path / "h0.onnx", tmp_path / "h1.onnx"))
    assert len(folded.graph.node) == len(original.graph.node)
    assert len(mul.graph.node) == len(original.graph.node) + 1
    zero = np.flatnonzero(find_head(mul).mask == 0)
    assert len(zero) == reports[True].masked == round(0.1 * 64)
    # Folding set the integer weight's masked columns to the zero point: they dequantize to exact zeros.
    head = find_head(folded)
    assert np.all(head.weight[zero] == 0) and np.count_nonzero(head.weight[np.setdiff1d(np.arange(64), zero)]) > 0
    x = np.load(data_path)["x"]
    a = _run(mul, x)
    b = _run(folded, x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99  # fused integer Gemm vs float Gemm: rounding only


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
