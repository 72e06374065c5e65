"""Build, import and backend choice as a user meets them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers import ext_expected, factors, gen

import ssa_kernels
from ssa_kernels import _backends

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, cwd=cwd or ROOT / "tests", timeout=300)


def test_extension_loaded_when_built():
    """CI builds _C (with CUDA sources): a silent fallback to 'reference' must fail here."""
    if not ext_expected():
        pytest.skip("SSA_KERNELS_EXPECT_EXT=1 is set where the extension is built (CI, make)")
    assert _backends.extension() is not None, _backends.extension_error()
    assert "cpu" in ssa_kernels.available_backends("cpu")
    if os.environ.get("SSA_KERNELS_EXPECT_CUDA", "0") == "1":
        assert _backends.extension().WITH_CUDA == 1


def test_import_without_extension_warns_once_and_falls_back():
    code = """
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ssa_kernels._C":
                    raise ImportError("simulated: no compiled extension")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import ssa_kernels
        msgs = [str(x.message) for x in w if "ssa_kernels" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "could not be loaded" in msgs[0] and "no-build-isolation" in msgs[0], msgs[0]
        import torch
        print(ssa_kernels.available_backends("cpu"))
        h, t = ssa_kernels.lowrank_linear(torch.randn(3, 4), torch.eye(4, 2), torch.ones(2),
                                          torch.eye(4, 2))
        try:
            ssa_kernels.lowrank_linear(torch.randn(3, 4), torch.eye(4, 2), torch.ones(2),
                                       torch.eye(4, 2), backend="cpu")
        except RuntimeError as err:
            assert "did not load" in str(err), err
        else:
            raise AssertionError("backend='cpu' without _C must raise")
        print("ok")
    """
    res = _run(code, env={"TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr
    assert "['reference']" in res.stdout and "ok" in res.stdout


def test_environment_variable_overrides_auto(monkeypatch):
    g = gen(0)
    U, s, V = (t.float() for t in factors(4, 5, 2, g))
    x = torch.randn(3, 5)
    calls = []
    real = _backends.REGISTRY["reference"].op

    def spy(op):
        calls.append(op)
        return real(op)

    monkeypatch.setattr(_backends.Backend, "op", lambda self, op: spy(op) if self.name ==
                        "reference" else _backends._ops.get(op, self.family))
    monkeypatch.setenv(_backends.ENV_BACKEND, "reference")
    ssa_kernels.lowrank_linear(x, U, s, V)
    assert calls == ["lowrank_linear"]
    monkeypatch.setenv(_backends.ENV_BACKEND, "nonsense")
    with pytest.raises(ValueError, match="SSA_KERNELS_BACKEND must be"):
        ssa_kernels.lowrank_linear(x, U, s, V)
    monkeypatch.setenv(_backends.ENV_BACKEND, "cuda")
    with pytest.raises(RuntimeError, match="environment variable SSA_KERNELS_BACKEND asks"):
        ssa_kernels.lowrank_linear(x, U, s, V)


def test_auto_prefers_compiled_backend_on_cpu():
    names = ssa_kernels.available_backends("cpu")
    assert names[0] == ("cpu" if _backends.extension() is not None else "reference")
    assert "reference" in names
    assert set(names) <= {"reference", "cpu", "triton"}


def test_isolated_build_stops_at_once_with_advice():
    """`pip install .` (build isolation, no torch inside) must stop and say what to do."""
    code = f"""
        import importlib.abc, runpy, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("No module named 'torch'")
        sys.meta_path.insert(0, NoTorch())
        sys.argv = ["setup.py", "--name"]
        runpy.run_path({str(ROOT / "setup.py")!r}, run_name="__main__")
    """
    res = _run(code, cwd=ROOT, env={"SSA_KERNELS_NO_EXT": "0"})
    assert res.returncode != 0
    assert "--no-build-isolation" in res.stderr + res.stdout


def test_pyproject_keeps_torch_out_of_build_requirements():
    text = (ROOT / "pyproject.toml").read_text()
    build = text.split("[build-system]")[1].split("[project]")[0]
    assert "torch" not in build.split("requires")[1].split("]")[0]
