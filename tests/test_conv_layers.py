"""SSAConv2d, convert on convnets, and the trainer on convolutional networks (DESIGN §4, §5, §8)."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssa
import ssa_kernels

GRID = list(
    itertools.product([(3, 3), (1, 1), (2, 3), (5, 2)], [1, (2, 1), 2], [0, 1, (2, 1), "same"], [1, (1, 2)])
)


def _conv(k, st, pad, dil, bias=True, C=3, N=4):
    if pad == "same" and st != 1:
        pad = 1
    torch.manual_seed(0)
    return nn.Conv2d(C, N, k, st, pad, dil, bias=bias)


# ------------------------------------------------------------------ the module


@pytest.mark.parametrize("k,st,pad,dil", GRID)
def test_from_dense_at_full_rank_equals_the_conv(k, st, pad, dil):
    conv = _conv(k, st, pad, dil, bias=(k != (1, 1)))
    layer = ssa.SSAConv2d.from_dense(conv)
    assert layer.rank == min(4 * conv.kernel_size[1], 3 * conv.kernel_size[0])
    x = torch.randn(2, 3, 11, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[0]), conv(x[0]), rtol=1e-5, atol=1e-5)  # unbatched input
        back = layer.to_dense()
        assert type(back) is nn.Conv2d and back.weight.shape == conv.weight.shape
        torch.testing.assert_close(back.weight, conv.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(x), conv(x), rtol=1e-5, atol=1e-5)


def test_weight_view_and_layout():
    conv = _conv((2, 3), 1, 1, 1)
    layer = ssa.SSAConv2d.from_dense(conv)
    torch.testing.assert_close(layer.weight, conv.weight, rtol=1e-5, atol=1e-6)
    assert layer.U.shape == (4 * 3, layer.rank) and layer.V.shape == (3 * 2, layer.rank)
    assert layer.factor_shape == (12, 6) and layer.feedback_width == 4
    assert "rank=6" in repr(layer) and "kernel_size=(2, 3)" in repr(layer)


def test_constructor_defaults_and_errors():
    layer = ssa.SSAConv2d(3, 8, 3, padding=1, seed=0)
    assert layer.rank == min(8 * 3, 3 * 3) and layer.bias is not None and layer.activation == "none"
    again = ssa.SSAConv2d(3, 8, 3, padding=1, seed=0)
    torch.testing.assert_close(layer.weight, again.weight)  # seeded
    dense = nn.Conv2d(3, 8, 3)
    bound = 1 / (3 * 9) ** 0.5  # nn.Conv2d's init range
    assert layer.weight.abs().max() <= bound + 1e-6 and dense.weight.abs().max() <= bound + 1e-6
    assert ssa.SSAConv2d(3, 8, 3, rank=4).rank == 4
    with pytest.raises(ValueError, match="groups must be 1"):
        ssa.SSAConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        ssa.SSAConv2d(4, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="rank must be <="):
        ssa.SSAConv2d(3, 8, 3, rank=10)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        ssa.SSAConv2d(3.0, 8, 3)
    with pytest.raises(ValueError, match="activation"):
        ssa.SSAConv2d(3, 8, 3, activation="gelu")
    with pytest.raises(ValueError, match="in_channels = 3"):
        layer(torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        ssa.SSAConv2d.from_dense(nn.Linear(3, 3))


def test_same_padding_with_an_even_kernel_and_asymmetric_padding():
    conv = nn.Conv2d(3, 4, (2, 4), padding="same")
    layer = ssa.SSAConv2d.from_dense(conv)
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        assert layer.to_dense().padding == "same"
    asym = ssa.SSAConv2d(3, 4, 3, padding=(0, 1, 2, 0), seed=1)
    dense = asym.to_dense()  # ZeroPad2d + Conv2d
    assert isinstance(dense, nn.Sequential) and isinstance(dense[0], nn.ZeroPad2d)
    with torch.no_grad():
        torch.testing.assert_close(asym(x), dense(x), rtol=1e-5, atol=1e-5)


def test_fused_activation_round_trip():
    layer = ssa.SSAConv2d(3, 4, 3, activation="leaky_relu", negative_slope=0.2, seed=0)
    x = torch.randn(2, 3, 6, 6)
    dense = layer.to_dense()
    assert isinstance(dense[1], nn.LeakyReLU) and dense[1].negative_slope == 0.2
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_backprop_through_the_layer_matches_the_dense_conv():
    conv = _conv((3, 2), (2, 1), 1, 1)
    layer = ssa.SSAConv2d.from_dense(conv)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn_like(conv(x2))
    (layer(x) * g).sum().backward()
    (conv(x2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-5)
    # chain rule through K' = U diag(s) Vᵀ: gU = G' V diag(s), G' = dense weight-gradient as K'
    from ssa_kernels import reference as ref

    Gp = ref.factors_from_kernel(conv.weight.grad)
    torch.testing.assert_close(layer.U.grad, Gp @ layer.V.detach() * layer.s.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        layer.V.grad, Gp.t() @ layer.U.detach() * layer.s.detach(), rtol=1e-4, atol=1e-5
    )


def test_truncate_reorthonormalize_and_checkpoint_resize():
    layer = ssa.SSAConv2d(4, 6, 3, padding=1, seed=3)
    assert layer.target_U is None  # no targets until asked for; a conv has them only as "frame"
    layer.set_targets("frame")
    assert layer.target_U.shape == (18, 12) and layer.target_V.shape == (12, 12)
    with torch.no_grad():
        layer.U.add_(0.01 * torch.randn_like(layer.U, generator=torch.Generator().manual_seed(0)))
    W = layer.weight.clone()
    layer.reorthonormalize()
    torch.testing.assert_close(layer.weight, W, rtol=1e-4, atol=1e-5)
    assert layer.ortho_error() < 1e-5
    Kp = (layer.U * layer.s) @ layer.V.t()
    best = torch.linalg.svd(Kp.detach().double())
    pos = torch.argsort(torch.argsort(layer.s.detach().abs(), descending=True))  # column -> sorted place
    old_U = layer.target_U.clone()
    layer.truncate(5)
    kept = pos < 5  # targets of the kept columns stay, attached to where their columns went
    assert layer.rank == 5 and torch.equal(layer.target_cols, pos[kept])
    n = int(kept.sum())
    assert 0 < n <= 5 and layer.target_U.shape == (18, n) and layer.target_V.shape == (12, n)
    assert torch.equal(layer.target_U, old_U[:, kept])
    approx = (best.U[:, :5] * best.S[:5]) @ best.Vh[:5]
    torch.testing.assert_close(
        ((layer.U * layer.s) @ layer.V.t()).detach().double(), approx, rtol=1e-4, atol=1e-5
    )
    layer.init_feedback(10)
    fresh = ssa.SSAConv2d(4, 6, 3, padding=1, seed=3)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.rank == 5 and fresh.targets == "frame"
    torch.testing.assert_close(fresh.weight, layer.weight)
    torch.testing.assert_close(fresh.feedback_P, layer.feedback_P)
    for name in ("target_U", "target_s", "target_V", "target_cols"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name)), name


def test_feedback_is_per_channel_with_unit_columns_on_average():
    layer = ssa.SSAConv2d(3, 16, 3, seed=0)
    layer.init_feedback(10)
    B = (layer.feedback_P * layer.feedback_sigma) @ layer.feedback_Q.t()
    assert B.shape == (16, 10)  # out channels × classes: one signal per channel, shared by positions
    assert abs(float((B**2).sum()) - 10) < 1e-4
    small = ssa.SSAConv2d(3, 4, 3, seed=0)
    small.init_feedback(10)
    assert small.feedback_P.shape == (4, 4) and small.feedback_Q.shape == (10, 4)  # k = min(C, N)


# ------------------------------------------------------------------ convert


def test_convert_resnet18_keeps_outputs_and_reports_counts(caplog):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        with caplog.at_level(logging.INFO, logger="ssa"):
            ssa.convert(model)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "ssa")
    assert "20 Conv2d -> SSAConv2d" in text and "1 Linear -> SSALinear" in text and "0 left dense" in text
    assert sum(isinstance(m, ssa.SSAConv2d) for m in model.modules()) == 20
    ssa.to_dense(model)
    assert not any(isinstance(m, ssa.SSALayer) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_convert_leaves_grouped_and_depthwise_convs_dense(caplog):
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 8, 1, groups=2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
    )
    with caplog.at_level(logging.INFO, logger="ssa"):
        ssa.convert(model)
    assert isinstance(model[0], ssa.SSAConv2d)
    assert all(type(m) is nn.Conv2d for m in model[1:])
    text = caplog.text
    assert (
        "2 Conv2d (grouped, left dense)" in text
        and "padding_mode='circular'" in text
        and "3 left dense" in text
    )
    capped = ssa.convert(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 2, 1)), rank=30)
    assert [m.rank for m in capped] == [12, 2]  # each layer at min(rank, its full rank)
    with pytest.raises(TypeError, match="SSAConv2d.from_dense"):
        ssa.convert(nn.Conv2d(3, 3, 3))


# ------------------------------------------------------------------ trainer on convnets


def _float_state(model):
    """A copy of the model's floating-point state (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and v.is_floating_point()}


