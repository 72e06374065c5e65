"""ssa.checkpoint: atomic and distributed-safe writes, weights-only reads with clear errors,
model state checked before anything is touched."""

from __future__ import annotations

import builtins
import os
import pickle
import re
import threading

import pytest
import torch
from _helpers import batch, mlp, run_distributed
from torch import nn

import ssa
from ssa import checkpoint as ck


def _state(**extra):
    return {"format": ck.FORMAT, "w": torch.arange(6.0).reshape(2, 3), "n": 3, "name": "x", **extra}


def _model_state(model):
    """Every entry of the model's state, cloned (tensors) or copied, to compare bit for bit."""
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else dict(v)
            for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------- save
def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest.pt"
    ck.save(_state(), path)
    assert torch.equal(ck.load(path)["w"], _state()["w"])
    ck.save(_state(n=4), str(path))  # replaces
    assert ck.load(path)["n"] == 4
    assert sorted(os.listdir(tmp_path)) == ["latest.pt"]


def test_failed_save_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "latest.pt"
    ck.save(_state(), path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ck.save(_state(bad=lambda: 0), path)  # a lambda cannot be pickled
    assert ck.load(path)["n"] == 3
    assert sorted(os.listdir(tmp_path)) == ["latest.pt"]


def test_save_refuses_a_non_dict(tmp_path):
    with pytest.raises(TypeError, match="must be a dict"):
        ck.save([1, 2], tmp_path / "x.pt")


def test_concurrent_writers_never_share_a_temporary_name(tmp_path, monkeypatch):
    # The old scheme (every writer uses path + ".tmp") loses the race: one writer's os.replace
    # moves the other's temporary away and that one fails with FileNotFoundError.
    path = tmp_path / "latest.pt"
    real_save = torch.save
    gate = threading.Barrier(4)

    def slow_save(obj, f, *a, **kw):
        gate.wait(timeout=30)  # every writer has its temporary open before any replaces
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", slow_save)
    errors = []

    def write(i):
        try:
            ck.save(_state(n=i), path)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.undo()
    assert not errors, errors
    assert ck.load(path)["n"] in range(4)
    assert sorted(os.listdir(tmp_path)) == ["latest.pt"]


def test_new_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        ck.save(_state(), tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.pt").st_mode & 0o777) == 0o640
    os.chmod(tmp_path / "a.pt", 0o600)
    ck.save(_state(), tmp_path / "a.pt")  # a replaced file keeps its mode
    assert (os.stat(tmp_path / "a.pt").st_mode & 0o777) == 0o600


def _save_on_every_rank(rank, world, path, out):
    # every rank saves a different state to the same file (what fit() does under torchrun)
    ck.save(_state(n=rank), path)
    seen = ck.load(path)["n"]  # the file is complete when save returns, on every rank
    torch.save({"seen": seen, "files": sorted(os.listdir(os.path.dirname(path)))}, f"{out}.{rank}")


def test_under_a_process_group_only_rank_0_writes_and_every_rank_waits(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = str(tmp_path / "seen")
    run_distributed(_save_on_every_rank, 2, str(ckpt / "latest.pt"), out)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got == {"seen": 0, "files": ["latest.pt"]}


# ---------------------------------------------------------------------- load: errors name the file
def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ck.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"latest\.pt.*empty \(0 bytes\)"):
        ck.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 10])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "latest.pt"
    ck.save(_state(big=torch.randn(1000)), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ck.CheckpointError, match=r"latest\.pt.*truncated or corrupt"):
        ck.load(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(b"this is not a checkpoint at all\n" * 10)
    with pytest.raises(ck.CheckpointError, match=r"latest\.pt"):
        ck.load(path)


def test_not_a_dict_and_wrong_format(tmp_path):
    path = tmp_path / "x.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ck.CheckpointError, match=r"x\.pt.*holds a list, not a dict"):
        ck.load(path)
    torch.save({"format": 99}, path)
    with pytest.raises(ck.CheckpointError, match=r"x\.pt.*format 99"):
        ck.load(path)
    torch.save({"model": {}}, path)
    with pytest.raises(ck.CheckpointError, match=r"no 'format' entry"):
        ck.load(path)
    assert ck.load(path, format=None) == {"model": {}}
    assert ck.load(path, format=None, map_location="cpu") == {"model": {}}


class _RunsCode:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "raw-pickle"])
def test_a_crafted_checkpoint_cannot_run_code(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "os.system":
        payload = _RunsCode(os.system, f"touch {marker}")
    else:
        payload = _RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    state = {"format": ck.FORMAT, "model": {}, "history": [payload]}
    if how == "raw-pickle":  # the legacy (non-zip) torch format is a plain pickle
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)
    else:
        torch.save(state, path)
    with pytest.raises(ck.CheckpointError, match=r"evil\.pt.*was refused") as info:
        ck.load(path)
    named = "system" if how == "os.system" else "exec"  # torch names "posix.system", "exec"
    assert re.search(rf"GLOBAL (\w+\.)?{named}\b", str(info.value)), str(info.value)
    assert not marker.exists()


