"""--input-shapes (Polygraphy's syntax) on check, inspect, harden and evaluate, and one reading of
dynamic dims: -1, 0, a dim_param and an absent dim all mean dynamic."""
import json
import warnings

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cloakonnx.cli import main

DYNAMIC_SPELLINGS = [-1, 0, "height", None]  # None: the dim is present but has no value


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def conv_classifier(height, width=None, batch="N") -> onnx.ModelProto:
    """x [batch, 3, height, width] -> Conv 3x3 -> Relu -> global pool -> Gemm -> 5 logits."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(5, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, height, height if width is None else width])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])
    model = helper.make_model(helper.make_graph(nodes, "conv", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model, tmp_path, name="model.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def torch_exported(tmp_path, channels=1):
    """A small CNN exported by torch.onnx with a dynamic batch, height and width (dim_params)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    path = tmp_path / "dynamic_hw.onnx"
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, channels, 8, 8),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


@pytest.fixture
def digits_npz(digits, tmp_path):
    path = tmp_path / "digits.npz"
    np.savez(path, x=digits.x[:80], y=digits.y[:80])
    return path


# --- one reading of dynamic dims -------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", DYNAMIC_SPELLINGS)
def test_fixed_size_reads_minus_one_zero_a_name_and_an_absent_dim_alike(spelling):
    from cloakonnx.graph import fixed_size, model_inputs

    model = conv_classifier(spelling, batch=spelling)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [fixed_size(d) for d in dims] == [None, 3, None, None]
    shape = model_inputs(model)[0].shape
    shown = spelling if isinstance(spelling, str) else None  # a name is kept for display, numbers are not
    assert shape == [shown, 3, shown, shown] and [fixed_size(d) for d in shape] == [None, 3, None, None]
    assert [fixed_size(v) for v in (7, -1, 0, "h", None, True)] == [7, None, None, None, None, None]


@pytest.mark.parametrize("spelling", DYNAMIC_SPELLINGS)
def test_check_needs_input_shapes_for_a_dynamic_height_and_width_and_passes_with_them(spelling, tmp_path):
    path = save(conv_classifier(spelling), tmp_path)
    failed = run("check", path, code=1)
    assert "--input-shapes x:[2,3," in failed.stderr and "dynamic dimension 2" in failed.stderr
    report = json.loads(run("check", path, "--input-shapes", "x:[2,3,12,10]", "--json").stdout)
    assert report["ok"] and report["input_shapes"] == {"x": [2, 3, 12, 10]} and report["batch"] == 2
    assert "inputs x [2, 3, 12, 10]" in run("check", path, "--input-shapes", "x:[2,3,12,10]").stdout


def test_check_runs_a_torch_export_with_dynamic_height_and_width(tmp_path):
    path = torch_exported(tmp_path)
    assert "--input-shapes input:[2,1,height,width]" in run("check", path, code=1).stderr
    assert json.loads(run("check", path, "--input-shapes", "input:[3,1,16,16]", "--json").stdout)["ok"]


