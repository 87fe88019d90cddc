"""The typed configs check themselves: each bad option is one CloakError that names it; defaults are valid."""
import pytest

from cloakonnx.attacks import AttackConfig
from cloakonnx.config import CommonConfig, EvaluateConfig, HardenConfig, MaskConfig
from cloakonnx.data import Preprocess
from cloakonnx.errors import CloakError
from cloakonnx.mask import SCORES


@pytest.mark.parametrize("cls", [CommonConfig, MaskConfig, HardenConfig, EvaluateConfig])
def test_defaults_are_valid(cls):
    cls().validate()  # raises on any invalid default


@pytest.mark.parametrize("config, match", [
    (HardenConfig(rounds=0), r"--rounds must be at least 1, got 0"),
    (HardenConfig(rounds=-2), r"--rounds must be at least 1, got -2"),
    (HardenConfig(budget_confidence=0.3), r"--budget-confidence must be 0 .* got 0\.3"),
    (MaskConfig(budget_confidence=1.0), r"--budget-confidence must be 0 .* got 1"),
    (MaskConfig(max_clean_drop=-0.5), r"--max-clean-drop must be non-negative, got -0\.5"),
    (HardenConfig(fraction=1.0), r"--fraction must be in \[0, 1\), got 1"),
    (MaskConfig(fraction=-0.1), r"--fraction must be in \[0, 1\), got -0\.1"),
    (CommonConfig(attack=AttackConfig(steps=0)), r"--steps must be at least 1, got 0"),
    (HardenConfig(attack=AttackConfig(steps=0)), r"--steps must be at least 1, got 0"),
    (MaskConfig(attack=AttackConfig(eps=1.5)), r"--eps 1\.5 is larger than the box 0,1"),
    (HardenConfig(attack=AttackConfig(eps=0.5), preprocess=Preprocess((0.0, 0.25))),
     r"--eps 0\.5 is larger than the box 0,0\.25"),
    (HardenConfig(attack=AttackConfig(eps=-0.1)), r"--eps must be non-negative"),
    (CommonConfig(ort_batch_size=0), r"onnxruntime batch must be at least 1, got 0"),
    (EvaluateConfig(eps=()), r"--eps needs at least one value"),
    (EvaluateConfig(max_samples=0), r"--max-samples must be at least 1, got 0"),
])
def test_bad_option_is_named(config, match):
    with pytest.raises(CloakError, match=match):
        config.validate()


def test_unknown_score_names_the_choices():
    with pytest.raises(CloakError, match=r"unknown score 'bogus'; choose one of absdiff, normalised, margin"):
        MaskConfig(score="bogus").validate()
    for score in SCORES:  # every known score is accepted
        MaskConfig(score=score).validate()


def test_eps_limit_follows_the_box():
    """The same eps is fine in a wider box; L2 budgets are not capped by the box width."""
    HardenConfig(attack=AttackConfig(eps=2.0), preprocess=Preprocess((0.0, 255.0))).validate()
    HardenConfig(attack=AttackConfig(eps=2.0, norm="l2")).validate()
    with pytest.raises(CloakError, match="--eps 2 is larger"):
        HardenConfig(attack=AttackConfig(eps=2.0)).validate()


def test_boundary_values_are_accepted():
    HardenConfig(rounds=1, budget_confidence=0.0, max_clean_drop=0.0, fraction=0.0).validate()
    MaskConfig(budget_confidence=0.5, fraction=0.999).validate()
    EvaluateConfig(max_samples=1, eps=(0.0,)).validate()


def test_attack_steps_default_differs_on_purpose():
    """evaluate measures robustness (20 steps); harden and sweep craft calibration inputs (10, for speed)."""
    assert EvaluateConfig().attack.steps == 20
    assert HardenConfig().attack.steps == 10
    assert MaskConfig().attack.steps == 10
    # each config gets its own AttackConfig: changing one never leaks into another default
    a, b = EvaluateConfig(), EvaluateConfig()
    a.attack.steps = 3
    assert b.attack.steps == 20 and EvaluateConfig().attack.steps == 20


@pytest.mark.parametrize("config", [
    EvaluateConfig(attack=AttackConfig(steps=0)),
    EvaluateConfig(ort_batch_size=0),
])
def test_evaluate_config_checks_the_common_options(config):
    with pytest.raises(CloakError):
        config.validate()
