import numpy as np
import pytest

from cloakonnx.data import Preprocess, load_data, load_image_folder, load_npz, split, validate
from cloakonnx.errors import CloakError


def _npz(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return p


def test_npz_roundtrip(tmp_path):
    x = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    ds = load_npz(_npz(tmp_path, x=x, y=np.arange(10) % 3))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and len(ds) == 10


@pytest.mark.parametrize("arrays, match", [
    (dict(x=np.zeros((3, 4))), "missing y"),
    (dict(x=np.zeros((3, 4)), y=np.array([0.5, 1, 2])), "integers"),
    (dict(x=np.zeros((3, 4)), y=np.array(["a", "b", "c"])), "integers"),
    (dict(x=np.zeros((3, 4)), y=np.array([0, 1])), "3 samples but 'y' has 2"),
])
def test_bad_npz(tmp_path, arrays, match):
    with pytest.raises(CloakError, match=match):
        load_npz(_npz(tmp_path, **arrays))


def test_not_an_npz(tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(CloakError, match="not a readable .npz"):
        load_data(p)
    with pytest.raises(CloakError, match="data not found"):
        load_data(tmp_path / "missing.npz")


@pytest.mark.parametrize("mutate, match", [
    (lambda x, y: (x[:, :, :4], y), r"shape \(1, 4, 8\)"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y), "NaN or Inf"),
    (lambda x, y: (x * 2, y), "outside --bounds"),
    (lambda x, y: (x, y + 10), "10 classes"),
    (lambda x, y: (x[:0], y[:0]), "empty"),
])
def test_validate_refuses_bad_data(digits, mutate, match):
    from cloakonnx.data import Dataset

    x, y = mutate(digits.x[:20] * 0.9 + 0.01, digits.y[:20].copy())
    with pytest.raises(CloakError, match=match):
        validate(Dataset(x.astype(np.float32), y), ["N", 1, 8, 8], (0.0, 1.0), 10)


def test_split_is_disjoint_repeatable_and_checks_size(digits):
    a_cal, a_val = split(digits, 0.2, seed=1)
    b_cal, b_val = split(digits, 0.2, seed=1)
    assert np.array_equal(a_val.y, b_val.y) and len(a_val) == round(0.2 * len(digits))
    assert len(a_cal) + len(a_val) == len(digits)
    small = digits.subset(np.arange(1))
    with pytest.raises(CloakError, match="too few"):
        split(small, 0.2)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray((rng.random((10, 12, 3)) * 255).astype(np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"garbage")
    ds = load_image_folder(tmp_path, size=(8, 8), channels=3)
    assert ds.x.shape == (6, 3, 8, 8) and list(ds.y) == [0, 0, 0, 1, 1, 1]
    x = np.asarray(ds.x)
    assert 0 <= x.min() and x.max() <= 1


def test_empty_image_folder(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CloakError, match="no readable images"):
        load_image_folder(tmp_path, None)
    with pytest.raises(CloakError, match="no class sub-folders"):
        load_image_folder(tmp_path / "a", None)


def test_preprocess_normalises_per_channel():
    p = Preprocess((0.0, 1.0), [0.5, 0.0], [0.5, 2.0])
    x = np.ones((1, 2, 2, 2), np.float32)
    out = p.to_model(x)
    assert np.allclose(out[:, 0], 1.0) and np.allclose(out[:, 1], 0.5)
    with pytest.raises(CloakError):
        Preprocess((0.0, 1.0), [0.5], None)
    with pytest.raises(CloakError):
        Preprocess((1.0, 0.0))


def test_torch_wrap_normalises_like_to_model():
    import torch

    p = Preprocess((0.0, 1.0), [0.2, 0.5, 0.7], [0.3, 0.25, 0.1])
    x = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    wrapped = p.torch_wrap(torch.nn.Identity(), 4)
    np.testing.assert_allclose(wrapped(torch.from_numpy(x)).numpy(), p.to_model(x), rtol=1e-6)
    assert Preprocess().torch_wrap(torch.nn.Identity(), 4).__class__ is torch.nn.Identity


def test_harden_with_mean_std(digits_files, tmp_path):
    """A model that expects normalised input: wrap the digits model so it undoes (x - 0.5) / 0.25."""
    import onnx
    from onnx import helper, numpy_helper

    from cloakonnx.attacks import AttackConfig
    from cloakonnx.harden import HardenConfig, harden

    model = onnx.load(str(digits_files[0]))
    first = model.graph.node[0]
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0.25, np.float32), "s"),
                                    numpy_helper.from_array(np.array(0.5, np.float32), "m")])
    model.graph.node.insert(0, helper.make_node("Mul", ["input", "s"], ["scaled"]))
    model.graph.node.insert(1, helper.make_node("Add", ["scaled", "m"], ["unnormalised"]))
    first.input[0] = "unnormalised"
    path = tmp_path / "norm.onnx"
    onnx.save(model, str(path))
    cfg = dict(attack=AttackConfig(name="fgsm", eps=0.1), fraction=0.05, adaptive=False)
    plain = harden(digits_files[0], digits_files[1], HardenConfig(output=tmp_path / "a.onnx", **cfg))
    normed = harden(path, digits_files[1], HardenConfig(output=tmp_path / "b.onnx", preprocess=Preprocess(
        (0.0, 1.0), [0.5], [0.25]), **cfg))
    assert normed.clean_accuracy == pytest.approx(plain.clean_accuracy, abs=1e-9)
    assert normed.adversarial_accuracy["original"] == pytest.approx(plain.adversarial_accuracy["original"], abs=0.01)
    # the same function of the box-space input: the same features are masked, not just as many
    from cloakonnx.graph import find_head

    mask_plain = find_head(onnx.load(str(tmp_path / "a.onnx"))).mask
    mask_normed = find_head(onnx.load(str(tmp_path / "b.onnx"))).mask
    assert mask_plain is not None and (mask_plain == 0).sum() == plain.masked > 0
    np.testing.assert_array_equal(mask_normed, mask_plain)


def test_validate_checks_the_first_rows_of_lazy_data_at_once(digits, tmp_path):
    """Inputs read lazily cannot be checked up front: validate checks the first rows itself (bad data
    fails before any work starts) and wraps the rest to be checked as each batch is read."""
    x = digits.x[:200].copy()
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "early.npz", x=x, y=digits.y[:200])
    with pytest.raises(CloakError, match=r"NaN or Inf values in 1 sample\(s\) \(samples 3\)"):
        validate(load_data(tmp_path / "early.npz"), ["N", 1, 8, 8], (0.0, 1.0), 10)
    x[3], x[150, 0, 0, 0] = digits.x[3], np.nan
    np.savez(tmp_path / "late.npz", x=x, y=digits.y[:200])
    ds = validate(load_data(tmp_path / "late.npz"), ["N", 1, 8, 8], (0.0, 1.0), 10)  # past the rows checked now
    assert ds.lazy
    with pytest.raises(CloakError, match=r"\(samples 150\)"):
        ds.x[128:192]
