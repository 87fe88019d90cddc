"""If in the torch executor: decided at plan time and inlined, or picked per call (issue 23).

torch's legacy exporter writes ``nn.LocalResponseNorm`` at opset 13 with an If whose condition
depends only on shapes; the planner decides it once and inlines the taken branch. An If whose
condition depends on data runs both branches' sub-plans, one per call, and gradients flow through
whichever ran. Loop and Scan are refused by name (the Runner then falls back to Square).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.check import check_model
from cloakonnx.torch_exec import OnnxTorchModule, UnsupportedOpsError, unsupported_ops
from cloakonnx.torch_exec.plan import SubPlan, iter_steps

RNG = np.random.default_rng(0)


def r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset=13):
    opsets = [helper.make_opsetid("", opset)]
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = helper.find_min_ir_version_for(opsets)
    return m


def _graph(nodes, outputs, inits=()):
    return helper.make_graph(nodes, "branch", [], outputs, list(inits))


def ort_run(model, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def plan_ops(module: OnnxTorchModule) -> list[str]:
    return [step.ctx.op_type for step in module._plan]


def _if_graph_has(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "If" for n in model.graph.node)


# --------------------------------------------------------------------------------------------
# The legacy export of nn.LocalResponseNorm
# --------------------------------------------------------------------------------------------


class _LrnCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.lrn = torch.nn.LocalResponseNorm(3, alpha=1e-2, beta=0.75, k=1.0)
        self.conv2 = torch.nn.Conv2d(8, 6, 3, stride=2)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.lrn(torch.relu(self.conv(x)))
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


def _export_lrn_cnn() -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    net = _LrnCnn().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 12, 12),), buf, dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return net, onnx.load_from_string(buf.getvalue())


def test_legacy_lrn_export_passes_check_with_torch_gradients():
    net, model = _export_lrn_cnn()
    # the legacy exporter still writes LocalResponseNorm with a shape-only If (else: build it by hand)
    assert _if_graph_has(model), [n.op_type for n in model.graph.node]
    assert unsupported_ops(model) == []

    result = check_model(model)
    assert result.ok, result.to_dict()

    module = OnnxTorchModule(model)
    assert "If" not in plan_ops(module)  # the condition is certain from shapes: inlined

    x = torch.from_numpy(RNG.uniform(0, 1, (3, 3, 12, 12)).astype(np.float32))
    ref = ort_run(model, {"x": x.numpy()})[0]
    weights = torch.from_numpy(r(3, 5))

    xe = x.clone().requires_grad_()
    got = module(xe)
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-4, atol=1e-5)
    (grad_exec,) = torch.autograd.grad((got * weights).sum(), xe)

    xt = x.clone().requires_grad_()
    want = net(xt)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-5)
    (grad_torch,) = torch.autograd.grad((want * weights).sum(), xt)
    assert grad_torch.abs().max() > 0
    torch.testing.assert_close(grad_exec, grad_torch, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# A data-dependent If: branch chosen per call
# --------------------------------------------------------------------------------------------


W_OUTER = r(4)
W_ELSE = r(4)


def _data_if_model() -> onnx.ModelProto:
    """y = 2 * (x*x + w_outer) when sum(x) > 0, else 2 * (sin(x) * w_else + x).

    Both branches name an internal tensor ``t``, as the outer graph does (then branch reads the
    outer initializer ``w``, the else branch its own initializer and the outer input ``x``)."""
    then_g = _graph([helper.make_node("Mul", ["x", "x"], ["t"]),
                     helper.make_node("Add", ["t", "w"], ["then_out"])], [_vi("then_out", None)])
    else_g = _graph([helper.make_node("Sin", ["x"], ["t"]),
                     helper.make_node("Mul", ["t", "w_else"], ["u"]),
                     helper.make_node("Add", ["u", "x"], ["else_out"])], [_vi("else_out", None)],
                    [numpy_helper.from_array(W_ELSE, "w_else")])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=then_g, else_branch=else_g, name="pick"),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2, np.float32))),
        helper.make_node("Mul", ["b", "two"], ["t"]),
        helper.make_node("Identity", ["t"], ["y"]),
    ]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], [numpy_helper.from_array(W_OUTER, "w")])


def _data_if_reference(x: torch.Tensor) -> torch.Tensor:
    if bool(x.sum() > 0):
        return 2 * (x * x + torch.from_numpy(W_OUTER))
    return 2 * (torch.sin(x) * torch.from_numpy(W_ELSE) + x)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["then", "else"])
def test_data_dependent_if_matches_onnxruntime_and_hand_gradients(sign):
    model = _data_if_model()
    onnx.checker.check_model(model)
    module = OnnxTorchModule(model)
    assert plan_ops(module).count("If") == 1  # decided per call
    x_np = (np.abs(r(3, 4)) * sign).astype(np.float32)
    ref = ort_run(model, {"x": x_np})[0]
    x = torch.from_numpy(x_np).requires_grad_()
    got = module(x)
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, atol=1e-6)

    xr = torch.from_numpy(x_np).requires_grad_()
    want = _data_if_reference(xr)
    torch.testing.assert_close(got, want)
    weights = torch.from_numpy(r(3, 4))
    (g_exec,) = torch.autograd.grad((got * weights).sum(), x)
    (g_ref,) = torch.autograd.grad((want * weights).sum(), xr)
    torch.testing.assert_close(g_exec, g_ref)
    # the two branches really differ: the other branch's gradient is not this one
    other = 2 * (torch.sin(xr) * torch.from_numpy(W_ELSE) + xr) if sign > 0 else 2 * (xr * xr + torch.from_numpy(W_OUTER))
    (g_other,) = torch.autograd.grad((other * weights).sum(), xr)
    assert not torch.allclose(g_exec, g_other)


def test_data_dependent_if_follows_each_call_and_moves_its_constants():
    """One module, both branches in turn; .double() converts the branches' constants too."""
    model = _data_if_model()
    module = OnnxTorchModule(model)
    for sign in (1.0, -1.0, 1.0):
        x = (np.abs(r(2, 4)) * sign).astype(np.float32)
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), ort_run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    module.double()
    x = -np.abs(r(2, 4)).astype(np.float64)
    got = module(torch.from_numpy(x))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _data_if_reference(torch.from_numpy(x).float()).double(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Plan-time decisions
# --------------------------------------------------------------------------------------------


def _shape_if_model(dim: int, value: int) -> onnx.ModelProto:
    """Conv(x) then If(Shape(conv)[dim] == value): Relu in the then branch, Neg(conv) + branch
    constant in the else branch. The conv fixes dim 1 (its weight has 5 output channels);
    the input's dims are all dynamic."""
    then_g = _graph([helper.make_node("Relu", ["c"], ["r"])], [_vi("r", None)])
    else_g = _graph([helper.make_node("Neg", ["c"], ["n"]),
                     helper.make_node("Add", ["n", "k"], ["e"])], [_vi("e", None)],
                    [numpy_helper.from_array(np.array(0.5, np.float32), "k")])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Constant", [], ["i"], value=numpy_helper.from_array(np.array(dim, np.int64))),
        helper.make_node("Gather", ["shape", "i"], ["d"], axis=0),
        helper.make_node("Constant", [], ["v"], value=numpy_helper.from_array(np.array(value, np.int64))),
        helper.make_node("Equal", ["d", "v"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    w = numpy_helper.from_array(r(5, 3, 3, 3), "w")
    return _model(nodes, [_vi("x", ["N", 3, "H", "W"])], [_vi("y", None)], [w])


@pytest.mark.parametrize("value, branch_op", [(5, "Relu"), (4, "Neg")])
def test_if_certain_from_shapes_is_inlined(value, branch_op):
    model = _shape_if_model(1, value)
    module = OnnxTorchModule(model)
    ops = plan_ops(module)
    assert "If" not in ops and branch_op in ops and ({"Relu", "Neg"} - {branch_op}).isdisjoint(ops)
    assert "Shape" not in ops and "Equal" not in ops  # the condition's nodes are pruned with it
    x = r(2, 3, 6, 7)
    np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), ort_run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_if_on_a_dynamic_dim_is_decided_per_call():
    """dim 0 is the input's batch: not certain at plan time, so both branches stay, and each
    batch size takes its own."""
    model = _shape_if_model(0, 1)
    module = OnnxTorchModule(model)
    assert plan_ops(module).count("If") == 1
    for batch in (1, 2):
        x = r(batch, 3, 5, 5)
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), ort_run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_constant_if_with_initializer_output_and_nested_if_is_inlined():
    """A constant condition; the taken branch returns a value made by a nested data-dependent If
    (which stays a run-time If, inside the inlined nodes), a branch initializer and a tensor."""
    inner_then = _graph([helper.make_node("Mul", ["h", "x"], ["m"])], [_vi("m", [3])])
    inner_else = _graph([helper.make_node("Sub", ["h", "x"], ["m"])], [_vi("m", [3])])
    then_g = _graph([
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
        helper.make_node("If", ["c"], ["nested"], then_branch=inner_then, else_branch=inner_else),
    ], [_vi("nested", [3]), _vi("kb", [3]), _vi("h", [3])],
        [numpy_helper.from_array(np.full(3, 7.0, np.float32), "kb")])
    else_g = _graph([helper.make_node("Neg", ["x"], [n]) for n in "abd"], [_vi(n, [3]) for n in "abd"])
    nodes = [
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["cond"], ["y0", "y1", "y2"], then_branch=then_g, else_branch=else_g),
    ]
    model = _model(nodes, [_vi("x", [3])], [_vi(f"y{k}", [3]) for k in range(3)])
    module = OnnxTorchModule(model)
    ops = plan_ops(module)
    assert "Relu" in ops and "Neg" not in ops and ops.count("If") == 1  # the outer If inlined, the nested one kept
    nested = next(s for s in module._plan if s.ctx.op_type == "If")
    assert all(isinstance(b, SubPlan) for b in nested.attrs.values())
    x1 = np.array([1.0, -2.0, 3.0], np.float32)
    for x in (x1, -x1, np.zeros(3, np.float32)):
        got = module(torch.from_numpy(x))
        for g, e in zip(got, ort_run(model, {"x": x}), strict=True):
            np.testing.assert_allclose(g.numpy(), e, rtol=1e-6)


