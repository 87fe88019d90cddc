"""Data read a batch at a time: every source gives the same samples and the same hardened model,
bad values fail batch by batch with a clear error, and an attack's random start depends on the
sample's index, not on its batch."""
import json
import textwrap

import numpy as np
import onnx
import pytest

from cloakonnx.attacks import AttackConfig
from cloakonnx.backend import craft
from cloakonnx.attacks.pgd import PGD
from cloakonnx.config import HardenConfig
from cloakonnx.data import (DATA_WAIT, Dataset, ImageTransform, LoaderScript, RowFile, Rows, from_calibration_reader,
                            load_data, prefetched, split)
from cloakonnx.errors import CloakError
from cloakonnx.harden import harden

from .conftest import sha256

PGD3 = AttackConfig(name="pgd", eps=0.1, steps=3, batch_size=64)


def _arrays(digits, n=300):
    return digits.x[:n], digits.y[:n]


# --- every file source reads the same samples ---------------------------------------------------------------


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_npz_is_read_by_rows_not_loaded(digits, tmp_path, writer):
    x, y = _arrays(digits)
    writer(tmp_path / "d.npz", x=x, y=y)
    ds = load_data(tmp_path / "d.npz")
    assert isinstance(ds.x, RowFile) and ds.x.shape == x.shape
    np.testing.assert_array_equal(ds.x[:], x)
    idx = np.array([299, 3, 4, 5, 120, 0])  # unsorted, with a contiguous run
    np.testing.assert_array_equal(ds.x[idx], x[idx])
    np.testing.assert_array_equal(ds.y, y)


def test_npz_of_uint8_keeps_its_values(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.savez(tmp_path / "u.npz", x=x, y=np.array([0, 1]))
    got = load_data(tmp_path / "u.npz").x[:]
    assert got.dtype == np.float32 and np.array_equal(got, x.astype(np.float32))


def test_npy_folder_and_pair(digits, tmp_path):
    x, y = _arrays(digits)
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "x.npy", x)
    np.save(tmp_path / "f" / "y.npy", y)
    for spec in (tmp_path / "f", f"{tmp_path / 'f' / 'x.npy'},{tmp_path / 'f' / 'y.npy'}"):
        ds = load_data(spec)
        assert isinstance(ds.x, Rows)
        np.testing.assert_array_equal(ds.x[10:20], x[10:20])
        np.testing.assert_array_equal(ds.y, y)
    np.save(tmp_path / "f" / "y.npy", y[:-1])
    with pytest.raises(CloakError, match="300 samples but 'y' has 299"):
        load_data(tmp_path / "f")


def test_subsets_stay_lazy_and_keep_source_indices(digits, tmp_path):
    x, y = _arrays(digits)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_data(tmp_path / "d.npz")
    calib, val = split(ds, 0.2, seed=0)
    assert isinstance(calib.x, Rows) and len(calib) + len(val) == len(ds)
    sub = val.subset(np.array([5, 1]))
    np.testing.assert_array_equal(sub.x[:], x[sub.index])
    np.testing.assert_array_equal(sub.index, val.index[[5, 1]])


def test_val_max_caps_validation_and_gives_the_rest_to_calibration(digits):
    calib, val = split(digits, 0.5, seed=0, val_max=100)
    assert len(val) == 100 and len(calib) == len(digits) - 100


def test_reports_count_the_wait_for_data(digits_files, tmp_path):
    from cloakonnx.config import EvaluateConfig
    from cloakonnx.evaluate import evaluate

    model, data = digits_files
    report = evaluate(model, data, EvaluateConfig(attacks=("fgsm",), eps=(0.1,), max_samples=64, sanity=False))
    assert 0 <= report.data_wait_seconds <= report.seconds
    hardened = harden(model, data, HardenConfig(attack=PGD3, fraction=0.05, adaptive=False, output=tmp_path / "m.onnx"))
    assert 0 <= hardened.stages["data wait"] <= hardened.seconds


def test_prefetched_reads_ahead_and_counts_the_wait(digits, tmp_path):
    x, y = _arrays(digits)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rows = load_data(tmp_path / "d.npz").x
    before = DATA_WAIT.seconds
    got = np.concatenate(list(prefetched(rows, [(0, 100), (100, 250), (250, 300)])))
    np.testing.assert_array_equal(got, x)
    assert DATA_WAIT.seconds >= before


