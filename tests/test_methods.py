"""The trainer's methods beyond ssa/bp/dfa (DESIGN §9): svd_bp, drtp, sgr; every method on digits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import batch, grads, mlp
from torch import nn

import ssa
from ssa.baselines import FeedbackConv2d, FeedbackLinear
from ssa.trainer import LOCAL_METHODS, METHODS


def fill_grads(tr, x, y):
    """The method's gradients in .grad, without the optimizer step."""
    tr.optimizer.zero_grad(set_to_none=True)
    opt_step, tr.optimizer.step = tr.optimizer.step, lambda *a, **k: None
    try:
        tr.step(x, y)
    finally:
        tr.optimizer.step = opt_step


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", ["mlp", "lenet"])
def test_every_method_improves_the_loss_on_digits(method, model_name):
    pytest.importorskip("sklearn")
    train, _ = ssa.data.digits(batch_size=64, seed=0)
    torch.manual_seed(0)
    model = ssa.models.get(model_name, 10, (1, 8, 8))
    tr = ssa.Trainer(model, 10, method=method, lr=2e-3, seed=0)
    kinds = {type(m) for m in model.modules()}
    if method in ("ssa", "svd_bp"):
        assert ssa.SSALinear in kinds
    elif method in ("fa", "usf", "brsf"):
        assert FeedbackLinear in kinds and (model_name == "mlp" or FeedbackConv2d in kinds)
    else:
        assert not any(issubclass(k, (ssa.SSALayer, FeedbackLinear, FeedbackConv2d)) for k in kinds)
    batches = list(train)[:8]
    model.eval()
    with torch.no_grad():
        first = F.cross_entropy(model(batches[0][0]), batches[0][1]).item()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(6 if model_name == "mlp" else 12):
        for x, y in batches:
            tr.step(x, y)
    model.eval()
    with torch.no_grad():
        last = F.cross_entropy(model(batches[0][0]), batches[0][1]).item()
    # DFA-style rules start slowly on LeNet (DESIGN: convnets on 8×8 digits), all must move down.
    assert last < (0.8 if model_name == "mlp" else 0.98) * first, (first, last)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before), sorted(set(before) - set(moved))
    if method not in LOCAL_METHODS:
        with pytest.raises(RuntimeError, match="only methods"):
            tr.record()


# ---------------------------------------------------------------------------- svd_bp
def test_svd_bp_factor_gradients_are_backprop_through_the_dense_weight_plus_penalty():
    torch.manual_seed(0)
    model = mlp()
    loss = ssa.LossConfig(ortho=0.3, hoyer=0.05)
    tr = ssa.Trainer(model, 5, method="svd_bp", loss=loss, rank=4)
    layers = list(tr.ssa_layers().values())
    assert len(layers) == 3 and all(layer.rank == 4 for layer in layers)
    x, y = batch(16, seed=1)
    with torch.no_grad():  # move off the orthonormal start so that the penalty has a gradient
        for layer in layers:
            layer.U.add_(0.1 * torch.randn_like(layer.U))
    fill_grads(tr, x, y)
    got = grads(model)
    # independently: plain torch ops on cloned leaves, W = U diag(s) Vᵀ, the penalty written out
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    h = x
    for i, name in enumerate(("0", "2", "4")):
        U, s, V, b = (leaves[f"{name}.{k}"] for k in ("U", "s", "V", "bias"))
        h = h @ (U * s @ V.t()).t() + b
        if i < 2:
            h = torch.relu(h)
    total = F.cross_entropy(h, y)
    for name in ("0", "2", "4"):
        U, s, V = (leaves[f"{name}.{k}"] for k in ("U", "s", "V"))
        eye = torch.eye(4)
        total = total + 0.3 * ((U.t() @ U - eye).pow(2).sum() + (V.t() @ V - eye).pow(2).sum())
        total = total + 0.05 * torch.sqrt(s * s + 1e-6).sum() / s.norm()
    total.backward()
    for n, leaf in leaves.items():
        torch.testing.assert_close(got[n], leaf.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_svd_penalty_gradient_is_the_design_formula():
    """∇_U ortho·‖UᵀU − I‖² = 4·ortho·U(UᵀU − I) (DESIGN §6)."""
    torch.manual_seed(0)
    tr = ssa.Trainer(mlp(), 5, method="svd_bp", loss=ssa.LossConfig(ortho=0.5))
    layer = tr.ssa_layers()["2"]
    with torch.no_grad():
        layer.U.mul_(1.3)
    tr.optimizer.zero_grad()
    tr.svd_penalty().backward()
    U = layer.U.detach()
    torch.testing.assert_close(layer.U.grad, 4 * 0.5 * U @ (U.t() @ U - torch.eye(U.shape[1])))
    assert layer.s.grad is None or layer.s.grad.abs().max() == 0  # no hoyer term by default


# ---------------------------------------------------------------------------- drtp
def test_drtp_hidden_layers_get_the_projected_target_and_the_output_layer_the_error():
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, method="drtp")
    x, y = batch(16, seed=1)
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    p = x.shape[0]
    with torch.no_grad():
        target = (1 / 5 - F.one_hot(y, 5).float()) / p  # the error at the uniform output
        h = [x]
        for i in (0, 2):
            h.append(model[i + 1](model[i](h[-1])))
        for j, i in enumerate((0, 2)):
            B = tr.feedback[str(i)]
            delta = (target @ B.t()) * (h[j + 1] > 0)
            torch.testing.assert_close(model[i].weight.grad, delta.t() @ h[j], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(model[i].bias.grad, delta.sum(0), rtol=1e-4, atol=1e-6)
    # the signal does not depend on the output at all: another batch with the same labels, same δ shape
    bp = copy.deepcopy(model)
    bp.zero_grad()
    F.cross_entropy(bp(x), y).backward()
    torch.testing.assert_close(model[4].weight.grad, bp[4].weight.grad, rtol=1e-4, atol=1e-6)
    dfa = ssa.Trainer(copy.deepcopy(model), 5, method="dfa")  # same seed: the same B as dfa
    fill_grads(dfa, x, y)
    torch.testing.assert_close(dfa.feedback["0"], tr.feedback["0"])


def test_drtp_recompute_equals_store():
    torch.manual_seed(0)
    model = mlp()
    a = ssa.Trainer(model, 5, method="drtp")
    b = ssa.Trainer(copy.deepcopy(model), 5, method="drtp", memory="recompute")
    x, y = batch(16, seed=1)
    for _ in range(2):
        a.step(x, y)
        b.step(x, y)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)


