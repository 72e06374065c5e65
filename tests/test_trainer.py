"""ssa.Trainer: the autograd-free SSA step against the ops, memory modes, local modules,
checkpoints, distributed all-reduce, accuracy on digits, and bad input (DESIGN §5-§9)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import batch, grads, mlp, run_distributed
from torch import nn

import ssa
import ssa_kernels

NO_PENALTY = ssa.LossConfig(align=0.0, ortho=0.0, projection="none")


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------- the step itself

def test_step_is_the_op_sequence_of_design():
    """One trainer update = lowrank_linear → dfa_project → svd_factor_grads per layer (§3, §5, §6)."""
    torch.manual_seed(0)
    model = mlp()
    loss = ssa.LossConfig(align=0.05, ortho=0.5)
    tr = ssa.Trainer(model, 5, loss=loss)
    x, y = batch()
    with tr.record():
        z = model(x)
    assert not z.requires_grad  # no graph is built
    tr.local_backward(z, y)
    got = grads(model)

    L = [m for m in model if isinstance(m, ssa.SSALinear)]
    assert [m.activation for m in L] == ["relu", "relu", "none"]  # ReLU modules folded into the kernel
    hs, ts, xs = [], [], [x]
    for layer in L:
        h, t = ssa_kernels.lowrank_linear(xs[-1], layer.U, layer.s, layer.V, layer.bias, layer.activation,
                                          backend="reference")
        xs.append(h.detach())
        ts.append(t.detach())
        hs.append(h.detach())
    torch.testing.assert_close(z, hs[-1])
    e = (hs[-1].softmax(1) - F.one_hot(y, 5)) / x.shape[0]
    for i, layer in enumerate(L):
        U, s, V = layer.U.detach(), layer.s.detach(), layer.V.detach()
        if i == len(L) - 1:
            delta = e
            align = dict(align=0.0)  # DESIGN §6: the output layer has no feedback, so no target
        else:
            delta = ssa_kernels.dfa_project(e, layer.feedback_P, layer.feedback_sigma, layer.feedback_Q,
                                            hs[i], layer.activation, backend="reference")
            # "feedback" targets: U[:, :k] -> P (each column sign-matched to U's), s[:k] -> sigma, and
            # no V target (BV = V's own leading columns: zero pull)
            k = layer.feedback_P.shape[1]
            assert torch.equal(layer.target_U, layer.feedback_P) and layer.target_V is None
            assert torch.equal(layer.target_cols, torch.arange(k))
            sign = torch.where((U[:, :k] * layer.feedback_P).sum(0) < 0, -1.0, 1.0)
            align = dict(BU=layer.feedback_P * sign, BS=layer.feedback_sigma, BV=V[:, :k], align=0.05)
        want = ssa_kernels.svd_factor_grads(xs[i], ts[i], delta, U, s, V, ce=1.0, ortho=0.5,
                                            backend="reference", **align)
        name = str(list(model).index(layer))
        for suffix, w in zip(("U", "s", "V", "bias"), want):
            torch.testing.assert_close(got[f"{name}.{suffix}"], w, rtol=1e-4, atol=1e-6)


def test_output_layer_uses_the_true_gradient():
    # With no penalties and projection "none" the output layer's update is exactly BP's.
    torch.manual_seed(1)
    model = mlp()
    tr = ssa.Trainer(model, 5, loss=NO_PENALTY)
    x, y = batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    last = model[-1]
    got = {k: getattr(last, k).grad.clone() for k in ("U", "s", "V", "bias")}
    for p in model.parameters():
        p.grad = None
    h = model[:-1](x).detach()
    F.cross_entropy(last(h), y).backward()
    for k, g in got.items():
        torch.testing.assert_close(g, getattr(last, k).grad, rtol=1e-4, atol=1e-6)


def test_gradients_accumulate_like_autograd():
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5)
    x, y = batch()
    for _ in range(2):
        with tr.record():
            z = model(x)
        tr.local_backward(z, y)
        if _ == 0:
            once = grads(model)
    twice = grads(model)
    assert_same({k: 2 * v for k, v in once.items()}, twice, rtol=1e-5, atol=1e-7)


def test_user_loop_matches_trainer_step():
    x, y = batch()
    torch.manual_seed(0)
    a = mlp()
    ta = ssa.Trainer(a, 5, seed=3)  # default factor_lr: the singular values at 3× the learning rate
    ta.step(x, y)
    torch.manual_seed(0)
    b = mlp()
    tb = ssa.Trainer(b, 5, seed=3)
    s_params = [m.s for m in b.modules() if isinstance(m, ssa.SSALayer)]
    others = [p for p in b.parameters() if all(p is not q for q in s_params)]
    opt = torch.optim.Adam([{"params": others}, {"params": s_params, "lr": 3e-3}], lr=1e-3)
    with tb.record():
        z = b(x)
    tb.local_backward(z, y)
    opt.step()
    assert_same(params(a), params(b), rtol=1e-6, atol=1e-7)


def test_norm_after_a_layer_is_forward_only_and_trained_locally():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    tr = ssa.Trainer(model, 5, loss=NO_PENALTY)
    x, y = batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    lin, bn = model[0], model[1]
    assert lin.activation == "none" and isinstance(model[2], nn.ReLU)  # not folded across the norm
    with torch.no_grad():
        a = lin(x)
        xhat = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + bn.eps)
        out = torch.relu(bn.weight * xhat + bn.bias)
        e = (z.softmax(1) - F.one_hot(y, 5)) / x.shape[0]
        dh = ((e @ lin.feedback_Q) * lin.feedback_sigma) @ lin.feedback_P.t()
        delta = dh * (out > 0)
    torch.testing.assert_close(bn.weight.grad, (delta * xhat).sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn.bias.grad, delta.sum(0), rtol=1e-4, atol=1e-6)
    # δ at the activation input is the layer's δa (the norm's Jacobian is not applied).
    want = ssa_kernels.svd_factor_grads(x, x @ lin.V.detach(), delta, lin.U.detach(), lin.s.detach(),
                                        lin.V.detach(), projection="none")
    torch.testing.assert_close(lin.s.grad, want[1], rtol=1e-4, atol=1e-6)


def test_local_module_gets_local_backprop_and_factor_grads_from_the_op():
    """Inside a local module, with no penalties and projection 'none', the SSA layers' factor
    gradients (from svd_factor_grads) equal local autograd's, as do the dense parameters'."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return x + F.gelu(self.norm(self.inner(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), Block(), nn.Linear(16, 5))
    tr = ssa.Trainer(model, 5, loss=NO_PENALTY, local_modules=["2"])
    assert isinstance(model[2].inner, ssa.SSALinear)
    x, y = batch()
    with tr.record():
        z = model(x)
    assert not z.requires_grad
    tr.local_backward(z, y)
    got = {n: p.grad.clone() for n, p in model[2].named_parameters()}
    B = tr.feedback["2"]
    assert B.shape == (16, 5)
    with torch.no_grad():
        xin = model[1](model[0](x))
        e = (z.softmax(1) - F.one_hot(y, 5)) / x.shape[0]
    for p in model.parameters():
        p.grad = None
    (model[2](xin) * (e @ B.t())).sum().backward()
    want = {n: p.grad for n, p in model[2].named_parameters()}
    assert_same(got, want, rtol=1e-4, atol=1e-6)
    assert model[0].U.grad is None  # nothing leaks out of the local module


