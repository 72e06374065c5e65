"""Models and uses that used to train wrongly without an error (issue 13), the recording's
lifetime, option routing, and the structure of the training layer (one method per file,
no import cycles, layers free of training code)."""

from __future__ import annotations

import ast
import copy
import gc
import os
import pathlib
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssa
from ssa.local.units import Unit
from ssa.local.update import through_tail

ROOT = pathlib.Path(__file__).resolve().parents[1]


def mlp(d=12, h=16, c=5, dropout=False):
    torch.manual_seed(0)
    mods = [nn.Linear(d, h), nn.ReLU()] + ([nn.Dropout(0.3)] if dropout else []) + [nn.Linear(h, c)]
    return nn.Sequential(*mods)


def batch(p=24, d=12, c=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, d, generator=g), torch.randint(0, c, (p,), generator=g)


def hooks_of(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_overrides", {}))
    return n


# ---------------------------------------------------------------------------- 3. the output layer
class PostProcessed(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.body, self.how = mlp(), how

    def forward(self, x):
        z = self.body(x)
        return {"log_softmax": lambda: F.log_softmax(z, 1), "scale": lambda: z * 1.0,
                "half": lambda: z / 2, "double": lambda: z.double()}[self.how]()


@pytest.mark.parametrize("method", ["ssa", "dfa", "drtp"])
@pytest.mark.parametrize("how", ["log_softmax", "scale", "half", "double"])
def test_an_output_computed_after_the_last_layer_raises(method, how):
    tr = ssa.Trainer(PostProcessed(how), 5, method=method)
    with pytest.raises(ValueError, match="not the output of any trained layer"):
        tr.step(*batch())


class ConvHead(nn.Module):
    """An all-conv net: the logits are a flatten (a view) of the last conv's N×C×1×1 output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 4))

    def forward(self, x):
        return self.body(x).flatten(1)


@pytest.mark.parametrize("method", ["ssa", "dfa"])
def test_an_output_that_is_a_view_of_the_last_layer_gets_the_error_itself(method):
    tr = ssa.Trainer(ConvHead(), 5, method=method)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 5, (8,))
    tr.step(x, y)
    out = [u for u in tr.units if u.is_output]
    assert [u.name for u in out] == ["body.2"]


def test_a_frozen_output_layer_leaves_every_trained_layer_hidden():
    model = mlp()
    model[2].requires_grad_(False)
    tr = ssa.Trainer(model, 5, method="dfa")
    before = model[2].weight.detach().clone()
    tr.step(*batch())
    assert not any(u.is_output for u in tr.units) and [u.name for u in tr.units] == ["0"]
    assert torch.equal(model[2].weight, before) and model[2].weight.grad is None


# ---------------------------------------------------------------------------- 4. a shared tail module
@pytest.mark.parametrize("method", ["dfa", "ssa"])
def test_one_dropout_after_two_layers_gives_each_layer_its_own_mask(method):
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    shared = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), drop, nn.Linear(16, 16), nn.Tanh(), drop,
                           nn.Linear(16, 5))
    separate = copy.deepcopy(shared)
    separate[5] = nn.Dropout(0.5)  # same draws in the same order: the same masks
    grads = []
    for model in (shared, separate):
        tr = ssa.Trainer(model, 5, method=method, seed=3)
        torch.manual_seed(7)
        with tr.record():
            z = model(batch()[0])
        tr.local_backward(z, batch()[1])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 4
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=0)


def test_one_batchnorm_after_two_layers_is_refused():
    bn = nn.BatchNorm1d(16)
    model = nn.Sequential(nn.Linear(12, 16), bn, nn.ReLU(), nn.Linear(16, 16), bn, nn.ReLU(), nn.Linear(16,
                                                                                                        5))
    with pytest.raises(ValueError, match="follows both '0' and '3'"):
        ssa.Trainer(model, 5, method="dfa")


def test_dropout_tail_carries_the_mask_and_rescale_of_autograd():
    """δ through a dropout tail equals torch.autograd.grad through the same dropout output."""
    torch.manual_seed(0)
    drop = nn.Dropout(0.4).train()
    inp = torch.randn(16, 10, requires_grad=True)
    out = drop(inp)
    delta = torch.randn(16, 10)
    want = torch.autograd.grad(out, inp, delta)[0]
    unit = Unit("u", "dense", nn.Linear(3, 10), [drop], cap={drop: (inp.detach(), out.detach())})
    torch.testing.assert_close(through_tail(unit, delta), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- 5. frozen layers
@pytest.mark.parametrize("method", ["ssa", "dfa", "svd_bp", "bp"])
def test_a_frozen_layer_is_not_trained(method):
    model = mlp()
    model[0].requires_grad_(False)
    tr = ssa.Trainer(model, 5, method=method, schedule=None)
    frozen = tr.model[0]
    before = {k: v.clone() for k, v in frozen.state_dict().items() if isinstance(v, torch.Tensor)}
    for _ in range(3):
        tr.step(*batch())
    assert all(not p.requires_grad for p in frozen.parameters())
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trained = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert not any(any(p is q for q in frozen.parameters()) for p in trained)


def test_a_frozen_ssa_layer_is_not_cut_by_the_rank_schedule():
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    model[2].requires_grad_(False)
    tr = ssa.Trainer(model, 5, schedule=ssa.RankSchedule(2, interval=1, energy=0.5))
    x, y = batch()
    tr.fit([(x, y)], 2)
    assert tr.model[2].rank == 16 and tr.model[0].rank < 12


# ---------------------------------------------------------------------------- 6. nothing recorded
def test_local_backward_without_a_recorded_forward_raises():
    tr = ssa.Trainer(mlp(), 5)
    x, y = batch()
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        tr.local_backward(tr.model(x), y)


def test_a_forward_in_another_thread_is_not_recorded_and_raises():
    tr = ssa.Trainer(mlp(), 5)
    x, y = batch()
    out = {}
    with tr.record():
        t = threading.Thread(target=lambda: out.update(z=tr.model(x)))
        t.start()
        t.join()
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        tr.local_backward(out["z"], y)
    with tr.record():
        z = tr.model(x)
    tr.local_backward(z, y)  # recovers
    with pytest.raises(RuntimeError, match="nothing was recorded"):  # one backward per recording
        tr.local_backward(z, y)


# ---------------------------------------------------------------------------- 8, 9, 10, 11. state
def test_a_checkpoint_that_does_not_fit_leaves_the_trainer_unchanged(tmp_path):
    small = ssa.Trainer(mlp(h=16), 5, rank=4)
    small.step(*batch())
    small.save_checkpoint(str(tmp_path / "small.pt"))
    other = ssa.Trainer(mlp(h=20), 5)  # a wider hidden layer: factors do not fit
    other.step(*batch())
    before = copy.deepcopy(other.model.state_dict())
    ranks, opt = other.ranks(), copy.deepcopy(other.optimizer.state_dict())
    with pytest.raises(ValueError, match="small.pt"):
        other.load_checkpoint(str(tmp_path / "small.pt"))
    after = other.model.state_dict()
    assert other.ranks() == ranks and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
    assert other.optimizer.state_dict()["param_groups"] == opt["param_groups"]


def test_a_checkpoint_at_a_lower_rank_still_loads(tmp_path):
    tr = ssa.Trainer(mlp(), 5)
    tr.step(*batch())
    tr.model[0].truncate(3, tr.optimizer)
    tr.save_checkpoint(str(tmp_path / "cut.pt"))
    fresh = ssa.Trainer(mlp(), 5)
    fresh.load_checkpoint(str(tmp_path / "cut.pt"))
    assert fresh.ranks() == tr.ranks()


def test_a_checkpoint_is_read_without_running_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "ran"),))

    torch.save({"format": 1, "x": Boom()}, tmp_path / "evil.pt")
    tr = ssa.Trainer(mlp(), 5)
    with pytest.raises(ValueError, match="evil.pt"):
        tr.load_checkpoint(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "ran").exists()
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt"):
        tr.load_checkpoint(str(tmp_path / "empty.pt"))


@pytest.mark.parametrize("method", ["ssa", "dfa", "bp"])
def test_a_nan_batch_leaves_batchnorm_statistics_as_they_were(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    tr = ssa.Trainer(model, 5, method=method)
    tr.step(*batch())
    bn = tr.model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x, y = batch()
    x[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="not applied"):
        tr.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    assert all(p.grad is None for p in tr.model.parameters())


def test_best_is_written_before_latest(tmp_path, monkeypatch):
    written = []
    real = ssa.checkpoint.save
    def spy(state, path, **kw):
        written.append(os.path.basename(path))
        real(state, path, **kw)

    monkeypatch.setattr(ssa.checkpoint, "save", spy)
    tr = ssa.Trainer(mlp(), 5)
    data = [batch()]
    tr.fit(data, 2, val_loader=data, checkpoint_dir=str(tmp_path))
    assert written[:2] == ["best.pt", "latest.pt"] and written[-1] == "latest.pt"


def test_resuming_with_other_settings_is_refused(tmp_path):
    data = [batch()]
    ssa.Trainer(mlp(), 5, lr=1e-3).fit(data, 1, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"other settings(.|\n)*groups_lr"):
        ssa.Trainer(mlp(), 5, lr=0.5).fit(data, 2, checkpoint_dir=str(tmp_path), resume=True)
    with pytest.raises(ValueError, match=r"loss"):
        ssa.Trainer(mlp(), 5, loss=ssa.LossConfig(ortho=0.5)).fit(data, 2, checkpoint_dir=str(tmp_path),
                                                                   resume=True)
    hist = ssa.Trainer(mlp(), 5, lr=1e-3).fit(data, 2, checkpoint_dir=str(tmp_path), resume=True)
    assert [r["epoch"] for r in hist] == [1, 2]


# ---------------------------------------------------------------------------- 14. smaller
def test_rank_is_capped_at_each_layers_full_rank():
    tr = ssa.Trainer(mlp(), 5, rank=32)
    assert tr.ranks() == {"0": 12, "2": 5}


def test_fit_on_an_empty_loader_raises():
    with pytest.raises(ValueError, match="no batch"):
        ssa.Trainer(mlp(), 5).fit([], 2)


# ---------------------------------------------------------------------------- options and lifetime
@pytest.mark.parametrize("method, option", [
    ("bp", {"memory": "recompute"}), ("bp", {"local_modules": ["0"]}), ("bp", {"freeze_norms": True}),
    ("svd_bp", {"reorth_every": 5}), ("dfa", {"rank": 4}), ("sgr", {"feedback": "orthogonal"}),
    ("fa", {"loss": ssa.LossConfig(ortho=0.5)}), ("ssa", {"sgr_lambda": 2.0}), ("bp", {"skip": ["0"]}),
])
def test_an_option_that_does_not_apply_raises_naming_who_takes_it(method, option):
    (key,) = option
    with pytest.raises(ValueError,
                       match=rf"option {key}=.* does not apply to method='{method}' \(it applies to"):
        ssa.Trainer(mlp(), 5, method=method, **option)


def test_applicable_filters_a_shared_set_of_options():
    shared = {"memory": "recompute", "rank": 4, "reorth_every": 10, "lr": 0.01}
    for method in ssa.METHODS:
        kept = ssa.methods.applicable(method, shared)
        ssa.Trainer(mlp(), 5, method=method, **kept)  # never raises
    assert ssa.methods.applicable("bp", shared) == {"lr": 0.01}


@pytest.mark.parametrize("method", ["ssa", "dfa", "sgr"])
def test_close_removes_every_hook_and_the_model_still_runs(method):
    model = mlp()
    base = hooks_of(model)
    with ssa.Trainer(model, 5, method=method) as tr:
        assert hooks_of(model) > base
        tr.step(*batch())
    assert hooks_of(model) == base
    model(batch()[0])
    with pytest.raises(RuntimeError, match="closed"):
        tr.step(*batch())


@pytest.mark.parametrize("method", ["ssa", "dfa", "sgr"])
def test_a_collected_trainer_removes_its_hooks(method):
    model = mlp(dropout=True)
    tr = ssa.Trainer(model, 5, method=method)
    assert hooks_of(model) > 0
    tr.step(*batch())
    ref = weakref.ref(tr)
    del tr
    gc.collect()
    assert ref() is None and hooks_of(model) == 0


def test_a_second_trainer_on_the_same_model_trains_as_a_fresh_one():
    model, twin = mlp(), mlp()
    first = ssa.Trainer(model, 5, seed=0)
    first.step(*batch())  # the model now holds SSA layers trained one step (and first's hooks)
    twin = copy.deepcopy(model)
    first_hooks = hooks_of(model)
    a, b = ssa.Trainer(model, 5, seed=4), ssa.Trainer(twin, 5, seed=4)
    for _ in range(2):
        ra, rb = a.step(*batch()), b.step(*batch())
        assert ra == rb
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    a.close()
    assert hooks_of(model) == first_hooks


# ---------------------------------------------------------------------------- structure
def _imports(path: pathlib.Path, package: str) -> set[str]:
    """Modules of ``package`` that the file imports (at module level or inside functions)."""
    tree = ast.parse(path.read_text())
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if mod.endswith(".__init__"):
        mod = mod[: -len(".__init__")]
        pkg = mod
    else:
        pkg = mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != package:
                continue
            out.add(name)
            for a in node.names:  # "from . import x" imports the submodule x
                if (ROOT / pathlib.Path(*name.split("."), a.name)).with_suffix(".py").exists() or \
                        (ROOT / pathlib.Path(*name.split("."), a.name, "__init__.py")).exists():
                    out.add(f"{name}.{a.name}")
    return out


def _graph(package="ssa"):
    graph = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[mod] = {m for m in _imports(path, package) if m != mod}
    return graph


def test_no_import_cycles_in_ssa():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            nxt = nxt if nxt in graph else nxt.rpartition(".")[0]
            # importing a.b runs a/__init__ first: only a real edge if it is not a parent package
            if nxt not in graph or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_layers_do_not_import_training_code():
    graph = _graph()
    training = ("ssa.trainer", "ssa.methods", "ssa.local", "ssa.metrics", "ssa.cli", "ssa.compare",
                "ssa._tape")
    for mod in ("ssa.layers", "ssa.convert", "ssa.loss", "ssa.schedule", "ssa.baselines"):
        assert not [m for m in graph[mod] if m.startswith(training)], mod


def test_the_training_layer_uses_only_the_public_kernel_api():
    for path in (ROOT / "ssa").rglob("*.py"):
        text = path.read_text()
        for private in ("ssa_kernels.reference", "ssa_kernels._checks", "ssa_kernels import reference",
                        "ssa_kernels import _checks"):
            assert private not in text, (path, private)


def test_the_trainer_is_only_the_loop():
    text = (ROOT / "ssa" / "trainer.py").read_text()
    assert len(text.splitlines()) < 500
    assert "self.method ==" not in text and "method ==" not in text
    for path in (ROOT / "ssa").rglob("*.py"):
        if path.parent.name != "methods":
            assert "self.method ==" not in path.read_text(), path