# ---------------------------------------------------------------------------- sgr
def _etf_loss(E, a, y):
    f = a.mean((2, 3)) if a.dim() == 4 else a
    return F.cross_entropy(f @ E, y)


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_sgr_gradients_equal_the_written_out_local_losses(lam):
    """Units 0 → 2 → 4 (Linear+ReLU, Linear+ReLU, Linear): L₀ = ETF-CE on a₁ = relu(W₀x), L₁ on
    a₂, L₂ = CE(z); unit j also gets λ·p·‖∂L_j/∂a_j − sg(∂L_{j−1}/∂a_j)‖²; inputs detached."""
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, method="sgr", sgr_lambda=lam)
    x, y = batch(16, seed=1)
    fill_grads(tr, x, y)
    got = grads(model)
    E1, E2 = tr.feedback["sgr_head:2"], tr.feedback["sgr_head:4"]
    assert E1.shape == (32, 5) and E2.shape == (24, 5)
    W = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}

    def unit(i, inp, act=True):
        out = inp @ W[f"{i}.weight"].t() + W[f"{i}.bias"]
        return torch.relu(out) if act else out

    a1 = unit("0", x)
    a1_in = a1.detach().requires_grad_(True)
    a2 = unit("2", a1_in)
    a2_in = a2.detach().requires_grad_(True)
    z = unit("4", a2_in, act=False)
    L0, L1, L2 = _etf_loss(E1, a1, y), _etf_loss(E2, a2, y), F.cross_entropy(z, y)
    total = L0 + L1 + L2
    p = x.shape[0]
    for own, prev, a_in, a in ((L1, L0, a1_in, a1), (L2, L1, a2_in, a2)):
        g_own = torch.autograd.grad(own, a_in, create_graph=True)[0]
        g_prev = torch.autograd.grad(prev, a, retain_graph=True)[0].detach()
        total = total + lam * p * (g_own - g_prev).pow(2).sum()
    total.backward()
    for n, leaf in W.items():
        torch.testing.assert_close(got[n], leaf.grad, rtol=1e-4, atol=1e-7, msg=n)
    if lam == 0:  # gradient isolation: the first layer sees only its own head
        g0 = torch.autograd.grad(_etf_loss(E1, unit("0", x), y), W["0.weight"])[0]
        torch.testing.assert_close(got["0.weight"], g0, rtol=1e-4, atol=1e-7)


