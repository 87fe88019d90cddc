"""harden's default (--method auto): the weights fine-tuned against the adaptive attacker, and when that gains
nothing, soft masks learned on every stage, applied at the strength chosen within a 1-point clean budget;
--method both learns both and writes the more robust; the learned masks alone (--method mask) and the paper's
mask (--score absdiff) are one flag away."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cloakonnx.attacks import AttackConfig
from cloakonnx.cli import main
from cloakonnx.config import DEFAULT_CLEAN_DROP, HardenConfig, LearnConfig, MaskConfig
from cloakonnx.errors import CloakError
from cloakonnx.graph import inspect_model
from cloakonnx.harden import harden

ATTACK = AttackConfig(name="pgd", eps=0.1, steps=5, seed=0)
QUICK = LearnConfig(steps=40, batch_size=64)


def test_the_default_is_fine_tuned_weights_and_learned_masks_on_every_stage():
    c = HardenConfig()
    assert c.method == "auto" and c.selection_budget() == DEFAULT_CLEAN_DROP and c.two_candidates
    assert HardenConfig(method="both").candidates() == c.candidates() and HardenConfig(method="both").two_candidates
    masks, weights = c.candidates()
    assert (masks.method, masks.score, masks.feature_tensors, masks.mask_values) == ("mask", "learned", ("auto",), "soft")
    assert (masks.learn.inner_attack, masks.learn.steps) == ("fgsm", 100)
    assert (weights.method, weights.learn.inner_attack, weights.learn.steps) == ("finetune", "pgd", 300)
    assert masks.selection_budget() == weights.selection_budget() == DEFAULT_CLEAN_DROP
    assert c.describe_method().index("fine-tuning") < c.describe_method().index("every stage")
    assert "if that gains nothing" in c.describe_method() and "more robust" in HardenConfig(method="both").describe_method()
    m = HardenConfig(method="mask")  # the learned masks alone
    assert (m.score, m.feature_tensors, m.mask_values, m.learn.steps) == ("learned", ("auto",), "soft", 100)


@pytest.mark.parametrize("kw", [dict(score="learned"), dict(feature_tensors=("t",)), dict(mask_values="binary"),
                                dict(score="absdiff"), dict(fraction=0.05)])
def test_an_option_that_shapes_a_mask_asks_for_the_mask_method(kw):
    assert HardenConfig(**kw).method == "mask"


def test_auto_shares_the_options_both_take_and_keeps_fold_for_the_masks():
    c = HardenConfig(learn=LearnConfig(steps=7), max_clean_drop=2.0, fold=True)
    masks, weights = c.candidates()
    assert masks.learn.steps == weights.learn.steps == 7 and masks.max_clean_drop == weights.max_clean_drop == 2.0
    assert masks.fold and not weights.fold
    weights.validate()  # --fold would be refused for --method finetune
    with pytest.raises(CloakError, match="--method"):
        MaskConfig(method="auto").validate()  # sweep draws one method's curve


@pytest.mark.parametrize("kw", [dict(score="absdiff"), dict(fraction=0.05), dict(rounds=2), dict(curve=True)])
def test_the_papers_knobs_give_the_papers_mask(kw):
    """--score absdiff, or a knob that only the paper's mask has, gives a binary mask on the head's input."""
    c = HardenConfig(**kw)
    assert (c.score, c.feature_tensors, c.mask_values) == ("absdiff", (), "binary")
    assert "paper" in c.describe_method()


def test_an_explicit_choice_keeps_its_meaning():
    assert HardenConfig(score="learned").feature_tensors == ()  # --score learned alone: the head's input, as before
    assert HardenConfig(feature_tensors=("t",)).score == "learned"
    assert HardenConfig(method="finetune").score == "absdiff"  # unused by fine-tuning; recorded as before
    assert MaskConfig().score == "absdiff"  # sweep's default is unchanged


def test_a_count_knob_with_several_tensors_is_refused():
    with pytest.raises(CloakError, match="--fraction shapes a mask on one tensor"):
        HardenConfig(score="learned", feature_tensors=("auto",), fraction=0.1).validate()


def test_the_cli_default_is_the_api_default():
    seen = {}

    def fake(model, data, config):
        seen["config"] = config
        raise CloakError("stop here")

    import cloakonnx.harden as module
    original = module.harden
    module.harden = fake
    try:
        result = CliRunner().invoke(main, ["harden", "m.onnx", "--data", "d.npz"])
    finally:
        module.harden = original
    assert "stop here" in result.output
    assert seen["config"] == HardenConfig() and seen["config"].method == "auto"


@pytest.fixture(scope="module")
def default_run(digits_files, tmp_path_factory):
    model, data = digits_files
    out = tmp_path_factory.mktemp("default") / "m.onnx"
    return harden(model, data, HardenConfig(output=out, attack=ATTACK, learn=QUICK, seed=0)), out


@pytest.fixture(scope="module")
def both_run(digits_files, tmp_path_factory):
    model, data = digits_files
    out = tmp_path_factory.mktemp("both") / "m.onnx"
    return harden(model, data, HardenConfig(output=out, attack=ATTACK, learn=QUICK, seed=0, method="both")), out


@pytest.fixture(scope="module")
def mask_run(digits_files, tmp_path_factory):
    model, data = digits_files
    out = tmp_path_factory.mktemp("masks") / "m.onnx"
    return harden(model, data, HardenConfig(output=out, attack=ATTACK, learn=QUICK, seed=0, method="mask")), out


def test_both_writes_the_candidate_more_robust_on_validation(both_run, mask_run):
    report, out = both_run
    learning = report.learning
    candidates = learning["candidates"]
    assert learning["chooser"] == "both"
    assert set(candidates) == {"mask", "finetune"}
    guards = {m: c["guard"] for m, c in candidates.items() if c["written"]}
    if not guards:
        assert learning["kept"] is None and not report.mask_added
        return
    kept = learning["kept"]
    assert guards[kept] == max(guards.values()) and learning["guard"]["hardened"] == guards[kept]
    assert report.mask_added and (learning.get("method") == "finetune") == (kept == "finetune")
    # the masks candidate is exactly what --method mask alone chooses
    masks_alone = mask_run[0].learning
    assert candidates["mask"]["strength"] == masks_alone["strength"]
    assert candidates["mask"]["guard"] == (masks_alone["guard"]["hardened"] if mask_run[0].mask_added else None)
    assert learning["guard"]["original"] == masks_alone["guard"]["original"]  # the original, attacked once


def test_the_default_learns_masks_only_when_the_weights_gain_nothing(digits_files, default_run, mask_run, tmp_path,
                                                                   monkeypatch):
    import cloakonnx.harden as module
    from cloakonnx.finetune import WeightSearch

    learning = default_run[0].learning
    assert learning["chooser"] == "auto" and "finetune" in learning["candidates"]
    assert learning["candidates"]["finetune"]["written"]  # on the digits CNN the weights gain
    assert set(learning["candidates"]) == {"finetune"} and learning["kept"] == "finetune"  # so no masks are learned

    def no_gain(p, config, base, timer):  # what search_weights returns when no strength beats the original
        search = WeightSearch(p.target.feature, p.runner, {}, {}, 0)
        search.learning = {"method": "finetune", "alpha": None, "seconds": 1.0}
        return search

    monkeypatch.setattr(module, "search_weights", no_gain)
    model, data = digits_files
    report = harden(model, data, HardenConfig(output=tmp_path / "m.onnx", attack=ATTACK, learn=QUICK, seed=0))
    candidates, masks_alone = report.learning["candidates"], mask_run[0].learning
    assert set(candidates) == {"finetune", "mask"} and not candidates["finetune"]["written"]
    assert candidates["mask"]["strength"] == masks_alone["strength"]  # exactly what --method mask alone writes
    assert report.learning["kept"] == ("mask" if mask_run[0].mask_added else None)
    assert report.mask_added == mask_run[0].mask_added and report.score == "learned"


def test_the_mask_run_learns_on_several_tensors_and_judges_adaptively(mask_run):
    report, out = mask_run
    assert report.score == "learned" and len(report.masks) >= 2
    learning = report.learning
    assert learning["max_clean_drop"] == DEFAULT_CLEAN_DROP
    assert report.max_clean_drop == DEFAULT_CLEAN_DROP and report.budget_confidence == 0.9  # the budget applied
    strengths = [p["alpha"] for p in report.curve]
    assert strengths[0] == 0.0 and strengths[-1] == 1.0
    if report.mask_added:  # written only when it beats the original adaptively on validation, within the budget
        assert learning["strength"] in strengths
        assert learning["guard"]["hardened"] > learning["guard"]["original"]
        assert report.adversarial_accuracy["hardened_adaptive"] > report.adversarial_accuracy["original"]
        chosen = next(p for p in report.curve if p["alpha"] == learning["strength"])
        assert 100 * (report.clean_accuracy["original"] - chosen["clean_accuracy"]) <= DEFAULT_CLEAN_DROP
        assert chosen["clean_drop_bound"] <= DEFAULT_CLEAN_DROP
        assert len(inspect_model(out).masks) == len(report.masks)
    else:
        assert learning["strength"] is None and out.read_bytes()


def test_the_default_run_reports_its_validation_split_sized_to_the_budget(default_run):
    report, _ = default_run
    n = report.samples["calibration"] + report.samples["validation"]
    assert report.samples["validation"] == min(round(0.5 * n), max(round(0.2 * n), 420))


def test_the_cli_default_run_says_what_it_did(digits_files, tmp_path):
    model, data = digits_files
    result = CliRunner().invoke(main, ["-q", "harden", str(model), "--data", str(data), "-o", str(tmp_path / "m.onnx"),
                                       "--eps", "0.1", "--steps", "3", "--learn-steps", "10", "--learn-batch", "32",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "finetune" in report["learning"]["candidates"] and report["learning"]["chooser"] == "auto"
    assert np.isfinite(report["learning"]["seconds"])


def test_fold_multiplies_every_stage_into_the_next_layer(digits_files, mask_run, tmp_path):
    """--fold with the default: each feature map's mask goes into the next conv's (or the head's) weights,
    so the graph has the original's nodes, and the outputs equal the Mul form's."""
    import onnx

    from cloakonnx.runtime import make_session, run_batch

    model, data = digits_files
    report, mul_path = mask_run
    if not report.mask_added:
        pytest.skip("the quick learning bought nothing on this fixture: nothing to fold")
    folded = harden(model, data, HardenConfig(output=tmp_path / "f.onnx", attack=ATTACK, learn=QUICK, seed=0,
                                              fold=True, method="mask"))
    assert folded.masks == report.masks
    original, mul, fold = (onnx.load(str(p)) for p in (model, mul_path, tmp_path / "f.onnx"))
    assert len(fold.graph.node) == len(original.graph.node) < len(mul.graph.node)
    x = np.load(data)["x"][:64]
    outs = [run_batch(make_session(m, ["CPUExecutionProvider"]), x, [m.graph.output[0].name])[0] for m in (mul, fold)]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * max(1.0, np.abs(outs[0]).max())
    recorded = json.loads({p.key: p.value for p in fold.metadata_props}["cloakonnx.masks"])
    assert [m["form"] for m in recorded] == ["folded"] * len(report.masks)


def test_the_demo_comparison_names_each_method_and_an_unchanged_model():
    from cloakonnx.report import format_comparison

    def fake(clean, adaptive, transfer, added=True):
        return {"clean_accuracy": {"original": 0.99, "hardened": clean}, "samples": {"validation": 360},
                "adversarial_accuracy": {"original": 0.5, "hardened_adaptive": adaptive, "hardened_transfer": transfer},
                "seconds": 12.3, "mask_added": added}

    text = format_comparison({"paper": fake(0.98, 0.55, 0.6), "default": fake(0.99, 0.6, 0.61, added=False)})
    lines = text.splitlines()
    assert "same 360 validation samples" in lines[0]
    assert lines[2].split()[:3] == ["original", "99.00%", "50.00%"]
    assert "paper" in lines[3] and "55.00%" in lines[3] and "12 s" in lines[3]
    assert "default (no gain: unchanged)" in lines[4]
    auto = fake(0.99, 0.7, 0.75)
    auto["learning"] = {"kept": "finetune", "candidates": {
        "mask": {"written": True, "clean_accuracy": 0.99, "adversarial_accuracy": 0.58, "guard": 0.56},
        "finetune": {"written": True, "clean_accuracy": 0.99, "adversarial_accuracy": 0.7, "guard": 0.69}}}
    lines = format_comparison({"paper": fake(0.98, 0.55, 0.6), "default": auto}).splitlines()
    assert "learned masks (--method mask): not written" in lines[4] and "58.00%" in lines[4] and "-" in lines[4]
    assert "default: fine-tuned weights" in lines[5] and "75.00%" in lines[5]


def test_harden_attacks_a_softmax_model_through_its_logits(digits_files, tmp_path):
    """A graph that ends in Softmax outputs probabilities; cross-entropy on them gives weak gradients.
    harden attacks the head's own output instead, so its figures equal those of the model without the
    Softmax (the same attack, the same inputs)."""
    import onnx
    from onnx import helper

    from cloakonnx.graph import resolve_target

    model = onnx.load(str(digits_files[0]))
    out = model.graph.output[0]
    raw = out.name + "_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    model.graph.node.append(helper.make_node("Softmax", [raw], [out.name], axis=1))
    soft = tmp_path / "soft.onnx"
    onnx.save(model, str(soft))
    target = resolve_target(model, None, None)
    assert target.logits == raw and target.head.logits == out.name and raw in target.runner_outputs

    config = dict(attack=AttackConfig(name="pgd", eps=0.1, steps=5, seed=0), score="absdiff", fraction=0.05)
    with_softmax = harden(soft, digits_files[1], HardenConfig(output=tmp_path / "a.onnx", **config)).to_dict()
    plain = harden(digits_files[0], digits_files[1], HardenConfig(output=tmp_path / "b.onnx", **config)).to_dict()
    for key in ("clean_accuracy", "adversarial_accuracy", "calibration"):
        assert with_softmax[key] == plain[key], key
    assert plain["adversarial_accuracy"]["original"] < plain["clean_accuracy"]["original"]


def test_auto_skips_a_1x1_map_that_repeats_the_heads_input():
    """PP-LCNet's last activation is [N, 1280, 1, 1], reshaped into the head's 1280 inputs: one stage, not two."""
    from onnx import helper

    from cloakonnx.layers import candidate_tensors

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]), helper.make_node("Flatten", ["c"], ["f"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("f", 1, [1, 4])])
    model = helper.make_model(graph)
    shapes = {"a": (1, 4, 8, 8), "b": (1, 4, 8, 8), "c": (1, 4, 1, 1)}
    assert candidate_tensors(model, "f", shapes) == ["f", "b"]
    assert candidate_tensors(model, None, shapes) == ["b", "c"]  # without a head the 1x1 map is a stage of its own


def test_a_change_that_weakens_the_model_is_named_loudly(caplog):
    import logging

    from cloakonnx.harden import warn_if_weaker
    from cloakonnx.search import Baseline

    base = Baseline(0.99, None, 0.5)
    with caplog.at_level(logging.WARNING, logger="cloakonnx.harden"):
        warn_if_weaker(base, {"adaptive": 0.6}, True)
        warn_if_weaker(base, {"adaptive": 0.3}, False)  # nothing written: nothing to warn about
        warn_if_weaker(base, {"adaptive": None}, True)  # --no-adaptive: not measured
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="cloakonnx.harden"):
        warn_if_weaker(base, {"adaptive": 0.32}, True)
    assert len(caplog.records) == 1 and "LESS robust" in caplog.text and "50.0% -> 32.0%" in caplog.text


def test_finetune_learns_against_pgd_and_masks_against_fgsm_unless_told():
    """Weights overfit to FGSM with a random start; masks do not, and it is 3 times cheaper."""
    assert HardenConfig(method="finetune").learn.inner_attack == "pgd"
    assert HardenConfig(method="mask").learn.inner_attack == "fgsm"
    assert HardenConfig(method="finetune", learn=LearnConfig(inner_attack="fgsm")).learn.inner_attack == "fgsm"
    assert HardenConfig(method="mask", learn=LearnConfig(inner_attack="pgd")).learn.inner_attack == "pgd"


def test_auto_goes_on_with_the_method_the_model_allows(digits_files, tmp_path, monkeypatch, caplog):
    """Fine-tuning refuses some graphs (quantized weights); the default then writes the masks alone,
    saying why, and a model neither method can harden fails with the reason."""
    import logging

    import cloakonnx.harden as module

    def refuse(*args, **kwargs):
        raise CloakError("integer weights 'w' cannot be fine-tuned")

    monkeypatch.setattr(module, "search_weights", refuse)
    model, data = digits_files
    with caplog.at_level(logging.WARNING, logger="cloakonnx.harden"):
        report = harden(model, data, HardenConfig(output=tmp_path / "m.onnx", attack=ATTACK, learn=QUICK, seed=0))
    assert "integer weights 'w'" in caplog.text and "going on without it" in caplog.text
    assert set(report.learning["candidates"]) == {"mask"} and report.score == "learned"
    monkeypatch.setattr(module, "search_layers", refuse)
    with pytest.raises(CloakError, match="integer weights"):
        harden(model, data, HardenConfig(output=tmp_path / "n.onnx", attack=ATTACK, learn=QUICK, seed=0))
    assert not (tmp_path / "n.onnx").exists()
