import numpy as np
import pytest

from cloakonnx.errors import CloakError
from cloakonnx.mask import count_for, mask_top, ranking, score_features
from cloakonnx.stats import FeatureStats, per_feature


def test_streaming_stats_equal_in_memory_computation():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal((1000, 32)).astype(np.float32)
    adv = clean + rng.standard_normal((1000, 32)).astype(np.float32) * np.linspace(0, 2, 32, dtype=np.float32)
    stats = FeatureStats(32)
    for s in range(0, 1000, 77):  # uneven batches
        stats.update(clean[s : s + 77], adv[s : s + 77])
    assert stats.count == 1000
    clean, adv = clean.astype(np.float64), adv.astype(np.float64)  # the sums are kept in float64
    np.testing.assert_allclose(stats.mean_absdiff(), np.abs(adv - clean).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.clean_std(), clean.std(0), rtol=1e-5)


def test_conv_features_are_averaged_per_channel():
    f = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.testing.assert_allclose(per_feature(f), f.mean((2, 3)))


def select_mask(scores, fraction, existing=None):
    """How harden masks a fraction of features: rank what is not masked yet, zero the top ones."""
    return mask_top(ranking(scores, existing), count_for(fraction, len(scores)), len(scores), existing)


def test_the_top_scores_are_zeroed():
    scores = np.array([0.1, 5.0, 0.3, 4.0, 0.2, 0.0, 3.0, 0.05, 0.01, 0.02])
    mask = select_mask(scores, 0.3)
    assert mask.dtype == np.float32
    assert list(np.flatnonzero(mask == 0)) == [1, 3, 6]


def test_existing_zeros_are_kept_and_new_ones_added():
    scores = np.array([9.0, 5.0, 0.3, 4.0, 0.2])
    existing = np.array([0, 1, 1, 1, 1], np.float32)
    mask = select_mask(scores, 0.2, existing)  # one new feature: the best not already masked
    assert list(np.flatnonzero(mask == 0)) == [0, 1]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_fraction_outside_range_is_refused(fraction):
    with pytest.raises(CloakError, match="--fraction"):
        count_for(fraction, 10)


def test_scores():
    stats = FeatureStats(3)
    clean = np.array([[0.0, 1.0, 10.0], [2.0, 1.0, 30.0]])
    stats.update(clean, clean + np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(score_features(stats, "absdiff"), [1, 1, 1])
    norm = score_features(stats, "normalised")
    assert norm[1] > norm[0] > norm[2]  # a constant feature moved by noise is the most suspicious
    with pytest.raises(CloakError, match="unknown score"):
        score_features(stats, "nope")
