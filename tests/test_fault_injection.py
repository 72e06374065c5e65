"""Fault injection: ``python -m ssa train`` killed with SIGKILL at random points and while it writes
a checkpoint, then ``--resume``-d, ends with the same bits as a run that was never interrupted.

Every run is a process forked from one "zygote" that imported torch and ssa once (a fresh
interpreter per run would cost seconds of imports each): the zygote forks a child per run, which
runs ``ssa.cli.main`` with stdout/stderr in a log file, and kills it with SIGKILL after a delay
(random kills) or the child kills itself at an injected point of a checkpoint write (``torch.save``
half written, or written but not yet moved into place by ``os.replace``). Any kill point is
valid — before anything was written the resume simply starts from scratch — and the check is
always the same: every ``<method>/latest.pt`` and ``best.pt`` (model, optimizer, schedule, RNG,
history…), ``results.json``, ``history.csv`` and ``config.yaml`` equal the uninterrupted run's,
bit for bit, timing fields (``time_s``, ``wall_s``) aside. One thread everywhere (the thread count
changes float reduction order).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import struct
import subprocess
import sys

import pytest
import torch
import yaml

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

# A small run that still exercises everything a checkpoint holds: two methods (the kill may land in
# either), SSA with a rank cut after every epoch (layers shrink: a resume must resize them), Adam.
ARGV = ["train", "--model", "mlp", "--dataset", "digits", "--method", "ssa,bp", "--epochs", "3",
        "--interval", "1", "--batch-size", "128", "--quiet", "--no-plots"]
TIMING = {"time_s", "wall_s"}
SEED = 2  # random kills: before the first checkpoint, mid-run, around the last one

_BOOT = r'''
import io, json, os, signal, sys, time, traceback
import torch
import ssa.cli
import ssa.data
import tqdm.auto  # noqa: F401 - what every run imports, imported once here
import yaml  # noqa: F401
from sklearn.datasets import load_digits

load_digits()
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # its first use imports torch._dynamo: seconds
real_save, real_replace = torch.save, os.replace


def child(job):
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    kind, _, n = (job.get("fault") or "").partition(":")
    n, done = int(n or 0), [0]  # checkpoint writes finished (os.replace of a *.pt)

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj, f, *args, **kwargs):
        if kind == "save-partial" and done[0] + 1 == n:  # half the bytes on disk, then killed
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            out.flush()
            die()
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".pt"):
            if kind == "replace" and done[0] + 1 == n:  # complete temporary file, not yet in place
                die()
            done[0] += 1
            print("CKPT", os.path.relpath(str(dst), job["argv"][job["argv"].index("--out") + 1]), flush=True)
        return real_replace(src, dst, *args, **kwargs)

    torch.save, os.replace = save, replace
    return ssa.cli.main(job["argv"])


def fork(job):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(job) or 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


for line in sys.stdin:  # a batch of jobs, run side by side; one status line per batch
    jobs = json.loads(line)
    start = time.monotonic()
    pids = [fork(job) for job in jobs]
    status = [None] * len(jobs)
    armed = [None if job.get("after") else start for job in jobs]  # when the delay starts to count
    while any(s is None for s in status):
        for k, (pid, job) in enumerate(zip(pids, jobs)):
            if status[k] is not None:
                continue
            got, code = os.waitpid(pid, os.WNOHANG)
            if armed[k] is None and os.path.exists(job["log"]):  # "after" checkpoint writes done
                with open(job["log"]) as f:
                    if f.read().count("CKPT ") >= job["after"]:
                        armed[k] = time.monotonic()
            timer = False
            limit = 300.0 if job.get("delay") is None else job["delay"]
            if not got and time.monotonic() - (armed[k] or start) >= (limit if armed[k] else 300.0):
                os.kill(pid, signal.SIGKILL)
                _, code = os.waitpid(pid, 0)
                got, timer = pid, True
            if got:
                status[k] = {"signal": os.WTERMSIG(code) if os.WIFSIGNALED(code) else None,
                             "code": os.WEXITSTATUS(code) if os.WIFEXITED(code) else None,
                             "timer": timer, "wall": time.monotonic() - start}
        time.sleep(0.002)
    print(json.dumps(status), flush=True)
'''


@pytest.fixture(scope="module")
def zygote():
    """``run(jobs) -> statuses``: each job ``{"argv", "log", "fault", "delay"}`` forked side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)

    def run(jobs: list[dict]) -> list[dict]:
        proc.stdin.write(json.dumps([{**job, "log": str(job["log"])} for job in jobs]) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote process died (exit {proc.poll()})")
        return json.loads(line)

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


def _finished(status: dict, log) -> None:
    assert status["code"] == 0, f"exit {status}:\n{log.read_text()}"


@pytest.fixture(scope="module")
def baseline(zygote, tmp_path_factory):
    """The uninterrupted run, and the checkpoint files it writes in order (ssa/best.pt, ssa/latest.pt…)."""
    out = tmp_path_factory.mktemp("fault") / "baseline"
    log = out.parent / "baseline.log"
    _finished(zygote([{"argv": ARGV + ["--out", str(out)], "log": log}])[0], log)
    writes = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("CKPT ")]
    assert writes and all(w.endswith((os.sep + "latest.pt", os.sep + "best.pt")) for w in writes)
    return out, writes


