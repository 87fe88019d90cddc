"""benchmarks/harden_cost.py: the passes it counts from the settings, its count check and its --input/--n options."""
import pytest

from cloakonnx.attacks import AttackConfig
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("harden_cost")


def test_fgsm_makes_one_pass_per_batch_and_pgd_steps_times_restarts(bench):
    fgsm = bench.expected_grad_passes(AttackConfig(name="fgsm", steps=10, restarts=3, batch_size=128), 300, 200, True)
    assert fgsm == {"attack": [128, 128, 44], "evaluation": [128, 72, 128, 72]}
    pgd = bench.expected_grad_passes(AttackConfig(name="pgd", steps=3, restarts=2, batch_size=128), 130, 100, False)
    assert pgd == {"attack": [128] * 6 + [2] * 6, "evaluation": [100] * 6}


def test_statistics_runs_are_ort_batches_of_the_calibration_split_twice(bench):
    assert bench.expected_statistics_runs(600, 256) == [256, 256, 256, 256, 88, 88]


def test_a_count_that_differs_from_the_instrumented_run_stops_the_script(bench):
    bench.check_counts("x", [128, 44], [44, 128])
    with pytest.raises(RuntimeError, match="2 passes .172 samples. counted from the settings, 1 .128 samples."):
        bench.check_counts("x", [128, 44], [128])


def test_n_is_for_digits32_only(bench, capsys):
    args = bench.parse_args(["--input", "digits32"])
    assert (args.n, args.epochs) == (bench.DIGITS32_N, bench.DIGITS32_EPOCHS)
    args = bench.parse_args(["--input", "digits32", "--n", "600", "--epochs", "2"])
    assert (args.n, args.epochs) == (600, 2)
    args = bench.parse_args([])
    assert (args.input, args.n, args.epochs) == ("digits", None, 3)
    with pytest.raises(SystemExit):
        bench.parse_args(["--n", "600"])
    assert "--n needs --input digits32" in capsys.readouterr().err