def test_local_module_may_be_the_output():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), head)
    tr = ssa.Trainer(model, 5, loss=NO_PENALTY, local_modules=[head])
    x, y = batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    got = {n: p.grad.clone() for n, p in head.named_parameters()}
    for p in model.parameters():
        p.grad = None
    xin = model[1](model[0](x)).detach()
    F.cross_entropy(head(xin), y).backward()
    assert_same(got, {n: p.grad for n, p in head.named_parameters()}, rtol=1e-4, atol=1e-6)


def test_layers_left_dense_are_trained_by_plain_dfa():
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, loss=NO_PENALTY, skip=["2"])
    assert type(model[2]) is nn.Linear
    x, y = batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    B = tr.feedback["2"]
    with torch.no_grad():
        h0 = model[1](model[0](x))
        a = model[2](h0)
        e = (z.softmax(1) - F.one_hot(y, 5)) / x.shape[0]
        delta = (e @ B.t()) * (a > 0)
    torch.testing.assert_close(model[2].weight.grad, delta.t() @ h0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model[2].bias.grad, delta.sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(B.norm() ** 2, torch.tensor(5.0), rtol=1e-5, atol=0)


def test_dfa_method_is_plain_dfa_on_the_dense_model():
    """method="dfa" (Nøkland 2016): no SSA layer; hidden layers get (e Bᵀ) ⊙ f'(a), the output e."""
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, method="dfa")
    assert not any(isinstance(m, ssa.SSALayer) for m in model.modules()) and tr.ssa_layers() == {}
    x, y = batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    with torch.no_grad():
        e = (z.softmax(1) - F.one_hot(y, 5)) / x.shape[0]
        h = [x]
        for i in (0, 2):
            h.append(model[i + 1](model[i](h[-1])))
        for j, i in enumerate((0, 2)):
            B = tr.feedback[str(i)]
            assert B.shape == (model[i].out_features, 5)
            delta = (e @ B.t()) * (h[j + 1] > 0)
            torch.testing.assert_close(model[i].weight.grad, delta.t() @ h[j], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(model[i].bias.grad, delta.sum(0), rtol=1e-4, atol=1e-6)
    bp = copy.deepcopy(model)
    bp.zero_grad()
    F.cross_entropy(bp(x), y).backward()
    # the output layer gets the true error
    torch.testing.assert_close(model[4].weight.grad, bp[4].weight.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="a rank schedule needs method='ssa'"):
        ssa.Trainer(mlp(), 5, method="dfa", schedule=ssa.RankSchedule(3))


def test_reorth_every_keeps_factors_orthonormal():
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, reorth_every=1, lr=0.05, loss=ssa.LossConfig(ortho=0.0))
    x, y = batch()
    for _ in range(3):
        tr.step(x, y)
    for layer in tr.ssa_layers().values():
        assert layer.ortho_error() < 1e-5


