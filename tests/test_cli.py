"""The command line: the config each command line gives (no model runs), then end to end on a real
digits model: results, JSON, errors, files left untouched."""
import importlib
import inspect
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cloakonnx.attacks import AttackConfig
from cloakonnx.cli import main
from cloakonnx.config import EvaluateConfig, HardenConfig, LearnConfig, MaskConfig, RayConfig
from cloakonnx.data import LoaderScript, Preprocess
from cloakonnx.demo import DemoOptions

from .conftest import UNSUPPORTED_OP, sha256, with_unsupported_op

FAST = ["--attack", "fgsm", "--eps", "0.1", "--fraction", "0.05", "--seed", "0"]


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


# --- what each command line asks of the library: recorded, not run ------------------------------------------

LIBRARY = (("cloakonnx.harden", "harden"), ("cloakonnx.sweep", "sweep"), ("cloakonnx.evaluate", "evaluate"),
           ("cloakonnx.graph", "inspect_model"), ("cloakonnx.check", "check_model"), ("cloakonnx.demo", "run_demo"))


class Called(Exception):
    """Raised by a recorded library function, so that nothing runs after it."""


@pytest.fixture
def calls(monkeypatch):
    """The library functions the commands call, replaced by recorders of (name, arguments by parameter)."""
    seen = []
    for module_name, name in LIBRARY:
        module = importlib.import_module(module_name)
        signature = inspect.signature(getattr(module, name))

        def record(*args, _name=name, _signature=signature, **kwargs):
            seen.append((_name, dict(_signature.bind(*args, **kwargs).arguments)))
            raise Called

        monkeypatch.setattr(module, name, record)
    monkeypatch.setattr(importlib.import_module("cloakonnx.graph"), "load_model", lambda path: f"loaded {path}")
    return seen