# ---------------------------------------------------------------------- everything the trainer saves
@pytest.mark.parametrize("method,kw", [
    ("ssa", dict(lr_milestones=(1,), align_every=2, measure_memory=True)),
    ("ssa", dict(lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
                 optimizer="adamw")),
    ("ssa", dict(lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5 ** e),
                 memory="recompute")),
    ("bp", dict(optimizer="sgd", lr_milestones=(1,))),
    ("svd_bp", {}), ("dfa", {}), ("drtp", {}), ("fa", {}), ("usf", {}), ("brsf", {}), ("sgr", {}),
])
def test_every_trainer_checkpoint_loads_weights_only(tmp_path, method, kw):
    x, y = batch(p=32)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    tr = ssa.Trainer(mlp(), 5, method=method, **kw)
    tr.fit(loader, 2, val_loader=loader, checkpoint_dir=str(tmp_path))
    if method == "ssa" and kw.get("optimizer", "adam") != "sgd":
        assert tr.optimizer.defaults.get("fused") in (True, None)
    for name in ("latest.pt", "best.pt"):
        state = ck.load(tmp_path / name)  # weights_only=True
        assert state["method"] == method and state["history"] and state["rng"]["torch"].dtype == torch.uint8
    ck.save(tr.state_dict(), tmp_path / "again.pt")
    state = ck.load(tmp_path / "again.pt")
    torch.manual_seed(0)
    fresh = ssa.Trainer(mlp(), 5, method=method, **kw)
    fresh.load_state_dict(state)
    _assert_state_equal(_model_state(fresh.model), _model_state(tr.model))
    assert fresh.optimizer.state_dict()["param_groups"] == tr.optimizer.state_dict()["param_groups"]
    if tr.lr_scheduler is not None:
        assert fresh.lr_scheduler.state_dict() == tr.lr_scheduler.state_dict()


# ---------------------------------------------------------------------- model state
def _trainer(sizes=(12, 32, 24, 5), seed=0):
    torch.manual_seed(seed)
    tr = ssa.Trainer(mlp(sizes), 5, seed=seed)
    x, y = batch()
    tr.step(x, y)  # optimizer state, feedback and targets exist
    return tr


def test_a_checkpoint_of_another_shape_is_refused_and_the_model_is_untouched():
    tr = _trainer()
    other = _trainer(sizes=(12, 20, 24, 5), seed=1)
    other.ssa_layers()["2"].truncate(3)  # a lower rank too: U, s, V of another rank and width
    before = _model_state(tr.model)
    ranks = tr.ranks()
    with pytest.raises(ValueError) as info:
        ck.load_model_state(tr.model, other.model.state_dict(), what="checkpoint x.pt")
    msg = str(info.value)
    assert msg.startswith("checkpoint x.pt does not fit the model")
    assert "0.U: shape (20, 12), expected (32, 12)" in msg
    assert "2.V: shape (20, 3), expected (32, 3)" in msg
    assert "0.bias: shape (20,) in the checkpoint, (32,) in the model" in msg
    assert tr.ranks() == ranks
    _assert_state_equal(_model_state(tr.model), before)


