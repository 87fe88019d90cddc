import numpy as np
import onnx
import pytest

from cloakonnx.errors import CloakError
from cloakonnx.graph import find_head, load_model
from cloakonnx.runtime import make_session
from cloakonnx.graph import apply_mask


def _run(model, x):
    return make_session(model).run(None, {"input": x})[0]


def test_all_ones_mask_keeps_outputs_bit_identical(digits_files, digits):
    model = load_model(digits_files[0])
    head = find_head(model)
    out = apply_mask(model, head.feature, np.ones(head.width))
    x = digits.x[:64]
    assert np.array_equal(_run(model, x), _run(out, x))
    assert len(out.graph.node) == len(model.graph.node) + 1


def test_masked_output_equals_head_on_masked_features(digits_files, digits):
    from cloakonnx.graph import with_outputs

    model = load_model(digits_files[0])
    head = find_head(model)
    mask = np.ones(head.width, np.float32)
    mask[::3] = 0
    hardened = apply_mask(model, head.feature, mask)
    x = digits.x[:64]
    (features,) = make_session(with_outputs(model, [head.feature])).run([head.feature], {"input": x})
    expected = head.apply(features, mask)
    np.testing.assert_allclose(_run(hardened, x), expected, rtol=1e-4, atol=1e-4)
    # and the mask really changes something
    assert np.abs(_run(hardened, x) - _run(model, x)).max() > 1e-3


def test_fidelity_of_model_level_fields(digits_files):
    model = load_model(digits_files[0])
    model.ir_version = 7
    model.producer_name, model.producer_version = "someone", "1.2"
    model.doc_string = "a doc"
    onnx.helper.set_model_props(model, {"author": "me"})
    head = find_head(model)
    out = apply_mask(model, head.feature, np.ones(head.width), metadata={"cloakonnx.masked": "0"})
    assert out.ir_version == 7
    assert out.producer_name == "someone" and out.producer_version == "1.2"
    assert out.doc_string == "a doc"
    assert list(out.opset_import) == list(model.opset_import)
    props = {p.key: p.value for p in out.metadata_props}
    assert props["author"] == "me" and props["cloakonnx.masked"] == "0"
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    onnx.checker.check_model(out)


def test_reharden_updates_the_one_mask(digits_files, digits):
    model = load_model(digits_files[0])
    head = find_head(model)
    m1 = np.ones(head.width, np.float32)
    m1[:4] = 0
    once = apply_mask(model, head.feature, m1)
    h1 = find_head(once)
    assert h1.feature == head.feature and h1.mask is not None and (h1.mask == 0).sum() == 4
    # an all-ones update of an already hardened model is idempotent
    again = apply_mask(once, h1.feature, h1.mask)
    assert again.SerializeToString() == once.SerializeToString()
    m2 = h1.mask.copy()
    m2[10:12] = 0
    twice = apply_mask(once, h1.feature, m2)
    assert sum(n.op_type == "Mul" for n in twice.graph.node) == sum(n.op_type == "Mul" for n in once.graph.node)
    assert (find_head(twice).mask == 0).sum() == 6


def test_mask_must_be_binary(digits_files):
    model = load_model(digits_files[0])
    head = find_head(model)
    with pytest.raises(CloakError, match=r"values in \[0, 1\]"):
        apply_mask(model, head.feature, np.full(head.width, 1.5))


def test_fp16_feature_gets_fp16_mask():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float16), "W")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    out = apply_mask(model, "f", np.array([1, 0, 1, 1]))
    const = [t for t in out.graph.initializer if t.name.startswith("cloakonnx_mask")]
    assert const and const[0].data_type == TensorProto.FLOAT16
    x = np.random.default_rng(1).random((2, 4)).astype(np.float16)
    y = make_session(out).run(None, {"x": x})[0]
    assert y.dtype == np.float16


def test_external_data_model_is_written_with_external_data(digits_files, tmp_path):
    """A model saved with external data is hardened into a model with its own .data file next to it."""
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.harden import HardenConfig, harden

    src = tmp_path / "src"
    src.mkdir()
    model = onnx.load(str(digits_files[0]))
    onnx.save_model(model, str(src / "m.onnx"), save_as_external_data=True, location="m.weights", size_threshold=0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    harden(src / "m.onnx", digits_files[1], HardenConfig(score="absdiff", output=out_dir / "h.onnx", adaptive=False,
                                                         attack=AttackConfig(name="fgsm", eps=0.1)))
    assert sorted(p.name for p in out_dir.iterdir()) == ["h.onnx", "h.onnx.data"]
    written = onnx.load(str(out_dir / "h.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    loaded = onnx.load(str(out_dir / "h.onnx"))
    x = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(loaded, x), make_session(str(out_dir / "h.onnx")).run(None, {"input": x})[0])
    assert find_head(loaded).mask is not None


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is None, reason="TensorRT is not installed")
def test_tensorrt_parser_accepts_both_forms(digits_files, tmp_path):
    import tensorrt as trt

    from cloakonnx.graph import fold_mask

    model = load_model(digits_files[0])
    head = find_head(model)
    mask = np.ones(head.width, np.float32)
    mask[:5] = 0
    for form in (apply_mask(model, head.feature, mask), fold_mask(model, mask)):
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse(form.SerializeToString()), [parser.get_error(i) for i in range(parser.num_errors)]


def test_a_written_model_is_readable_as_any_new_file_is(digits_files, tmp_path):
    """Not 0600 (what the temporary file starts as): a serving container running as another user
    must be able to read the hardened model."""
    import os
    import stat

    from cloakonnx.graph import load_model, save_model

    umask = os.umask(0o022)
    try:
        save_model(load_model(digits_files[0]), tmp_path / "out.onnx")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.onnx").stat().st_mode) == 0o644