def test_bp_method_trains_dense_layers():
    torch.manual_seed(0)
    model = ssa.convert(mlp())
    tr = ssa.Trainer(model, 5, method="bp")
    assert not any(isinstance(m, ssa.SSALinear) for m in model.modules())
    x, y = batch()
    before = tr.evaluate([(x, y)])["loss"]
    for _ in range(20):
        tr.step(x, y)
    assert tr.evaluate([(x, y)])["loss"] < before


# ---------------------------------------------------------------------- memory modes

def _deep(depth, width=64, rank=None, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(12, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, 5))
    return ssa.convert(nn.Sequential(*layers), rank=rank)


def _with_local_block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.2), nn.GELU(), nn.Linear(16, 16))
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), block, nn.ReLU(), nn.Linear(16, 5))
    return model, dict(local_modules=[block])


@pytest.mark.parametrize("build", [lambda: (_deep(5, width=32, dropout=0.3), {}), _with_local_block],
                         ids=["norm-dropout-tails", "local-module"])
def test_recompute_gives_the_same_update_as_store(build):
    x, y = batch(p=16)
    out = {}
    for memory in ("store", "recompute"):
        model, kw = build()
        tr = ssa.Trainer(model, 5, memory=memory, seed=1, **kw)
        torch.manual_seed(7)
        for _ in range(3):
            tr.step(x, y)
        out[memory] = params(model)
    assert_same(out["store"], out["recompute"], rtol=1e-6, atol=1e-7)


def test_recompute_peak_memory_is_flat_in_depth():
    x, y = batch(p=1024)
    peaks = {}
    for memory in ("store", "recompute"):
        for depth in (4, 16):
            model = _deep(depth, width=128, rank=4)
            tr = ssa.Trainer(model, 5, memory=memory)
            tr.step(x, y)  # optimizer state exists before measuring
            peaks[memory, depth] = ssa.metrics.cpu_peak_bytes(lambda tr=tr: tr.step(x, y))
    act = 1024 * 128 * 4  # one layer's activation
    assert peaks["store", 16] - peaks["store", 4] > 12 * 2 * act  # x and h kept per layer
    assert peaks["recompute", 16] - peaks["recompute", 4] < 2 * act
    assert peaks["recompute", 16] < peaks["store", 16] / 3


# ---------------------------------------------------------------------- digits, schedule, checkpoints

@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return ssa.data.digits(batch_size=64, seed=0)


def _digits_mlp():
    torch.manual_seed(0)
    return ssa.models.get("mlp", 10, (1, 8, 8))


def test_ssa_and_bp_on_digits(digits):
    """DESIGN §6 measurement: SSA ≥ 94 % in 30 epochs on the CPU; BP in the same test."""
    train, test = digits
    acc = {}
    for method in ("ssa", "bp"):
        tr = ssa.Trainer(_digits_mlp(), 10, method=method)
        hist = tr.fit(train, 30, val_loader=test)
        acc[method] = hist[-1]["val_acc"]
    assert acc["ssa"] >= 0.94, acc
    assert acc["bp"] >= 0.94, acc
    tr = ssa.Trainer(_digits_mlp(), 10, schedule=ssa.RankSchedule(30))
    hist = tr.fit(train, 30, val_loader=test)
    full = {n: m.r0 for n, m in tr.ssa_layers().items()}
    ranks = hist[-1]["ranks"]
    assert all(ranks[n] <= full[n] for n in full) and any(ranks[n] < full[n] for n in full), ranks
    assert [h["ranks"] for h in hist][0] == full  # history records rank per layer per epoch
    assert hist[-1]["val_acc"] >= acc["ssa"] - 0.02, (hist[-1]["val_acc"], acc)


