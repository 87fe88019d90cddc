"""Folding the mask into the head's weights: same outputs as the Mul form, same graph as the original."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.errors import CloakError
from cloakonnx.graph import fold_mask, folded_mask
from cloakonnx.graph.record import FOLDED_MASK_KEY, FORM_KEY
from cloakonnx.graph import find_head, load_model, save_model
from cloakonnx.runtime import make_session
from cloakonnx.graph import apply_mask

F, C = 6, 4  # features, classes of the tiny models


def _rng(seed=0):
    return np.random.default_rng(seed)


def _props(model):
    return {p.key: p.value for p in model.metadata_props}


def _tiny(kind: str, dtype=np.float32) -> onnx.ModelProto:
    """x [N, F] -> Relu -> f -> head -> Identity -> y, with each supported head kind."""
    rng = _rng(1)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = rng.standard_normal((F, C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    nodes = [helper.make_node("Relu", ["x"], ["f"], name="relu")]
    inits = []
    if kind.startswith("gemm"):
        trans_b = int(kind.endswith("t"))
        inits = [numpy_helper.from_array(w.T.copy() if trans_b else w, "W"), numpy_helper.from_array(b, "B")]
        nodes.append(helper.make_node("Gemm", ["f", "W", "B"], ["z"], name="fc", transB=trans_b, alpha=0.7, beta=1.3))
    elif kind == "matmul_add":
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
        nodes += [helper.make_node("MatMul", ["f", "W"], ["mm"], name="mm"),
                  helper.make_node("Add", ["B", "mm"], ["z"], name="add")]  # bias first: either order is a head
    elif kind == "matmul":
        inits = [numpy_helper.from_array(w, "W")]
        nodes.append(helper.make_node("MatMul", ["f", "W"], ["z"], name="mm"))
    else:  # pragma: no cover
        raise ValueError(kind)
    nodes.append(helper.make_node("Identity", ["z"], ["y"], name="out"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", elem, ["N", F])],
                              [helper.make_tensor_value_info("y", elem, ["N", C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="tests", producer_version="0.1", doc_string="tiny")
    helper.set_model_props(model, {"author": "me"})
    onnx.checker.check_model(model)
    return model


def _mask(width, zeros):
    m = np.ones(width, np.float32)
    m[list(zeros)] = 0
    return m


def _run(model, x, name="x"):
    return make_session(model).run(None, {name: x})[0]


def _same_signature(a: onnx.ModelProto, b: onnx.ModelProto):
    assert len(a.graph.node) == len(b.graph.node)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [i.SerializeToString() for i in a.graph.input] == [i.SerializeToString() for i in b.graph.input]
    assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]


@pytest.mark.parametrize("kind", ["gemm", "gemm_t", "matmul_add", "matmul"])
def test_tiny_heads_fold_like_the_mul_form(kind):
    model = _tiny(kind)
    mask = _mask(F, [1, 4])
    folded = fold_mask(model, mask)
    onnx.checker.check_model(folded)
    _same_signature(folded, model)
    assert not any(n.name.startswith("cloakonnx_mask") for n in folded.graph.node)
    x = _rng(2).standard_normal((5, F)).astype(np.float32)
    head = find_head(model)
    expected = _run(apply_mask(model, head.feature, mask), x)
    np.testing.assert_allclose(_run(folded, x), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - _run(model, x)).max() > 1e-3  # the mask matters
    # the head's weight now has zero rows for the masked features, nothing else changed
    assert np.all(find_head(folded).weight[[1, 4]] == 0)
    np.testing.assert_allclose(find_head(folded).weight[mask == 1], head.weight[mask == 1])


def test_digits_model_folds_like_the_mul_form(digits_files, digits, tmp_path):
    model = load_model(digits_files[0])
    head = find_head(model)
    assert head.kind == "Gemm"
    mask = np.ones(head.width, np.float32)
    mask[::5] = 0
    folded = fold_mask(model, mask, metadata={"cloakonnx.masked": str(int((mask == 0).sum()))})
    _same_signature(folded, model)
    assert len(folded.graph.initializer) == len(model.graph.initializer)
    x = digits.x[:64]
    expected = _run(apply_mask(model, head.feature, mask), x, "input")
    np.testing.assert_allclose(_run(folded, x, "input"), expected, rtol=1e-4, atol=1e-4)
    # and it survives the round trip through save/load
    save_model(folded, tmp_path / "folded.onnx")
    again = load_model(tmp_path / "folded.onnx")
    np.testing.assert_array_equal(folded_mask(again), mask)
    np.testing.assert_allclose(_run(again, x, "input"), expected, rtol=1e-4, atol=1e-4)


def test_all_ones_mask_is_bit_identical(digits_files, digits):
    model = load_model(digits_files[0])
    folded = fold_mask(model, np.ones(find_head(model).width))
    x = digits.x[:32]
    assert np.array_equal(_run(folded, x, "input"), _run(model, x, "input"))
    assert [t.SerializeToString() for t in folded.graph.initializer] == \
        [t.SerializeToString() for t in model.graph.initializer]


def test_folding_a_mul_hardened_model_removes_the_mul_and_unions_masks(digits_files, digits):
    model = load_model(digits_files[0])
    head = find_head(model)
    old, new = _mask(head.width, [0, 1, 2]), _mask(head.width, [2, 10, 11])
    hardened = apply_mask(model, head.feature, old, metadata={"cloakonnx.form": "mul"})
    assert len(hardened.graph.node) == len(model.graph.node) + 1
    folded = fold_mask(hardened, new)
    _same_signature(folded, model)
    assert not any(n.op_type == "Mul" and n.name.startswith("cloakonnx_mask") for n in folded.graph.node)
    assert not any(t.name.startswith("cloakonnx_mask") for t in folded.graph.initializer)
    assert len(folded.graph.initializer) == len(model.graph.initializer)
    union = old * new
    np.testing.assert_array_equal(folded_mask(folded), union)
    assert find_head(folded).mask is None and find_head(folded).feature == head.feature
    x = digits.x[:64]
    np.testing.assert_allclose(_run(folded, x, "input"), _run(apply_mask(model, head.feature, union), x, "input"),
                               rtol=1e-4, atol=1e-4)
    assert _props(folded)[FORM_KEY] == "folded"


def test_refolding_unions_with_the_recorded_mask():
    model = _tiny("gemm_t")
    once = fold_mask(model, _mask(F, [0]))
    twice = fold_mask(once, _mask(F, [3]))
    np.testing.assert_array_equal(folded_mask(twice), _mask(F, [0, 3]))
    _same_signature(twice, model)
    x = _rng(3).standard_normal((4, F)).astype(np.float32)
    np.testing.assert_allclose(_run(twice, x), _run(apply_mask(model, "f", _mask(F, [0, 3])), x), rtol=1e-5, atol=1e-5)


def test_shared_weight_gets_its_own_initializer():
    """W feeds both a hidden MatMul and the head: the hidden layer must keep the original W."""
    rng = _rng(4)
    w = rng.standard_normal((F, F)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="hidden"),
         helper.make_node("Relu", ["h"], ["f"], name="relu"),
         helper.make_node("Gemm", ["f", "W"], ["y"], name="fc")],
        "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", F])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mask = _mask(F, [2, 5])
    folded = fold_mask(model, mask)
    _same_signature(folded, model)
    hidden = next(n for n in folded.graph.node if n.name == "hidden")
    fc = next(n for n in folded.graph.node if n.name == "fc")
    assert hidden.input[1] == "W" and fc.input[1] != "W"
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(inits["W"], w)
    assert np.all(inits[fc.input[1]][[2, 5]] == 0)
    x = rng.standard_normal((3, F)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(apply_mask(model, "f", mask), x), rtol=1e-5, atol=1e-5)


def test_weight_that_is_a_graph_input_is_not_changed():
    """An initializer listed as a graph input can be overridden by the caller: fold into a new one."""
    model = _tiny("matmul")
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [F, C]))
    folded = fold_mask(model, _mask(F, [0]))
    _same_signature(folded, model)
    assert next(n for n in folded.graph.node if n.op_type == "MatMul").input[1] != "W"
    x = _rng(5).standard_normal((2, F)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(apply_mask(model, "f", _mask(F, [0])), x), rtol=1e-5, atol=1e-5)


def test_weight_from_a_constant_node():
    model = _tiny("matmul_add")
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], name="wconst", value=w))
    model.graph.initializer.remove(w)
    onnx.checker.check_model(model)
    folded = fold_mask(model, _mask(F, [5]))
    _same_signature(folded, model)
    x = _rng(6).standard_normal((2, F)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(apply_mask(model, "f", _mask(F, [5])), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gemm", "gemm_t", "matmul_add"])
def test_fp16_weights_stay_fp16(kind):
    model = _tiny(kind, np.float16)
    mask = _mask(F, [0, 3])
    folded = fold_mask(model, mask)
    w = next(t for t in folded.graph.initializer if t.name == "W")
    assert w.data_type == TensorProto.FLOAT16
    x = _rng(7).standard_normal((4, F)).astype(np.float16)
    y = _run(folded, x)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), _run(apply_mask(model, "f", mask), x).astype(np.float32),
                               rtol=1e-2, atol=1e-2)


def test_model_level_fields_and_metadata_are_kept():
    model = _tiny("gemm")
    model.ir_version = 7
    mask = _mask(F, [1, 2, 3])
    folded = fold_mask(model, mask, metadata={"cloakonnx.masked": "3", FORM_KEY: "mul"})
    assert folded.ir_version == 7
    assert list(folded.opset_import) == list(model.opset_import)
    assert (folded.producer_name, folded.producer_version, folded.doc_string) == ("tests", "0.1", "tiny")
    props = _props(folded)
    assert props["author"] == "me" and props["cloakonnx.masked"] == "3"
    assert props[FORM_KEY] == "folded"  # the form is always recorded truthfully
    assert props[FOLDED_MASK_KEY] == '{"features":6,"zero":[1,2,3]}'
    assert list(props)[0] == "author"  # existing keys keep their order
    np.testing.assert_array_equal(folded_mask(folded), mask)
    assert folded_mask(model) is None
    onnx.checker.check_model(folded)
    make_session(folded)  # onnxruntime accepts IR 7
    # the input model is not modified
    assert FORM_KEY not in _props(model)
    assert np.all(find_head(model).weight[1] != 0)


def test_unsupported_heads_are_explained():
    model = _tiny("gemm")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.attribute.append(helper.make_attribute("transA", 1))
    with pytest.raises(CloakError, match="transA=1"):
        fold_mask(model, np.ones(F))

    model = _tiny("matmul")
    w = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.initializer.remove(w)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [F, C]))
    with pytest.raises(CloakError, match="non-constant"):
        fold_mask(model, np.ones(F))


def test_bad_masks_are_refused():
    model = _tiny("gemm")
    with pytest.raises(CloakError, match="6 features"):
        fold_mask(model, np.ones(F + 1))
    with pytest.raises(CloakError, match=r"values in \[0, 1\]"):
        fold_mask(model, np.full(F, -0.5))


def test_mask_that_also_feeds_another_node_is_not_removed():
    model = _tiny("gemm")
    hardened = apply_mask(model, "f", _mask(F, [0]))
    masked = next(n for n in hardened.graph.node if n.op_type == "Mul").output[0]
    hardened.graph.output.append(helper.make_tensor_value_info(masked, TensorProto.FLOAT, ["N", F]))
    with pytest.raises(CloakError, match="also feeds"):
        fold_mask(hardened, np.ones(F))


def test_bad_folded_mask_record_is_an_error():
    model = _tiny("gemm")
    helper.set_model_props(model, {FOLDED_MASK_KEY: "not json"})
    with pytest.raises(CloakError, match="folded_mask"):
        folded_mask(model)


def _latency_bench(tmp_path):
    """benchmarks/latency.py loaded as a module, a tiny model saved for it, and where its JSON goes."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"
    spec = importlib.util.spec_from_file_location("cloakonnx_latency_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_path, out = tmp_path / "tiny.onnx", tmp_path / "latency.json"
    onnx.save(_tiny("gemm_t"), model_path)
    return bench, model_path, out


def test_latency_benchmark_runs_on_a_small_model(tmp_path):
    """benchmarks/latency.py is a tested example: a tiny model, a few rounds, JSON out."""
    import json

    bench, model_path, out = _latency_bench(tmp_path)
    assert bench.main(["--model", str(model_path), "--batches", "1,3", "--repeats", "5", "--warmup", "1",
                       "--threads", "1", "--providers", "cpu", "--rotate", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["threads"] == 1 and result["config"]["masked"] == 1
    assert result["config"]["nodes"]["folded"] == result["config"]["nodes"]["original"]
    assert result["config"]["nodes"]["mul"] == result["config"]["nodes"]["original"] + 1
    assert [(r["provider"], r["batch"]) for r in result["runs"]] == [("CPUExecutionProvider", 1),
                                                                     ("CPUExecutionProvider", 3)]
    for run in result["runs"]:
        assert run["check"]["max_abs_diff_mul_vs_folded"] < 1e-5
        assert {"p50_ms", "p90_ms", "p99_ms", "images_per_s"} <= set(run["variants"]["original"])
        assert run["variants"]["mul"]["target"] == "<= 1.01" and "p50_ratio" in run["variants"]["folded"]


def test_latency_benchmark_stages_records_what_folded(tmp_path):
    """--stages: a soft mask on each candidate tensor (here only the head's input), folded where exact."""
    import json

    bench, model_path, out = _latency_bench(tmp_path)
    assert bench.main(["--model", str(model_path), "--batches", "2", "--repeats", "5", "--warmup", "1", "--threads",
                       "1", "--providers", "cpu", "--stages", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["stages"]["folded"] == ["f"] and cfg["stages"]["kept_mul"] == []
    assert cfg["nodes"]["folded"] == cfg["nodes"]["original"] and cfg["nodes"]["mul"] == cfg["nodes"]["original"] + 1
    mask = bench.soft_mask(200, np.random.default_rng(0))
    assert (mask == 0).sum() == 10 and mask[mask > 0].min() >= bench.SOFT_LOW and mask.max() <= 1
    assert "--stages" in bench.table(json.loads(out.read_text()))
