"""Learned masks (--score learned): they buy adaptive robustness, their forms agree, several tensors round-trip."""
import json

import numpy as np
import onnx
import pytest

from cloakonnx.attacks import AttackConfig
from cloakonnx.config import HardenConfig, LearnConfig
from cloakonnx.data import Preprocess
from cloakonnx.errors import CloakError
from cloakonnx.graph import find_head, inspect_model, load_model, with_outputs
from cloakonnx.harden import harden
from cloakonnx.runtime import make_session, run_batch

ATTACK = AttackConfig(name="pgd", eps=0.1, steps=5, seed=0)
FAST = LearnConfig(steps=60, batch_size=64, inner_attack="pgd", inner_steps=3, lr=0.3, sparsity=2.0)
CONV = "/5/Relu_output_0"  # the second conv block's output (64 channels, 8x8) in the fixture's export


def _config(tmp_path, name, **kw) -> HardenConfig:
    return HardenConfig(**{"output": tmp_path / name, "attack": ATTACK, "score": "learned", "learn": FAST, "seed": 0,
                           **kw})


def _outputs(path, x) -> np.ndarray:
    model = onnx.load(str(path))
    (out,) = run_batch(make_session(model, ["CPUExecutionProvider"]), x, [model.graph.output[0].name])
    return out


@pytest.fixture(scope="module")
def learned(digits_files, tmp_path_factory):
    """The fixture model hardened with a learned binary mask on the head's input, and with absdiff."""
    model, data = digits_files
    folder = tmp_path_factory.mktemp("learned")
    report = harden(model, data, _config(folder, "learned.onnx"))
    paper = harden(model, data, HardenConfig(output=folder / "paper.onnx", attack=ATTACK, seed=0,
                                              fraction=report.masked / report.features))
    return report, paper, folder


def test_learned_mask_buys_adaptive_robustness(learned):
    """Against PGD crafted on each model itself (mask included), the learned mask beats the original
    by 5 points and is at least as good as the paper's absdiff mask of the same size, at a small
    clean cost.

    "At least as good", not "better": one binary head mask of the same size has little room on this
    small CNN. The fixture trains to a different model at 1 and 2 torch threads; measured on both,
    the learned mask scored 69.4% against the paper's 63.2% (2 threads) and 66.7% against 66.7%
    (1 thread, 96 of 144 each), with the original at 60.4% and 54.9%."""
    report, paper, _ = learned
    adv = report.adversarial_accuracy
    assert report.mask_added and report.score == "learned" and 0 < report.masked < report.features
    assert adv["hardened_adaptive"] >= adv["original"] + 0.05, adv
    assert adv["hardened_adaptive"] >= paper.adversarial_accuracy["hardened_adaptive"], (adv, paper.adversarial_accuracy)
    assert report.clean_accuracy["original"] - report.clean_accuracy["hardened"] <= 0.03
    assert report.learning["steps"] == FAST.steps and report.learning["seconds"] > 0
    assert "learning" in report.stages and report.masks[0]["zeroed"] == report.masked


