"""The command line end to end on a real digits model: results, JSON, errors, files left untouched."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cloakonnx.cli import main

from .conftest import UNSUPPORTED_OP, sha256, with_unsupported_op

FAST = ["--attack", "fgsm", "--eps", "0.1", "--fraction", "0.05", "--seed", "0"]


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def hardened(digits_files, tmp_path_factory):
    """One harden run shared by several tests (PGD, adaptive on)."""
    model, data = digits_files
    out = tmp_path_factory.mktemp("hardened") / "model.cloaked.onnx"
    before = sha256(model), sha256(data)
    result = run("-q", "harden", model, "--data", data, "-o", out, "--attack", "pgd", "--steps", "3", "--eps", "0.1",
                 "--fraction", "0.05", "--json")
    return json.loads(result.stdout), out, before


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cloakonnx.cli", "--help"],
                         capture_output=True, text=True, check=True)
    for cmd in ("demo", "harden", "inspect", "check"):
        assert cmd in out.stdout
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    assert "onnxruntime" not in out.stderr


def test_inspect_json(digits_files):
    info = json.loads(run("inspect", digits_files[0], "--json").stdout)
    assert info["head"]["features"] == 64 and info["head"]["kind"] == "Gemm"
    text = run("inspect", digits_files[0]).output
    assert "feature tensor" in text and "cloak mask: none" in text


def test_harden_report_and_model(hardened, digits_files):
    report, out, before = hardened
    for key in ("model", "output", "features", "masked", "fraction", "attack", "clean_accuracy",
                "adversarial_accuracy", "samples", "seconds", "providers"):
        assert key in report
    assert report["features"] == 64 and report["masked"] == round(0.05 * 64)
    assert set(report["adversarial_accuracy"]) == {"original", "hardened_transfer", "hardened_adaptive"}
    assert report["samples"]["validation"] == round(0.2 * 719)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["cloakonnx.masked"] == str(report["masked"]) and json.loads(props["cloakonnx.attack"])["name"] == "pgd"
    # the inputs were not modified
    assert (sha256(digits_files[0]), sha256(digits_files[1])) == before
    # inspect shows the mask
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["head"]["mask"]["masked"] == report["masked"]


def test_report_agrees_with_independent_evaluation(hardened, digits_files):
    """Recompute the clean accuracies with plain onnxruntime on the same held-out split."""
    import onnxruntime as ort

    from cloakonnx.data import load_npz, split

    report, out, _ = hardened
    _, val = split(load_npz(digits_files[1]), 0.2, seed=0)
    for path, key in ((digits_files[0], "original"), (out, "hardened")):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        acc = (sess.run(None, {"input": np.asarray(val.x)})[0].argmax(1) == val.y).mean()
        assert acc == pytest.approx(report["clean_accuracy"][key], abs=1e-9)


def test_reharden_unions_masks_and_keeps_history(hardened, digits_files, tmp_path):
    report, out, _ = hardened
    twice = tmp_path / "twice.onnx"
    r2 = json.loads(run("-q", "harden", out, "--data", digits_files[1], "-o", twice, *FAST, "--json",
                        "--no-adaptive").stdout)
    model = onnx.load(str(twice))
    assert sum(n.name.startswith("cloakonnx_mask") for n in model.graph.node) == 1
    assert r2["masked"] == report["masked"] + r2["newly_masked"] and r2["newly_masked"] == 3
    history = json.loads({p.key: p.value for p in model.metadata_props}["cloakonnx.history"])
    assert len(history) == 2


def test_same_seed_gives_identical_model(digits_files, tmp_path):
    model, data = digits_files
    outs = []
    for name in ("a.onnx", "b.onnx"):
        run("-q", "harden", model, "--data", data, "-o", tmp_path / name, *FAST, "--no-adaptive", "--json")
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]


def test_report_file(digits_files, tmp_path):
    model, data = digits_files
    result = run("-q", "harden", model, "--data", data, "-o", tmp_path / "m.onnx", *FAST, "--no-adaptive",
                 "--report", tmp_path / "r.json")
    assert "accuracy on validation" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["adversarial_accuracy"]["hardened_adaptive"] is None
    assert report["seed"] == 0 and report["versions"]["cloakonnx"] and len(report["inputs_sha256"]["model"]) == 64


def _error(*args):
    result = run(*args, code=1)
    assert result.output.startswith("cloakonnx: error: "), result.output
    assert "Traceback" not in result.output
    return result.output


def test_errors_are_one_clear_line(digits_files, tmp_path):
    model, data = digits_files
    assert "model file not found" in _error("harden", tmp_path / "nope.onnx", "--data", data)
    assert "is the input model" in _error("harden", model, "--data", data, "-o", model)
    assert "output directory does not exist" in _error("harden", model, "--data", data, "-o", tmp_path / "no" / "m.onnx")
    assert "--fraction" in _error("harden", model, "--data", data, "-o", tmp_path / "m.onnx", "--fraction", "1.5")
    assert "--eps" in _error("harden", model, "--data", data, "-o", tmp_path / "m.onnx", "--eps", "-1")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 1, 4, 4), np.float32), y=np.zeros(10, np.int64))
    msg = _error("harden", model, "--data", bad, "-o", tmp_path / "m.onnx")
    assert "(1, 4, 4)" in msg and "[N, 1, 8, 8]" in msg
    assert "no tensor named" in _error("harden", model, "--data", data, "-o", tmp_path / "m.onnx",
                                       "--feature-tensor", "nope")
    assert not (tmp_path / "m.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_usage_error_exits_2(digits_files):
    result = CliRunner().invoke(main, ["harden", str(digits_files[0])])
    assert result.exit_code == 2 and "--data" in result.output


def test_feature_tensor_on_a_conv_output(digits_files, tmp_path):
    """--feature-tensor masks any float tensor; a 4-D one gets a per-channel [1, C, 1, 1] mask."""
    model_path, data = digits_files
    model = onnx.load(str(model_path))
    conv_out = [n for n in model.graph.node if n.op_type == "Relu"][-1].output[0]
    report = json.loads(run("-q", "harden", model_path, "--data", data, "-o", tmp_path / "c.onnx", *FAST,
                            "--no-adaptive", "--feature-tensor", conv_out, "--json").stdout)
    assert report["feature_tensor"] == conv_out and report["features"] == 64
    hardened = onnx.load(str(tmp_path / "c.onnx"))
    const = [t for t in hardened.graph.initializer if t.name.startswith("cloakonnx_mask")][0]
    assert list(const.dims) == [1, 64, 1, 1]


def test_fold_matches_mul_form_with_the_original_node_count(digits_files, digits, tmp_path):
    import onnxruntime as ort

    model, data = digits_files
    for name, extra in (("mul.onnx", []), ("fold.onnx", ["--fold"])):
        run("-q", "harden", model, "--data", data, "-o", tmp_path / name, *FAST, "--no-adaptive", *extra)
    original, mul, fold = (onnx.load(str(p)) for p in (model, tmp_path / "mul.onnx", tmp_path / "fold.onnx"))
    assert len(fold.graph.node) == len(original.graph.node) == len(mul.graph.node) - 1
    assert [i.name for i in fold.graph.input] == [i.name for i in original.graph.input]
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": digits.x[:100]})[0]
            for p in (tmp_path / "mul.onnx", tmp_path / "fold.onnx")]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    info = json.loads(run("inspect", tmp_path / "fold.onnx", "--json").stdout)
    assert info["head"]["mask"]["form"] == "folded" and info["head"]["mask"]["masked"] == 3


def test_unsupported_op_falls_back_to_square(digits_files, tmp_path):
    """A graph with an op the torch executor lacks (LpPool) is still hardened, gradient-free, and says so."""
    model = with_unsupported_op(digits_files[0])
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, str(path))
    check = CliRunner().invoke(main, ["check", str(path), "--json"])
    assert check.exit_code == 1 and [UNSUPPORTED_OP, 17] in json.loads(check.stdout)["unsupported"]
    report = json.loads(run("-q", "harden", path, "--data", digits_files[1], "-o", tmp_path / "h.onnx", "--eps", "0.1",
                            "--queries", "30", "--fraction", "0.05", "--json").stdout)
    assert report["attack"]["name"] == "square" and UNSUPPORTED_OP in report["attack"]["fallback"]
    assert report["adversarial_accuracy"]["original"] < report["clean_accuracy"]["original"]
    assert report["adversarial_accuracy"]["hardened_adaptive"] is not None
    onnx.checker.check_model(onnx.load(str(tmp_path / "h.onnx")))
