"""Folding a per-channel mask into the layers after any feature tensor: the same outputs as the Mul form
(onnxruntime, on random inputs), no node added, and None wherever the fold would not be exact."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cloakonnx.graph.fold_next import fold_into_consumers
from cloakonnx.graph.surgery import apply_mask

SHAPE = (2, 3, 8, 8)


def _export(net: nn.Module, example: torch.Tensor, outputs=("logits",), spatial_dynamic=False) -> onnx.ModelProto:
    """torch.onnx export as the project does it (legacy exporter, opset 17, eval mode, dynamic batch)."""
    net.eval()
    axes = {"input": {0: "batch"} | ({2: "h", 3: "w"} if spatial_dynamic else {})}
    axes |= {name: {0: "batch"} for name in outputs}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), buf, input_names=["input"], output_names=list(outputs),
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return model


def _net(*layers: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*layers)


def _outputs_of(model: onnx.ModelProto, op: str) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type == op]


def _mask(width: int, seed: int = 0) -> np.ndarray:
    """Random values in [0, 1] with some exact zeros and ones."""
    rng = np.random.default_rng(seed)
    mask = rng.uniform(0, 1, width).astype(np.float32)
    mask[rng.choice(width, max(1, width // 3), replace=False)] = 0
    mask[rng.choice(width, 1)] = 1
    return mask


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _check_folds(model: onnx.ModelProto, tensor: str, rank: int, shape=SHAPE,
                 seed=0) -> tuple[onnx.ModelProto, list[str]]:
    """Fold a random mask on ``tensor`` and compare against the Mul form on random inputs."""
    before = model.SerializeToString()
    width = _width(model, tensor)
    mask = _mask(width, seed)
    result = fold_into_consumers(model, tensor, mask)
    assert result is not None, f"expected {tensor!r} to fold"
    folded, names = result
    assert model.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(folded)
    assert len(folded.graph.node) == len(model.graph.node)
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]  # no Mul added
    inits = {t.name for t in folded.graph.initializer}
    assert names and set(names) <= inits
    masked = apply_mask(model, tensor, mask, rank)
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    for want, got in zip(_run(masked, x), _run(folded, x)):
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(want - got).max() <= 1e-5 * scale
    plain = _run(model, x)[0]
    assert np.abs(plain - _run(folded, x)[0]).max() > 1e-4, "the mask should change the outputs"
    return folded, names


def _width(model: onnx.ModelProto, tensor: str) -> int:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    vi = next(v for v in list(g.value_info) + list(g.input) + list(g.output) if v.name == tensor)
    return vi.type.tensor_type.shape.dim[1].dim_value


def _refuses(model: onnx.ModelProto, tensor: str, width: int | None = None) -> None:
    before = model.SerializeToString()
    assert fold_into_consumers(model, tensor, _mask(width or _width(model, tensor))) is None
    assert model.SerializeToString() == before


def _image() -> torch.Tensor:
    return torch.randn(*SHAPE)


# --- cases that fold --------------------------------------------------------------------------------------


def test_conv_relu_conv():
    net = _net(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    model = _export(net, _image())
    tensor = _outputs_of(model, "Relu")[0]
    _, names = _check_folds(model, tensor, 4)
    assert len(names) == 1
    conv_w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv" and n.input[0] == tensor)
    assert names == [conv_w]


def test_maxpool_then_conv():
    net = _net(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
               nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    model = _export(net, _image())
    tensor = _outputs_of(model, "Conv")[0]  # raw conv output: negative values go through the MaxPool
    assert any(n.op_type == "MaxPool" and n.input[0] == tensor for n in model.graph.node)
    _check_folds(model, tensor, 4)


@pytest.mark.parametrize("groups", [8, 2], ids=["depthwise", "grouped"])
def test_grouped_conv_consumer(groups):
    net = _net(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8 if groups == 8 else 6, 3, padding=1,
                                                                    groups=groups),
               nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 if groups == 8 else 6, 5), seed=groups)
    model = _export(net, _image())
    _check_folds(model, _outputs_of(model, "Relu")[0], 4, seed=groups)


def test_global_pool_flatten_gemm():
    net = _net(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model = _export(net, _image())
    ops = [n.op_type for n in model.graph.node]
    assert "GlobalAveragePool" in ops and "Flatten" in ops and "Gemm" in ops
    _check_folds(model, _outputs_of(model, "Relu")[0], 4)


def test_flatten_of_spatial_tensor_maps_channel_blocks():
    net = _net(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    model = _export(net, _image())
    _check_folds(model, _outputs_of(model, "Relu")[0], 4)


def test_flatten_with_unknown_spatial_size_refuses():
    net = _net(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5))
    model = _export(net, _image(), spatial_dynamic=True)
    _refuses(model, _outputs_of(model, "Relu")[0], 6)


class _MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_reduce_mean_over_spatial_axes():
    torch.manual_seed(0)
    model = _export(_MeanHead(), _image())
    assert any(n.op_type == "ReduceMean" for n in model.graph.node)
    _check_folds(model, _outputs_of(model, "Relu")[0], 4)


def test_two_dim_head_gemm():
    net = _net(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    model = _export(net, torch.randn(2, 12))
    assert [n.op_type for n in model.graph.node].count("Gemm") == 2
    _check_folds(model, _outputs_of(model, "Relu")[0], 2, shape=(3, 12))


class _MatMulHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 10)
        self.weight = nn.Parameter(torch.randn(10, 4))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.matmul(torch.relu(self.fc(x)), self.weight) + self.bias


def test_matmul_head_with_constant_weight():
    torch.manual_seed(0)
    model = _export(_MatMulHead(), torch.randn(2, 12))
    assert any(n.op_type == "MatMul" for n in model.graph.node)
    _check_folds(model, _outputs_of(model, "Relu")[0], 2, shape=(3, 12))


class _TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        t = torch.relu(self.stem(x))
        return self.fc((self.a(t) + self.b(t)).mean(dim=(2, 3)))


def test_tensor_with_two_conv_consumers():
    torch.manual_seed(0)
    model = _export(_TwoConsumers(), _image())
    tensor = _outputs_of(model, "Relu")[0]
    assert sum(n.op_type == "Conv" and n.input[0] == tensor for n in model.graph.node) == 2
    _, names = _check_folds(model, tensor, 4)
    assert len(names) == 2


def _shared_weight_model() -> onnx.ModelProto:
    """x -> Conv(W) -> Relu -> t -> Conv(W) -> y, and x -> Conv(W) -> z: only the first use of W that
    reads ``t`` is downstream of it."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["t"], name="relu"),
             helper.make_node("Conv", ["t", "W", "B"], ["y"], name="next", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W"], ["z"], name="other", pads=[1, 1, 1, 1])]
    io_ = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, 6, 6]) for n in ("x", "y", "z")]
    graph = helper.make_graph(nodes, "shared", [io_[0]], io_[1:], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def test_shared_weight_gets_its_own_copy():
    model = _shared_weight_model()
    folded, names = _check_folds(model, "t", 4, shape=(2, 4, 6, 6))
    assert len(names) == 1 and names[0] != "W"
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["W"], original["W"])
    np.testing.assert_array_equal(inits["B"], original["B"])  # the bias is never scaled
    by_name = {n.name: n for n in folded.graph.node}
    assert by_name["next"].input[1] == names[0]
    assert by_name["stem"].input[1] == "W" and by_name["other"].input[1] == "W"
    x = np.random.default_rng(9).standard_normal((2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, x)[1], _run(folded, x)[1])


