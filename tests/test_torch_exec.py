"""Per-op conformance of the torch executor against onnxruntime (CPU), plus autograd checks.

Each case is a one-node ONNX graph built with onnx.helper. Arrays become graph inputs,
``K(array)`` becomes an initializer, ``None`` an omitted optional input. Cases cover both the
attribute form and the input form of ops whose spec moved attributes to inputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.errors import CloakError
from cloakonnx.torch_exec import OnnxTorchModule, UnsupportedOpsError, unsupported_ops

RNG = np.random.default_rng(0)
I64_MAX = np.iinfo(np.int64).max
I64_MIN = np.iinfo(np.int64).min


def r(*shape, low=None, high=None):
    """Random float32 data; uniform in [low, high) when given, else standard normal."""
    if low is not None:
        return RNG.uniform(low, high, shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def ri(*shape, low=-5, high=5):
    return RNG.integers(low, high, shape).astype(np.int64)


def i64(*values):
    return np.array(values, dtype=np.int64)


def f32(*values):
    return np.array(values, dtype=np.float32)


@dataclasses.dataclass
class K:
    """A constant node input (initializer)."""

    value: np.ndarray


@dataclasses.dataclass
class Case:
    op: str
    inputs: list
    opset: int = 17
    attrs: dict = dataclasses.field(default_factory=dict)
    n_out: int = 1
    grad: bool = True
    atol: float = 1e-5
    id: str = ""

    def __str__(self):
        return self.id


def C(op, inputs, opset=17, n_out=1, grad=True, id="", atol=1e-5, **attrs):
    return Case(op, inputs, opset, attrs, n_out, grad, atol, id)


def _ir_version(opsets) -> int:
    try:
        return helper.find_min_ir_version_for(opsets)
    except ValueError:  # onnx's table starts at opset 3
        return 3


def build(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model for ``case`` and the feeds for its graph inputs."""
    graph_inputs, inits, names, feeds = [], [], [], {}
    for i, item in enumerate(case.inputs):
        if item is None:
            names.append("")
        elif isinstance(item, K):
            name = f"k{i}"
            inits.append(numpy_helper.from_array(np.asarray(item.value), name))
            names.append(name)
        else:
            name = f"in{i}"
            arr = np.asarray(item)
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
            feeds[name] = arr
            names.append(name)
    outs = [f"out{i}" for i in range(case.n_out)]
    node = helper.make_node(case.op, names, outs, **case.attrs)
    graph = helper.make_graph([node], case.op, graph_inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs], inits)
    opsets = [helper.make_opsetid("", case.opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = _ir_version(opsets)
    model = onnx.shape_inference.infer_shapes(model)
    for o in model.graph.output:  # outputs inference could not type: assume float
        if not o.type.HasField("tensor_type"):
            o.type.tensor_type.elem_type = TensorProto.FLOAT
    return model, feeds


def ort_run(model, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def torch_run(module, feeds, names):
    outs = module(*[torch.from_numpy(feeds[n].copy()) for n in names])
    return list(outs) if isinstance(outs, tuple) else [outs]


def assert_matches(got: torch.Tensor, ref: np.ndarray, atol: float, name: str = ""):
    got_np = got.detach().cpu().numpy()
    assert got_np.shape == ref.shape, f"{name}: shape {got_np.shape} != {ref.shape}"
    if ref.dtype == np.bool_:
        assert got.dtype == torch.bool, f"{name}: dtype {got.dtype}, expected bool"
        np.testing.assert_array_equal(got_np, ref)
    elif np.issubdtype(ref.dtype, np.integer):
        assert not got.is_floating_point() and got.dtype != torch.bool, f"{name}: dtype {got.dtype}, expected integer"
        np.testing.assert_array_equal(got_np.astype(np.int64), ref.astype(np.int64))
    else:
        assert got.is_floating_point(), f"{name}: dtype {got.dtype}, expected floating point"
        scale = max(1.0, float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0)))
        np.testing.assert_allclose(got_np, ref.astype(np.float32), rtol=1e-4, atol=atol * scale, err_msg=name)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

X4 = r(2, 4, 7, 7)
W4 = r(6, 4, 3, 3)
CASES: list[Case] = []


def add(*cases):
    CASES.extend(cases)


# Convolution
add(
    C("Conv", [X4, K(W4), K(r(6))], 11, id="conv_bias"),
    C("Conv", [X4, K(W4)], 1, id="conv_v1_nobias"),
    C("Conv", [X4, K(W4), K(r(6))], 22, strides=[2, 2], pads=[1, 1, 1, 1], id="conv_v22_stride_pad"),
    C("Conv", [X4, K(W4), K(r(6))], 11, dilations=[2, 2], pads=[2, 1, 2, 1], id="conv_dilation"),
    C("Conv", [X4, K(r(6, 2, 3, 3)), K(r(6))], 11, group=2, id="conv_group"),
    C("Conv", [X4, K(r(4, 1, 3, 3))], 11, group=4, strides=[2, 1], id="conv_depthwise"),
    C("Conv", [X4, K(W4)], 11, auto_pad="SAME_UPPER", strides=[2, 2], id="conv_same_upper"),
    C("Conv", [X4, K(r(6, 4, 4, 4))], 11, auto_pad="SAME_LOWER", strides=[2, 2], id="conv_same_lower"),
    C("Conv", [X4, K(W4)], 11, auto_pad="VALID", strides=[2, 2], id="conv_valid"),
    C("Conv", [X4, K(W4)], 11, pads=[0, 1, 2, 0], id="conv_asymmetric_pads"),
    C("Conv", [X4, K(W4)], 11, pads=[2, 2, 2, 2], id="conv_pad_gt_half_kernel"),
    C("Conv", [r(2, 3, 9), K(r(5, 3, 3)), K(r(5))], 11, pads=[1, 0], id="conv1d"),
    C("Conv", [r(1, 2, 4, 5, 5), K(r(3, 2, 2, 3, 3))], 11, pads=[0, 1, 1, 1, 1, 1], id="conv3d"),
    C("Conv", [X4, W4], 11, id="conv_weight_as_input"),
)
add(
    C("ConvTranspose", [r(2, 4, 5, 5), K(r(4, 3, 3, 3)), K(r(3))], 11, id="convT_basic"),
    C("ConvTranspose", [r(2, 4, 5, 5), K(r(4, 3, 3, 3))], 11, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1], id="convT_stride_outpad"),
    C("ConvTranspose", [r(2, 4, 5, 5), K(r(4, 3, 3, 3)), K(r(3))], 11, strides=[2, 2], pads=[0, 1, 2, 0], id="convT_asym"),
    C("ConvTranspose", [r(2, 4, 5, 5), K(r(4, 1, 3, 3)), K(r(2))], 11, group=2, dilations=[2, 2], id="convT_group_dil"),
    C("ConvTranspose", [r(2, 4, 5, 5), K(r(4, 3, 3, 3)), K(r(3))], 11, strides=[2, 2], output_shape=[10, 11], id="convT_output_shape"),
    C("ConvTranspose", [r(2, 4, 5, 5), K(r(4, 3, 3, 3))], 11, strides=[2, 2], auto_pad="SAME_UPPER", id="convT_same_upper"),
    C("ConvTranspose", [r(2, 4, 5, 5), K(r(4, 3, 3, 3)), K(r(3))], 22, strides=[3, 3], output_padding=[2, 1], id="convT_v22_outpad_bias"),
    C("ConvTranspose", [r(2, 3, 6), K(r(3, 2, 4)), K(r(2))], 11, strides=[2], pads=[1, 1], id="convT_1d"),
)

