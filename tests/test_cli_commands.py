"""sweep, harden and evaluate from the command line: JSON, plots, --eps parsing, the standard preset,
and the option groups the commands share."""
import json

import click
import onnx
import pytest
from click.testing import CliRunner

from cloakonnx.cli import main
from cloakonnx.graph import cloak_metadata

FAST = ["--attack", "fgsm", "--eps", "0.1", "--seed", "0"]
SCORES = ("absdiff", "normalised", "margin")


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# --- sweep ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(digits_files, tmp_path_factory):
    model, data = digits_files
    plot = tmp_path_factory.mktemp("sweep") / "sweep.png"
    # sweep's default: the three statistical scores (--scores adds the slow learned one)
    choose = []
    result = run("-q", "sweep", model, "--data", data, *FAST, *choose, "--json", "--plot", plot)
    return json.loads(result.stdout), plot


def test_sweep_json_has_a_curve_per_score_starting_at_no_mask(swept):
    report, _ = swept
    assert set(report["curves"]) == set(SCORES) == set(report["scores"])
    for score in SCORES:
        curve = report["curves"][score]
        assert curve[0]["masked"] == 0 and curve[0]["added"] == 0 and curve[0]["fraction"] == 0.0
        assert curve[0]["clean_accuracy"] == report["clean_accuracy"]
        assert curve[0]["adversarial_accuracy"] == report["adversarial_accuracy"]
        assert [p["masked"] for p in curve] == sorted({p["masked"] for p in curve})  # increasing, no repeats
        assert curve[-1]["masked"] == 32  # the largest candidate, half of 64 features
        assert len(report["scores"][score]) == 64
    assert report["adversarial_accuracy"] < report["clean_accuracy"]
    assert report["attack"]["name"] == "fgsm" and report["features"] == 64
    assert report["scores"]["absdiff"] != report["scores"]["margin"]


def test_sweep_plot_writes_a_png(swept):
    _, plot = swept
    assert _is_png(plot)


# --- harden ----------------------------------------------------------------------------------------------------


def test_harden_with_the_margin_score(digits_files, tmp_path):
    model, data = digits_files
    out = tmp_path / "m.onnx"
    report = json.loads(run("-q", "harden", model, "--data", data, "-o", out, *FAST, "--fraction", "0.05",
                            "--no-adaptive", "--score", "margin", "--json").stdout)
    assert report["score"] == "margin" and report["masked"] == 3
    meta = cloak_metadata(onnx.load(str(out)))
    assert meta["cloakonnx.score"] == "margin" and json.loads(meta["cloakonnx.history"])[0]["score"] == "margin"


def test_harden_plot_writes_a_png(digits_files, tmp_path):
    model, data = digits_files
    result = run("-q", "harden", model, "--data", data, "-o", tmp_path / "m.onnx", *FAST, "--no-adaptive",
                 "--plot", tmp_path / "curve.png")
    assert _is_png(tmp_path / "curve.png")
    assert "accuracy on validation" in result.stdout  # the table is still printed


def test_harden_eps_as_a_fraction_equals_the_decimal(digits_files, tmp_path):
    model, data = digits_files
    reports = []
    for name, eps in (("frac.onnx", "8/255"), ("dec.onnx", "0.03137254901960784")):
        reports.append(json.loads(run("-q", "harden", model, "--data", data, "-o", tmp_path / name, "--attack",
                                      "fgsm", "--eps", eps, "--score", "absdiff", "--no-adaptive", "--json").stdout))
    assert reports[0]["attack"]["eps"] == reports[1]["attack"]["eps"] == 8 / 255
    assert reports[0]["attack"] == reports[1]["attack"]
    assert (tmp_path / "frac.onnx").read_bytes() == (tmp_path / "dec.onnx").read_bytes()


@pytest.mark.parametrize("eps, message", [
    ("0.1,0.2", "cloakonnx: error: --eps takes one value here, got 2\n"),
    ("8/0", "cloakonnx: error: --eps takes numbers or fractions such as 8/255, got '8/0'\n"),
    ("a/255", "cloakonnx: error: --eps takes numbers or fractions such as 8/255, got 'a/255'\n"),
])
def test_harden_bad_eps_is_one_clear_line(digits_files, tmp_path, eps, message):
    model, data = digits_files
    result = run("harden", model, "--data", data, "-o", tmp_path / "m.onnx", "--eps", eps, code=1)
    assert result.output == message
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()