def test_several_inputs_after_one_option_or_with_it_repeated(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "K"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "K"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])
    model = helper.make_model(helper.make_graph([helper.make_node("Mul", ["a", "b"], ["y"])], "mul", [a, b], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = save(model, tmp_path)
    for args in (["--input-shapes", "a:[2,5]", "b:[2,5]"],  # Polygraphy's way: several words after one option
                 ["--input-shapes", "a:[2,5]", "--input-shapes", "b:[2,5]"], ["--input-shapes=a:[2,5] b:[2,5]"]):
        report = json.loads(run("check", *args, path, "--json").stdout)
        assert report["ok"] and report["input_shapes"] == {"a": [2, 5], "b": [2, 5]}


# --- clean errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "inspect"])
@pytest.mark.parametrize("value, message", [
    ("nope:[2,3,8,8]", "'nope', which is not a model input; inputs: x"),
    ("x=[2,3,8,8]", "takes NAME:[D0,D1,...] for each input"),
    ("x:[2,3,8,eight]", "takes NAME:[D0,D1,...] for each input"),
    ("x:[2,4,8,8]", "gives 'x' dim 1 = 4, but the model fixes dim 1 to 3"),
    ("x:[2,3,8]", "gives 'x' 3 dims, [2,3,8], but the model declares 4"),
    ("x:[2,3,-1,8]", "every dim must be a positive integer"),
])
def test_bad_input_shapes_are_one_clear_error(command, value, message, tmp_path):
    path = save(conv_classifier("H"), tmp_path)
    result = run(command, path, "--input-shapes", value, code=1)
    assert message in result.stderr and result.stderr.startswith("cloakonnx: error: --input-shapes")


def test_a_fixed_batch_is_a_fixed_dim_too(tmp_path):
    path = save(conv_classifier(8, batch=1), tmp_path)
    assert "fixes dim 0 to 1" in run("check", path, "--input-shapes", "x:[2,3,8,8]", code=1).stderr
    assert json.loads(run("check", path, "--input-shapes", "x:[1,3,8,8]", "--json").stdout)["batch"] == 1


def test_config_validates_input_shapes():
    from cloakonnx.config import HardenConfig
    from cloakonnx.errors import CloakError

    HardenConfig(input_shapes={"x": (1, 3, 8, 8)}).validate()
    with pytest.raises(CloakError, match="positive integer"):
        HardenConfig(input_shapes={"x": (1, 3, 0, 8)}).validate()


# --- inspect ----------------------------------------------------------------------------------------------


def test_inspect_shows_the_given_shapes_next_to_the_declared_ones(tmp_path):
    path = save(conv_classifier("H", "W"), tmp_path)
    info = json.loads(run("inspect", path, "--input-shapes", "x:[1,3,32,24]", "--json").stdout)
    assert info["input_shapes"] == {"x": [1, 3, 32, 24]}
    assert info["inputs"][0]["shape"] == ["N", 3, "H", "W"]  # the declared shape stays as it is
    assert json.loads(run("inspect", path, "--json").stdout)["input_shapes"] == {}
    out = run("inspect", path, "--input-shapes", "x:[1,3,32,24]").stdout
    assert "input  x: float32 [N, 3, H, W], run as [1, 3, 32, 24] (--input-shapes)" in out


# --- harden and evaluate: the data decides, --input-shapes must agree ---------------------------------------

FAST = ["--attack", "fgsm", "--eps", "0.1", "--steps", "1"]


@pytest.mark.parametrize("command", ["harden", "evaluate"])
def test_input_shapes_that_disagree_with_the_data_fail_before_any_work(command, digits_npz, tmp_path):
    model = torch_exported(tmp_path)
    args = ["-o", tmp_path / "hardened.onnx", "--no-adaptive"] if command == "harden" else []
    result = run("-q", command, model, "--data", digits_npz, "--input-shapes", "input:[4,1,16,16]", *FAST, *args,
                 code=1)
    assert "gives 'input' as [4,1,16,16], but the data's samples are [1,8,8]" in result.stderr
    assert "every dim but the batch" in result.stderr
    assert set(tmp_path.iterdir()) == {digits_npz, model}  # nothing written


def test_harden_takes_input_shapes_that_agree_with_the_data_but_the_batch(digits_npz, tmp_path):
    model = torch_exported(tmp_path)
    out = tmp_path / "hardened.onnx"
    report = json.loads(run("-q", "harden", model, "--data", digits_npz, "--input-shapes", "input:[1,1,8,8]", "-o",
                            out, *FAST, "--score", "absdiff", "--no-adaptive", "--json").stdout)
    assert out.exists() and report["samples"]["calibration"] + report["samples"]["validation"] == 80


@pytest.mark.parametrize("spelling", DYNAMIC_SPELLINGS)
def test_onnxruntime_runs_every_dynamic_spelling(spelling):
    """onnxruntime itself reads a 0 dim as a fixed size 0: the Runner's session must not."""
    from cloakonnx.data import Preprocess
    from cloakonnx.runner import Runner

    runner = Runner(conv_classifier(spelling, batch=spelling), "logits", [], Preprocess())
    assert runner.fixed_batch is None
    assert runner.predict(np.zeros((3, 3, 12, 10), np.float32)).shape == (3,)


def test_a_given_batch_does_not_fix_the_models_batch(tmp_path):
    from cloakonnx.data import Preprocess
    from cloakonnx.runner import Runner

    model = onnx.load(str(torch_exported(tmp_path)))
    runner = Runner(model, "logits", [], Preprocess(), input_shapes={"input": (1, 1, 8, 8)})
    assert runner.fixed_batch is None and runner.input.shape == [1, 1, 8, 8]
