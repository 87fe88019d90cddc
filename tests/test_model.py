import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.errors import CloakError
from cloakonnx.graph import find_head, inspect_model, load_model


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _mlp(head="gemm", softmax=False, batch="N"):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "W1")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["f"])]
    if head == "gemm":
        inits += [numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "W2"),
                  numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")]
        nodes.append(helper.make_node("Gemm", ["f", "W2", "b2"], ["logits"], transB=1))
    else:
        inits += [numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "W2"),
                  numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")]
        nodes += [helper.make_node("MatMul", ["f", "W2"], ["mm"]), helper.make_node("Add", ["mm", "b2"], ["logits"])]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out = "probs"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 6])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("head", ["gemm", "matmul"])
@pytest.mark.parametrize("softmax", [False, True])
def test_find_head(head, softmax):
    h = find_head(_mlp(head, softmax))
    assert h.feature == "f" and h.width == 5 and h.weight.shape == (5, 3)
    assert h.kind == ("Gemm" if head == "gemm" else "MatMul+Add")
    assert h.logits == ("probs" if softmax else "logits")


def test_head_weights_reproduce_logits():
    from cloakonnx.runtime import make_session
    from cloakonnx.graph import with_outputs

    model = _mlp("gemm")
    x = np.random.default_rng(1).random((4, 6)).astype(np.float32)
    f, logits = make_session(with_outputs(model, ["f"])).run(["f", "logits"], {"x": x})
    np.testing.assert_allclose(find_head(model).apply(f), logits, rtol=1e-5, atol=1e-5)


def test_inspect_digits(digits_files):
    info = inspect_model(digits_files[0]).to_dict()
    assert info["head"]["kind"] == "Gemm" and info["head"]["features"] == 64 and info["head"]["classes"] == 10
    assert info["dynamic_batch"] is True and info["opset"] == 17
    assert info["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert info["head"]["mask"] is None


def test_no_linear_head_names_feature_tensor_option():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(CloakError, match="--feature-tensor NAME"):
        find_head(helper.make_model(graph, ir_version=8))


@pytest.mark.parametrize("content, match", [
    (b"", "empty"), (b"\x00\x01garbage" * 10, "not a readable ONNX model|no graph"),
])
def test_unreadable_files(tmp_path, content, match):
    p = tmp_path / "m.onnx"
    p.write_bytes(content)
    with pytest.raises(CloakError, match=match):
        load_model(p)


def test_missing_and_truncated(tmp_path, digits_files):
    with pytest.raises(CloakError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    data = digits_files[0].read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CloakError):
        load_model(p)


def test_checker_failure(tmp_path):
    model = _mlp()
    model.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(CloakError, match="onnx.checker"):
        load_model(_save(model, tmp_path / "bad.onnx"))
