"""harden() through the library API: where it writes, the cloak record it leaves in the model, its
stage timer, the clean-drop budget, the curve, and the options a custom feature tensor rules out."""
import json
import shutil

import numpy as np
import onnx
import pytest

from cloakonnx import __version__
from cloakonnx.attacks import AttackConfig
from cloakonnx.config import HardenConfig
from cloakonnx.curve import DEFAULT_FRACTIONS, counts_for
from cloakonnx.errors import CloakError
from cloakonnx.graph import cloak_metadata, find_mask, folded_mask
from cloakonnx.harden import harden

from .conftest import sha256

FGSM = AttackConfig(name="fgsm", eps=0.1)
FEATURE = "/11/Flatten_output_0"  # the digits CNN's head input
RECORD_KEYS = {"cloakonnx." + k for k in
               ("version", "feature_tensor", "features", "masked", "fraction", "score", "attack", "form", "history")}


def _config(**kw) -> HardenConfig:
    kw.setdefault("attack", FGSM)
    kw.setdefault("fraction", 0.05)
    kw.setdefault("adaptive", False)
    kw.setdefault("score", "absdiff")
    return HardenConfig(**kw)


def _mask_zeros(model: onnx.ModelProto) -> set[int]:
    found = find_mask(model, FEATURE)
    values = found[1] if found is not None else folded_mask(model)
    return set(np.flatnonzero(values == 0).tolist())


@pytest.fixture(scope="module")
def copied(digits_files, tmp_path_factory):
    """The digits model and data copied to a folder of their own, so the default output lands there."""
    folder = tmp_path_factory.mktemp("own")
    model, data = folder / "net.onnx", folder / "net.npz"
    shutil.copy(digits_files[0], model)
    shutil.copy(digits_files[1], data)
    return model, data


@pytest.fixture(scope="module")
def hardened(copied):
    """One harden run (default output path, Mul form) shared by several tests."""
    model, data = copied
    before = sha256(model)
    report = harden(model, data, _config())
    return report, before


# --- the output path ---------------------------------------------------------------------------------------


def test_default_output_is_next_to_the_model(hardened, copied):
    report, before = hardened
    model, _ = copied
    expected = model.parent / "net.cloaked.onnx"
    assert report.output == str(expected) and expected.is_file()
    assert sha256(model) == before  # the input is never written
    assert sorted(p.name for p in model.parent.iterdir()) == ["net.cloaked.onnx", "net.npz", "net.onnx"]


def _refuse_work(monkeypatch):
    """Any attempt to load the model or data fails the test: the error must come first."""
    import cloakonnx.harden as h

    def boom(*a, **k):
        raise AssertionError("harden started work before checking the output path")

    monkeypatch.setattr(h, "prepare", boom)


def test_the_input_as_output_is_refused_before_any_work(copied, monkeypatch, tmp_path):
    model, data = copied
    before = sha256(model)
    _refuse_work(monkeypatch)
    with pytest.raises(CloakError, match="is the input model"):
        harden(model, data, _config(output=model))
    # another spelling of the same path
    with pytest.raises(CloakError, match="is the input model"):
        harden(model, data, _config(output=model.parent / "." / model.name))
    assert sha256(model) == before


def test_a_missing_output_folder_is_refused_before_any_work(copied, monkeypatch, tmp_path):
    model, data = copied
    _refuse_work(monkeypatch)
    with pytest.raises(CloakError, match="output directory does not exist"):
        harden(model, data, _config(output=tmp_path / "nowhere" / "m.onnx"))
    assert not (tmp_path / "nowhere").exists()


# --- the cloak record --------------------------------------------------------------------------------------