# ---------------------------------------------------------------------------- comparison
def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _differences(a, b, where: str = "") -> list[str]:
    """Paths at which ``a`` and ``b`` differ (bit for bit), timing fields skipped."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        same = a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))
        return [] if same else [f"{where}: tensor values differ (max |Δ| "
                                f"{(a.double() - b.double()).abs().max().item():.3g})"
                                if a.is_floating_point() else f"{where}: tensor values differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in dict.fromkeys([*a, *b]) if k not in TIMING]
        out = []
        for k in keys:
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'the resumed run' if k in a else 'the baseline'}")
            else:
                out += _differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        same = _bits(a) == _bits(b) or (math.isnan(a) and math.isnan(b))
        return [] if same else [f"{where}: {a!r} vs {b!r}"]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} vs {b!r}"]


def _csv(path):
    rows = list(csv.DictReader(path.open()))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _artefacts(out, writes) -> dict:
    found = {name: torch.load(out / name, map_location="cpu", weights_only=True)
             for name in sorted(set(writes))}
    found["results.json"] = json.loads((out / "results.json").read_text())
    found["history.csv"] = _csv(out / "history.csv")
    found["config.yaml"] = {k: v for k, v in yaml.safe_load((out / "config.yaml").read_text()).items()
                            if k != "out"}
    return found


# ---------------------------------------------------------------------------- the scenarios
SCENARIOS = ["first checkpoint half written", "a later latest.pt half written",
             "latest.pt complete but not moved into place", "a best.pt half written after an earlier epoch"]
RANDOM_KILLS = 3


def _fault(name: str, writes: list[str]) -> str:
    """The injected fault of a named scenario, at a checkpoint write picked from the baseline's writes."""
    latest = [i + 1 for i, w in enumerate(writes) if w.endswith("latest.pt")]
    best = [i + 1 for i, w in enumerate(writes) if w.endswith("best.pt") and i > 1] or [2]
    return {"first checkpoint half written": "save-partial:1",
            "a later latest.pt half written": f"save-partial:{latest[1]}",
            "latest.pt complete but not moved into place": f"replace:{latest[len(latest) // 2]}",
            "a best.pt half written after an earlier epoch": f"save-partial:{best[0]}"}[name]


@pytest.fixture(scope="module")
def resumed(zygote, baseline, tmp_path_factory):
    """Every scenario killed, then resumed (side by side); name -> (killed status, differences)."""
    base, writes = baseline
    root = tmp_path_factory.mktemp("killed")
    rng = random.Random(SEED)
    jobs = {name: {"fault": _fault(name, writes)} for name in SCENARIOS}
    for i in range(RANDOM_KILLS):  # SIGKILL a random time after a random number of checkpoint writes
        jobs[f"random kill {i}"] = {"after": rng.randint(0, len(writes) - 1), "delay": rng.uniform(0.0, 0.5)}
    names = list(jobs)
    for k, name in enumerate(names):
        jobs[name].update(argv=ARGV + ["--out", str(root / f"run{k}")], log=root / f"run{k}.killed.log")
    killed = dict(zip(names, zygote([jobs[n] for n in names])))
    for name in names:  # how far each got: checkpoint writes completed before the kill
        text = jobs[name]["log"].read_text() if jobs[name]["log"].exists() else ""
        killed[name]["checkpoints"] = sum(line.startswith("CKPT ") for line in text.splitlines())
    resumes = [{"argv": jobs[n]["argv"] + ["--resume"], "log": root / f"run{k}.resume.log"}
               for k, n in enumerate(names)]
    out = {}
    for name, job, status in zip(names, resumes, zygote(resumes)):
        _finished(status, job["log"])
        run = root / f"run{names.index(name)}"
        out[name] = (killed[name], _differences(_artefacts(run, writes), _artefacts(base, writes)))
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_killed_while_writing_a_checkpoint_resumes_bit_exact(resumed, name):
    status, differences = resumed[name]
    assert status["signal"] == 9 and not status["timer"], f"the injected kill did not happen: {status}"
    assert not differences, f"resumed after {name} differs from the uninterrupted run:\n  " + "\n  ".join(
        differences[:20])


@pytest.mark.parametrize("k", range(RANDOM_KILLS))
def test_killed_at_a_random_point_resumes_bit_exact(resumed, k):
    status, differences = resumed[f"random kill {k}"]
    print(f"random kill {k}: {status}")
    assert status["signal"] == 9 or status["code"] == 0, status  # killed, or done before the kill
    assert not differences, (f"resumed after a SIGKILL at {status['wall']:.2f} s ({status['checkpoints']} "
                             "checkpoint writes done) differs from the uninterrupted run:\n  "
                             + "\n  ".join(differences[:20]))