# --- evaluate --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # APGD-CE/DLR 100 steps and Square 5000 queries: 16 s on a quiet 2-core machine, 60 s when loaded
def test_evaluate_standard_preset(digits_files):
    model, data = digits_files
    report = json.loads(run("-q", "evaluate", model, "--data", data, "--preset", "standard", "--max-samples", "8",
                            "--eps", "0.1", "--json").stdout)
    assert report["samples"] == 8 and report["eps"] == [0.1]
    assert [(r["attack"], r["threat"]) for r in report["results"]] == [
        ("apgd-ce", "adaptive"), ("apgd-t", "adaptive"), ("fab-t", "adaptive"), ("square", "gradient-free")]
    assert report["attacks"]["apgd-ce"]["steps"] == report["attacks"]["apgd-t"]["steps"] == 100
    assert report["attacks"]["fab-t"]["steps"] == 100 and report["cumulative"] is True
    assert report["attacks"]["square"]["queries"] == 5000
    robust = report["robust_accuracy"]["0.1"]
    assert robust <= report["clean_accuracy"]
    assert robust <= min(r["accuracy"] for r in report["results"])  # the worst case per sample
    assert robust < 1.0  # eps 0.1 breaks some digits


# --- the shared option groups -------------------------------------------------------------------------------------


COMMANDS = ("harden", "sweep", "evaluate", "inspect", "check", "demo")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command):
    options = [p for p in main.commands[command].params if isinstance(p, click.Option)]
    assert options and [o.opts for o in options if not o.help] == []


def test_harden_sweep_and_evaluate_share_the_data_attack_and_runtime_groups():
    def flags(command):
        return {o for p in main.commands[command].params for o in p.opts}

    shared = {"--data", "--data-loader-script", "--bounds", "--mean", "--std", "--size", "--resize", "--crop",
              "--data-workers", "--input", "--input-shapes", "--logits", "--seed", "--eps", "--norm", "--steps",
              "--step-size", "--restarts", "--no-random-start", "--queries", "--batch-size", "--device",
              "--providers", "--ray", "--ray-workers", "--json", "--report", "--plot"}
    assert shared <= flags("harden") & flags("sweep") & flags("evaluate")
    assert flags("harden") - {"-o", "--output", "--rounds", "--no-adaptive", "--fold"} == flags("sweep") - {"--scores"}


def test_an_option_is_one_declaration_that_fills_its_field():
    """The machinery under the groups: click's name for the value, ``to`` (nested with a dot), ``convert``."""
    from cloakonnx.cli_args import ArgGroup, Command, Option, parse_pair
    from cloakonnx.config import LearnConfig, MaskConfig
    from cloakonnx.data import Preprocess

    class Extra(ArgGroup):
        options = (Option("--most", "val_max", type=int, default=7, to="val_max"),
                   Option("--learn-rate", type=float, default=0.5, to="learn.lr"),
                   Option("--box", default="0,1", to="preprocess.bounds", convert=parse_pair))

    assert [o.dest for o in Extra.options] == ["val_max", "learn_rate", "box"]
    command, built = Command(Extra()), []

    @click.command()
    @command
    def cmd(**kw):
        built.append(command.parse(kw).config(MaskConfig))

    assert CliRunner().invoke(cmd, ["--learn-rate", "0.25", "--box", "-1,1"]).exit_code == 0
    assert built == [MaskConfig(val_max=7, learn=LearnConfig(lr=0.25), preprocess=Preprocess((-1.0, 1.0)))]
    with pytest.raises(ValueError, match="declared twice"):
        Command(Extra(), Extra())


def test_size_takes_one_value_for_a_square(tmp_path):
    from cloakonnx.cli_args import parse_pair
    from cloakonnx.errors import CloakError

    assert parse_pair("16", "--size", int, square=True) == (16, 16)
    assert parse_pair("16,24", "--size", int, square=True) == (16, 24)
    with pytest.raises(CloakError, match="two comma-separated values"):
        parse_pair("0.5", "--bounds")  # a box needs both ends


def test_inspect_reads_a_batch_of_minus_one_as_dynamic(digits_files, tmp_path):
    """Paddle writes a dynamic batch as dim_value -1; inspect and the rest treat it as dynamic."""
    model = onnx.load(str(digits_files[0]))
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = -1
    path = tmp_path / "paddle_batch.onnx"
    onnx.save(model, str(path))
    info = json.loads(run("inspect", path, "--json").stdout)
    assert info["dynamic_batch"] is True and info["inputs"][0]["shape"][0] is None
    assert "batch dimension: dynamic" in run("inspect", path).stdout


def test_check_says_not_computed_when_ops_are_unsupported(digits_files, tmp_path):
    from .conftest import with_unsupported_op

    path = tmp_path / "unsupported.onnx"
    onnx.save(with_unsupported_op(digits_files[0]), str(path))
    out = run("check", path, code=1).stdout
    assert "input gradients: not computed" in out and "NOT finite" not in out and "ZERO" not in out


def test_evaluate_can_skip_the_large_eps_check(digits_files):
    model, data = digits_files
    base = ("-q", "evaluate", model, "--data", data, "--attack", "fgsm", "--max-samples", "16", "--eps", "0.1", "--json")
    names = [c["name"] for c in json.loads(run(*base, "--no-large-eps-check").stdout)["checks"]]
    assert names and not any("large eps" in n for n in names)
    assert any("large eps" in c["name"] for c in json.loads(run(*base).stdout)["checks"])
