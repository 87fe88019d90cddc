"""--ray: the attacks run on Ray workers, and the results are the same to the byte as in one process.

These run a local Ray instance (``ray.init(num_cpus=2)``) with 2 workers."""
import builtins
import json

import numpy as np
import pytest

from cloakonnx.attacks import AttackConfig
from cloakonnx.config import EvaluateConfig, HardenConfig, RayConfig
from cloakonnx.distributed import plan_shards
from cloakonnx.errors import CloakError
from cloakonnx.evaluate import evaluate
from cloakonnx.harden import harden

from .conftest import sha256

PGD3 = AttackConfig(name="pgd", eps=0.1, steps=3, batch_size=32)


def test_shards_cover_the_data_in_whole_units():
    assert plan_shards(1000, 64, 4) == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert plan_shards(100, 64, 8) == [(0, 64), (64, 100)]
    assert plan_shards(10, 64, 4) == [(0, 10)]
    for n, unit, k in ((4000, 256, 8), (1797, 128, 3), (7, 1, 5)):
        shards = plan_shards(n, unit, k)
        assert shards[0][0] == 0 and shards[-1][1] == n and len(shards) <= k
        assert all(a == b for (_, a), (b, _) in zip(shards, shards[1:]))
        assert all(a % unit == 0 for a, _ in shards)