SCORES3 = ("absdiff", "normalised", "margin")
LOADED = LoaderScript("load.py:make")
# command line -> (library function, its arguments); the model is m.onnx and the data d.npz unless given
COMMAND_LINES = {
    # the library's defaults are the command line's
    "harden m.onnx --data d.npz": ("harden", dict(config=HardenConfig())),
    "sweep m.onnx --data d.npz": ("sweep", dict(config=MaskConfig(), scores=SCORES3)),
    "evaluate m.onnx --data d.npz": ("evaluate", dict(config=EvaluateConfig())),
    "harden m.onnx --data d.npz --score learned --feature-tensor auto --mask-values soft --learn-steps 50 "
    "--learn-batch 64 --learn-lr 0.05 --learn-attack fgsm --learn-attack-steps 3 --learn-sparsity 0.01":
        ("harden", dict(config=HardenConfig(score="learned", feature_tensors=("auto",), mask_values="soft",
                                            learn=LearnConfig(steps=50, batch_size=64, lr=0.05, inner_attack="fgsm",
                                                              inner_steps=3, sparsity=0.01)))),
    "harden m.onnx --data d.npz --method finetune --learn-stop-loss 0 --learn-stop-every 10":
        ("harden", dict(config=HardenConfig(method="finetune", learn=LearnConfig(stop_loss=0.0, stop_every=10)))),
    "harden m.onnx --data d.npz --max-clean-drop 1.5 --budget-confidence 0 --val-split 0.3 --val-max 500 "
    "--fraction 0.1": ("harden", dict(config=HardenConfig(max_clean_drop=1.5, budget_confidence=0.0, val_split=0.3,
                                                          val_max=500, fraction=0.1))),
    "harden m.onnx --data d.npz --ray --ray-workers 3": ("harden", dict(config=HardenConfig(ray=RayConfig(workers=3)))),
    "harden m.onnx --data d.npz --ray auto": ("harden", dict(config=HardenConfig(ray=RayConfig(address="auto")))),
    "harden m.onnx --data d.npz --ray=ray://h:10001":
        ("harden", dict(config=HardenConfig(ray=RayConfig(address="ray://h:10001")))),
    "harden m.onnx --data d.npz --input-shapes a:[1,3,8,8] b:[1,5] --input x --logits out":
        ("harden", dict(config=HardenConfig(input_shapes={"a": (1, 3, 8, 8), "b": (1, 5)}, input_name="x",
                                            logits="out"))),
    "harden m.onnx --data d.npz --input-shapes=a:[1,3,8,8] --input-shapes b:[] --seed 5":
        ("harden", dict(config=HardenConfig(input_shapes={"a": (1, 3, 8, 8), "b": ()}, seed=5,
                                            attack=AttackConfig(seed=5)))),
    "harden m.onnx --data d.npz --mean 0.5,0.4,0.3 --std 0.2,0.2,0.1 --bounds -1,1 --eps 0.1 --norm l2":
        ("harden", dict(config=HardenConfig(preprocess=Preprocess((-1.0, 1.0), [0.5, 0.4, 0.3], [0.2, 0.2, 0.1]),
                                            attack=AttackConfig(eps=0.1, norm="l2")))),
    "harden m.onnx --data imgs --size 16 --data-workers 2":
        ("harden", dict(data="imgs", config=HardenConfig(image_size=(16, 16), data_workers=2))),
    "harden m.onnx --data imgs --size 16,24 --resize 256 --crop 224":
        ("harden", dict(data="imgs", config=HardenConfig(image_size=(16, 24), resize=256, crop=224))),
    "harden m.onnx --data-loader-script load.py:make --seed 3 --device cpu --providers CPUExecutionProvider,,X "
    "-o out.onnx --rounds 2 --no-adaptive --plot p.png --fold --attack square --queries 50 --steps 3 "
    "--step-size 0.01 --restarts 2 --no-random-start --batch-size 16 --json --report r.json":
        ("harden", dict(data=LOADED, config=HardenConfig(
            seed=3, device="cpu", providers=("CPUExecutionProvider", "X"), output=Path("out.onnx"), rounds=2,
            adaptive=False, curve=True, fold=True, attack=AttackConfig(
                name="square", queries=50, steps=3, step_size=0.01, restarts=2, random_start=False, batch_size=16,
                seed=3)))),
    "sweep m.onnx --data d.npz --scores absdiff,learned --feature-tensor t1 --attack fgsm --eps 0.2 "
    "--max-clean-drop 2 --ray --plot s.png":
        ("sweep", dict(scores=("absdiff", "learned"), config=MaskConfig(
            feature_tensors=("t1",), attack=AttackConfig(name="fgsm", eps=0.2), max_clean_drop=2.0, ray=RayConfig()))),
    "sweep m.onnx --data-loader-script load.py --scores ' margin , normalised,' --learn-steps 7":
        ("sweep", dict(data=LoaderScript("load.py"), scores=("margin", "normalised"),
                       config=MaskConfig(learn=LearnConfig(steps=7)))),
    "evaluate m.onnx --data d.npz --preset standard --reference ref.onnx --eps 0.03,8/255 --max-samples 10 "
    "--no-large-eps-check":
        ("evaluate", dict(config=EvaluateConfig(preset="standard", reference=Path("ref.onnx"), eps=(0.03, 8 / 255),
                                                attack=AttackConfig(eps=0.03, steps=20), max_samples=10,
                                                sanity=False))),
    "evaluate m.onnx --data d.npz --attack fgsm,pgd,,square --eps 0.1 --steps 5 --ray --ray-workers 2 "
    "--input-shapes input:[2,1,8,8] --batch-size 4 --plot e.png --norm l2 --mean 0.1 --std 0.3":
        ("evaluate", dict(config=EvaluateConfig(
            attacks=("fgsm", "pgd", "square"), eps=(0.1,), attack=AttackConfig(eps=0.1, steps=5, batch_size=4,
                                                                              norm="l2"),
            ray=RayConfig(workers=2), input_shapes={"input": (2, 1, 8, 8)}, preprocess=Preprocess(mean=[0.1],
                                                                                                   std=[0.3])))),
    "evaluate m.onnx --data imgs --preset plus --size 8 --resize 10 --crop 8 --data-workers 1 --seed 9 "
    "--device cuda:1 --providers A,B --queries 7 --restarts 3 --no-random-start --step-size 0.5":
        ("evaluate", dict(data="imgs", config=EvaluateConfig(
            preset="plus", image_size=(8, 8), resize=10, crop=8, data_workers=1, seed=9, device="cuda:1",
            providers=("A", "B"), attack=AttackConfig(steps=20, queries=7, restarts=3, random_start=False,
                                                      step_size=0.5, seed=9)))),
    "inspect m.onnx --logits out --input-shapes a:[1,2] b:[3]":
        ("inspect_model", dict(path="m.onnx", logits="out", input_shapes={"a": (1, 2), "b": (3,)})),
    "inspect m.onnx": ("inspect_model", dict(path="m.onnx", logits=None, input_shapes={})),
    "check m.onnx --batch 3 --bounds -1,1 --input-shapes a:[1,2]":
        ("check_model", dict(model="loaded m.onnx", batch=3, bounds=(-1.0, 1.0), input_shapes={"a": (1, 2)})),
    "check m.onnx": ("check_model", dict(model="loaded m.onnx", batch=2, bounds=(0.0, 1.0), input_shapes={})),
    "demo --out dd --epochs 2 --seed 1": ("run_demo", dict(options=DemoOptions(out=Path("dd"), epochs=2, seed=1))),
}


