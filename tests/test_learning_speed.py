"""benchmarks/learning_speed.py's settings: ATTACK:STEPS[:STOP_LOSS[:LR]], and eps as a fraction."""
import argparse

import pytest

from tests.benchmark_scripts import load_benchmark


def test_settings_and_eps_parse_as_documented():
    bench = load_benchmark("learning_speed")
    assert bench.parse_settings("pgd:300, fgsm:100:0, pgd:200:0:1e-4, pgd:9::1e-3") == [
        ("pgd", 300, None, None), ("fgsm", 100, 0.0, None), ("pgd", 200, 0.0, 1e-4), ("pgd", 9, None, 1e-3)]
    for bad in ("sgd:3", "pgd:x", "pgd", "pgd:3:0:1:2", "pgd:3:y", "pgd:3:0:-1", "pgd:3:0:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="ATTACK:STEPS"):
            bench.parse_settings(bad)
    assert bench.parse_eps("2/255") == 2 / 255 and bench.parse_eps("0.1") == 0.1