# Normalisation
BN_ARGS = lambda c: [K(r(c)), K(r(c)), K(r(c)), K(r(c, low=0.5, high=2.0))]  # noqa: E731
add(
    C("BatchNormalization", [X4, *BN_ARGS(4)], 9, epsilon=1e-3, id="bn_v9"),
    C("BatchNormalization", [X4, *BN_ARGS(4)], 14, training_mode=0, id="bn_v14_training_mode0"),
    C("BatchNormalization", [X4, *BN_ARGS(4)], 15, id="bn_v15"),
    C("BatchNormalization", [r(5, 4), *BN_ARGS(4)], 15, id="bn_2d_input"),
    C("BatchNormalization", [X4, *BN_ARGS(4)], 7, id="bn_v7"),
    C("LayerNormalization", [r(2, 5, 8), K(r(8)), K(r(8))], 17, id="ln_last"),
    C("LayerNormalization", [r(2, 5, 8), K(r(5, 8))], 17, axis=1, epsilon=1e-3, id="ln_axis1_nobias"),
    C("LayerNormalization", [r(2, 5, 8), K(r(8)), K(r(8))], 17, n_out=3, id="ln_mean_invstd"),
    C("LayerNormalization", [r(2, 5, 8), K(r(1)), K(r(8))], 17, id="ln_broadcast_scale"),
    C("InstanceNormalization", [X4, K(r(4)), K(r(4))], 6, epsilon=1e-3, id="instancenorm"),
    C("GroupNormalization", [r(2, 6, 4, 4), K(r(6)), K(r(6))], 21, num_groups=3, id="groupnorm_v21"),
    C("LpNormalization", [r(3, 5)], 13, axis=1, p=2, id="lpnorm"),
)

# Matrix products
add(
    C("Gemm", [r(3, 5), K(r(4, 5)), K(r(4))], 13, transB=1, id="gemm_linear"),
    C("Gemm", [r(5, 3), K(r(5, 4)), K(r(3, 4))], 13, transA=1, alpha=0.5, beta=2.0, id="gemm_transA_alpha_beta"),
    C("Gemm", [r(3, 5), K(r(5, 4))], 11, id="gemm_no_c"),
    C("Gemm", [r(3, 5), K(r(4, 5)), K(f32(0.5))], 9, transB=1, id="gemm_v9_scalar_c"),
    C("Gemm", [r(3, 5), r(4, 5), r(1, 4)], 13, transB=1, alpha=2.0, id="gemm_all_inputs"),
    C("MatMul", [r(3, 4), K(r(4, 5))], 13, id="matmul_2d"),
    C("MatMul", [r(2, 1, 3, 4), r(3, 4, 2)], 13, id="matmul_broadcast"),
    C("MatMul", [r(4), r(2, 4, 3)], 9, id="matmul_1d"),
    C("Einsum", [r(2, 3, 4), r(2, 4, 5)], 12, equation="bij,bjk->bik", id="einsum_bmm"),
    C("Einsum", [r(2, 2, 3, 4), r(2, 2, 5, 4)], 12, equation="bhqd, bhkd -> bhqk", id="einsum_attention"),
    C("Einsum", [r(3, 4)], 12, equation="ij->ji", id="einsum_transpose"),
)

# Elementwise arithmetic
for name in ("Add", "Sub", "Mul", "Div"):
    for opset in (7, 13, 14):
        add(C(name, [r(2, 3, 4), r(3, 1) if name != "Div" else r(3, 1, low=0.5, high=2)], opset, id=f"{name}_v{opset}"))
    add(C(name, [ri(2, 3), ri(3, low=1, high=4)], 14, id=f"{name}_int"))
add(
    C("Div", [i64(7, -7, 7, -7, 0), i64(2, 2, -2, -2, 3)], 14, id="div_int_truncates"),
    C("Div", [np.array([7, -7, 9], np.int32), np.array([2, 2, -4], np.int32)], 14, id="div_int32"),
    C("Add", [r(2, 3), K(f32(1.5))], 14, id="add_scalar_constant"),
    C("Pow", [r(2, 3, low=0.5, high=2), r(2, 3)], 15, id="pow"),
    C("Pow", [r(2, 3), K(np.array(2, np.int64))], 15, id="pow_int_exponent"),
    C("Pow", [r(2, 3, low=0.5, high=2), K(f32(0.5))], 7, id="pow_v7"),
    C("Mod", [ri(6), i64(3, -3, 4, -4, 5, 2)], 13, id="mod_int"),
    C("Mod", [r(6), r(6, low=0.5, high=2)], 13, fmod=1, grad=False, id="mod_fmod"),
)
for name, data in {
    "Sqrt": r(2, 5, low=0.1, high=3),
    "Exp": r(2, 5),
    "Log": r(2, 5, low=0.1, high=3),
    "Neg": r(2, 5),
    "Abs": r(2, 5),
    "Reciprocal": r(2, 5, low=0.5, high=3),
    "Relu": r(2, 5),
    "Sigmoid": r(2, 5),
    "Tanh": r(2, 5),
    "Softplus": r(2, 5),
    "Softsign": r(2, 5),
    "Erf": r(2, 5),
    "Sin": r(2, 5),
    "Cos": r(2, 5),
    "HardSwish": r(2, 5) * 4,
    "Mish": r(2, 5),
}.items():
    add(C(name, [data], 18, id=name))
for name in ("Floor", "Ceil", "Sign"):
    add(C(name, [r(2, 5) * 3], 13, grad=False, id=name))
add(
    C("Round", [f32(0.5, 1.5, 2.5, -0.5, -1.5, 1.2, -2.7)], 11, grad=False, id="round_half_even"),
    C("Relu", [r(2, 5)], 6, id="relu_v6"),
    C("Abs", [ri(2, 5)], 13, id="abs_int"),
    C("Neg", [ri(2, 5)], 13, id="neg_int"),
    C("LeakyRelu", [r(2, 5)], 16, alpha=0.2, id="leaky_relu"),
    C("LeakyRelu", [r(2, 5)], 6, id="leaky_relu_default"),
    C("PRelu", [X4, K(r(4, 1, 1))], 16, id="prelu_channel"),
    C("PRelu", [X4, K(f32(0.25))], 9, id="prelu_scalar"),
    C("Elu", [r(2, 5)], 6, alpha=0.7, id="elu"),
    C("Selu", [r(2, 5)], 6, id="selu"),
    C("Selu", [r(2, 5)], 6, alpha=1.5, gamma=1.2, id="selu_attrs"),
    C("Celu", [r(2, 5)], 12, alpha=0.5, id="celu"),
    C("HardSigmoid", [r(2, 5) * 4], 6, id="hard_sigmoid"),
    C("HardSigmoid", [r(2, 5) * 4], 6, alpha=1 / 6, beta=0.5, id="hard_sigmoid_torch"),
    C("ThresholdedRelu", [r(2, 5)], 10, alpha=0.3, id="thresholded_relu"),
    C("Shrink", [r(2, 5)], 9, lambd=0.4, bias=0.1, id="shrink"),
    C("Gelu", [r(2, 5)], 20, id="gelu"),
    C("Gelu", [r(2, 5)], 20, approximate="tanh", id="gelu_tanh"),
    C("Softplus", [r(2, 5) * 30], 1, id="softplus_large"),
)

# Softmax family: opset < 13 flattens to 2-D at axis, >= 13 works along one axis
for name in ("Softmax", "LogSoftmax", "Hardmax"):
    grad = name != "Hardmax"
    add(
        C(name, [r(2, 3, 4)], 11, grad=grad, id=f"{name}_v11_default"),
        C(name, [r(2, 3, 4)], 11, axis=1, grad=grad, id=f"{name}_v11_axis1_flattens"),
        C(name, [r(2, 3, 4)], 13, axis=1, grad=grad, id=f"{name}_v13_axis1"),
        C(name, [r(2, 3, 4)], 13, grad=grad, id=f"{name}_v13_default"),
        C(name, [r(2, 3, 4)], 1, axis=0, grad=grad, id=f"{name}_v1_axis0"),
    )