@pytest.mark.parametrize("argv", COMMAND_LINES)
def test_a_command_line_gives_the_config_of_the_api(calls, argv):
    """Each command calls one library function, with the config the Python API spells the same way."""
    function, arguments = COMMAND_LINES[argv]
    if function in ("harden", "sweep", "evaluate"):
        arguments = dict(model_path="m.onnx", data="d.npz") | arguments
    if function == "check_model":  # the CLI resolves check's threads (--threads, $CLOAKONNX_THREADS, torch's)
        from cloakonnx.runtime import resolve_threads

        arguments = arguments | dict(threads=resolve_threads(None))
    result = CliRunner().invoke(main, shlex.split(argv))
    assert isinstance(result.exception, Called), (result.output, result.exception)
    assert calls == [(function, arguments)]


@pytest.mark.parametrize("argv, code, message", [
    ("harden m.onnx --data d.npz --ray-workers 2", 2, "Error: --ray-workers needs --ray"),
    ("evaluate m.onnx", 2,
     "Error: give the data with --data PATH or --data-loader-script FILE.py[:FUNC] (one of them)"),
    ("sweep m.onnx --data d.npz --data-loader-script l.py", 2, "Error: give the data with --data PATH or"),
    ("harden m.onnx --data d.npz --crop 0", 2, "Error: Invalid value for '--crop': 0 is not in the range x>=1."),
    ("sweep m.onnx --data d.npz --eps 0.1,0.2", 1, "cloakonnx: error: --eps takes one value here, got 2"),
    ("evaluate m.onnx --data d.npz --eps 1/0", 1, "cloakonnx: error: --eps takes numbers or fractions such as 8/255"),
    ("harden m.onnx --data d.npz --mean 0.5", 1, "cloakonnx: error: --mean and --std go together"),
    ("harden m.onnx --data d.npz --mean a,b --std 1,1", 1,
     "cloakonnx: error: --mean must be comma-separated numbers, got 'a,b'"),
    ("harden m.onnx --data d.npz --bounds 1,0", 1, "cloakonnx: error: --bounds must be LOW,HIGH with LOW < HIGH"),
    ("evaluate m.onnx --data d.npz --size 1,2,3", 1,
     "cloakonnx: error: --size takes two comma-separated values (or one, for a square), got '1,2,3'"),
    ("harden m.onnx --data d.npz --input-shapes a:[1] a:[2]", 1, "cloakonnx: error: --input-shapes gives 'a' twice"),
    ("inspect m.onnx --input-shapes a:[x]", 1, "cloakonnx: error: --input-shapes takes NAME:[D0,D1,...] for each"),
    ("check m.onnx --bounds 0", 1, "cloakonnx: error: --bounds takes two comma-separated values, got '0'"),
])
def test_a_bad_command_line_is_refused_before_the_library_runs(calls, argv, code, message):
    result = CliRunner().invoke(main, shlex.split(argv))
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output
    assert calls == []


@pytest.fixture(scope="module")
def hardened(digits_files, tmp_path_factory):
    """One harden run shared by several tests (PGD, adaptive on)."""
    model, data = digits_files
    out = tmp_path_factory.mktemp("hardened") / "model.cloaked.onnx"
    before = sha256(model), sha256(data)
    result = run("-q", "harden", model, "--data", data, "-o", out, "--attack", "pgd", "--steps", "3", "--eps", "0.1",
                 "--fraction", "0.05", "--json")
    return json.loads(result.stdout), out, before


@pytest.mark.parametrize("argv", [["--help"], ["harden", "--help"], ["evaluate", "--help"]])
def test_help_imports_no_heavy_library(argv):
    """The option groups import only click: --help never loads torch, onnxruntime or onnx."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cloakonnx", *argv],
                         capture_output=True, text=True, check=True)
    if argv == ["--help"]:
        assert all(cmd in out.stdout for cmd in ("demo", "harden", "sweep", "evaluate", "inspect", "check"))
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    heavy = imported & {"torch", "onnxruntime", "onnx", "numpy"}
    assert not heavy, heavy


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