def _assert_same_states(a, b, rtol, atol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _convnet(C=5, norm=False):
    torch.manual_seed(0)
    mods = [nn.Conv2d(2, 6, 3, padding=1)]
    if norm:
        mods.append(nn.BatchNorm2d(6))
    mods += [
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, C),
    ]
    return nn.Sequential(*mods)


def _batch(p=6, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, 2, 6, 6, generator=g), torch.randint(0, C, (p,), generator=g)


@pytest.mark.parametrize("targets", ["feedback", "frame"])
def test_conv_step_is_the_op_sequence_with_channel_shared_feedback(targets):
    model = _convnet()
    loss = ssa.LossConfig(align=0.05, ortho=0.5, targets=targets)
    tr = ssa.Trainer(model, 5, loss=loss)
    c1, c2, fc = model[0], model[3], model[6]
    assert isinstance(c1, ssa.SSAConv2d) and c1.activation == "relu" and c2.activation == "tanh"
    # DESIGN §6: a convolution has no "feedback" target (P does not index the rows of its U)
    assert all((c.target_U is not None) == (targets == "frame") for c in (c1, c2))
    x, y = _batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    kw = loss.factor_kwargs(False)
    h1, t1 = ssa_kernels.lowrank_conv2d(
        x, c1.U, c1.s, c1.V, c1.bias, kernel_size=3, padding=1, activation="relu"
    )
    p1 = F.max_pool2d(h1, 2)
    h2, t2 = ssa_kernels.lowrank_conv2d(
        p1, c2.U, c2.s, c2.V, c2.bias, kernel_size=3, padding=1, activation="tanh"
    )
    with torch.no_grad():
        zz = fc(h2.flatten(1))
    torch.testing.assert_close(z, zz, rtol=1e-5, atol=1e-5)
    e = (zz.softmax(1) - F.one_hot(y, 5)) / 6
    for layer, xin, h, t in ((c1, x, h1, t1), (c2, p1, h2, t2)):
        dh = ((e @ layer.feedback_Q) * layer.feedback_sigma) @ layer.feedback_P.t()  # (p, N): per channel
        delta = dh[:, :, None, None] * (h > 0 if layer is c1 else 1 - h * h)  # shared by every position
        fast = ssa_kernels.dfa_project(
            e, layer.feedback_P, layer.feedback_sigma, layer.feedback_Q, h, layer.activation
        )
        torch.testing.assert_close(fast, delta, rtol=1e-5, atol=1e-7)
        if targets == "frame":  # each U target column takes the sign of its U column; no column moved
            U = layer.U.detach()
            sign = torch.where((U * layer.target_U).sum(0) < 0, -1.0, 1.0)
            align = dict(BU=layer.target_U * sign, BS=layer.target_s, BV=layer.target_V)
        else:
            align = dict(kw, align=0.0)
        want = ssa_kernels.svd_conv_factor_grads(
            xin,
            t,
            delta,
            layer.U.detach(),
            layer.s.detach(),
            layer.V.detach(),
            3,
            1,
            1,
            **{**kw, **align},
        )
        name = "0" if layer is c1 else "3"
        for part, w in zip(("U", "s", "V", "bias"), want):
            torch.testing.assert_close(got[f"{name}.{part}"], w, rtol=1e-4, atol=1e-6)