# Pooling
X5 = r(2, 3, 9, 9)
add(
    C("MaxPool", [X5], 12, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], id="maxpool_resnet"),
    C("MaxPool", [X5], 8, kernel_shape=[2, 2], id="maxpool_v8"),
    C("MaxPool", [X5], 10, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, id="maxpool_ceil"),
    C("MaxPool", [X5], 12, kernel_shape=[3, 3], dilations=[2, 2], id="maxpool_dilation"),
    C("MaxPool", [X5], 12, kernel_shape=[3, 2], pads=[0, 1, 2, 0], id="maxpool_asym_pads"),
    C("MaxPool", [X5], 12, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", id="maxpool_same_upper"),
    C("MaxPool", [X5], 12, kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER", id="maxpool_same_lower"),
    C("MaxPool", [r(2, 3, 10)], 12, kernel_shape=[3], strides=[2], id="maxpool_1d"),
    C("MaxPool", [r(1, 2, 5, 6, 6)], 12, kernel_shape=[2, 2, 2], id="maxpool_3d"),
    C("MaxPool", [X5], 12, kernel_shape=[3, 3], strides=[2, 2], n_out=2, id="maxpool_indices"),
    C("MaxPool", [X5], 12, kernel_shape=[3, 3], pads=[1, 1, 1, 1], n_out=2, storage_order=1, id="maxpool_indices_colmajor"),
    C("MaxPool", [ri(1, 2, 6, 6).astype(np.int8)], 12, kernel_shape=[2, 2], id="maxpool_int8"),
    C("AveragePool", [X5], 11, kernel_shape=[3, 3], strides=[2, 2], id="avgpool"),
    C("AveragePool", [X5], 11, kernel_shape=[3, 3], pads=[1, 1, 1, 1], id="avgpool_pads_exclude"),
    C("AveragePool", [X5], 11, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, id="avgpool_pads_include"),
    C("AveragePool", [X5], 11, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, id="avgpool_ceil"),
    C("AveragePool", [X5], 11, kernel_shape=[3, 3], pads=[0, 1, 2, 0], id="avgpool_asym_exclude"),
    C("AveragePool", [X5], 11, kernel_shape=[3, 3], pads=[0, 1, 2, 0], count_include_pad=1, id="avgpool_asym_include"),
    C("AveragePool", [X5], 19, kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER", id="avgpool_v19_same_upper"),
    C("AveragePool", [X5], 7, kernel_shape=[3, 3], auto_pad="SAME_LOWER", count_include_pad=1, id="avgpool_v7_same_lower"),
    C("AveragePool", [r(2, 3, 10)], 11, kernel_shape=[3], strides=[2], pads=[1, 1], id="avgpool_1d"),
    C("GlobalAveragePool", [X5], 1, id="global_avgpool"),
    C("GlobalAveragePool", [r(2, 3, 7)], 1, id="global_avgpool_1d"),
    C("GlobalMaxPool", [X5], 1, id="global_maxpool"),
)

# Reductions: attribute axes (<13 or <18), input axes (>=13 for ReduceSum, >=18 for others)
REDUCE_DATA = {"ReduceL2": r(2, 3, 4), "ReduceLogSumExp": r(2, 3, 4), "ReduceProd": r(2, 3, 4, low=0.5, high=1.5)}
for name in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp"):
    data = REDUCE_DATA.get(name, r(2, 3, 4))
    input_since = 13 if name == "ReduceSum" else 18
    add(
        C(name, [data], 11, axes=[1], id=f"{name}_attr_axes"),
        C(name, [data], 11, axes=[0, -1], keepdims=0, id=f"{name}_attr_keepdims0"),
        C(name, [data], 11, id=f"{name}_attr_all"),
        C(name, [data, K(i64(2, 0))], input_since, id=f"{name}_input_axes"),
        C(name, [data, K(i64(-1))], input_since, keepdims=0, id=f"{name}_input_keepdims0"),
        C(name, [data], input_since, id=f"{name}_input_all"),
        C(name, [data, K(np.zeros(0, np.int64))], input_since, noop_with_empty_axes=1, id=f"{name}_noop_empty"),
    )
add(
    C("ReduceMax", [ri(3, 4)], 18, keepdims=0, id="reducemax_int_all"),
    C("ReduceSum", [ri(3, 4), K(i64(1))], 13, id="reducesum_int"),
    C("ReduceMean", [r(2, 3, 4, 5)], 18, axes=None, id="reducemean_v18_no_axes") if False else C("ReduceMean", [r(2, 3, 4, 5), K(i64(-1, -2))], 18, id="reducemean_v18_spatial"),
)
TIES = np.array([[1, 3, 3, 0], [2, 2, 1, 2]], np.float32)
for name in ("ArgMax", "ArgMin"):
    add(
        C(name, [r(3, 4, 5)], 13, axis=1, grad=False, id=f"{name}_axis1"),
        C(name, [r(3, 4, 5)], 13, axis=-1, keepdims=0, grad=False, id=f"{name}_keepdims0"),
        C(name, [TIES], 12, axis=1, select_last_index=1, grad=False, id=f"{name}_last_index"),
        C(name, [TIES], 11, axis=1, grad=False, id=f"{name}_first_index"),
        C(name, [ri(3, 4)], 1, grad=False, id=f"{name}_v1_int"),
    )
add(
    C("TopK", [r(3, 6), K(i64(3))], 11, n_out=2, id="topk"),
    C("TopK", [r(3, 6), K(i64(2))], 11, n_out=2, axis=0, largest=0, id="topk_smallest_axis0"),
    C("CumSum", [r(3, 4), K(np.array(1, np.int64))], 14, id="cumsum"),
    C("CumSum", [r(3, 4), K(np.array(0, np.int32))], 14, exclusive=1, reverse=1, id="cumsum_excl_rev"),
    C("CumSum", [ri(3, 4), K(np.array(-1, np.int64))], 11, exclusive=1, id="cumsum_int_excl"),
)

# Shapes and indexing
add(
    C("Flatten", [r(2, 3, 4, 5)], 13, id="flatten_default"),
    C("Flatten", [r(2, 3, 4, 5)], 13, axis=0, id="flatten_axis0"),
    C("Flatten", [r(2, 3, 4, 5)], 13, axis=-1, id="flatten_axis_neg"),
    C("Flatten", [r(2, 3, 4, 5)], 9, axis=4, id="flatten_axis_rank"),
    C("Reshape", [r(2, 3, 4), K(i64(0, -1))], 13, id="reshape_zero_minus1"),
    C("Reshape", [r(2, 3, 4), K(i64(4, 0, 2))], 5, id="reshape_v5"),
    C("Reshape", [r(2, 3, 4), K(i64(-1))], 14, allowzero=1, id="reshape_allowzero"),
    C("Reshape", [np.zeros((0, 3), np.float32), K(i64(3, 0))], 14, allowzero=1, grad=False, id="reshape_allowzero_literal0"),
    C("Transpose", [r(2, 3, 4)], 13, id="transpose_default"),
    C("Transpose", [r(2, 3, 4, 5)], 13, perm=[0, 2, 3, 1], id="transpose_perm"),
    C("Concat", [r(2, 3), r(2, 1), K(r(2, 2))], 13, axis=-1, id="concat"),
    C("Concat", [ri(2), K(i64(7))], 11, axis=0, id="concat_int"),
    C("Split", [r(6, 4)], 11, n_out=3, axis=0, split=[1, 2, 3], id="split_v11_attr"),
    C("Split", [r(6, 4)], 2, n_out=2, axis=1, id="split_v2_equal"),
    C("Split", [r(6, 4), K(i64(4, 2))], 13, n_out=2, id="split_v13_input"),
    C("Split", [r(6, 4)], 13, n_out=3, id="split_v13_equal"),
    C("Split", [r(5, 4)], 18, n_out=3, num_outputs=3, id="split_v18_num_outputs_uneven"),
    C("Split", [r(6, 4), K(i64(1, 3))], 18, n_out=2, axis=-1, id="split_v18_input"),
    C("Slice", [r(5, 6), K(i64(1, -4)), K(i64(4, I64_MAX)), K(i64(0, 1))], 13, id="slice_basic_int64max"),
    C("Slice", [r(5, 6), K(i64(-1)), K(i64(I64_MIN)), K(i64(1)), K(i64(-2))], 13, id="slice_negative_step"),
    C("Slice", [r(5, 6), K(i64(4, 1)), K(i64(0, 6)), K(i64(0, 1)), K(i64(-1, 2))], 11, id="slice_mixed_steps"),
    C("Slice", [r(5, 6), K(i64(1, 10)), K(i64(3, 20))], 10, id="slice_v10_no_axes_clamped"),
    C("Slice", [r(5, 6)], 1, starts=[1], ends=[-1], axes=[1], id="slice_v1_attrs"),
    C("Slice", [r(5, 6), K(i64(-10)), K(i64(-1)), K(i64(0)), K(i64(3))], 13, id="slice_step3"),
    C("Slice", [r(5, 6), K(i64(2)), K(i64(2)), K(i64(0))], 13, grad=False, id="slice_empty"),
    C("Gather", [r(5, 4), K(i64(0, -1, 2))], 13, id="gather_axis0_negative"),
    C("Gather", [r(3, 5, 2), K(np.array([[0, 4], [1, -2]], np.int64))], 13, axis=1, id="gather_axis1_2d"),
    C("Gather", [r(3, 5), K(np.array(-1, np.int64))], 11, axis=1, id="gather_scalar_index"),
    C("Gather", [i64(2, 3, 8, 8), K(np.array(0, np.int32))], 1, id="gather_shape_v1"),
    C("GatherElements", [r(3, 4), K(np.array([[0, 1], [2, -1], [3, 0]], np.int64))], 13, axis=1, id="gather_elements"),
    C("GatherND", [r(3, 4, 2), K(np.array([[0, 1], [2, 3]], np.int64))], 13, id="gather_nd"),
    C("GatherND", [r(2, 3, 4), K(np.array([[1], [2]], np.int64))], 13, batch_dims=1, id="gather_nd_batch_dims"),
    C("ScatterND", [r(4, 3), K(np.array([[1], [3]], np.int64)), r(2, 3)], 13, id="scatter_nd"),
    C("ScatterND", [r(4, 3), K(np.array([[1, 2], [3, 0], [1, 2]], np.int64)), r(3)], 16, reduction="add", id="scatter_nd_add"),
    C("ScatterND", [r(4, 3), K(np.array([[1], [3]], np.int64)), r(2, 3)], 18, reduction="max", grad=False, id="scatter_nd_max"),
    C("ScatterElements", [r(3, 4), K(np.array([[0, 2], [1, 3], [3, 0]], np.int64)), r(3, 2)], 13, axis=1, id="scatter_elements"),
    C("ScatterElements", [r(3, 4), K(np.array([[0, 2], [1, 1], [3, 0]], np.int64)), r(3, 2)], 16, axis=1, reduction="add", id="scatter_elements_add"),
    C("Squeeze", [r(1, 3, 1, 4)], 11, axes=[0, -2], id="squeeze_v11_attr"),
    C("Squeeze", [r(1, 3, 1, 4), K(i64(2))], 13, id="squeeze_v13_input"),
    C("Squeeze", [r(1, 3, 1, 4)], 13, id="squeeze_all"),
    C("Unsqueeze", [r(3, 4)], 11, axes=[0, -1], id="unsqueeze_v11_attr"),
    C("Unsqueeze", [r(3, 4), K(i64(3, 0))], 13, id="unsqueeze_v13_input"),
    C("Unsqueeze", [np.array(5, np.int64), K(i64(0))], 13, id="unsqueeze_scalar_int"),
    C("Expand", [r(3, 1), K(i64(2, 1, 4))], 13, id="expand_bidirectional"),
    C("Expand", [r(2, 1, 4), K(i64(3, 1))], 8, id="expand_ones_in_shape"),
    C("Tile", [r(2, 3), K(i64(2, 3))], 13, id="tile"),
    C("Shape", [r(2, 3, 4)], 13, id="shape"),
    C("Shape", [r(2, 3, 4, 5)], 15, start=1, end=-1, id="shape_start_end"),
    C("Shape", [r(2, 3, 4, 5)], 15, start=-2, id="shape_start_neg"),
    C("Size", [r(2, 3, 4)], 13, id="size"),
    C("ConstantOfShape", [i64(2, 3)], 9, id="constant_of_shape_default"),
    C("ConstantOfShape", [i64(2, 3)], 20, value=helper.make_tensor("v", TensorProto.INT64, [1], [7]), id="constant_of_shape_int"),
    C("ConstantOfShape", [i64(3)], 9, value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]), id="constant_of_shape_float"),
    C("Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], 11, id="range_int"),
    C("Range", [np.array(10, np.int32), np.array(4, np.int32), np.array(-2, np.int32)], 11, id="range_int32_negative"),
    C("Range", [np.array(0.5, np.float32), np.array(2.0, np.float32), np.array(0.25, np.float32)], 11, grad=False, id="range_float"),
    C("Trilu", [r(2, 4, 5)], 14, id="trilu_upper"),
    C("Trilu", [r(4, 5), K(np.array(-1, np.int64))], 14, upper=0, id="trilu_lower_k"),
    C("OneHot", [i64(0, 2, -1, 5), K(np.array(4, np.int64)), K(f32(0.0, 1.0))], 11, grad=False, id="onehot"),
    C("NonZero", [np.array([[1, 0, 2], [0, 3, 0]], np.float32)], 13, grad=False, id="nonzero"),
    C("DepthToSpace", [r(1, 8, 2, 3)], 13, blocksize=2, id="depth_to_space_dcr"),
    C("DepthToSpace", [r(1, 8, 2, 3)], 13, blocksize=2, mode="CRD", id="depth_to_space_crd"),
    C("SpaceToDepth", [r(1, 2, 4, 6)], 13, blocksize=2, id="space_to_depth"),
)

# Pad: attributes (<11), inputs (>=11), axes input (>=18), wrap (>=19)
P = r(1, 2, 4, 5)
add(
    C("Pad", [P], 2, pads=[0, 0, 1, 2, 0, 0, 2, 1], value=1.5, id="pad_v2_attr_constant"),
    C("Pad", [P], 2, pads=[0, 0, 1, 2, 0, 0, 2, 1], mode="reflect", id="pad_v2_reflect"),
    C("Pad", [P, K(i64(0, 0, 1, 2, 0, 0, 2, 1)), K(f32(-1.0))], 11, id="pad_v11_constant_value"),
    C("Pad", [P, K(i64(0, 0, 1, 2, 0, 0, 2, 1))], 13, mode="reflect", id="pad_reflect"),
    C("Pad", [P, K(i64(0, 0, 1, 2, 0, 0, 2, 1))], 13, mode="edge", id="pad_edge"),
    C("Pad", [P, K(i64(0, 1, 0, 0, 0, 1, 0, 0))], 13, mode="edge", id="pad_edge_channel_axis"),
    C("Pad", [P, K(i64(0, 0, -1, 1, 0, 0, 1, -2))], 13, id="pad_negative_crop"),
    C("Pad", [P, K(i64(0, 0, -1, 1, 0, 0, 1, -2))], 13, mode="reflect", id="pad_reflect_negative"),
    C("Pad", [P, K(i64(1, 2, 2, 1)), None, K(i64(2, -1))], 18, id="pad_v18_axes"),
    C("Pad", [P, K(i64(1, 1, 1, 2)), K(f32(3.0)), K(i64(-2, 3))], 18, mode="reflect", id="pad_v18_axes_reflect"),
    C("Pad", [P, K(i64(0, 0, 1, 2, 0, 0, 2, 1))], 19, mode="wrap", id="pad_v19_wrap"),
    C("Pad", [ri(2, 3), K(i64(1, 0, 0, 2)), K(np.array(9, np.int64))], 13, id="pad_int_constant"),
    C("Pad", [ri(2, 3), K(i64(1, 0, 0, 2))], 13, mode="edge", id="pad_int_edge"),
)

# Resize and Upsample
RX = r(1, 2, 4, 5)
S2 = K(f32(1, 1, 2, 2))
SD = K(f32(1, 1, 0.5, 0.6))
EMPTY_F = K(np.zeros(0, np.float32))
for opset in (11, 13, 18, 19):
    roi = K(np.zeros(0, np.float32)) if opset < 13 else None
    add(
        C("Resize", [RX, roi, S2], opset, mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor", id=f"resize_v{opset}_nearest_asym_floor"),
        C("Resize", [RX, roi, S2], opset, mode="linear", id=f"resize_v{opset}_linear_half_pixel"),
        C("Resize", [RX, roi, SD], opset, mode="linear", id=f"resize_v{opset}_linear_down"),
    )
add(
    C("Resize", [RX, None, K(f32(1, 1, 1.5, 1.7))], 13, id="resize_nearest_default_fractional"),
    C("Resize", [RX, None, K(f32(1, 1, 1.5, 1.7))], 13, nearest_mode="round_prefer_ceil", id="resize_nearest_prefer_ceil"),
    C("Resize", [RX, None, K(f32(1, 1, 2.5, 1.5))], 13, nearest_mode="ceil", coordinate_transformation_mode="tf_half_pixel_for_nn", id="resize_nearest_ceil_tf"),
    C("Resize", [RX, None, S2], 13, coordinate_transformation_mode="align_corners", id="resize_nearest_align_corners"),
    C("Resize", [RX, None, SD], 13, id="resize_nearest_down"),
    C("Resize", [RX, None, None, K(i64(1, 2, 7, 9))], 13, mode="linear", coordinate_transformation_mode="align_corners", id="resize_linear_sizes_align"),
    C("Resize", [RX, None, None, K(i64(1, 2, 7, 1))], 13, mode="linear", coordinate_transformation_mode="pytorch_half_pixel", id="resize_linear_pytorch_half_pixel"),
    C("Resize", [RX, None, S2], 13, mode="linear", coordinate_transformation_mode="asymmetric", id="resize_linear_asym"),
    C("Resize", [RX, None, K(f32(1, 1, 1.5, 2.5))], 19, mode="linear", coordinate_transformation_mode="half_pixel_symmetric", id="resize_v19_half_pixel_symmetric"),
    C("Resize", [RX, None, S2], 13, mode="cubic", id="resize_cubic"),
    C("Resize", [RX, None, K(f32(1, 1, 1.5, 0.8))], 13, mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1, id="resize_cubic_exclude_outside"),
    C("Resize", [RX, None, K(f32(1, 1, 1.5, 1.5))], 13, mode="cubic", coordinate_transformation_mode="align_corners", id="resize_cubic_align"),
    C("Resize", [RX, K(f32(0, 0, 0.2, 0.1, 1, 1, 0.8, 0.7)), K(f32(1, 1, 2, 1.5))], 13, mode="linear", coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=3.0, id="resize_tf_crop_and_resize"),
    C("Resize", [RX, None, K(f32(2, 2))], 18, mode="linear", axes=[2, 3], id="resize_v18_axes"),
    C("Resize", [RX, None, None, K(i64(8, 8))], 18, mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger", id="resize_v18_not_larger"),
    C("Resize", [RX, None, None, K(i64(8, 8))], 18, axes=[2, 3], keep_aspect_ratio_policy="not_smaller", id="resize_v18_not_smaller"),
    C("Resize", [RX, S2], 10, mode="nearest", id="resize_v10_nearest"),
    C("Resize", [RX, K(f32(1, 1, 1.5, 2.5))], 10, mode="linear", id="resize_v10_linear"),
    C("Upsample", [RX, S2], 9, mode="nearest", id="upsample_v9"),
    C("Upsample", [RX], 7, mode="linear", scales=[1.0, 1.0, 2.0, 1.5], id="upsample_v7_attr"),
    C("Resize", [r(1, 2, 3, 4, 5), None, K(f32(1, 1, 2, 1.5, 0.5))], 13, mode="linear", id="resize_trilinear"),
)

# Logic, selection, casting, constants
add(
    C("Where", [np.array([[True, False, True]]), r(2, 3), r(1, 3)], 16, id="where"),
    C("Where", [np.array([True, False]), ri(2), K(np.array(0, np.int64))], 9, id="where_int"),
    C("Equal", [ri(3, 4, low=0, high=3), ri(4, low=0, high=3)], 13, id="equal_int"),
    C("Equal", [f32(1, 2, 3), f32(1, 0, 3)], 11, id="equal_float"),
    C("Less", [r(3, 4), r(4)], 13, id="less"),
    C("Greater", [r(3, 4), r(4)], 9, id="greater"),
    C("LessOrEqual", [ri(3, 4), ri(4)], 16, id="less_or_equal"),
    C("GreaterOrEqual", [ri(3, 4), ri(4)], 12, id="greater_or_equal"),
    C("Not", [np.array([True, False])], 1, id="not"),
    C("And", [np.array([True, False, True]), np.array([True, True, False])], 7, id="and"),
    C("Or", [np.array([True, False, False]), np.array([True, True, False])], 7, id="or"),
    C("Xor", [np.array([True, False, False]), np.array([True, True, False])], 7, id="xor"),
    C("IsNaN", [f32(1, np.nan, 3)], 13, id="isnan"),
    C("IsInf", [f32(1, np.inf, -np.inf)], 10, id="isinf"),
    C("IsInf", [f32(1, np.inf, -np.inf)], 10, detect_negative=0, id="isinf_positive"),
    C("Cast", [r(2, 5) * 5], 13, to=TensorProto.INT64, id="cast_float_to_int64_truncates"),
    C("Cast", [ri(2, 5)], 13, to=TensorProto.FLOAT, grad=False, id="cast_int_to_float"),
    C("Cast", [f32(0, 1.5, -2)], 19, to=TensorProto.BOOL, id="cast_float_to_bool"),
    C("Cast", [np.array([True, False])], 21, to=TensorProto.FLOAT, id="cast_bool_to_float"),
    C("Cast", [ri(3)], 13, to=TensorProto.INT32, id="cast_int64_to_int32"),
    C("Cast", [r(2, 3)], 13, to=TensorProto.FLOAT16, atol=2e-3, grad=False, id="cast_to_float16"),
    C("CastLike", [ri(2, 3), K(f32(0.0))], 15, grad=False, id="castlike"),
    C("Clip", [r(3, 4) * 3], 6, min=-1.0, max=1.5, id="clip_v6_attrs"),
    C("Clip", [r(3, 4) * 3], 6, id="clip_v6_noop"),
    C("Clip", [r(3, 4) * 3, K(np.array(0.0, np.float32)), K(np.array(6.0, np.float32))], 11, id="clip_v11_relu6"),
    C("Clip", [r(3, 4) * 3, K(np.array(-0.5, np.float32))], 13, id="clip_min_only"),
    C("Clip", [r(3, 4) * 3, None, K(np.array(0.5, np.float32))], 13, id="clip_max_only"),
    C("Clip", [r(3, 4)], 13, id="clip_no_bounds"),
    C("Clip", [ri(3, 4), K(np.array(-2, np.int64)), K(np.array(2, np.int64))], 13, id="clip_int"),
    C("Identity", [r(2, 3)], 16, id="identity"),
    C("Dropout", [r(2, 3)], 13, id="dropout"),
    C("Dropout", [r(2, 3)], 12, n_out=2, id="dropout_mask"),
    C("Dropout", [r(2, 3)], 7, ratio=0.3, id="dropout_v7_ratio"),
    C("Max", [r(3, 4), r(4), K(r(1, 4))], 13, id="max_variadic"),
    C("Min", [r(3, 4), r(3, 1)], 8, id="min_broadcast"),
    C("Mean", [r(3, 4), r(4), r(3, 4)], 13, id="mean_variadic"),
    C("Sum", [r(3, 4), r(4), r(3, 4)], 13, id="sum_variadic"),
    C("Sum", [r(3, 4)], 13, id="sum_single"),
    C("Max", [ri(3, 4), ri(3, 4)], 12, id="max_int"),
)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_op_matches_onnxruntime(case: Case):
    model, feeds = build(case)
    assert unsupported_ops(model) == []
    ref = ort_run(model, feeds)
    module = OnnxTorchModule(model)
    got = torch_run(module, feeds, module.input_names)
    assert len(got) == len(ref)
    for i, (g, e) in enumerate(zip(got, ref)):
        assert_matches(g, e, case.atol, f"{case.id} output {i}")


def _differentiable(case: Case) -> bool:
    """A float graph input feeds a float output (decided from the model's declared types)."""
    if not case.grad or not any(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.size for a in case.inputs):
        return False
    model, _ = build(case)
    return any(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)


GRAD_CASES = [c for c in CASES if _differentiable(c)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_op_gradients(case: Case):
    """Autograd through the executor agrees with finite differences (in float64)."""
    model, feeds = build(case)
    module = OnnxTorchModule(model).double()
    names = module.input_names
    args = []
    for n in names:
        a = torch.from_numpy(feeds[n].copy())
        if a.is_floating_point():
            a = a.double().requires_grad_()
        args.append(a)

    def fn(*xs):
        outs = module(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return tuple(o for o in outs if o.is_floating_point())

    assert any(o.requires_grad for o in fn(*args)), "no output depends differentiably on an input"
    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


DATA_DEPENDENT = {"range_float", "nonzero"}  # output shapes depend on values: need real tensors
META_CASES = [
    c for c in CASES if c.id not in DATA_DEPENDENT and all(not isinstance(a, np.ndarray) or a.dtype == np.float32 for a in c.inputs)
]


@pytest.mark.parametrize("case", META_CASES, ids=str)
def test_op_runs_on_meta_device(case: Case):
    """``.to(device)`` moves every constant, and shape/axes constants are read without a device sync.

    The meta device has no data: any constant left on the CPU, or any constant shape read back
    from the device (a GPU sync), makes the call fail.
    """
    model, feeds = build(case)
    module = OnnxTorchModule(model)
    expected = torch_run(module, feeds, module.input_names)
    meta = module.to("meta")
    got = meta(*[torch.from_numpy(feeds[n]).to("meta") for n in module.input_names])
    got = list(got) if isinstance(got, tuple) else [got]
    assert [(g.device.type, tuple(g.shape), g.dtype) for g in got] == [("meta", tuple(e.shape), e.dtype) for e in expected]


def test_resize_negative_axes_equal_positive_axes():
    """onnxruntime 1.31 ignores negative Resize axes; the spec allows them, so compare with [2, 3]."""
    pos = C("Resize", [RX, None, None, K(i64(8, 8))], 18, mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger")
    neg = C("Resize", [RX, None, None, K(i64(8, 8))], 18, mode="linear", axes=[-2, -1], keep_aspect_ratio_policy="not_larger")
    ref = ort_run(*build(pos))[0]
    model, feeds = build(neg)
    got = OnnxTorchModule(model)(torch.from_numpy(feeds["in0"]))
    assert ref.shape == (1, 2, 6, 8)
    assert_matches(got, ref, 1e-5)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and all(ids)


# --------------------------------------------------------------------------------------------
# Whole-graph behaviour
# --------------------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits=(), opset=17):
    opsets = [helper.make_opsetid("", opset)]
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = _ir_version(opsets)
    return m


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_unsupported_ops_are_all_listed_in_one_message():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Det", ["a"], ["b"]),
        helper.make_node("FusedConv", ["b"], ["c"], domain="com.microsoft"),
        helper.make_node("Det", ["c"], ["d"]),
        helper.make_node("BatchNormalization", ["d", "s", "s", "s", "s"], ["e"], training_mode=1),
    ]
    inits = [numpy_helper.from_array(np.ones(3, np.float32), "s")]
    m = _model(nodes, [_vi("x", [3, 3])], [_vi("e", [3, 3])], inits, opset=15)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    expected = [("BatchNormalization", 15), ("Det", 15), ("com.microsoft::FusedConv", 1)]
    assert unsupported_ops(m) == expected
    with pytest.raises(UnsupportedOpsError) as err:
        OnnxTorchModule(m)
    assert err.value.ops == expected
    msg = str(err.value)
    for text in ("ai.onnx::Det (opset 15)", "com.microsoft::FusedConv (opset 1)", "BatchNormalization (opset 15): training_mode=1"):
        assert text in msg
    assert msg.count("Det") == 1
    assert isinstance(err.value, CloakError)


def test_op_version_newer_than_any_handler_is_unsupported():
    # Gelu exists from opset 20 only; at opset 17 it is not an ONNX op at all.
    m = _model([helper.make_node("Gelu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], opset=17)
    assert unsupported_ops(m) == [("Gelu", 17)]


def test_registering_an_op_version_twice_raises(monkeypatch):
    """A second handler for an (op, since_version) that has one is an error, not a silent override."""
    from cloakonnx.torch_exec import registry

    # A copy of the table for this test; op() and _resolve read the module's _OPS when called.
    monkeypatch.setattr(registry, "_OPS", {name: list(entries) for name, entries in registry._OPS.items()})
    before = [(e.since, e.fn) for e in registry._OPS["Relu"]]

    def relu_again(inputs, attrs, ctx):
        return (inputs[0],)

    with pytest.raises(ValueError, match="Relu since opset 1"):
        registry.op("Relu", 1)(relu_again)
    with pytest.raises(ValueError, match="Relu since opset 1"):  # one taken version spoils the whole call
        registry.op("Relu", 99, 1)(relu_again)
    assert [(e.since, e.fn) for e in registry._OPS["Relu"]] == before
    with pytest.raises(ValueError, match="NewOp since opset 3"):  # twice within one call
        registry.op("NewOp", 3, 3)(relu_again)
    assert "NewOp" not in registry.supported_ops()

    registry.op("Relu", 99)(relu_again)  # a new version of a known op is fine
    assert [e.since for e in registry._OPS["Relu"]] == [s for s, _ in before] + [99]
    # exact resolution: opset 20 has Relu's since_version 14, which keeps its own handler
    assert registry._resolve("Relu", 20).fn is before[-1][1]
    registry._OPS["Relu"] = [e for e in registry._OPS["Relu"] if e.since != 14]
    registry.op("Relu", 14)(relu_again)
    assert registry._resolve("Relu", 20).fn is relu_again and registry._resolve("Relu", 13).fn is before[-2][1]


# --------------------------------------------------------------------------------------------
# Op versions: exactly the since_version a node has at the model's opset, or a refusal
# --------------------------------------------------------------------------------------------


def _onnx_since_versions() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain in ("", "ai.onnx"):
            out.setdefault(schema.name, set()).add(schema.since_version)
    return out


def _not_since_versions(table: dict[str, list[int]]) -> list[tuple[str, int]]:
    """(op, version) of every registration whose version is not a since_version of that op."""
    real = _onnx_since_versions()
    return [(name, v) for name, versions in table.items() for v in versions if v not in real.get(name, set())]


def test_every_registered_version_is_a_since_version_of_its_op(monkeypatch):
    from cloakonnx.torch_exec import registry

    assert _not_since_versions(registry.supported_ops()) == []
    # a typo would be caught: Gemm has since_versions 1, 6, 7, 9, 11, 13, not 8
    monkeypatch.setattr(registry, "_OPS", {name: list(entries) for name, entries in registry._OPS.items()})
    registry.op("Gemm", 8)(lambda inputs, attrs, ctx: (inputs[0],))
    assert _not_since_versions(registry.supported_ops()) == [("Gemm", 8)]


def _bn_model(opset: int, outputs=("y",)):
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "s", "s", "s"], list(outputs))]
    inits = [numpy_helper.from_array(np.ones(3, np.float32), "s")]
    return _model(nodes, [_vi("x", [2, 3, 4])], [_vi(o, None) for o in outputs], inits, opset=opset)


def test_unregistered_since_version_is_refused_with_op_and_opset():
    """BatchNormalization-6 (is_test=0 by default: training) has no handler; opset 6 gives it, 8 gives 7."""
    m = _bn_model(6)
    assert unsupported_ops(m) == [("BatchNormalization", 6)]
    with pytest.raises(UnsupportedOpsError) as err:
        OnnxTorchModule(m)
    assert err.value.ops == [("BatchNormalization", 6)]
    assert err.value.since_versions == {("BatchNormalization", 6): 6}
    assert "ai.onnx::BatchNormalization (opset 6, since_version 6): not verified by cloakonnx's executor" in str(err.value)
    assert unsupported_ops(_bn_model(8)) == []
    assert OnnxTorchModule(_bn_model(8))._plan[0].ctx.since == 7


def test_an_older_handler_never_serves_a_newer_version(monkeypatch):
    """Without an entry for Gemm-9, opsets 9 and 10 are refused; Gemm-7 still serves opsets 7 and 8."""
    from cloakonnx.torch_exec import registry

    monkeypatch.setattr(registry, "_OPS", {n: [e for e in entries if (n, e.since) != ("Gemm", 9)]
                                          for n, entries in registry._OPS.items()})
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(r(4, 5), "w")]

    def gemm(opset):
        return _model(nodes, [_vi("x", [3, 5])], [_vi("y", [3, 4])], inits, opset=opset)

    assert [unsupported_ops(gemm(v)) for v in (8, 9, 10, 11)] == [[], [("Gemm", 9)], [("Gemm", 10)], []]
    with pytest.raises(UnsupportedOpsError, match=r"ai\.onnx::Gemm \(opset 10, since_version 9\): not verified"):
        OnnxTorchModule(gemm(10))
    assert OnnxTorchModule(gemm(8))._plan[0].ctx.since == 7


@pytest.mark.parametrize("op_type, opset, since", [
    ("Gemm", 10, 9), ("Relu", 20, 14), ("Softmax", 12, 11), ("Softmax", 17, 13), ("Add", 6, 6), ("Conv", 21, 11),
    ("Reshape", 13, 13), ("ReduceMean", 17, 13), ("ReduceMean", 18, 18), ("Cast", 28, 28), ("Clip", 12, 12),
])
def test_a_registered_later_version_resolves_to_its_own_entry(op_type, opset, since):
    from cloakonnx.torch_exec import registry

    entry = registry._resolve(op_type, opset)
    assert entry is not None and entry.since == since
    assert entry is next(e for e in registry._OPS[op_type] if e.since == since)


def test_handlers_follow_the_versions_they_serve():
    """One handler per form: the attribute and input forms of an op are different entries."""
    from cloakonnx.torch_exec import registry

    fn = {v: registry._resolve("Softmax", v).fn for v in (1, 11, 13)}
    assert fn[1] is fn[11] and fn[11] is not fn[13]
    fn = {v: registry._resolve("Squeeze", v).fn for v in (1, 11, 13, 25)}
    assert fn[1] is fn[11] and fn[13] is fn[25] and fn[11] is not fn[13]


def test_opset_newer_than_onnx_knows_and_op_before_its_first_version_are_refused():
    newest = onnx.defs.onnx_opset_version()
    relu = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], opset=newest + 1)
    relu.ir_version = onnx.IR_VERSION
    with pytest.raises(UnsupportedOpsError, match=rf"Relu \(opset {newest + 1}\): opset {newest + 1} is newer than"):
        OnnxTorchModule(relu)
    sin = _model([helper.make_node("Sin", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], opset=6)  # Sin is from 7
    with pytest.raises(UnsupportedOpsError, match=r"ai\.onnx::Sin \(opset 6\): no such op at this opset"):
        OnnxTorchModule(sin)


@pytest.mark.parametrize("node, opset, reason", [
    (helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_shape=[10, 11]), 10, "output_shape"),
    (helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER"), 10, "auto_pad SAME_"),
    (helper.make_node("BatchNormalization", ["x", "s", "s", "s", "v"], ["y", "m", "var"]), 9, "statistics outputs"),
    (helper.make_node("QuantizeLinear", ["x", "s"], ["y"], precision=TensorProto.FLOAT16), 23, "precision FLOAT16"),
    (helper.make_node("DequantizeLinear", ["q", "s"], ["y"], output_dtype=TensorProto.FLOAT16), 23, "output_dtype FLOAT16"),
])
def test_version_specific_settings_are_refused(node, opset, reason):
    inits = [numpy_helper.from_array(r(4, 3, 3, 3), "w"), numpy_helper.from_array(np.ones(4, np.float32), "s"),
             numpy_helper.from_array(np.ones(4, np.float32), "v"), numpy_helper.from_array(np.zeros((2, 4, 5, 5), np.uint8), "q")]
    m = _model([node], [_vi("x", [2, 4, 5, 5])], [_vi(o, None) for o in node.output], inits, opset=opset)
    with pytest.raises(UnsupportedOpsError, match=rf"{node.op_type} \(opset {opset}\): .*{reason}"):
        OnnxTorchModule(m)
    if node.op_type == "ConvTranspose":  # explicit pads, or opset 11, run
        ok = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])
        assert unsupported_ops(_model([ok], [_vi("x", [2, 4, 5, 5])], [_vi("y", None)], inits, opset=10)) == []
        assert unsupported_ops(_model([node], [_vi("x", [2, 4, 5, 5])], [_vi("y", None)], inits, opset=11)) == []


@pytest.mark.parametrize("opset", [13, 19, 21, 23, 25, 28])
def test_quantize_dequantize_at_each_registered_version(opset):
    """A per-channel QuantizeLinear -> DequantizeLinear pair matches the reference at every version."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)]
    inits = [numpy_helper.from_array(f32(0.02, 0.05, 0.1), "s"), numpy_helper.from_array(np.array([0, 10, -5], np.int8), "z")]
    m = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [2, 3, 4])], inits, opset=opset)
    m.ir_version = max(m.ir_version, 7)
    x = r(2, 3, 4) * 3
    assert unsupported_ops(m) == []
    assert_matches(OnnxTorchModule(m)(torch.from_numpy(x)), np.asarray(_reference(m, {"x": x})[0]), 1e-6)


def test_dropout_training_mode_input_is_refused_when_true():
    nodes = [helper.make_node("Dropout", ["x", "", "t"], ["y"])]
    for flag, ok in ((False, True), (True, False)):
        m = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], [numpy_helper.from_array(np.array(flag), "t")], opset=13)
        mod, x = OnnxTorchModule(m), torch.from_numpy(r(2, 3))
        if ok:
            assert torch.equal(mod(x), x)
        else:
            with pytest.raises(CloakError, match="training_mode=1"):
                mod(x)


def _reference(model, feeds):
    """onnxruntime, or the ONNX reference implementation for opsets onnxruntime does not load yet."""
    try:
        return ort_run(model, feeds)
    except Exception as exc:  # noqa: BLE001 - only a too-new opset (or its IR version) falls back
        if "opset" not in str(exc).lower() and "ir version" not in str(exc).lower():
            raise
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


# Cases whose attributes have no place at the newest version of their handler (they are exercised
# at their own opset in CASES): Split-18 needs num_outputs or a split input, Dropout-12 made ratio an input.
_NOT_VALID_LATER = {"split_v13_equal", "dropout_v7_ratio"}


def _at_newest_version(case: Case) -> Case | None:
    """``case`` at the newest since_version its handler is registered for, if newer than its own."""
    from cloakonnx.torch_exec import registry

    entry = registry._resolve(case.op, case.opset)
    newest = max(e.since for e in registry._OPS[case.op] if e.fn is entry.fn)
    if newest <= case.opset or case.id in _NOT_VALID_LATER:
        return None
    return dataclasses.replace(case, opset=newest, id=f"{case.id}@v{newest}")


NEWEST_CASES = [c for c in map(_at_newest_version, CASES) if c is not None] + [
    C("SpaceToDepth", [r(1, 2, 4, 6)], 28, blocksize=2, mode="CRD", id="space_to_depth_v28_crd"),
    C("SpaceToDepth", [r(1, 2, 4, 6)], 28, blocksize=2, mode="DCR", id="space_to_depth_v28_dcr"),
    C("Mod", [r(6) * 5, f32(2, -2, 3, -3, 0.5, -0.5)], 28, grad=False, id="mod_v28_float_floor"),
    C("Cast", [r(2, 5) * 5], 25, to=TensorProto.INT32, id="cast_v25"),
]


@pytest.mark.parametrize("case", NEWEST_CASES, ids=str)
def test_op_matches_reference_at_newest_registered_version(case: Case):
    """Every case again at the newest since_version registered for the handler it exercises."""
    model, feeds = build(case)
    onnx.checker.check_model(model)
    assert unsupported_ops(model) == []
    module = OnnxTorchModule(model)
    ref = _reference(model, feeds)
    got = torch_run(module, feeds, module.input_names)
    assert len(got) == len(ref)
    for i, (g, e) in enumerate(zip(got, ref)):
        assert_matches(g, np.asarray(e), case.atol, f"{case.id} output {i}")


def test_shared_initializer_and_constant_node_weights():
    """Two convs share one deduplicated weight and bias; a third takes its weight from a Constant node."""
    w = r(4, 4, 3, 3)
    b = r(4)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a2"]),
        helper.make_node("Conv", ["a2", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["w3"], value=numpy_helper.from_array(r(2, 4, 1, 1))),
        helper.make_node("Identity", ["b"], ["b_alias"]),
        helper.make_node("Add", ["c", "a"], ["d"]),
        helper.make_node("Conv", ["d", "w3"], ["y"]),
        helper.make_node("Add", ["y", "b_alias_slice"], ["z"]),
        helper.make_node("Slice", ["b_alias", "zero", "two"], ["b_alias_slice_1d"]),
        helper.make_node("Unsqueeze", ["b_alias_slice_1d", "ax"], ["b_alias_slice"]),
    ]
    # put the Slice/Unsqueeze after their consumer: the executor must sort the graph itself
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(i64(0), "zero"),
        numpy_helper.from_array(i64(2), "two"),
        numpy_helper.from_array(i64(1, 2), "ax"),
    ]
    m = _model(nodes, [_vi("x", [2, 4, 6, 6])], [_vi("z", [2, 2, 6, 6])], inits)
    sorted_model = onnx.ModelProto()
    sorted_model.CopyFrom(m)
    del sorted_model.graph.node[:]
    order = [0, 1, 2, 3, 4, 5, 6, 8, 9, 7]
    sorted_model.graph.node.extend([m.graph.node[i] for i in order])
    x = r(2, 4, 6, 6)
    ref = ort_run(sorted_model, {"x": x})[0]
    mod = OnnxTorchModule(m)
    xt = torch.from_numpy(x).requires_grad_()
    y = mod(xt)
    assert_matches(y, ref, 1e-5)
    y.sum().backward()
    assert torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0
    # the shared weight is one buffer, and the Identity alias of the bias is not duplicated
    ws = [t for t in mod.buffers() if t.shape == (4, 4, 3, 3)]
    assert len(ws) == 1
    # everything constant lives in buffers: they follow .to() and appear in the state dict
    assert all(k.startswith("c") for k in mod.state_dict())
    assert mod.double()(xt.double()).dtype == torch.float64


def test_float16_model_runs_in_float32():
    w = r(3, 2, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("ReduceMean", ["b"], ["y"], axes=[2, 3], keepdims=0),
    ]
    inits = [numpy_helper.from_array(w.astype(np.float16), "w")]
    m = _model(nodes, [_vi("x", [2, 2, 5, 5], TensorProto.FLOAT16)], [_vi("y", [2, 3], TensorProto.FLOAT16)], inits, opset=13)
    x = r(2, 2, 5, 5).astype(np.float16)
    ref = ort_run(m, {"x": x})[0]
    assert ref.dtype == np.float16
    mod = OnnxTorchModule(m)
    assert mod.computes_in_float32
    assert all(b.dtype == torch.float32 for b in mod.buffers())
    xt = torch.from_numpy(x).requires_grad_()
    y = mod(xt)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.detach().numpy(), ref.astype(np.float32), rtol=1e-2, atol=1e-2)
    y.sum().backward()
    assert xt.grad is not None and xt.grad.dtype == torch.float16 and torch.isfinite(xt.grad).all()
    assert not OnnxTorchModule(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])).computes_in_float32


def test_intermediate_outputs_and_pruning():
    w = r(3, 4)
    nodes = [
        helper.make_node("Relu", ["x"], ["feat"]),
        helper.make_node("Gemm", ["feat", "w"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    m = _model(nodes, [_vi("x", [2, 4])], [_vi("prob", [2, 3])], [numpy_helper.from_array(w, "w")])
    x = torch.from_numpy(r(2, 4))
    feat_only = OnnxTorchModule(m, outputs=["feat"])
    assert len(feat_only._plan) == 1 and len(feat_only.state_dict()) == 0  # the head is pruned
    torch.testing.assert_close(feat_only(x), torch.relu(x))
    logits, feat = OnnxTorchModule(m, outputs=["logits", "feat"])(x)
    torch.testing.assert_close(feat, torch.relu(x))
    torch.testing.assert_close(logits, torch.relu(x) @ torch.from_numpy(w).t())
    torch.testing.assert_close(OnnxTorchModule(m)(x), torch.softmax(logits, 1))
    with pytest.raises(CloakError, match="no tensor named 'nope'"):
        OnnxTorchModule(m, outputs=["nope"])


def test_intermediates_are_freed_after_last_use():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Exp", ["b"], ["y"]),
        helper.make_node("Add", ["y", "a"], ["z"]),
    ]
    m = _model(nodes, [_vi("x", [3])], [_vi("z", [3]), _vi("y", [3])])
    mod = OnnxTorchModule(m)
    a, b, y, z = (step.outs[0] for step in mod._plan)
    frees = [set(step.free) for step in mod._plan]
    assert b in frees[2] and b not in frees[1]  # b dies at its only reader
    assert a in frees[3] and a not in frees[1] | frees[2]  # a lives until Add reads it
    assert y not in set().union(*frees) and z not in set().union(*frees)  # graph outputs survive


def test_constant_subgraphs_are_folded_once():
    """Arithmetic on constants (shape computations, scaled weights) runs at build time, not per call."""
    nodes = [
        helper.make_node("Constant", [], ["shape"], value_ints=[3, -1]),
        helper.make_node("Constant", [], ["base"], value_ints=[1, 5]),
        helper.make_node("Constant", [], ["one"], value_int=1),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Constant", [], ["fl"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        helper.make_node("Mul", ["fl", "half"], ["scaled"]),
        helper.make_node("Add", ["base", "one"], ["shape2"]),  # [2, 6]
        helper.make_node("Reshape", ["x", "shape"], ["a"]),
        helper.make_node("Mul", ["a", "scaled"], ["y"]),
        helper.make_node("Reshape", ["y", "shape2"], ["z"]),
    ]
    m = _model(nodes, [_vi("x", [12])], [_vi("z", [2, 6])])
    mod = OnnxTorchModule(m)
    assert [s.ctx.op_type for s in mod._plan] == ["Reshape", "Mul", "Reshape"]
    x = r(12)
    got = mod(torch.from_numpy(x))
    assert got.shape == (2, 6)
    assert_matches(got, ort_run(m, {"x": x})[0], 1e-6)


def test_constant_node_attribute_forms():
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", TensorProto.FLOAT, [2], [5.0, 7.0]), helper.make_tensor("i", TensorProto.INT64, [2], [1, 4]), [2, 3]
    )
    forms = {
        "value": helper.make_tensor("t", TensorProto.FLOAT, [2, 3], list(range(6))),
        "value_float": 2.5,
        "value_floats": [1.0, 2.0, 3.0],
        "value_int": 4,
        "value_ints": [1, 2, 3],
        "sparse_value": sparse,
    }
    for key, value in forms.items():
        nodes = [helper.make_node("Constant", [], ["c"], **{key: value}), helper.make_node("Identity", ["c"], ["y"])]
        m = _model(nodes, [], [helper.make_value_info("y", onnx.TypeProto())], opset=13)
        m = onnx.shape_inference.infer_shapes(m)
        ref = ort_run(m, {})[0]
        assert_matches(OnnxTorchModule(m)(), ref, 0.0, key)


def test_multiple_inputs_and_wrong_arity():
    m = _model([helper.make_node("Sub", ["a", "b"], ["y"])], [_vi("a", [2]), _vi("b", [2])], [_vi("y", [2])])
    mod = OnnxTorchModule(m)
    assert mod.input_names == ["a", "b"] and mod.output_names == ["y"]
    torch.testing.assert_close(mod(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])), torch.tensor([2.0, 0.0]))
    with pytest.raises(CloakError, match="takes 2 input"):
        mod(torch.zeros(2))


def test_initializer_listed_as_graph_input_is_a_constant():
    """IR < 4 models list initializers among graph inputs; they are not inputs of the module."""
    w = r(3, 2)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [1, 3]), _vi("w", [3, 2])], [_vi("y", [1, 2])], [numpy_helper.from_array(w, "w")])
    mod = OnnxTorchModule(m)
    assert mod.input_names == ["x"]
    x = r(1, 3)
    np.testing.assert_allclose(mod(torch.from_numpy(x)).numpy(), x @ w, rtol=1e-6)


def test_runtime_errors_name_the_node():
    m = _model([helper.make_node("Reshape", ["x", "s"], ["y"], name="bad_reshape")], [_vi("x", [6]), _vi("s", [2], TensorProto.INT64)], [_vi("y", None)])
    mod = OnnxTorchModule(m)
    with pytest.raises(CloakError, match="bad_reshape"):
        mod(torch.zeros(6), torch.tensor([4, 4]))


def test_executor_doc_claims_what_these_cases_verify():
    """docs/executor.md's op count, case count and opset span are exactly what this file and the op table hold."""
    from pathlib import Path

    from cloakonnx.torch_exec.registry import supported_ops

    doc = (Path(__file__).resolve().parents[1] / "docs" / "executor.md").read_text(encoding="utf-8")
    opsets = sorted({c.opset for c in CASES})
    assert f"The executor covers {len(supported_ops())} ONNX ops." in doc
    assert f"compares {len(CASES)} one-node cases" in doc
    assert f"the cases span opsets {opsets[0]}–{opsets[-1]}" in doc
