"""The ops train a real network: examples/digits_ssa_ops.py on scikit-learn's digits."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_digits_example_learns_without_backprop():
    pytest.importorskip("sklearn")
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_ssa_ops.py"), "--epochs", "10"],
        capture_output=True, text=True, timeout=600, cwd=ROOT / "tests",
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    acc = float(re.search(r"test accuracy ([0-9.]+)", res.stdout).group(1))
    first = float(re.search(r"epoch +1 .*test acc ([0-9.]+)", res.stdout).group(1))
    # 10 epochs of SSA on digits: well above chance (0.1) and improving.
    assert acc >= 0.85, res.stdout
    assert acc > first, res.stdout