def test_the_record_matches_the_report(hardened):
    report, _ = hardened
    model = onnx.load(report.output)
    meta = cloak_metadata(model)
    assert set(meta) == RECORD_KEYS
    assert report.masked == 3 and report.features == 64 and report.mask_added
    assert meta["cloakonnx.version"] == __version__
    assert meta["cloakonnx.feature_tensor"] == report.feature_tensor == FEATURE
    assert meta["cloakonnx.features"] == "64"
    assert meta["cloakonnx.masked"] == str(report.masked)
    assert float(meta["cloakonnx.fraction"]) == report.fraction == 3 / 64
    assert meta["cloakonnx.score"] == report.score == "absdiff"
    assert meta["cloakonnx.form"] == "mul"
    attack = json.loads(meta["cloakonnx.attack"])
    assert attack == {k: v for k, v in report.attack.items() if k != "fallback"}
    assert attack["name"] == "fgsm" and attack["eps"] == 0.1
    history = json.loads(meta["cloakonnx.history"])
    assert isinstance(history, list) and len(history) == 1
    entry = history[0]
    assert (entry["masked"], entry["form"], entry["score"], entry["feature_tensor"]) == (3, "mul", "absdiff", FEATURE)
    assert entry["fraction"] == 3 / 64 and entry["version"] == __version__ and entry["rounds"] == 1
    # the Mul in the graph zeroes exactly the recorded number of features
    assert len(_mask_zeros(model)) == report.masked
    assert sum(n.op_type == "Mul" and n.name.startswith("cloakonnx_mask") for n in model.graph.node) == 1


def test_the_folded_record(digits_files, tmp_path):
    model_path, data = digits_files
    report = harden(model_path, data, _config(output=tmp_path / "f.onnx", fold=True))
    model = onnx.load(str(tmp_path / "f.onnx"))
    meta = cloak_metadata(model)
    assert set(meta) == RECORD_KEYS | {"cloakonnx.folded_mask"}
    assert meta["cloakonnx.form"] == "folded" and meta["cloakonnx.masked"] == str(report.masked) == "3"
    assert json.loads(meta["cloakonnx.history"])[0]["form"] == "folded"
    folded = json.loads(meta["cloakonnx.folded_mask"])
    assert folded["features"] == 64 and len(folded["zero"]) == report.masked
    # no Mul: the head's weight rows for the masked features are zero instead
    assert not any(n.op_type == "Mul" for n in model.graph.node)
    assert len(model.graph.node) == len(onnx.load(str(model_path)).graph.node)
    weight = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "12.weight"))
    zero_columns = np.flatnonzero(np.all(weight == 0, axis=0))  # Gemm weight [classes, features] (transB)
    assert zero_columns.tolist() == sorted(folded["zero"])


def test_rehardening_appends_to_the_history_and_unites_the_masks(hardened, copied, tmp_path):
    first, _ = hardened
    first_model = onnx.load(first.output)
    before = _mask_zeros(first_model)
    out = tmp_path / "twice.onnx"
    second = harden(first.output, copied[1], _config(output=out))
    model = onnx.load(str(out))
    after = _mask_zeros(model)
    assert before < after  # the earlier zeroed features stay zero, and more are added
    assert second.masked == len(after) == first.masked + second.newly_masked and second.newly_masked == 3
    meta = cloak_metadata(model)
    assert meta["cloakonnx.masked"] == str(second.masked) == "6"
    history = json.loads(meta["cloakonnx.history"])
    assert [h["masked"] for h in history] == [3, 6]
    assert sum(n.name.startswith("cloakonnx_mask") for n in model.graph.node) == 1  # one Mul, updated


def test_refolding_a_folded_model_unites_the_masks(digits_files, tmp_path):
    model_path, data = digits_files
    harden(model_path, data, _config(output=tmp_path / "f1.onnx", fold=True))
    once = folded_mask(onnx.load(str(tmp_path / "f1.onnx")))
    report = harden(tmp_path / "f1.onnx", data, _config(output=tmp_path / "f2.onnx", fold=True))
    model = onnx.load(str(tmp_path / "f2.onnx"))
    twice = folded_mask(model)
    assert set(np.flatnonzero(once == 0)) < set(np.flatnonzero(twice == 0))
    assert report.masked == int((twice == 0).sum()) == 6 and report.newly_masked == 3
    assert [h["form"] for h in json.loads(cloak_metadata(model)["cloakonnx.history"])] == ["folded", "folded"]


# --- the stage timer ---------------------------------------------------------------------------------------


def test_stage_times_add_up(hardened):
    report, _ = hardened
    stages = dict(report.stages)
    wait = stages.pop("data wait")  # time blocked on data overlaps the stages it happened in
    assert set(stages) == set(report.stages_cpu)
    assert {"attack", "statistics", "evaluation", "surgery", "write"} <= set(stages)
    assert stages["attack"] > 0 and report.stages_cpu["attack"] > 0  # FGSM ran, inside the attack stage
    assert wait <= report.seconds
    assert sum(stages.values()) <= report.seconds + 0.0005 * len(stages) + 0.01