def test_ray_without_ray_installed_names_the_extra(digits_files, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    model, data = digits_files
    with pytest.raises(CloakError, match=r'pip install "cloakonnx\[ray\]"'):
        harden(model, data, HardenConfig(attack=PGD3, fraction=0.05, adaptive=False, ray=RayConfig()))


def test_cli_ray_workers_needs_ray(digits_files):
    from click.testing import CliRunner

    from cloakonnx.cli import main

    result = CliRunner().invoke(main, ["harden", str(digits_files[0]), "--data", str(digits_files[1]),
                                       "--ray-workers", "2"])
    assert result.exit_code == 2 and "--ray-workers needs --ray" in result.output


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is the [ray] extra (also in [dev])")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


TIMINGS = ("seconds", "stages", "stages_cpu", "data_wait_seconds", "ray", "output")  # not figures


def _same_reports(a: dict, b: dict, drop=TIMINGS) -> None:
    a = {k: v for k, v in a.items() if k not in drop}
    b = {k: v for k, v in b.items() if k not in drop}
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_harden_with_ray_writes_the_same_model(local_ray, digits_files, tmp_path):
    model, data = digits_files
    options = dict(attack=PGD3, fraction=0.05, adaptive=True, max_clean_drop=5.0, ort_batch_size=64)
    here = harden(model, data, HardenConfig(output=tmp_path / "here.onnx", **options))
    there = harden(model, data, HardenConfig(output=tmp_path / "ray.onnx", ray=RayConfig(workers=2), **options))
    assert sha256(tmp_path / "here.onnx") == sha256(tmp_path / "ray.onnx")
    _same_reports(here.to_dict(), there.to_dict())
    assert there.ray["workers"] == 2 and there.ray["shards"] >= 2 and there.ray["address"]
    assert here.ray is None


def test_fine_tuning_with_ray_writes_the_same_model(local_ray, digits_files, tmp_path):
    """--method finetune --ray: the learning loop stays in this process (one batch of 32 a step, too
    small to ship), while choosing the strength and the final check attack on the workers; the
    weights written are the same to the byte."""
    from cloakonnx.config import LearnConfig

    model, data = digits_files
    options = dict(attack=PGD3, method="finetune", learn=LearnConfig(steps=10, batch_size=32), ort_batch_size=64)
    here = harden(model, data, HardenConfig(output=tmp_path / "here.onnx", **options))
    there = harden(model, data, HardenConfig(output=tmp_path / "ray.onnx", ray=RayConfig(workers=2), **options))
    assert here.learning["method"] == "finetune" and here.learning["guard"] is not None
    assert sha256(tmp_path / "here.onnx") == sha256(tmp_path / "ray.onnx")
    drop = {"seconds"}  # the learning's own wall-clock time
    _same_reports({**here.to_dict(), "learning": {k: v for k, v in here.learning.items() if k not in drop}},
                  {**there.to_dict(), "learning": {k: v for k, v in there.learning.items() if k not in drop}})
    assert there.ray["shards"] >= 2 * (len(there.curve) - 1)  # every strength's attack was sharded


def test_evaluate_with_ray_gives_the_same_figures(local_ray, digits_files):
    model, data = digits_files
    options = dict(attacks=("fgsm", "pgd", "square"), eps=(0.05, 0.1), attack=AttackConfig(steps=3, queries=50,
                                                                                                batch_size=32),
                   max_samples=150)
    here = evaluate(model, data, EvaluateConfig(**options)).to_dict()
    there = evaluate(model, data, EvaluateConfig(ray=RayConfig(workers=2), **options)).to_dict()
    _same_reports(here, there)
    assert there["ray"]["workers"] == 2


def test_a_torchvision_export_hardens_the_same_with_ray(local_ray, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from cloakonnx.demo import export_onnx

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(192, 3, 32, 32)
    with torch.no_grad():
        y = net(x).argmax(1).numpy()
    export_onnx(net, x[:2], tmp_path / "r18.onnx")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y)
    options = dict(attack=AttackConfig(name="pgd", eps=2 / 255, steps=2, batch_size=16), fraction=0.02, adaptive=False)
    here = harden(tmp_path / "r18.onnx", tmp_path / "d.npz", HardenConfig(output=tmp_path / "a.onnx", **options))
    there = harden(tmp_path / "r18.onnx", tmp_path / "d.npz",
                   HardenConfig(output=tmp_path / "b.onnx", ray=RayConfig(workers=2), **options))
    assert sha256(tmp_path / "a.onnx") == sha256(tmp_path / "b.onnx")
    _same_reports(here.to_dict(), there.to_dict())


def test_a_failing_shard_is_named_and_nothing_is_written(local_ray, digits_files, digits, tmp_path):
    model, _ = digits_files
    from cloakonnx.data import Dataset, split

    x, y = digits.x[:600].copy(), digits.y[:600]
    calib, _ = split(Dataset(x, y), 0.2, seed=0)
    x[calib.index[-1], 0, 3, 3] = np.nan  # a calibration sample: only a worker reads it
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    out = tmp_path / "out.onnx"
    with pytest.raises(CloakError, match=r"shard \d+ of \d+ \(samples \d+\.\.\d+\): the data has NaN"):
        harden(model, tmp_path / "bad.npz", HardenConfig(attack=PGD3, fraction=0.05, adaptive=False, output=out,
                                                          ray=RayConfig(workers=2)))
    assert not out.exists()


def test_cli_ray_flag_alone_and_with_workers(local_ray, digits_files, tmp_path):
    """`--ray` takes an optional address: alone (even before another option) it means a local instance."""
    from click.testing import CliRunner

    from cloakonnx.cli import main

    result = CliRunner().invoke(main, ["-q", "evaluate", str(digits_files[0]), "--data", str(digits_files[1]),
                                       "--attack", "fgsm", "--eps", "0.1", "--max-samples", "64", "--ray",
                                       "--ray-workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"not JSON: {result.stdout[:2000]}") from None
    assert report["ray"]["workers"] == 2 and report["results"][0]["attack"] == "fgsm"


def test_sweep_with_ray_gives_the_same_curves(local_ray, digits_files):
    from cloakonnx.config import MaskConfig
    from cloakonnx.sweep import sweep

    model, data = digits_files
    here = sweep(model, data, MaskConfig(attack=PGD3)).to_dict()
    there = sweep(model, data, MaskConfig(attack=PGD3, ray=RayConfig(workers=2))).to_dict()
    _same_reports(here, there)
    assert here["curves"]  # the comparison covers real curves
