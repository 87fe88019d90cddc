"""Whole-model conformance: torchvision architectures through both torch.onnx exporters.

Every architecture is built with random weights (weights=None) and randomised BatchNorm
statistics and affine parameters, so no two initializers are equal and no layer is an identity.
Each export is checked with :func:`cloakonnx.check.check_model` (executor vs onnxruntime on the
same inputs, plus finite non-zero input gradients).

Exports are made once per session under tmp_path_factory. The default run covers every
architecture with the fast legacy exporter and the required ones (resnet18, mobilenet_v3_small,
efficientnet_b0, vit) with the dynamo exporter; the remaining dynamo exports are marked ``slow``.
"""
from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.check import CheckResult, check_model
from cloakonnx.errors import CloakError

torchvision = pytest.importorskip("torchvision")
tv = torchvision.models

IMAGE = 32
NUM_CLASSES = 10


def _vit():
    return tv.VisionTransformer(
        image_size=IMAGE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=NUM_CLASSES
    )


def _densenet_mini():
    return tv.densenet.DenseNet(growth_rate=16, block_config=(2, 2, 2, 2), num_init_features=32, num_classes=NUM_CLASSES)


def _convnext_mini():
    cfg = tv.convnext.CNBlockConfig
    return tv.convnext.ConvNeXt([cfg(32, 64, 2), cfg(64, 128, 2), cfg(128, None, 2)], num_classes=NUM_CLASSES)


def _swin_mini():
    return tv.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=NUM_CLASSES
    )


# The four required architectures as torchvision ships them (vit scaled to 32 px), plus three
# more small standard ones and scaled-down DenseNet/ConvNeXt/Swin (same blocks, fewer and
# narrower layers, so the run stays short on two cores).
ARCHS = {
    "resnet18": lambda: tv.resnet18(weights=None, num_classes=NUM_CLASSES),
    "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES),
    "efficientnet_b0": lambda: tv.efficientnet_b0(weights=None, num_classes=NUM_CLASSES),
    "vit": _vit,
    "squeezenet1_1": lambda: tv.squeezenet1_1(weights=None, num_classes=NUM_CLASSES),
    "shufflenet_v2_x0_5": lambda: tv.shufflenet_v2_x0_5(weights=None, num_classes=NUM_CLASSES),
    "regnet_y_400mf": lambda: tv.regnet_y_400mf(weights=None, num_classes=NUM_CLASSES),
    "densenet_mini": _densenet_mini,
    "convnext_mini": _convnext_mini,
    "swin_mini": _swin_mini,
}
REQUIRED = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit")


def randomised(name: str) -> torch.nn.Module:
    """The architecture in eval mode with random weights and no constant-valued tensor."""
    torch.manual_seed(sum(map(ord, name)))
    model = ARCHS[name]().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
        for p in list(model.parameters()) + [b for n, b in model.named_buffers() if b.is_floating_point()]:
            if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):  # ones, zeros: make them distinct
                base = 1.0 if float(p.reshape(-1)[0]) == 1.0 else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def export(name: str, exporter: str, dynamic: bool, path) -> str:
    """Export ``name`` with the dynamo (default opset) or legacy (opset 17) exporter."""
    model = randomised(name)
    x = torch.rand(2 if dynamic else 1, 3, IMAGE, IMAGE)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
                torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, input_names=["x"], verbose=False)
            else:
                axes = {"x": {0: "batch"}} if dynamic else None
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], dynamic_axes=axes)
    finally:
        logging.disable(logging.NOTSET)
    return str(path)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Export on first use and reuse the file for the rest of the session."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple, str] = {}

    def get(name: str, exporter: str, dynamic: bool) -> str:
        key = (name, exporter, dynamic)
        if key not in cache:
            cache[key] = export(name, exporter, dynamic, root / f"{name}-{exporter}-{'dyn' if dynamic else 'fixed'}.onnx")
        return cache[key]

    return get


def _variants():
    for name in ARCHS:
        for exporter in ("legacy", "dynamo"):
            for dynamic in (True, False):
                slow = exporter == "dynamo" and (name not in REQUIRED or (not dynamic and name not in ("resnet18", "vit")))
                marks = [pytest.mark.slow] if slow else []
                yield pytest.param(name, exporter, dynamic, id=f"{name}-{exporter}-{'dynamic' if dynamic else 'fixed'}", marks=marks)