def test_dfa_on_digits(digits):
    """DESIGN §6 measurement: dense DFA 96.4 % on the 64-256-256-10 MLP in 30 epochs."""
    train, test = digits
    train.generator.manual_seed(0)
    hist = ssa.Trainer(_digits_mlp(), 10, method="dfa").fit(train, 30, val_loader=test)
    assert hist[-1]["val_acc"] >= 0.95, hist[-1]


def test_same_seed_same_numbers(digits):
    train, test = digits
    runs = []
    for _ in range(2):
        train.generator.manual_seed(0)
        tr = ssa.Trainer(_digits_mlp(), 10, seed=5)
        hist = tr.fit(train, 2, val_loader=test)
        runs.append((params(tr.model), [h["train_loss"] for h in hist]))
    assert_same(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_resume_continues_exactly(digits, tmp_path):
    train, test = digits

    def run(epochs, out, resume=False):
        schedule = ssa.RankSchedule(4, interval=1, min_fraction=0.5)
        tr = ssa.Trainer(_digits_mlp(), 10, seed=2, schedule=schedule)
        return tr, tr.fit(train, epochs, val_loader=test, checkpoint_dir=str(out), resume=resume)

    train.generator.manual_seed(11)
    full, hist_full = run(4, tmp_path / "a")
    train.generator.manual_seed(11)
    run(2, tmp_path / "b")
    train.generator.manual_seed(999)  # the checkpoint restores the loader's shuffle state
    resumed, hist_resumed = run(4, tmp_path / "b", resume=True)
    assert resumed.ranks() == full.ranks()
    assert any(r < full.ssa_layers()[n].r0 for n, r in full.ranks().items())
    assert_same(params(full.model), params(resumed.model))
    assert [h["train_loss"] for h in hist_full] == [h["train_loss"] for h in hist_resumed]
    assert os.path.exists(tmp_path / "b" / "best.pt")
    # a checkpoint loads into a freshly built model: truncated layers are resized first
    fresh = ssa.Trainer(_digits_mlp(), 10, seed=2)
    state = torch.load(tmp_path / "b" / "latest.pt", weights_only=False)
    fresh.model.load_state_dict(state["model"])
    assert fresh.ranks() == full.ranks()


# ---------------------------------------------------------------------- distributed

def _dist_worker(rank, world, x, y, out):
    torch.manual_seed(0)
    tr = ssa.Trainer(mlp(), 5, seed=4)
    half = x.shape[0] // world
    for _ in range(2):
        tr.step(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    torch.save(params(tr.model), f"{out}.{rank}")


def test_distributed_ranks_agree_with_one_process_on_the_whole_batch(tmp_path):
    x, y = batch(p=16)
    out = str(tmp_path / "params")
    # run_distributed: file rendezvous, barrier before teardown, os._exit (a gloo thread freeing a
    # tensor during interpreter shutdown aborted rank 0 on a loaded machine: tests/_helpers.py)
    run_distributed(_dist_worker, 2, x, y, out)
    p0, p1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert_same(p0, p1)
    torch.manual_seed(0)
    tr = ssa.Trainer(mlp(), 5, seed=4)
    for _ in range(2):
        tr.step(x, y)
    assert_same(p0, params(tr.model), rtol=1e-5, atol=1e-6)


def _dist_fit_worker(rank, world, x, y, folder, epochs, resume):
    torch.manual_seed(0)
    tr = ssa.Trainer(mlp(), 5, seed=4)
    half = x.shape[0] // world
    data = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])]
    tr.fit(data, epochs, val_loader=data, checkpoint_dir=folder, resume=resume)
    torch.save(params(tr.model), os.path.join(folder, f"params.{rank}"))
    torch.save(torch.tensor(tr.best_acc), os.path.join(folder, f"best.{rank}"))