def test_sgr_heads_are_simplex_etfs():
    torch.manual_seed(0)
    tr = ssa.Trainer(mlp((12, 32, 4, 5)), 5, method="sgr")
    x, y = batch(16, seed=1)
    tr.step(x, y)
    E = tr.feedback["sgr_head:2"].double()  # d = 32 >= C = 5: an exact ETF
    gram = E.t() @ E
    torch.testing.assert_close(gram.diagonal(), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)
    off = gram[~torch.eye(5, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 4), rtol=0, atol=1e-6)
    assert tr.feedback["sgr_head:4"].shape == (4, 5)  # d = 4 < C: a projection of the ETF
    # seeded: a second trainer builds the same heads
    tr2 = ssa.Trainer(mlp((12, 32, 4, 5)), 5, method="sgr")
    tr2.step(x, y)
    torch.testing.assert_close(tr2.feedback["sgr_head:2"], tr.feedback["sgr_head:2"])


def test_sgr_on_convnets_and_residual_blocks():
    torch.manual_seed(0)
    model = ssa.models.get("resnet20", 10, (1, 8, 8))
    tr = ssa.Trainer(model, 10, method="sgr")
    assert sum(u.kind == "local" for u in tr.units) == 9
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 10
    fill_grads(tr, x, y)
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    heads = [k for k in tr.feedback if k.startswith("sgr_head:")]
    assert len(heads) == len(tr.units) - 1  # every unit but the first consumes a trained input


def test_sgr_refuses_units_that_do_not_form_a_chain():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 5)

        def forward(self, x):
            h = self.a(x)
            self.b(h)  # computed, unused: the loss after 'b' does not depend on its input
            return self.c(h.relu())

    tr = ssa.Trainer(Skip(), 5, method="sgr")
    x, y = batch(16, seed=1)
    with pytest.raises(RuntimeError, match="chain"):
        tr.step(x, y)


def test_new_options_are_checked():
    for kw, match in [(dict(sgr_lambda=-1.0), "sgr_lambda"), (dict(sgr_lambda=math.nan), "sgr_lambda"),
                      (dict(align_every=0), "align_every"), (dict(align_every=True), "align_every")]:
        with pytest.raises(ValueError, match=match):
            ssa.Trainer(mlp(), 5, method="sgr", **kw)
    with pytest.raises(TypeError, match="measure_memory"):
        ssa.Trainer(mlp(), 5, measure_memory=1)
    with pytest.raises(ValueError, match="a rank schedule needs method='ssa'"):
        ssa.Trainer(mlp(), 5, method="svd_bp", schedule=ssa.RankSchedule(3))


# ---------------------------------------------------------------------------- metrics in the history
def test_fit_logs_the_metrics_of_design_section_10():
    pytest.importorskip("sklearn")
    train, test = ssa.data.digits(batch_size=64, seed=0)
    torch.manual_seed(0)
    tr = ssa.Trainer(ssa.models.get("mlp", 10, (1, 8, 8)), 10, method="dfa", align_every=4,
                     measure_memory=True)
    rng = torch.get_rng_state()
    hist = tr.fit(train, 2, val_loader=test)
    row = hist[-1]
    assert set(row["flops"]) == {"1", "3", "5", "total"} and row["flops"]["total"] == sum(
        v for k, v in row["flops"].items() if k != "total")
    assert row["params"] == tr.param_count() and row["peak_mem"] > 0
    assert set(row["grad_angle"]) == {"1", "3", "5"}
    assert all(0 < row["grad_angle"][k] < 90 for k in ("1", "3")) and row["grad_angle"]["5"] < 1e-3
    assert set(row["matrix_angle"]) == {"1", "3"} and all(0 < v < 90 for v in row["matrix_angle"].values())
    # measuring does not change the run: same numbers without it
    torch.set_rng_state(rng)
    torch.manual_seed(0)
    train.generator.manual_seed(0)
    plain = ssa.Trainer(ssa.models.get("mlp", 10, (1, 8, 8)), 10, method="dfa")
    train2, _ = ssa.data.digits(batch_size=64, seed=0)
    h2 = plain.fit(train2, 2, val_loader=test)
    assert h2[-1]["val_acc"] == row["val_acc"] and h2[-1]["peak_mem"] is None and h2[-1]["grad_angle"] == {}
    for p, q in zip(plain.model.parameters(), tr.model.parameters()):
        torch.testing.assert_close(p, q)


def test_ssa_flops_fall_with_the_rank_schedule():
    pytest.importorskip("sklearn")
    train, _ = ssa.data.digits(batch_size=64, seed=0)
    torch.manual_seed(0)
    tr = ssa.Trainer(ssa.models.get("mlp", 10, (1, 8, 8)), 10, schedule=ssa.RankSchedule(4, interval=1))
    hist = tr.fit(train, 3)
    totals = [h["flops"]["total"] for h in hist]
    ranks = [sum(h["ranks"].values()) for h in hist]
    assert ranks[-1] < ranks[0] and totals[-1] < totals[0], (ranks, totals)
