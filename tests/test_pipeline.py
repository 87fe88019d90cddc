"""pipeline.py, runner.py and timing.py: the stage timer, the Runner (onnxruntime and torch views of one model), loading and
checking data against the model, the calibration/validation split, and the attack fallback."""
import time

import numpy as np
import pytest

from cloakonnx.attacks import AttackConfig
from cloakonnx.config import MaskConfig
from cloakonnx.data import Dataset, Preprocess, load_npz
from cloakonnx.errors import CloakError
from cloakonnx.graph import load_model, resolve_target
from cloakonnx.pipeline import choose_attack, load_checked, prepare
from cloakonnx.runner import Runner
from cloakonnx.timing import StageTimer

from .conftest import UNSUPPORTED_OP, with_unsupported_op

FGSM = AttackConfig(name="fgsm", eps=0.1)


# --- StageTimer ------------------------------------------------------------------------------------------


class FakeClock:
    """A clock the test moves by hand: stage times are exact, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timer_with_clocks():
    wall, cpu = FakeClock(), FakeClock()
    return StageTimer(wall, cpu), wall, cpu


def test_repeated_stages_add_up():
    timer, wall, _ = timer_with_clocks()
    for _ in range(3):
        with timer("wait"):
            wall.now += 0.5
    with timer("other"):
        wall.now += 0.25
    assert set(timer.wall) == set(timer.cpu) == {"wait", "other"}
    assert timer.wall == {"wait": 1.5, "other": 0.25}


def test_nested_stages_are_each_recorded():
    timer, wall, _ = timer_with_clocks()
    with timer("outer"):
        wall.now += 2.0
        with timer("inner"):
            wall.now += 4.0
    assert timer.wall == {"inner": 4.0, "outer": 6.0}  # the outer stage includes the inner one


def test_cpu_time_is_recorded_separately_from_wall_time():
    timer, wall, cpu = timer_with_clocks()
    with timer("sleep"):
        wall.now += 2.0
    with timer("busy"):
        wall.now += 1.0
        cpu.now += 0.75
    assert timer.wall == {"sleep": 2.0, "busy": 1.0} and timer.cpu == {"sleep": 0.0, "busy": 0.75}


def test_the_default_clocks_are_the_process_clocks():
    timer = StageTimer()
    with timer("busy"):
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
    assert timer.cpu["busy"] >= 0.05 and timer.wall["busy"] > 0


def test_a_stage_that_raises_is_still_recorded():
    timer, wall, _ = timer_with_clocks()
    with pytest.raises(ZeroDivisionError):
        with timer("fails"):
            wall.now += 3.0
            1 / 0
    assert timer.wall["fails"] == 3.0 and "fails" in timer.cpu


def test_data_wait_adds_the_clock_s_growth_as_its_own_stage():
    class Wait:
        seconds = 1.0

    timer, clock = StageTimer(), Wait()
    with timer.data_wait(clock):
        clock.seconds += 0.5
    with timer.data_wait(clock):
        clock.seconds += 0.25
    assert timer.wall["data wait"] == 0.75


def test_rounded_keeps_the_keys_and_rounds_to_milliseconds():
    timer = StageTimer()
    timer.wall, timer.cpu = {"a": 1.23456, "b": 0.0004}, {"a": 0.98765, "b": 0.0}
    wall, cpu = timer.rounded()
    assert wall == {"a": 1.235, "b": 0.0} and cpu == {"a": 0.988, "b": 0.0}


# --- Runner ------------------------------------------------------------------------------------------------


def _runner(model_path, preprocess=Preprocess(), model=None):
    model = model if model is not None else load_model(model_path)
    target = resolve_target(model, None, None)
    return Runner(model, target.logits, [target.feature], preprocess, device="cpu"), target


@pytest.fixture(scope="module")
def runner(digits_files):
    return _runner(digits_files[0])[0]


@pytest.fixture(scope="module")
def data(digits_files):
    return load_npz(digits_files[1])


def _ort_logits(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.asarray(x)})[0]


def test_runner_accuracy_matches_plain_onnxruntime(runner, data, digits_files):
    manual = float((_ort_logits(digits_files[0], data.x).argmax(1) == data.y).mean())
    assert 0.9 < manual < 1.0  # a real, imperfect classifier: the comparison means something
    assert runner.accuracy(data) == manual
    assert runner.accuracy(data, batch_size=7) == manual  # batching does not change it
    np.testing.assert_array_equal(runner.predict(data.x[:50]), _ort_logits(digits_files[0], data.x[:50]).argmax(1))
    # with other inputs for the same labels (here: reversed images)
    flipped = data.x[:, :, :, ::-1].copy()
    assert runner.accuracy(data, x=flipped) == float((_ort_logits(digits_files[0], flipped).argmax(1) == data.y).mean())


def test_runner_reads_the_number_of_classes(runner, data):
    assert runner.num_classes(data) == 10
    assert runner.input.name == "input" and runner.logits == "logits"


def test_feed_applies_mean_and_std(digits_files, data):
    runner, _ = _runner(digits_files[0], Preprocess(mean=[0.25], std=[0.5]))
    x = data.x[:4]
    fed = runner.feed(x)
    assert fed.dtype == np.float32
    np.testing.assert_allclose(fed, (x - 0.25) / 0.5, rtol=1e-6)
    assert fed.min() == pytest.approx(-0.5)  # black pixels moved from 0 to -0.5
    # onnxruntime sees the normalised input, and the torch view normalises the same way
    np.testing.assert_array_equal(runner.predict(x), _ort_logits(digits_files[0], (x - 0.25) / 0.5).argmax(1))
    import torch

    with torch.no_grad():
        torch_logits = runner.torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_logits, _ort_logits(digits_files[0], fed), rtol=1e-4, atol=1e-4)


def test_model_for_square_runs_onnxruntime(runner, data, digits_files):
    import torch

    call = runner.model_for("square")
    assert call is not runner.torch_model
    x = torch.from_numpy(data.x[:300])  # more than one onnxruntime batch
    out = call(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (300, 10)
    assert out.grad_fn is None  # no autograd through onnxruntime
    np.testing.assert_array_equal(out.numpy(), _ort_logits(digits_files[0], data.x[:300]))
    # gradient attacks get the differentiable torch graph instead
    assert runner.model_for("pgd") is runner.torch_model
    assert runner.model_for("fgsm")(x[:2].clone().requires_grad_(True)).grad_fn is not None


# --- load_checked ------------------------------------------------------------------------------------------


def test_load_checked_returns_the_data_and_classes(runner, digits_files):
    ds, n = load_checked(digits_files[1], runner, MaskConfig())
    assert n == 10 and len(ds) == 719 and ds.x.shape[1:] == (1, 8, 8)


def test_load_checked_refuses_labels_out_of_range(runner, data):
    bad = Dataset(data.x[:20], np.where(np.arange(20) == 5, 10, data.y[:20]))
    with pytest.raises(CloakError, match=r"labels range over \[0, 10\] but the model has 10 classes \(0\.\.9\)"):
        load_checked(bad, runner, MaskConfig())
    negative = Dataset(data.x[:20], np.where(np.arange(20) == 0, -1, data.y[:20]))
    with pytest.raises(CloakError, match=r"labels range over \[-1, "):
        load_checked(negative, runner, MaskConfig())


def test_load_checked_refuses_the_wrong_shape(runner):
    with pytest.raises(CloakError, match=r"shape \(1, 4, 4\).*\[N, 1, 8, 8\]"):
        load_checked(Dataset(np.zeros((6, 1, 4, 4), np.float32), np.zeros(6, np.int64)), runner, MaskConfig())
    with pytest.raises(CloakError, match=r"shape \(3, 8, 8\)"):
        load_checked(Dataset(np.zeros((6, 3, 8, 8), np.float32), np.zeros(6, np.int64)), runner, MaskConfig())


def test_load_checked_uses_the_box(runner, data):
    with pytest.raises(CloakError, match="outside --bounds 0,0.5"):
        load_checked(data, runner, MaskConfig(preprocess=Preprocess((0.0, 0.5))))


# --- prepare ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unique_data(data):
    """The held-out digits without duplicate images, so rows identify samples."""
    _, first = np.unique(np.asarray(data.x).reshape(len(data), -1), axis=0, return_index=True)
    return data.subset(np.sort(first))


def _rows(ds):
    return {row.tobytes() for row in np.asarray(ds.x).reshape(len(ds), -1)}


@pytest.mark.parametrize("val_split", [0.2, 0.5])
def test_prepare_splits_disjointly(digits_files, unique_data, val_split):
    p = prepare(digits_files[0], unique_data, MaskConfig(attack=FGSM, val_split=val_split))
    n = len(unique_data)
    assert len(p.val) == round(n * val_split) and len(p.calib) == n - len(p.val)
    assert _rows(p.calib).isdisjoint(_rows(p.val))
    assert _rows(p.calib) | _rows(p.val) == _rows(unique_data)
    assert p.attack.name == "fgsm" and p.fallback is None and p.attack.batch_size == p.attack_batch.size >= 1
    assert p.target.feature == "/11/Flatten_output_0" and p.target.head.width == 64


def test_prepare_split_depends_on_the_seed(digits_files, unique_data):
    a = prepare(digits_files[0], unique_data, MaskConfig(attack=FGSM, seed=0))
    b = prepare(digits_files[0], unique_data, MaskConfig(attack=FGSM, seed=0))
    c = prepare(digits_files[0], unique_data, MaskConfig(attack=FGSM, seed=1))
    assert _rows(a.val) == _rows(b.val) and _rows(a.val) != _rows(c.val)


def test_prepare_validates_the_config_first(digits_files, tmp_path):
    # the config error comes before the (missing) model is read
    with pytest.raises(CloakError, match="--fraction"):
        prepare(tmp_path / "missing.onnx", digits_files[1], MaskConfig(fraction=1.0))


# --- choose_attack ----------------------------------------------------------------------------------------


def test_choose_attack_falls_back_to_square_without_torch_support(digits_files, data):
    from cloakonnx.torch_exec import supported_ops

    assert UNSUPPORTED_OP not in supported_ops()
    runner, _ = _runner(None, model=with_unsupported_op(digits_files[0]))
    assert runner.torch_model is None and runner.unsupported is not None
    assert runner.accuracy(data) > 0.9  # onnxruntime still runs it
    attack, reason = choose_attack(runner, AttackConfig(name="pgd", eps=0.1, norm="l2", steps=7))
    assert attack.name == "square" and attack.norm == "linf"
    assert attack.eps == 0.1 and attack.steps == 7  # the other settings are kept
    assert UNSUPPORTED_OP in reason and "opset" in reason
    with pytest.raises(CloakError, match="gradient-free attack"):
        runner.model_for("pgd")
    # a gradient-free attack needs no fallback
    assert choose_attack(runner, AttackConfig(name="square")) == (AttackConfig(name="square"), None)


def test_choose_attack_keeps_the_attack_when_torch_runs_the_graph(runner):
    wanted = AttackConfig(name="apgd-ce", eps=0.05, norm="l2")
    assert choose_attack(runner, wanted) == (wanted, None)