# --- choosing the share under a clean-accuracy budget ------------------------------------------------------


def test_a_huge_budget_adds_the_mask_that_helps_most(digits_files, tmp_path):
    """Whatever the trained net (its training depends on the machine's thread count): the best point of
    the curve is chosen when it beats adding nothing, and nothing is added when no point does."""
    model, data = digits_files
    report = harden(model, data, _config(output=tmp_path / "m.onnx", max_clean_drop=100.0, budget_confidence=0))
    assert report.max_clean_drop == 100.0 and report.budget_confidence == 0
    start = next(p for p in report.curve if p["added"] == 0)["adversarial_accuracy"]
    best = max(p["adversarial_accuracy"] for p in report.curve)
    adv = report.adversarial_accuracy
    if best > start:
        assert report.mask_added and report.masked > 0
        assert adv["hardened_transfer"] > adv["original"]
        chosen = next(p for p in report.curve if p["masked"] == report.masked)
        assert chosen["adversarial_accuracy"] == best
        assert adv["hardened_transfer"] == pytest.approx(best, abs=1e-9)
    else:
        assert not report.mask_added and report.masked == 0
        assert adv["hardened_transfer"] == adv["original"]


def test_no_gain_no_mask_and_the_model_written_byte_identical(digits_files, tmp_path):
    model, data = digits_files
    out = tmp_path / "m.onnx"
    report = harden(model, data, _config(output=out, attack=AttackConfig(name="fgsm", eps=0.0),
                                         max_clean_drop=100.0, budget_confidence=0))
    assert report.mask_added is False and report.masked == 0 and report.newly_masked == 0
    assert report.rounds == [{"round": 1, "added": 0, "masked": 0}]
    assert out.read_bytes() == model.read_bytes()
    assert cloak_metadata(onnx.load(str(out))) == {}
    assert report.clean_accuracy["hardened"] == report.clean_accuracy["original"]


# --- the curve -----------------------------------------------------------------------------------------------


def test_curve_fills_the_curve_and_the_scores(digits_files, tmp_path):
    model, data = digits_files
    report = harden(model, data, _config(output=tmp_path / "m.onnx", curve=True))
    assert report.masked == 3  # the curve is reported; the mask still follows --fraction
    assert len(report.scores) == report.features == 64
    assert all(s >= 0 for s in report.scores) and max(report.scores) > 0
    assert [p["added"] for p in report.curve] == counts_for(DEFAULT_FRACTIONS, 64)
    assert report.curve[0]["added"] == 0 and report.curve[0]["clean_accuracy"] == report.clean_accuracy["original"]
    point = next(p for p in report.curve if p["masked"] == report.masked)
    assert point["clean_accuracy"] == pytest.approx(report.clean_accuracy["hardened"], abs=1e-9)
    # the masked features are the top-scored ones
    top = set(np.argsort(-np.asarray(report.scores), kind="stable")[:3].tolist())
    assert _mask_zeros(onnx.load(str(tmp_path / "m.onnx"))) == top


def test_without_curve_there_is_neither_curve_nor_scores(hardened):
    report, _ = hardened
    assert report.curve is None and report.scores is None
    assert report.to_dict()["curve"] is None


# --- a custom feature tensor ---------------------------------------------------------------------------------


def _custom_tensor(name: str) -> dict:
    """The option naming one custom feature tensor."""
    return {"feature_tensors": (name,)}


def _flatten_input(model_path) -> str:
    model = onnx.load(str(model_path))
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    assert flatten.output[0] == FEATURE
    return flatten.input[0]  # [N, 64, 1, 1]


@pytest.mark.parametrize("option, match", [
    (dict(fold=True), "--fold"),
    (dict(max_clean_drop=1.0), "--max-clean-drop"),
    (dict(curve=True), "--plot"),
])
def test_a_custom_feature_tensor_rules_out_head_options(digits_files, tmp_path, option, match):
    model, data = digits_files
    tensor = _flatten_input(model)
    with pytest.raises(CloakError, match=match):
        harden(model, data, _config(output=tmp_path / "m.onnx", **_custom_tensor(tensor), **option))
    assert not (tmp_path / "m.onnx").exists()