# --- image folders: decoded on demand, torchvision's resize and crop -----------------------------------------


def _image_folder(root, sizes=((40, 30), (30, 50)), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / label / f"{i}.png")
    return root


def test_resize_then_centre_crop_matches_torchvision(tmp_path):
    from PIL import Image

    transforms = pytest.importorskip("torchvision.transforms")
    root = _image_folder(tmp_path / "imgs")
    ds = load_data(root, transform=ImageTransform(resize=24, crop=20))
    assert ds.x.shape == (6, 3, 20, 20) and list(ds.y) == [0, 0, 0, 1, 1, 1]
    pipeline = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(20), transforms.ToTensor()])
    for i, f in enumerate(sorted(root.glob("*/*.png"))):
        want = pipeline(Image.open(f).convert("RGB")).numpy()
        np.testing.assert_allclose(ds.x[i], want, atol=1e-6)


def test_images_of_different_sizes_need_a_resize(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    with pytest.raises(CloakError, match="different sizes"):
        load_data(root)
    with pytest.raises(CloakError, match="not both"):
        ImageTransform(size=(8, 8), resize=10)
    with pytest.raises(CloakError, match="larger than an image"):
        load_data(root, transform=ImageTransform(crop=35)).x[:]


def test_a_file_that_fails_to_decode_is_named(tmp_path):
    root = _image_folder(tmp_path / "imgs", sizes=((16, 16),))
    png = sorted(root.glob("b/*.png"))[0]
    png.write_bytes(png.read_bytes()[:60])  # the header survives, the pixels do not
    ds = load_data(root)
    with pytest.raises(CloakError, match=png.name):
        ds.x[:]


# --- batch-by-batch validation ------------------------------------------------------------------------------


def test_nan_in_a_late_batch_fails_clearly_and_writes_nothing(digits_files, digits, tmp_path):
    model, _ = digits_files
    x, y = digits.x[:600].copy(), digits.y[:600]
    x[550, 0, 3, 3] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    out = tmp_path / "out.onnx"
    with pytest.raises(CloakError, match=r"NaN or Inf values in 1 sample\(s\) \(samples 550\)"):
        harden(model, tmp_path / "bad.npz", HardenConfig(attack=PGD3, fraction=0.05, adaptive=False, output=out))
    assert not out.exists()


# --- determinism: the random start belongs to the sample ----------------------------------------------------


def test_random_start_depends_on_the_sample_index_not_the_batch():
    import torch

    attack = PGD(lambda x: x.flatten(1), AttackConfig(name="pgd", eps=0.1, seed=3))
    attack.set_samples([7, 8, 9, 10])
    whole = attack.rand((4, 2, 3))
    attack.set_samples([9, 10])
    assert torch.equal(attack.rand((2, 2, 3)), whole[2:])
    attack.set_samples([10, 7])
    assert torch.equal(attack.rand((2, 2, 3)), whole[[3, 0]])
    other = PGD(lambda x: x.flatten(1), AttackConfig(name="pgd", eps=0.1, seed=4))
    other.set_samples([7])
    assert not torch.equal(other.rand((1, 2, 3)), whole[:1])


def test_crafting_does_not_depend_on_the_attack_batch(digits_net):
    net, held = digits_net
    x, y = held.x[:96], held.y[:96]
    a = craft(net.eval(), PGD3, x, y, batch_size=96)
    b = craft(net.eval(), PGD3, x, y, batch_size=32)
    np.testing.assert_allclose(a, b, atol=1e-6)


# --- every source hardens to the same model -----------------------------------------------------------------


LOADER = '''
import numpy as np

def load_data():
    with np.load({path!r}) as npz:
        x, y = npz["x"], npz["y"]
    for s in range(0, len(y), 50):  # batches of another size than the attack's
        yield x[s : s + 50], y[s : s + 50]
'''


class DigitsReader:
    """A CalibrationDataReader written as onnxruntime's quantization docs show."""

    def __init__(self, path, with_labels: bool):
        with np.load(path) as npz:
            x, y = npz["x"], npz["y"]
        feeds = [{"input": x[s : s + 40]} for s in range(0, len(y), 40)]
        if with_labels:
            for f, s in zip(feeds, range(0, len(y), 40)):
                f["label"] = y[s : s + 40]
        self.enum_data = iter(feeds)
        self.labels = y

    def get_next(self):
        return next(self.enum_data, None)


def test_every_source_hardens_to_the_same_model(digits_files, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader

    model, npz = digits_files
    config = dict(attack=PGD3, fraction=0.05, adaptive=False, seed=1)
    (tmp_path / "loader.py").write_text(textwrap.dedent(LOADER.format(path=str(npz))))
    with np.load(npz) as f:
        folder = tmp_path / "npy"
        folder.mkdir()
        np.save(folder / "x.npy", f["x"])
        np.save(folder / "y.npy", f["y"])
        in_memory = Dataset(f["x"], f["y"])
    reader = DigitsReader(npz, with_labels=False)
    # duck-typed: onnxruntime's ABC accepts any class with get_next(), and that is all cloakonnx calls
    assert isinstance(reader, CalibrationDataReader) and CalibrationDataReader not in type(reader).__mro__
    sources = {
        "npz": npz, "npy": folder, "memory": in_memory, "script": LoaderScript(f"{tmp_path / 'loader.py'}:load_data"),
        "reader-labels": from_calibration_reader(reader, labels=reader.labels),
        "reader-key": from_calibration_reader(DigitsReader(npz, with_labels=True), label_key="label"),
    }
    assert reader.get_next() is None  # read once, through get_next(), to its end
    hashes, reports = {}, {}
    for name, data in sources.items():
        out = tmp_path / f"{name}.onnx"
        report = harden(model, data, HardenConfig(output=out, **config))
        hashes[name], reports[name] = sha256(out), report
    assert len(set(hashes.values())) == 1, hashes
    figures = {n: json.dumps([r.masked, r.clean_accuracy, r.adversarial_accuracy, r.calibration]) for n, r in
               reports.items()}
    assert len(set(figures.values())) == 1
    # the one model every source gave is a hardened one (not, say, an untouched copy): a valid graph
    # whose cloak Mul zeroes as many features as the report says were masked
    from cloakonnx.graph import find_mask

    hardened = onnx.load(str(tmp_path / "npz.onnx"))
    onnx.checker.check_model(hardened)
    report = reports["npz"]
    mask = find_mask(hardened, report.feature_tensor)
    assert report.masked > 0 and mask is not None and int((mask[1] == 0).sum()) == report.masked


def test_loader_script_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def load_data():\n    yield [1, 2, 3]\n")
    with pytest.raises(CloakError, match="must be a pair"):
        load_data(LoaderScript(str(bad)))
    with pytest.raises(CloakError, match="no function 'other'"):
        load_data(LoaderScript(f"{bad}:other"))
    with pytest.raises(CloakError, match="no file"):
        load_data(LoaderScript(str(tmp_path / "missing.py")))
    bad.write_text("def load_data():\n    raise ValueError('boom')\n    yield\n")
    with pytest.raises(CloakError, match="ValueError: boom"):
        load_data(LoaderScript(str(bad)))


def test_calibration_reader_needs_labels(digits_files):
    _, npz = digits_files
    with pytest.raises(CloakError, match="needs labels"):
        from_calibration_reader(DigitsReader(npz, with_labels=False))
    with pytest.raises(CloakError, match="ran out"):
        from_calibration_reader(DigitsReader(npz, with_labels=False), labels=[0, 1, 2])


def test_spooled_rows_remove_their_file_when_dropped(digits, tmp_path):
    import gc
    import pickle
    from pathlib import Path

    np.savez_compressed(tmp_path / "c.npz", x=digits.x[:50], y=digits.y[:50])
    rows = load_data(tmp_path / "c.npz").x
    path = Path(rows.path)
    copy = pickle.loads(pickle.dumps(rows))  # what a Ray worker gets: it must not remove the file
    del copy
    gc.collect()
    assert path.exists()
    np.testing.assert_array_equal(rows[:5], digits.x[:5])
    del rows
    gc.collect()
    assert not path.exists()