def test_conv_with_batchnorm_tail_and_recompute_equals_store():
    results = []
    for memory in ("store", "recompute"):
        model = _convnet(norm=True)
        tr = ssa.Trainer(model, 5, memory=memory)
        for seed in range(3):
            tr.step(*_batch(seed=seed))
        results.append(_float_state(model))
    _assert_same_states(*results, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0]["1.weight"], torch.ones(6))  # the BN affine parameters are trained


def test_dense_grouped_conv_is_trained_by_plain_dfa():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )
    tr = ssa.Trainer(model, 5, loss=ssa.LossConfig(align=0.0, ortho=0.0, projection="none"))
    dense = model[2]
    assert type(dense) is nn.Conv2d
    x, y = _batch()
    with tr.record():
        z = model(x)
    xin = model[1](model[0](x)).detach()
    tr.local_backward(z, y)
    e = (z.softmax(1) - F.one_hot(y, 5)) / 6
    B = tr.feedback["2"]
    out = dense(xin)
    delta = ((e @ B.t())[:, :, None, None] * (out > 0)).detach()
    w = dense.weight.detach().requires_grad_(True)
    gw = torch.autograd.grad(F.conv2d(xin, w, None, 1, 1, 1, 2), w, delta)[0]
    torch.testing.assert_close(dense.weight.grad, gw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dense.bias.grad, delta.sum((0, 2, 3)), rtol=1e-5, atol=1e-7)


