"""Choosing the mask: the budget holds, 'no gain' leaves the model unchanged, sweep agrees with harden."""
import json

import numpy as np
import onnx
import pytest

from cloakonnx.attacks import AttackConfig
from cloakonnx.harden import HardenConfig, harden
from cloakonnx.curve import CurvePoint, choose_point, clean_drop_bound
from cloakonnx.plots import plot_harden
from cloakonnx.sweep import sweep

ATTACK = AttackConfig(name="pgd", eps=0.1, steps=3, seed=0)


@pytest.mark.parametrize("confidence", [0.0, 0.9])
def test_budget_holds_on_validation(digits_files, tmp_path, confidence):
    model, data = digits_files
    report = harden(model, data, HardenConfig(output=tmp_path / "m.onnx", attack=ATTACK, max_clean_drop=1.0,
                                              budget_confidence=confidence, adaptive=False, curve=True))
    plot_harden(report.to_dict(), tmp_path / "curve.png")
    clean = report.clean_accuracy
    assert 100 * (clean["original"] - clean["hardened"]) <= 1.0 + 1e-9
    assert report.budget_confidence == confidence
    assert report.mask_added, "the budget must be tested on a run that adds a mask"
    if confidence:  # the chosen point's upper bound is within the budget too
        chosen = next(p for p in report.curve if p["masked"] == report.masked)
        assert chosen["clean_drop_bound"] <= 1.0 + 1e-9
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    assert report.curve and report.curve[0]["added"] == 0
    assert report.adversarial_accuracy["hardened_transfer"] > report.adversarial_accuracy["original"]


def test_no_gain_writes_the_model_unchanged(digits_files, tmp_path):
    """With eps = 0 adversarial inputs are the clean ones, and on samples the model already gets
    right no mask can raise accuracy: none is added."""
    from cloakonnx.runtime import make_session

    model, data = digits_files
    x, y = np.load(data)["x"], np.load(data)["y"]
    session = make_session(onnx.load(str(model)), ["CPUExecutionProvider"])
    right = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == y
    np.savez(tmp_path / "right.npz", x=x[right], y=y[right])
    out = tmp_path / "m.onnx"
    report = harden(model, tmp_path / "right.npz", HardenConfig(score="absdiff", output=out, attack=AttackConfig(name="fgsm", eps=0.0),
                                                                max_clean_drop=1.0, adaptive=False))
    assert report.mask_added is False and report.masked == 0
    assert onnx.load(str(out)).SerializeToString() == onnx.load(str(model)).SerializeToString()


def test_sweep_agrees_with_harden_at_the_same_fraction(digits_files, tmp_path):
    model, data = digits_files
    config = HardenConfig(attack=ATTACK, fraction=0.05, adaptive=False)
    curve = sweep(model, data, config, scores=("absdiff",)).to_dict()
    point = next(p for p in curve["curves"]["absdiff"] if p["masked"] == round(0.05 * 64))
    config.output = tmp_path / "m.onnx"
    report = harden(model, data, config)
    assert report.masked == point["masked"]
    assert report.clean_accuracy["hardened"] == pytest.approx(point["clean_accuracy"], abs=1e-9)
    assert report.adversarial_accuracy["hardened_transfer"] == pytest.approx(point["adversarial_accuracy"], abs=1e-9)
    assert curve["clean_accuracy"] == pytest.approx(report.clean_accuracy["original"])


def test_rounds_add_to_the_mask(digits_files, tmp_path):
    model, data = digits_files
    report = harden(model, data, HardenConfig(output=tmp_path / "m.onnx", attack=ATTACK, fraction=0.05, rounds=2,
                                              adaptive=False))
    assert [r["added"] for r in report.rounds] == [3, 3] and report.masked == 6
    hardened = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(n.name.startswith("cloakonnx_mask") for n in hardened.graph.node) == 1
    assert json.loads({p.key: p.value for p in hardened.metadata_props}["cloakonnx.history"])[-1]["rounds"] == 2


def _pt(added, clean, adv):
    return CurvePoint(added / 100, added, added, clean, adv)


def test_choose_point_rules():
    pts = [_pt(0, 0.99, 0.50), _pt(1, 0.99, 0.55), _pt(2, 0.985, 0.60), _pt(5, 0.97, 0.70)]
    assert choose_point(pts, 0.99, 1.0).added == 2  # 0.97 is 2 points down: over budget
    assert choose_point(pts, 0.99, 5.0).added == 5
    assert choose_point([_pt(0, 0.99, 0.5), _pt(1, 0.99, 0.5), _pt(2, 0.95, 0.4)], 0.99, 1.0) is None


def test_choose_point_with_the_bound_refuses_a_lucky_point():
    """Within budget on validation (point estimate) but not for its upper bound: not chosen."""
    pts = [CurvePoint(0, 0, 0, 0.99, 0.50, 0.0), CurvePoint(0.01, 1, 1, 0.99, 0.55, 0.8),
           CurvePoint(0.02, 2, 2, 0.99, 0.60, 1.4)]
    assert choose_point(pts, 0.99, 1.0).added == 2
    assert choose_point(pts, 0.99, 1.0, use_bound=True).added == 1
    assert choose_point(pts[:1] + pts[2:], 0.99, 1.0, use_bound=True) is None


def _paired(n, broken, fixed):
    before = np.ones(n, bool)
    before[:fixed] = False
    after = before.copy()
    after[:fixed] = True
    after[fixed : fixed + broken] = False
    return before, after


def test_clean_drop_bound():
    # No sample changed among 135: not certified as zero. Agresti-Min: z(0.9) / (n + 2) in points.
    assert clean_drop_bound(*_paired(135, 0, 0), 0.9) == pytest.approx(100 * 1.2815516 / 137, rel=1e-6)
    # More data, tighter; more confidence, looser; a broken sample costs more than a fixed one gives back.
    assert clean_drop_bound(*_paired(1350, 0, 0), 0.9) < clean_drop_bound(*_paired(135, 0, 0), 0.9)
    assert clean_drop_bound(*_paired(135, 0, 0), 0.95) > clean_drop_bound(*_paired(135, 0, 0), 0.9)
    assert clean_drop_bound(*_paired(135, 1, 0), 0.9) > 1.0 > clean_drop_bound(*_paired(1000, 1, 0), 0.9)
    assert clean_drop_bound(*_paired(135, 2, 2), 0.9) > clean_drop_bound(*_paired(135, 0, 0), 0.9)
    # A mask that fixes many samples has a negative bound (it raises clean accuracy).
    assert clean_drop_bound(*_paired(500, 0, 40), 0.9) < 0


def test_budget_confidence_is_validated(digits_files, tmp_path):
    from cloakonnx.errors import CloakError

    with pytest.raises(CloakError, match="--budget-confidence"):
        harden(*digits_files, HardenConfig(score="absdiff", output=tmp_path / "m.onnx", attack=ATTACK, max_clean_drop=1.0,
                                           budget_confidence=1.0))
