"""strength.py: the strength of a learned change is chosen against the adaptive attacker, and a change
that does not beat the original adaptively is not written."""
import numpy as np
import pytest

from cloakonnx.attacks import AttackConfig
from cloakonnx.config import HardenConfig
from cloakonnx.graph import apply_mask, find_head
from cloakonnx.harden import evaluate_original
from cloakonnx.pipeline import prepare
from cloakonnx.strength import STRENGTHS, Strength, StrengthPoint, choose_strength, guard_attack, never_worse

PGD = AttackConfig(name="pgd", eps=0.1, steps=3, seed=0)


@pytest.fixture(scope="module")
def prepared(digits_files):
    config = HardenConfig(score="absdiff", attack=PGD, max_clean_drop=2.0, budget_confidence=0)
    p = prepare(digits_files[0], digits_files[1], config)
    yield p, config, evaluate_original(p, config)
    p.close()


def test_a_change_that_changes_nothing_is_never_chosen(prepared):
    p, config, base = prepared
    strength = choose_strength(p, config, base, lambda alpha: p.model, "nothing")
    assert strength.chosen is None and [pt.alpha for pt in strength.points] == [0.0, *STRENGTHS]
    assert all(pt.adversarial_accuracy == base.adv_accuracy for pt in strength.points)


def test_each_candidate_is_judged_by_an_attack_crafted_on_it(prepared, monkeypatch):
    """Adaptive, not transfer: every candidate's adversarial figure comes from inputs crafted on that
    candidate's own graph (a selection that reused the inputs crafted on the original would make no
    such call)."""
    p, config, base = prepared
    head = find_head(p.model)
    built, crafted_on = {}, []

    def build(alpha):
        built[alpha] = apply_mask(p.model, head.feature, np.full(head.width, 1.0 - 0.5 * alpha, np.float32))
        return built[alpha]

    real = type(p).adversarial

    def adversarial(self, runner, ds, desc):
        crafted_on.append(runner.model)
        return real(self, runner, ds, desc)

    monkeypatch.setattr(type(p), "adversarial", adversarial)
    strength = choose_strength(p, config, base, build, "a uniform scale")
    assert crafted_on == [built[a] for a in STRENGTHS]
    assert [pt.alpha for pt in strength.points] == [0.0, *STRENGTHS]


def test_a_candidate_no_better_than_the_original_is_refused(prepared):
    """The final check: the original itself as the 'hardened' model ties, and a tie is refused."""
    p, config, base = prepared
    survived = p.runner.predict(base.adv, config.ort_batch_size) == p.val.y
    tie = Strength(StrengthPoint(1.0, base.clean, base.adv_accuracy, 0.0), [], 1.0, p.runner, survived)
    out = never_worse(p, config, base, tie, "the original")
    assert out.chosen is None and out.guard["hardened"] == out.guard["original"]


def test_the_guard_runs_apgd_only_on_the_selections_survivors_with_the_same_worst_case(prepared, monkeypatch):
    """The final check's APGD-CE crafts only on the samples the selection attack left correct; the worst
    case per sample is that of APGD-CE run on every validation sample."""
    p, config, base = prepared
    survived = p.runner.predict(base.adv, config.ort_batch_size) == p.val.y
    assert 0 < survived.sum() < len(survived)
    sizes, real = [], type(p.backend).survivors

    def survivors(self, judge, crafter, attack, ds, device, batch, ort_batch_size, desc=""):
        sizes.append(len(ds))
        return real(self, judge, crafter, attack, ds, device, batch, ort_batch_size, desc)

    monkeypatch.setattr(type(p.backend), "survivors", survivors)
    base.guard = None
    strength = Strength(StrengthPoint(1.0, base.clean, base.adv_accuracy, 0.0), [], 1.0, p.runner, survived)
    out = never_worse(p, config, base, strength, "the original")
    assert sizes == [survived.sum(), survived.sum()]  # the original, then the same model as the candidate
    apgd_everywhere = real(p.backend, p.runner, p.runner, guard_attack(p.attack), p.val, p.device,
                           p.attack_batch.size, config.ort_batch_size)
    assert out.guard["original"] == float((survived & apgd_everywhere).mean())


def test_the_guard_attack_is_at_least_apgd_ce_20():
    cfg = guard_attack(AttackConfig(name="fgsm", eps=0.1, steps=1))
    assert cfg.name == "apgd-ce" and cfg.steps == 20 and cfg.eps == 0.1
    assert guard_attack(AttackConfig(name="pgd", steps=50)).steps == 50


def test_a_point_held_back_by_the_bound_alone_is_named_with_the_samples_it_needs():
    from cloakonnx.search import Baseline
    from cloakonnx.strength import bound_note

    points = [StrengthPoint(0.0, 0.99, 0.45, 0.0), StrengthPoint(0.1, 0.99, 0.50, 0.57),
              StrengthPoint(0.75, 0.985, 0.70, 1.24)]
    base = Baseline(0.99, None, 0.45)
    note = bound_note(points, {0.0: 0, 0.1: 0, 0.75: 1}, base, 1.0, 0.9, points[1], 224)
    assert note.startswith("strength 0.75 would reach 70.0% adaptive accuracy") and "about 280 validation" in note
    assert bound_note(points, {0.0: 0, 0.1: 0, 0.75: 1}, base, 1.0, 0.0, points[2], 224) is None  # no bound used
    assert bound_note(points[:2], {0.0: 0, 0.1: 0}, base, 1.0, 0.9, points[1], 224) is None  # nothing held back

