"""SSALinear (drop-in nn.Linear, factor surgery, state), convert / to_dense, LossConfig and
RankSchedule against the DESIGN §8 pseudo-code."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssa


def perturbed(layer: ssa.SSALinear, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.U, layer.s, layer.V):
            p.add_(scale * torch.randn(p.shape, generator=g))
    return layer


# ---------------------------------------------------------------------- drop-in nn.Linear

def test_drop_in_linear():
    layer = ssa.SSALinear(12, 7, True, None, torch.float32, seed=1)
    assert (layer.U.shape, layer.s.shape, layer.V.shape, layer.bias.shape) == ((7, 7), (7,), (12, 7), (7,))
    assert layer.rank == 7 and layer.weight.shape == (7, 12) and not layer.weight.requires_grad
    names = dict(layer.named_parameters())
    assert set(names) == {"U", "s", "V", "bias"}
    assert {"target_U", "target_s", "target_V"} <= set(layer.state_dict())
    assert not any(n.startswith("target") for n in names)
    for shape in ((5, 12), (2, 3, 12)):
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    assert ssa.SSALinear(12, 7, bias=False).bias is None
    double = layer.to(torch.float64)
    assert double.U.dtype == torch.float64 and double.target_U.dtype == torch.float64


def test_autograd_through_the_layer():
    layer = ssa.SSALinear(6, 4, dtype=torch.float64, seed=2)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_seeds_make_layers_reproducible():
    a, b = ssa.SSALinear(8, 5, seed=3), ssa.SSALinear(8, 5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if torch.is_tensor(x))
    torch.manual_seed(0)
    c = ssa.SSALinear(8, 5)
    torch.manual_seed(0)
    d = ssa.SSALinear(8, 5)
    assert torch.equal(c.U, d.U) and torch.equal(c.target_U, d.target_U)


def test_from_dense_and_to_dense_round_trip():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    layer = ssa.SSALinear.from_dense(lin)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)
    back = layer.to_dense()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back.weight, lin.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.bias, lin.bias)
    r = 3
    low = ssa.SSALinear.from_dense(lin, rank=r)
    S = torch.linalg.svdvals(lin.weight.detach().double())
    err = (low.weight.double() - lin.weight.detach().double()).norm()
    torch.testing.assert_close(err, S[r:].norm(), rtol=1e-5, atol=1e-6)
    fused = ssa.SSALinear(10, 6, activation="relu")
    dense = fused.to_dense()
    assert isinstance(dense, nn.Sequential) and isinstance(dense[1], nn.ReLU)
    torch.testing.assert_close(dense(x), fused(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- truncate / reorthonormalize

def test_truncate_keeps_the_best_rank_r_approximation():
    layer = perturbed(ssa.SSALinear(16, 12, seed=4))
    W = layer.weight.double()
    old_targets = layer.target_U.clone(), layer.target_s.clone()
    U_obj = layer.U
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(3, 16)).sum().backward()
    opt.step()
    W = layer.weight.double()
    layer.truncate(5, optimizer=opt)
    assert layer.rank == 5 and layer.U is U_obj
    assert layer.U not in opt.state and layer.s not in opt.state and layer.bias in opt.state
    U, S, Vh = torch.linalg.svd(W)
    best = (U[:, :5] * S[:5]) @ Vh[:5]
    torch.testing.assert_close(layer.weight.double(), best, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.U.t() @ layer.U, torch.eye(5), rtol=0, atol=1e-5)
    assert torch.all(layer.s[:-1] >= layer.s[1:])
    torch.testing.assert_close(layer.target_U, old_targets[0][:, :5])
    torch.testing.assert_close(layer.target_s, old_targets[1][:5])
    with pytest.raises(ValueError, match="rank"):
        layer.truncate(6)
    with pytest.raises(ValueError, match="rank"):
        layer.truncate(0)


def test_reorthonormalize_keeps_W_and_matches_columns():
    layer = ssa.SSALinear(16, 12, seed=5)
    with torch.no_grad():  # well separated singular values: columns are identifiable
        layer.s.copy_(torch.linspace(0.5, 3.0, 12))  # ascending: an unmatched SVD would reverse them
    perturbed(layer, scale=0.02)
    W, U_old = layer.weight.clone(), layer.U.detach().clone()
    layer.reorthonormalize()
    torch.testing.assert_close(layer.weight, W, rtol=1e-5, atol=1e-5)
    eye = torch.eye(layer.rank)
    torch.testing.assert_close(layer.U.t() @ layer.U, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.V.t() @ layer.V, eye, rtol=0, atol=1e-5)
    overlap = (U_old.t() @ layer.U).detach()
    # each new column sits where its old one was (largest overlap on the diagonal), sign kept
    assert torch.all(overlap.diagonal() > 0.8)
    assert torch.equal(overlap.abs().argmax(1), torch.arange(layer.rank))


def test_sorting_permutes_the_optimizer_state():
    layer = ssa.SSALinear(8, 6, seed=6)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([0.1, 3.0, 2.0, 0.5, 1.0, 4.0]))
    opt = torch.optim.Adam(layer.parameters())
    layer.s.grad = torch.arange(6.0)
    opt.step()
    before, s_before = opt.state[layer.s]["exp_avg"].clone(), layer.s.detach().clone()
    layer.reorthonormalize(sort=True, optimizer=opt)
    order = [5, 1, 2, 4, 3, 0]
    torch.testing.assert_close(layer.s.detach(), s_before[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[layer.s]["exp_avg"], before[order])


# ---------------------------------------------------------------------- state and feedback

def test_truncated_checkpoint_loads_into_a_fresh_layer():
    layer = perturbed(ssa.SSALinear(10, 8, seed=7))
    layer.init_feedback(4)
    layer.truncate(3)
    layer.frozen_rank = True
    fresh = ssa.SSALinear(10, 8, seed=99)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10)
    assert fresh.rank == 3 and fresh.frozen_rank and fresh.r0 == 8
    torch.testing.assert_close(fresh(x), layer(x))
    torch.testing.assert_close(fresh.feedback_Q, layer.feedback_Q)


@pytest.mark.parametrize("C,out,rank", [(10, 32, None), (10, 6, None), (10, 32, 4)])
def test_feedback_is_structured_with_unit_average_columns(C, out, rank):
    layer = ssa.SSALinear(20, out, rank=rank, seed=8)
    layer.init_feedback(C)
    k = min(C, out, layer.r0)
    P, sigma, Q = layer.feedback_P, layer.feedback_sigma, layer.feedback_Q
    assert P.shape == (out, k) and sigma.shape == (k,) and Q.shape == (C, k)
    B = (P * sigma) @ Q.t()
    torch.testing.assert_close(B.norm() ** 2, torch.tensor(float(C)), rtol=1e-5, atol=0)
    torch.testing.assert_close(P.t() @ P, torch.eye(k), rtol=0, atol=1e-5)
    torch.testing.assert_close(Q.t() @ Q, torch.eye(k), rtol=0, atol=1e-5)
    torch.testing.assert_close(P, layer.target_U[:, :k])  # the alignment frame (DESIGN §6)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="in_features"):
        ssa.SSALinear(4, 3)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="rank"):
        ssa.SSALinear(4, 3, rank=0)
    with pytest.raises(ValueError, match="rank"):
        ssa.SSALinear(4, 3, rank=4)
    with pytest.raises(ValueError, match="activation"):
        ssa.SSALinear(4, 3, activation="gelu")
    with pytest.raises(TypeError, match="in_features"):
        ssa.SSALinear(4.0, 3)
    with pytest.raises(TypeError, match="nn.Linear"):
        ssa.SSALinear.from_dense(nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------- convert

def test_convert_in_place_and_back(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)))
    x = torch.randn(4, 8)
    want = model(x)
    keep = ssa.SSALinear(3, 3)
    model.append(keep)
    want = keep(want)
    with caplog.at_level(logging.INFO, logger="ssa"):
        out = ssa.convert(model, seed=5)
    assert out is model and model[3] is keep
    assert "3 Linear -> SSALinear" in caplog.text
    assert all(isinstance(m, ssa.SSALinear) for m in (model[0], model[2][0], model[2][1]))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    assert [model[0].seed, model[2][0].seed, model[2][1].seed] == [5, 6, 7]
    ssa.to_dense(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_convert_rank_and_skip():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3), nn.Sequential(nn.Linear(3, 3)))
    ssa.convert(model, rank=2, skip=["1", nn.Sequential])
    assert model[0].rank == 2 and type(model[1]) is nn.Linear and type(model[2][0]) is nn.Linear
    with pytest.raises(ValueError, match="layer '0'"):
        ssa.convert(nn.Sequential(nn.Linear(8, 2)), rank=3)


def test_convert_leaves_what_it_cannot_train_dense():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.attn = nn.MultiheadAttention(4, 2)
            self.head = nn.Linear(4, 2)

    m = Tied()
    with pytest.warns(UserWarning) as record:
        ssa.convert(m)
    text = " ".join(str(w.message) for w in record)
    assert "attn.out_proj" in text and "tied" in text
    assert type(m.a) is nn.Linear and type(m.b) is nn.Linear and type(m.attn.out_proj) is not ssa.SSALinear
    assert isinstance(m.head, ssa.SSALinear)


# ---------------------------------------------------------------------- LossConfig

def test_loss_config_defaults_and_presets():
    d = ssa.LossConfig()
    assert (d.ce, d.cos, d.align, d.ortho, d.hoyer, d.scaling, d.projection) == (
        1.0, 0.0, 0.01, 1.0, 0.0, "euclidean", "stiefel")
    v2 = ssa.LossConfig.v2()
    assert (v2.ce, v2.align, v2.ortho, v2.scaling, v2.projection) == (1.0, 0.01, 0.1, "inverse", "paper")
    v1 = ssa.LossConfig.v1()
    assert (v1.ce, v1.cos, v1.align, v1.ortho, v1.hoyer) == (0.1, 0.01, 0.1, 0.05, 0.01)
    assert ssa.LossConfig(hoyer=0.5).factor_kwargs(hoyer_on=False)["hoyer"] == 0.0
    for bad in (dict(align=-1.0), dict(ortho=math.nan), dict(projection="tangent"), dict(scaling="log")):
        with pytest.raises(ValueError):
            ssa.LossConfig(**bad)
    with pytest.raises(ValueError, match="v3"):
        ssa.LossConfig.preset("v3")


# ---------------------------------------------------------------------- RankSchedule

class FakeLayer:
    def __init__(self, r0, s, m=64, n=64):
        self.r0, self.rank, self.frozen_rank = r0, r0, False
        self.out_features, self.in_features = m, n
        self.s = torch.as_tensor(s, dtype=torch.float64)

    def reorthonormalize(self, sort=False, optimizer=None):
        self.s = torch.sort(self.s, descending=True).values

    def truncate(self, r, optimizer=None):
        self.reorthonormalize()
        self.s, self.rank = self.s[:r], r


def spec_step(layer, E, K, interval, zeta, energy, min_fraction, start, cap):
    """DESIGN §8, transcribed line by line."""
    if E < start or layer.frozen_rank:
        return
    k = E - start + 1
    if k % interval != 0:
        return
    r0 = layer.r0
    floor = max(1, math.ceil(min_fraction * r0))
    target = math.ceil(r0 * (1 - (k // interval) / ((K - start) / interval)))
    if target <= zeta * r0:
        layer.reorthonormalize()
        s2 = layer.s ** 2
        target = next(r for r in range(1, len(s2) + 1) if s2[:r].sum() >= energy * s2.sum())
        if target >= layer.rank:
            layer.frozen_rank = True
            return
    if cap:
        target = min(target, max(floor, (layer.out_features * layer.in_features) // (layer.out_features +
                                                                                  layer.in_features)))
    new = max(floor, min(target, layer.rank))
    if new < layer.rank:
        layer.truncate(new)


@pytest.mark.parametrize("K,interval,zeta,energy,min_fraction,start,cap,m", [
    (30, 10, 0.7, 0.95, 0.3, 0, True, 64), (30, 10, 0.7, 0.95, 0.3, 0, False, 64),
    (25, 4, 0.5, 0.9, 0.2, 3, True, 64), (12, 1, 0.9, 0.99, 0.1, 0, True, 16),
    (40, 5, 0.7, 0.5, 0.3, 10, True, 64),
])
def test_schedule_is_the_design_pseudo_code(K, interval, zeta, energy, min_fraction, start, cap, m):
    s = torch.linspace(3.0, 0.01, 48) ** 2
    sched = ssa.RankSchedule(K, interval=interval, zeta=zeta, energy=energy, min_fraction=min_fraction,
                             start_epoch=start, cap=cap)
    got, want = FakeLayer(48, s, m=m), FakeLayer(48, s, m=m)
    ranks_got, ranks_want = [], []
    for E in range(K):
        sched.step_layer(got, E)
        spec_step(want, E, K, interval, zeta, energy, min_fraction, start, cap)
        ranks_got.append((got.rank, got.frozen_rank))
        ranks_want.append((want.rank, want.frozen_rank))
    assert ranks_got == ranks_want
    assert ranks_got[-1][0] < 48


def test_schedule_energy_freeze_and_output_layer():
    flat = FakeLayer(20, torch.ones(20))  # equal singular values: the energy target keeps (almost) all
    sched = ssa.RankSchedule(10, interval=2, zeta=0.9)
    for E in range(10):
        sched.step_layer(flat, E)
    assert flat.frozen_rank
    out = FakeLayer(20, torch.linspace(2, 0, 20))
    for E in range(10):
        sched.step_layer(out, E, is_output=True)
    assert out.rank == 20


def test_schedule_on_a_real_layer_and_hoyer_epochs():
    layer = perturbed(ssa.SSALinear(64, 32, seed=9), scale=0.1)
    sched = ssa.RankSchedule(30)
    prev, floor = layer.rank, sched.floor(32)
    for E in range(30):
        sched.step_layer(layer, E)
        assert floor <= layer.rank <= prev
        prev = layer.rank
    assert layer.rank < 32 and layer.rank <= 64 * 32 // 96
    assert {E for E in range(30) if ssa.RankSchedule(30).hoyer_active(E)} == set(range(30))
    assert {E for E in range(25) if ssa.RankSchedule(25, start_epoch=3).hoyer_active(E)} == set(range(3, 23))
    for bad in (dict(interval=0), dict(zeta=0.0), dict(zeta=1.5), dict(start_epoch=30)):
        with pytest.raises(ValueError):
            ssa.RankSchedule(30, **bad)