@pytest.mark.parametrize("stem_shares", [True, False])
def test_weight_shared_by_two_folded_convs(stem_shares):
    """Two readers of W are downstream of t. If the stem (not downstream) reads W too, both get their own
    scaled copy; else one copy and W itself scaled, which only the last folded conv then reads."""
    model = _shared_weight_model()
    by_name = {n.name: n for n in model.graph.node}
    by_name["other"].input[0] = "t"
    if not stem_shares:
        w0 = numpy_helper.to_array(model.graph.initializer[0]) * 0.5
        model.graph.initializer.append(numpy_helper.from_array(w0, "W0"))
        by_name["stem"].input[1] = "W0"
    onnx.checker.check_model(model)
    folded, names = _check_folds(model, "t", 4, shape=(2, 4, 6, 6))
    assert len(names) == 2 and len(set(names)) == 2
    readers = {n.name: n.input[1] for n in folded.graph.node if n.op_type == "Conv"}
    assert {readers["next"], readers["other"]} == set(names) and readers["stem"] not in names
    assert ("W" in names) is not stem_shares


def test_float16_weights_keep_their_dtype():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 3)).astype(np.float16)
    nodes = [helper.make_node("Relu", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 6])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mask = np.array([0.0, 0.5, 1.0], np.float32)
    folded, names = fold_into_consumers(model, "f", mask)
    onnx.checker.check_model(folded)
    weight = numpy_helper.to_array(folded.graph.initializer[0])
    assert names == ["W"] and weight.dtype == np.float16
    np.testing.assert_array_equal(weight, (w.astype(np.float64) * mask[None, :]).astype(np.float16))


# --- cases that refuse ------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        t = self.stem(x)
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(t)))))
        return self.head(torch.relu(out + t))


def test_residual_refuses():
    torch.manual_seed(0)
    model = _export(_BasicBlock(), _image())
    tensor = _outputs_of(model, "Relu")[0]
    assert any(n.op_type == "Add" and tensor in n.input for n in model.graph.node)
    _refuses(model, tensor)


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1))


def test_concat_consumer_refuses():
    torch.manual_seed(0)
    model = _export(_Concat(), _image())
    _refuses(model, _outputs_of(model, "Relu")[0])


class _WithFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x):
        t = self.body(x)
        return self.head(t), t


def test_graph_output_refuses():
    torch.manual_seed(0)
    model = _export(_WithFeatures(), _image(), outputs=("logits", "features"))
    assert "features" in _outputs_of(model, "Relu")
    _refuses(model, "features")


def test_downstream_graph_output_refuses():
    net = _net(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model = _export(net, _image())
    pooled = _outputs_of(model, "GlobalAveragePool")[0]
    model.graph.output.append(helper.make_tensor_value_info(pooled, TensorProto.FLOAT, None))
    _refuses(model, _outputs_of(model, "Relu")[0])


def test_sigmoid_consumer_refuses():
    net = _net(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Sigmoid(), nn.Conv2d(8, 4, 1),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    model = _export(net, _image())
    _refuses(model, _outputs_of(model, "Relu")[0])


def test_mixed_branches_refuse():
    """One branch ends in a Conv, the other in a Sigmoid: the fold would miss the Sigmoid."""
    model = _shared_weight_model()
    model.graph.node.append(helper.make_node("Sigmoid", ["t"], ["s"], name="gate"))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 4, 6, 6]))
    onnx.checker.check_model(model)
    _refuses(model, "t", 4)


def test_weight_not_an_initializer_refuses():
    """A weight computed by a node (here an Identity of the initializer) cannot be rescaled in place."""
    model = _shared_weight_model()
    model.graph.node.insert(0, helper.make_node("Identity", ["W"], ["W_live"], name="w_live"))
    next(n for n in model.graph.node if n.name == "next").input[1] = "W_live"
    onnx.checker.check_model(model)
    _refuses(model, "t", 4)