def test_branch_returning_an_outer_tensor_directly_or_one_tensor_twice():
    """onnxruntime refuses the first (it wants an Identity) and cannot constant-fold the second;
    the executor runs both, with an Identity where a branch output is not the branch's own."""
    then_g = _graph([], [_vi("x", [3])])
    else_g = _graph([helper.make_node("Neg", ["x"], ["n"])], [_vi("n", [3])])
    for cond, want in ((True, lambda x: x), (False, lambda x: -x)):
        nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(cond))),
                 helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
        module = OnnxTorchModule(_model(nodes, [_vi("x", [3])], [_vi("y", [3])]))
        assert "If" not in plan_ops(module)
        x = torch.tensor([1.0, -2.0, 3.0])
        assert torch.equal(module(x), want(x))
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    module = OnnxTorchModule(_model(nodes, [_vi("x", [3])], [_vi("y", [3])]))
    assert plan_ops(module).count("If") == 1
    x = torch.tensor([1.0, -2.0, 3.0])
    zero_sum = torch.tensor([1.0, -3.0, 2.0])  # sums to 0: else
    assert torch.equal(module(x), x) and torch.equal(module(zero_sum), -zero_sum)

    twice = _graph([helper.make_node("Relu", ["x"], ["h"])], [_vi("h", [3]), _vi("h", [3])])
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["c"], ["y", "z"], then_branch=twice, else_branch=twice)]
    module = OnnxTorchModule(_model(nodes, [_vi("x", [3])], [_vi("y", [3]), _vi("z", [3])]))
    y, z = module(x)
    assert torch.equal(y, x.relu()) and torch.equal(z, x.relu())