def assert_conforms(result: CheckResult):
    report = json.dumps(result.to_dict(), indent=1)
    assert not result.unsupported, report
    assert result.error is None, report
    assert result.outputs and all(o.ok for o in result.outputs), report
    assert result.grad_finite and result.grad_nonzero, report
    assert result.ok


@pytest.mark.parametrize("name, exporter, dynamic", list(_variants()))
def test_torchvision_architecture(exported, name, exporter, dynamic):
    path = exported(name, exporter, dynamic)
    model = onnx.load(path)
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset == 17 if exporter == "legacy" else opset >= 18
    result = check_model(path, batch=3, seed=1)
    assert result.batch == (3 if dynamic else 1)
    assert [o.name for o in result.outputs] == [o.name for o in model.graph.output]
    assert result.outputs[0].max_abs < result.outputs[0].tolerance
    assert_conforms(result)


@pytest.mark.slow
def test_float16_resnet18_conforms(exported, tmp_path):
    """A float16 conversion of an export runs in float32 and stays within half-precision tolerance."""
    model = onnx.load(exported("resnet18", "legacy", True))
    half = _to_float16(model)
    path = tmp_path / "resnet18-fp16.onnx"
    onnx.save(half, path)
    result = check_model(str(path), batch=2)
    assert result.computes_in_float32
    assert_conforms(result)


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Cast initializers and graph inputs/outputs to float16 (all ops here accept float16)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    return out


# --------------------------------------------------------------------------------------------
# check_model on tiny graphs: the verdicts, not just the happy path
# --------------------------------------------------------------------------------------------


def _tiny(nodes, inputs, outputs, inits=(), opset=17):
    opsets = [helper.make_opsetid("", opset)]
    m = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, list(inits)), opset_imports=opsets)
    m.ir_version = helper.find_min_ir_version_for(opsets)
    return m


def _classifier(batch_dim="N"):
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    return _tiny(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [batch_dim, 3])],
        [numpy_helper.from_array(w, "w")],
    )


def test_check_model_passes_softmax_classifier_and_is_json():
    result = check_model(_classifier(), batch=5)
    assert result.ok and result.batch == 5
    assert result.grad_nonzero  # a plain sum of softmax outputs would have zero gradient
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["ok"] is True and d["outputs"][0]["name"] == "prob" and d["unsupported"] == []
    assert d["outputs"][0]["max_abs"] <= d["outputs"][0]["tolerance"] == pytest.approx(1e-4)


def test_check_model_fixed_batch_of_one():
    assert check_model(_classifier(batch_dim=1), batch=7).batch == 1


def test_check_model_reports_unsupported_ops():
    nodes = [helper.make_node("Det", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    m = _tiny(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 3])], [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N"])])
    result = check_model(m)
    assert result.unsupported == [("Det", 17)] and not result.ok
    assert result.to_dict()["unsupported"] == [["Det", 17]]


def test_check_model_rejects_other_dynamic_dims():
    m = _tiny(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "H"])],
    )
    with pytest.raises(CloakError, match="fixed input shape"):
        check_model(m)
    assert check_model(m, input_shapes={"x": [2, 5]}).ok


def test_check_model_flags_zero_gradients():
    """A graph whose output does not depend smoothly on its input fails the gradient check."""
    m = _tiny(
        [helper.make_node("Floor", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    result = check_model(m, bounds=(0.0, 10.0))
    assert all(o.ok for o in result.outputs) and result.grad_finite
    assert not result.grad_nonzero and not result.ok


def test_check_model_detects_a_wrong_output(monkeypatch):
    """If the executor computed something else, the diff exceeds the tolerance."""
    import cloakonnx.torch_exec as te

    real = te._OPS["Softmax"][-1].fn
    monkeypatch.setattr(te._OPS["Softmax"][-1], "fn", lambda ins, attrs, ctx: (real(ins, attrs, ctx)[0] * 1.01,))
    result = check_model(_classifier())
    assert not result.outputs[0].ok and result.outputs[0].max_abs > result.outputs[0].tolerance
    assert not result.ok