def test_resnet_blocks_are_local_modules():
    model = ssa.models.get("resnet20", 10, (3, 8, 8))
    tr = ssa.Trainer(model, 10)
    local = [u for u in tr.units if u.kind == "local"]
    assert len(local) == 9 and all(type(u.head).__name__ == "BasicBlock" for u in local)
    assert sum(isinstance(m, ssa.SSAConv2d) for m in model.modules()) == 21
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    stats = tr.step(x, y)
    assert stats["n"] == 8
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert set(before) == changed  # every parameter (stem, blocks' convs and BNs, head) was updated


def test_rank_schedule_caps_a_conv_at_its_kernel_matrix():
    layer = ssa.SSAConv2d(2, 3, 3, seed=0)  # K' is 9 × 6: cap floor(54 / 15) = 3
    sched = ssa.RankSchedule(100, interval=10, zeta=0.01, cap=True, min_fraction=0.1)  # linear target 6
    new = sched.step_layer(layer, 9)
    assert new == 3 and layer.rank == 3


def test_lr_milestones_decay_and_are_checkpointed(tmp_path):
    tr = ssa.Trainer(_convnet(), 5, lr=1e-2, lr_milestones=(1, 2), lr_gamma=0.5)
    loader = [_batch(seed=s) for s in range(2)]
    tr.fit(loader, 2, checkpoint_dir=str(tmp_path))
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    again = ssa.Trainer(_convnet(), 5, lr=1e-2, lr_milestones=(1, 2), lr_gamma=0.5)
    again.load_checkpoint(str(tmp_path / "latest.pt"))
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert again.lr_scheduler.last_epoch == 2
    with pytest.raises(ValueError, match="lr_milestones"):
        ssa.Trainer(_convnet(), 5, lr_milestones=(0,))
    with pytest.raises(ValueError, match="not both"):
        ssa.Trainer(_convnet(), 5, lr_milestones=(3,), lr_scheduler=lambda o: None)
    with pytest.raises(TypeError, match="LRScheduler"):
        ssa.Trainer(_convnet(), 5, lr_scheduler=lambda o: None)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return ssa.data.digits(batch_size=32, seed=0)


def test_lenet_on_digits_ssa_and_bp(digits):
    """SSA trains LeNet on the 8×8 digits to >= 90 % on a CPU (30 epochs); BP on the same model."""
    train, test = digits
    acc = {}
    for method in ("ssa", "bp"):
        torch.manual_seed(0)
        train.generator.manual_seed(0)
        model = ssa.models.get("lenet", 10, (1, 8, 8))
        tr = ssa.Trainer(model, 10, method=method, lr=2e-3, lr_milestones=(20,), seed=0)
        tr.fit(train, 30)
        acc[method] = tr.evaluate(test)["acc"]
        if method == "ssa":
            assert sum(isinstance(m, ssa.SSAConv2d) for m in model.modules()) == 2
            assert max(tr.ortho_errors().values()) < 0.1
    assert acc["ssa"] >= 0.90, acc
    assert acc["bp"] >= 0.95, acc


def test_resnet_recompute_equals_store():
    """Local residual blocks with BatchNorm inside: recompute's second forward sees the same statistics."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)
    ]
    results = []
    for memory in ("store", "recompute"):
        torch.manual_seed(0)
        model = ssa.models.get("resnet20", 10, (3, 8, 8))
        tr = ssa.Trainer(model, 10, memory=memory)
        for x, y in batches:
            tr.step(x, y)
        results.append(_float_state(model))
    _assert_same_states(*results, rtol=1e-4, atol=1e-6)


def test_dfa_method_trains_a_dense_convnet_with_local_blocks():
    model = ssa.models.get("resnet20", 10, (3, 8, 8))
    tr = ssa.Trainer(model, 10, method="dfa")
    assert not any(isinstance(m, ssa.SSALayer) for m in model.modules())
    kinds = {u.name: u.kind for u in tr.units}
    assert sum(k == "local" for k in kinds.values()) == 9 and kinds["stem.0"] == kinds["head.2"] == "dense"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    tr.step(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