def test_runtime_if_branch_errors_name_the_branch_node():
    then_g = _graph([helper.make_node("Reshape", ["x", "bad"], ["o"])], [_vi("o", None)],
                    [numpy_helper.from_array(np.array([7], np.int64), "bad")])
    else_g = _graph([helper.make_node("Neg", ["x"], ["o"])], [_vi("o", None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branchy")]
    module = OnnxTorchModule(_model(nodes, [_vi("x", [3])], [_vi("y", None)]))
    assert torch.equal(module(torch.zeros(3)), torch.zeros(3))
    from cloakonnx.errors import CloakError

    with pytest.raises(CloakError, match=r"Reshape node 'branchy/then/Reshape'"):
        module(torch.ones(3))


def test_graphs_without_if_plan_as_before():
    """No If, no Flow: the plan of an ordinary graph has no sub-plans and the usual steps."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
    module = OnnxTorchModule(_model(nodes, [_vi("x", ["N", 3])], [_vi("y", None)]))
    assert plan_ops(module) == ["Shape", "Reshape"]
    assert not any(isinstance(v, SubPlan) for s in iter_steps(module._plan) for v in s.attrs.values())


# --------------------------------------------------------------------------------------------
# Loop and Scan are refused by name
# --------------------------------------------------------------------------------------------


def _loop_model() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "x"], ["acc_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("acc_in", None)],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", None)])
    nodes = [helper.make_node("Constant", [], ["n"], value=numpy_helper.from_array(np.array(3, np.int64))),
             helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body)]
    return _model(nodes, [_vi("x", [2])], [_vi("y", None)])


def test_loop_is_refused_with_the_op_named():
    model = _loop_model()
    assert unsupported_ops(model) == [("Loop", 13)]
    with pytest.raises(UnsupportedOpsError) as err:
        OnnxTorchModule(model)
    assert err.value.ops == [("Loop", 13)]
    assert ("ai.onnx::Loop (opset 13): control flow other than If is not supported; "
            "gradient-free attacks (Square) still work") in str(err.value)
    result = check_model(model)
    assert result.unsupported == [("Loop", 13)] and not result.ok


def test_unsupported_op_inside_an_if_branch_is_listed():
    then_g = _graph([helper.make_node("Det", ["x"], ["o"])], [_vi("o", None)])
    else_g = _graph([helper.make_node("Neg", ["x"], ["o"])], [_vi("o", None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = _model(nodes, [_vi("x", [3, 3])], [_vi("y", None)])
    assert unsupported_ops(model) == [("Det", 13)]
    with pytest.raises(UnsupportedOpsError):
        OnnxTorchModule(model)