def test_distributed_fit_writes_checkpoints_once_and_resumes_on_every_rank(tmp_path):
    """Under torchrun every rank used to write the same latest.pt.tmp (FileNotFoundError on one)."""
    x, y = batch(p=16)
    folder = str(tmp_path / "run")
    run_distributed(_dist_fit_worker, 2, x, y, folder, 2, False, timeout=120)
    assert sorted(os.listdir(folder)) == ["best.0", "best.1", "best.pt", "latest.pt", "params.0",
                                          "params.1"]  # no temporaries
    straight = torch.load(os.path.join(folder, "params.0"))
    assert_same(straight, torch.load(os.path.join(folder, "params.1")))
    run_distributed(_dist_fit_worker, 2, x, y, folder, 3, True, timeout=120)  # both ranks resume
    assert ssa.checkpoint.load(os.path.join(folder, "latest.pt"))["epoch"] == 3
    assert_same(torch.load(os.path.join(folder, "params.0")), torch.load(os.path.join(folder, "params.1")))
    # each rank validated on its own half: every rank follows rank 0's accuracy (one collective write)
    assert torch.load(os.path.join(folder, "best.0")) == torch.load(os.path.join(folder, "best.1"))


# ---------------------------------------------------------------------- bad input

def test_bad_input_is_refused_clearly():
    x, y = batch()
    with pytest.raises(ValueError, match="method must be one of"):
        ssa.Trainer(mlp(), 5, method="backprop")
    with pytest.raises(ValueError, match="memory must be one of"):
        ssa.Trainer(mlp(), 5, memory="cheap")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ssa.Trainer(mlp(), 5, optimizer="lion")
    with pytest.raises(ValueError, match="num_classes"):
        ssa.Trainer(mlp(), 1)
    with pytest.raises(ValueError, match="no layer"):
        ssa.Trainer(nn.Sequential(nn.Flatten()), 5)
    with pytest.raises(ValueError, match="cannot train parameters"):
        ssa.Trainer(nn.Sequential(nn.Embedding(10, 12), nn.Flatten(), nn.Linear(12, 5)), 5)
    with pytest.raises(ValueError, match="rank"):
        ssa.Trainer(mlp(), 5, rank=0)
    tr = ssa.Trainer(mlp(), 5)
    with pytest.raises(ValueError, match="in_features"):
        tr.step(torch.randn(9, 11), y)
    with pytest.raises(ValueError, match="labels must be in"):
        tr.step(x, y + 5)
    with pytest.raises(ValueError, match="samples"):
        tr.step(x, y[:3])
    wrong = ssa.Trainer(mlp(), 7)
    with pytest.raises(ValueError, match="num_classes does not match"):
        wrong.step(x, y)
    with pytest.raises(ValueError, match="epochs"):
        tr.fit([(x, y)], 0)


def test_a_layer_called_twice_per_forward_is_refused():
    shared = nn.Linear(12, 12)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(12, 5))
    with pytest.warns(UserWarning, match="left dense"):
        tr = ssa.Trainer(model, 5)
    with pytest.raises(RuntimeError, match="ran twice in one forward"):
        tr.step(*batch())


def test_an_ssa_layer_called_twice_per_forward_is_refused():
    shared = ssa.SSALinear(12, 12)
    model = nn.Sequential(nn.Linear(12, 12), shared, nn.ReLU(), shared, nn.Linear(12, 5))
    tr = ssa.Trainer(model, 5)
    with pytest.raises(RuntimeError, match="ran twice in one forward"):
        tr.step(*batch())


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = batch(p=16)
    bad = x.clone()
    bad[0, 0] = math.nan

    class Loader:
        epoch = 0

        def __iter__(self):
            self.epoch += 1
            yield (bad if self.epoch == 2 else x), y

    tr = ssa.Trainer(mlp(), 5)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        tr.fit(Loader(), 3, checkpoint_dir=str(tmp_path))
    state = torch.load(tmp_path / "latest.pt", weights_only=False)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v))


def test_recompute_restores_any_buffer_a_forward_updates():
    class Ema(nn.Module):  # a user module with its own running statistic, not a norm
        def __init__(self):
            super().__init__()
            self.register_buffer("avg", torch.zeros(16))

        def forward(self, x):
            if self.training:
                self.avg.mul_(0.5).add_(0.5 * x.detach().mean(0))
            return x - self.avg

    out = {}
    x, y = batch(p=16)
    for memory in ("store", "recompute"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), Ema(), nn.Linear(16, 5))
        tr = ssa.Trainer(model, 5, memory=memory, seed=1)
        for _ in range(3):
            tr.step(x, y)
        out[memory] = {**params(model), "avg": model[2].avg.clone()}
    assert_same(out["store"], out["recompute"], rtol=1e-6, atol=1e-7)