def test_learning_is_deterministic_under_the_seed(digits_files, tmp_path):
    from cloakonnx.data import load_npz
    from cloakonnx.learn import learn_masks

    model = load_model(digits_files[0])
    head = find_head(model)
    data = load_npz(digits_files[1])
    cfg = LearnConfig(steps=5, batch_size=32, inner_steps=2)
    runs = [learn_masks(model, [head.feature], head.logits, Preprocess(), data, ATTACK, cfg,
                        seed=s).values[head.feature] for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_soft_mask_outputs_agree_in_mul_and_folded_forms(digits_files, tmp_path):
    """A soft mask is one constant Mul of learned values; folded, the head's rows are scaled instead.
    Both give the numpy head applied to the masked features."""
    model, data = digits_files
    mul = harden(model, data, _config(tmp_path, "mul.onnx", mask_values="soft", adaptive=False))
    folded = harden(model, data, _config(tmp_path, "fold.onnx", mask_values="soft", adaptive=False, fold=True))
    x = np.load(data)["x"][:64]
    hardened = load_model(tmp_path / "mul.onnx")
    head = find_head(hardened)
    assert head.mask is not None and ((head.mask > 0) & (head.mask < 1)).any(), "a soft mask scales some features"
    assert mul.masks[0]["scaled"] > 0 and mul.masks[0]["zeroed"] == mul.masked
    (features,) = run_batch(make_session(with_outputs(load_model(model), [head.feature]), ["CPUExecutionProvider"]),
                            x, [head.feature])
    expected = head.apply(features, head.mask)
    np.testing.assert_allclose(_outputs(tmp_path / "mul.onnx", x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_outputs(tmp_path / "fold.onnx", x), expected, rtol=1e-4, atol=1e-4)
    assert len(load_model(tmp_path / "fold.onnx").graph.node) == len(load_model(model).graph.node)
    info = inspect_model(tmp_path / "fold.onnx")
    assert [m["form"] for m in info.masks] == ["folded"] and info.masks[0]["scaled"] == mul.masks[0]["scaled"]
    assert folded.clean_accuracy == mul.clean_accuracy


def test_binary_learned_mask_matches_its_fold(learned, digits_files, tmp_path):
    report, _, folder = learned
    from cloakonnx.graph import fold_mask

    hardened = load_model(folder / "learned.onnx")
    mask = find_head(hardened).mask
    assert set(np.unique(mask)) == {0.0, 1.0} and int((mask == 0).sum()) == report.masked
    onnx.save(fold_mask(load_model(digits_files[0]), mask), str(tmp_path / "f.onnx"))
    x = np.load(digits_files[1])["x"][:64]
    np.testing.assert_allclose(_outputs(tmp_path / "f.onnx", x), _outputs(folder / "learned.onnx", x), atol=1e-5)


def full_strength(p, config, base, build, what):
    """The learned masks at strength 1, whatever they buy: for tests of the mechanics, not the choice
    (test_strength.py tests that)."""
    from cloakonnx.strength import Strength, StrengthPoint

    runner = p.runner_for(build(1.0), config)
    return Strength(StrengthPoint(1.0, 1.0, 1.0, 0.0), [], 1.0, runner, None)


def test_several_tensors_round_trip_through_inspect_and_reharden(digits_files, tmp_path, monkeypatch):
    from cloakonnx import layers

    monkeypatch.setattr(layers, "choose_strength", full_strength)
    monkeypatch.setattr(layers, "never_worse", lambda p, config, base, strength, what: strength)
    model, data = digits_files
    head = find_head(load_model(model)).feature
    first = harden(model, data, _config(tmp_path, "a.onnx", feature_tensors=(CONV, head), adaptive=False))
    assert [m["tensor"] for m in first.masks] == [CONV, head]
    assert first.masks[0]["width"] == 64 and first.masks[0]["rank"] == 4
    info = inspect_model(tmp_path / "a.onnx")
    assert sorted(m["tensor"] for m in info.masks) == sorted([CONV, head])
    recorded = json.loads(info.metadata["cloakonnx.masks"])
    assert [m["tensor"] for m in recorded] == [CONV, head]
    before = {m["tensor"]: m["zeroed"] for m in info.masks}

    again = harden(tmp_path / "a.onnx", data, _config(tmp_path, "b.onnx", feature_tensors=(CONV, head), adaptive=False,
                                                        seed=1))
    after = inspect_model(tmp_path / "b.onnx")
    assert len(after.masks) == 2, "re-hardening replaces the masks' values, it does not stack a second Mul"
    for m in after.masks:
        assert m["zeroed"] >= before[m["tensor"]]
    old = {m.input[0]: m for m in load_model(tmp_path / "a.onnx").graph.node if m.name.startswith("cloakonnx_mask")}
    assert set(old) == {CONV, head}
    from cloakonnx.graph import find_mask

    for tensor in (CONV, head):
        earlier = find_mask(load_model(tmp_path / "a.onnx"), tensor)[1]
        now = find_mask(load_model(tmp_path / "b.onnx"), tensor)[1]
        assert np.all(now[earlier == 0] == 0), "the earlier zeros stay zero (the union)"
    assert len(json.loads(after.metadata["cloakonnx.history"])) == 2 and again.masked >= first.masked


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_a_cut_keeps_earlier_zeros_at_every_strength(strength):
    from cloakonnx.layers import cut

    learned = {"t": np.array([0.9, 0.2, 0.7, 0.8])}
    earlier = {"t": np.array([1.0, 1.0, 0.0, 1.0], np.float32)}
    soft = cut(learned, earlier, 0.5, True, strength)["t"]
    binary = cut(learned, earlier, 0.5, False, strength)["t"]
    assert soft[2] == binary[2] == 0, "an earlier zero stays zero"
    np.testing.assert_allclose(binary, [1.0, 1.0 - strength, 0.0, 1.0])
    np.testing.assert_allclose(soft, [1 - strength * 0.1, 1.0 - strength, 0.0, 1 - strength * 0.2], rtol=1e-6)


def test_auto_proposes_the_head_input_and_stage_outputs(digits_files, tmp_path):
    model, data = digits_files
    report = harden(model, data, _config(tmp_path, "auto.onnx", feature_tensors=("auto",), adaptive=False,
                                         learn=LearnConfig(steps=3, batch_size=32, inner_steps=1)))
    tensors = report.learning["tensors"]
    head = find_head(load_model(model)).feature
    assert tensors[0] == head and CONV in tensors and "/9/Relu_output_0" in tensors
    assert "/2/Relu_output_0" not in tensors, "only the last activation of each resolution"


@pytest.mark.parametrize("kw, match", [
    (dict(score="absdiff", mask_values="soft"), "--score learned"),
    (dict(score="absdiff", feature_tensors=("a", "b")), "--score learned"),
    (dict(score="learned", feature_tensors=("auto", "b")), "alone"),
    (dict(score="learned", mask_values="grey"), "--mask-values"),
    (dict(score="learned", learn=LearnConfig(steps=0)), "--learn-steps"),
    (dict(score="learned", learn=LearnConfig(inner_attack="cw")), "--learn-attack"),
    (dict(score="learned", feature_tensors=("a", "b"), rounds=2), "jointly"),
])
def test_bad_learned_options_are_refused_before_any_work(kw, match):
    with pytest.raises(CloakError, match=match):
        HardenConfig(**kw).validate()


def test_several_tensors_refuse_a_fraction(digits_files, tmp_path):
    model, data = digits_files
    head = find_head(load_model(model)).feature
    with pytest.raises(CloakError, match="--fraction shapes a mask on one tensor"):
        harden(model, data, _config(tmp_path, "x.onnx", feature_tensors=(CONV, head), fraction=0.1))
    assert not (tmp_path / "x.onnx").exists()


def test_a_learned_mask_that_loses_to_the_adaptive_attacker_is_refused(digits_files, tmp_path, monkeypatch):
    """A learned mask on one tensor is cut by transfer accuracy; one that leaves the model easier to
    attack directly (here: all but two head features switched off) must not be written."""
    import cloakonnx.harden as module

    model, data = digits_files
    width = find_head(load_model(model)).weight.shape[0]

    def crippling(p, config, search, timer, tensors):
        values = np.zeros(width, np.float32)
        values[:2] = 1.0
        search.learning = {"tensors": tensors, "seconds": 0.0, "steps": 0, "loss": []}
        return {tensors[0]: values}

    monkeypatch.setattr(module, "learn_stage", crippling)
    report = harden(model, data, _config(tmp_path, "x.onnx"))
    guard = report.learning["guard"]
    assert guard["hardened"] <= guard["original"], guard
    assert not report.mask_added and report.masked == 0 and report.masks == []
    assert find_head(load_model(tmp_path / "x.onnx")).mask is None