def test_plain_load_state_dict_would_damage_the_model():
    """Why validation comes first: torch resizes SSA factors, then fails on the bias shape."""
    tr = _trainer()
    other = _trainer(sizes=(12, 20, 24, 5), seed=1)
    other.ssa_layers()["0"].truncate(4)
    with pytest.raises(RuntimeError):
        tr.model.load_state_dict(other.model.state_dict())
    assert tr.ranks()["0"] == 4  # resized: the half-loaded model the validation prevents


def test_a_lower_rank_checkpoint_still_loads():
    src = _trainer()
    for name, r in (("0", 5), ("2", 3), ("4", 2)):
        src.ssa_layers()[name].truncate(r, src.optimizer)
    dst = _trainer(seed=3)
    ck.validate_model_state(dst.model, src.model.state_dict())
    ck.load_model_state(dst.model, src.model.state_dict())
    assert dst.ranks() == src.ranks() == {"0": 5, "2": 3, "4": 2}
    _assert_state_equal(_model_state(dst.model), _model_state(src.model))


def test_a_full_rank_checkpoint_loads_into_a_truncated_model():
    src = _trainer()
    dst = _trainer(seed=3)
    dst.ssa_layers()["0"].truncate(2)
    ck.load_model_state(dst.model, src.model.state_dict())
    assert dst.ranks() == src.ranks()
    _assert_state_equal(_model_state(dst.model), _model_state(src.model))


def test_every_problem_is_listed_at_once():
    tr = _trainer()
    sd = dict(tr.model.state_dict())
    del sd["4.bias"]
    sd["9.weight"] = torch.zeros(3)
    sd["0.U"] = sd["0.U"].to(torch.int64)
    sd["2.target_cols"] = torch.tensor([0, 1, 99])
    sd["2.target_U"] = sd["2.target_U"][:, :3]
    sd["2.target_s"] = sd["2.target_s"][:3]
    sd["2._extra_state"] = {**sd["2._extra_state"], "activation": "gelu"}
    sd["4.s"] = torch.ones(4)  # rank 4 but U, V still at rank 5
    before = _model_state(tr.model)
    with pytest.raises(ValueError) as info:
        ck.load_model_state(tr.model, sd)
    msg = str(info.value)
    for part in ("missing keys: 4.bias", "unexpected keys: 9.weight", "0.U: dtype torch.int64",
                 "2.target_cols: column indices in [0, 99]", "unknown activation 'gelu'",
                 "4.U: shape (5, 5), expected (5, 4)"):
        assert part in msg, (part, msg)
    _assert_state_equal(_model_state(tr.model), before)


def test_not_a_dict_and_a_non_tensor_entry():
    tr = _trainer()
    with pytest.raises(ValueError, match="expected a dict"):
        ck.validate_model_state(tr.model, [1])
    sd = dict(tr.model.state_dict())
    sd["0.bias"] = [0.0] * 32
    with pytest.raises(ValueError, match="0.bias: expected a tensor, got list"):
        ck.validate_model_state(tr.model, sd)


def test_plain_modules_are_checked_like_torch_does():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ck.validate_model_state(model, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict())
    bad = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)).state_dict()
    bad["1.num_batches_tracked"] = bad["1.num_batches_tracked"].float()
    with pytest.raises(ValueError) as info:
        ck.validate_model_state(model, bad)
    assert "0.weight: shape (5, 3) in the checkpoint, (4, 3) in the model" in str(info.value)
    assert "1.num_batches_tracked: dtype torch.float32" in str(info.value)


class _Picky(nn.Module):
    """A module with checks of its own that validation cannot know about."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(2))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if bool((state_dict[prefix + "w"] < 0).any()):
            raise RuntimeError("negative w")
        super()._load_from_state_dict(state_dict, prefix, *args)


def test_a_load_that_still_fails_puts_the_model_back():
    torch.manual_seed(0)
    model = nn.Sequential(ssa.SSALinear(6, 8, seed=0), _Picky())
    src = nn.Sequential(ssa.SSALinear(6, 8, seed=1), _Picky())
    src[0].truncate(3)
    src[0].init_feedback(5)
    src[1].w.fill_(-1)
    before = _model_state(model)
    with pytest.raises(RuntimeError, match="negative w"):
        ck.load_model_state(model, src.state_dict())
    assert model[0].rank == 6 and model[0].feedback_P is None
    _assert_state_equal(_model_state(model), before)
