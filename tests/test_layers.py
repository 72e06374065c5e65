"""SSALinear: a drop-in nn.Linear kept as SVD factors (DESIGN §2, §3, §5-§8): forward, dense round
trip, factor surgery (truncate, reorthonormalize) with optimizer state, state_dict, feedback, bad input."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssa


def perturbed(layer: ssa.SSALinear, scale=0.05, seed=0) -> ssa.SSALinear:
    """Move the factors off the manifold a little (U, V no longer exactly orthonormal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.U, layer.s, layer.V):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def separated(layer: ssa.SSALinear, lo=0.5, hi=3.0, ascending=True) -> ssa.SSALinear:
    """Well separated singular values, so singular directions are identifiable after a perturbation."""
    with torch.no_grad():
        s = torch.linspace(lo, hi, layer.rank)
        layer.s.copy_(s if ascending else s.flip(0))
    return layer


def best_rank(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def eye_close(A: torch.Tensor, atol=1e-5):
    torch.testing.assert_close(A.t() @ A, torch.eye(A.shape[1], dtype=A.dtype), rtol=0, atol=atol)


def framed(layer: ssa.SSALinear) -> ssa.SSALinear:
    """The papers' literal ``"frame"`` targets (U, s and V), built on demand (DESIGN §6)."""
    layer.set_targets("frame")
    return layer


def sort_positions(layer: ssa.SSALinear) -> torch.Tensor:
    """Where each current column goes when ``truncate`` / ``reorthonormalize(sort=True)`` sorts by ``|s|``
    (computed on a copy: re-orthonormalise without sorting, then order by decreasing ``|s|``)."""
    twin = copy.deepcopy(layer)
    twin.reorthonormalize()
    perm = torch.argsort(twin.s.detach().abs(), descending=True)
    return torch.argsort(perm)  # old column c -> new position


def adam_after_one_step(layer: ssa.SSALinear, in_features: int) -> torch.optim.Adam:
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(3, in_features)).pow(2).sum().backward()
    opt.step()
    assert all(p in opt.state for p in layer.parameters())
    return opt


# ---------------------------------------------------------------------- drop-in nn.Linear

def test_same_positional_arguments_as_nn_linear():
    ours = list(inspect.signature(ssa.SSALinear.__init__).parameters)[1:6]
    theirs = list(inspect.signature(nn.Linear.__init__).parameters)[1:6]
    assert ours == theirs == ["in_features", "out_features", "bias", "device", "dtype"]
    layer = ssa.SSALinear(12, 7, False, "cpu", torch.float64, seed=1)
    assert layer.bias is None and layer.U.dtype == torch.float64 and layer.U.device.type == "cpu"


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (12,)], ids=["2-D", "3-D", "1-D"])
def test_forward_equals_f_linear(shape):
    layer = ssa.SSALinear(12, 7, seed=1)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 7)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_weight_is_the_detached_product_of_the_factors():
    layer = ssa.SSALinear(12, 7, seed=1)
    W = layer.weight
    assert W.shape == (7, 12) and not W.requires_grad and W.grad_fn is None
    want = layer.U.detach() @ torch.diag(layer.s.detach()) @ layer.V.detach().t()
    torch.testing.assert_close(W, want, rtol=1e-6, atol=1e-7)
    W.add_(1.0)  # a copy: writing to it does not touch the factors
    torch.testing.assert_close(layer.weight, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("in_f,out_f,rank", [(12, 7, None), (5, 9, None), (12, 7, 3)])
def test_parameters_and_buffers(in_f, out_f, rank):
    layer = ssa.SSALinear(in_f, out_f, rank=rank, seed=1)
    r = min(in_f, out_f) if rank is None else rank
    assert layer.rank == layer.r0 == r
    params = dict(layer.named_parameters())
    assert set(params) == {"U", "s", "V", "bias"}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    assert shapes == {"U": (out_f, r), "s": (r,), "V": (in_f, r), "bias": (out_f,)}
    # targets are built on demand (set_targets), not at construction: no buffers yet
    assert layer.targets == "none" and not layer.has_targets and not layer.has_feedback
    assert not list(layer.named_buffers()) and set(layer.state_dict()) == set(params) | {"_extra_state"}
    layer.set_targets("frame")  # the papers' literal targets: U, s and V of a seeded frame
    state = layer.state_dict()
    assert (state["target_U"].shape, state["target_s"].shape, state["target_V"].shape) == (
        (out_f, r), (r,), (in_f, r))
    assert torch.equal(state["target_cols"], torch.arange(r))
    assert not any(n.startswith(("target", "feedback")) for n in params)
    assert {n for n, _ in layer.named_buffers()} == {"target_U", "target_s", "target_V", "target_cols"}
    C = 4  # "feedback" targets: U[:, :k] -> P, s[:k] -> sigma of the layer's own feedback, no V target
    k = min(C, out_f, r)
    layer.set_targets("feedback", C)
    assert layer.has_feedback and layer.target_V is None
    assert (layer.target_U.shape, layer.target_s.shape) == ((out_f, k), (k,))
    assert {n for n, _ in layer.named_buffers()} == {"target_U", "target_s", "target_cols", "feedback_P",
                                                     "feedback_sigma", "feedback_Q"}
    eye_close(layer.U.detach())  # full-SVD init: orthonormal factors, s descending and positive
    eye_close(layer.V.detach())
    assert torch.all(layer.s[:-1] >= layer.s[1:]) and torch.all(layer.s > 0)


def test_to_float64_moves_parameters_and_buffers():
    layer = ssa.SSALinear(12, 7, seed=1)
    layer.set_targets("frame", 4)  # three targets (+ their columns) and three feedback factors
    same = layer.to(torch.float64)
    assert same is layer
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    floats = [n for n, b in layer.named_buffers() if b.is_floating_point()]
    assert len(floats) == 6 and all(getattr(layer, n).dtype == torch.float64 for n in floats)
    assert layer.target_cols.dtype == torch.long  # column indices stay integers
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_bias_false():
    layer = ssa.SSALinear(12, 7, bias=False, seed=1)
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert set(dict(layer.named_parameters())) == {"U", "s", "V"}
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), x @ layer.weight.t(), rtol=1e-5, atol=1e-6)


def test_gradcheck_through_the_layer():
    layer = ssa.SSALinear(6, 4, dtype=torch.float64, seed=2)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    x3 = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x3,))


def test_parameter_gradients_equal_autograd_of_the_dense_expression():
    layer = perturbed(ssa.SSALinear(6, 4, dtype=torch.float64, seed=2))
    x = torch.randn(5, 6, dtype=torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    leaves = [p.detach().clone().requires_grad_(True) for p in (layer.U, layer.s, layer.V, layer.bias)]
    U, s, V, b = leaves
    ((x @ V @ torch.diag(s) @ U.t() + b) * g).sum().backward()
    for p, want in zip((layer.U, layer.s, layer.V, layer.bias), leaves):
        torch.testing.assert_close(p.grad, want.grad)


def test_seeds_make_layers_reproducible():
    def tensors(layer):
        return {k: v for k, v in layer.state_dict().items() if torch.is_tensor(v)}

    a, b, c = (framed(ssa.SSALinear(8, 5, seed=s)) for s in (3, 3, 4))
    for layer in (a, b, c):
        layer.init_feedback(3)
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    assert {"target_U", "target_V", "feedback_P", "feedback_Q"} <= set(ta)
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["U"], tc["U"]) and not torch.equal(ta["target_U"], tc["target_U"])
    assert not torch.equal(ta["feedback_Q"], tc["feedback_Q"])
    torch.manual_seed(0)
    d = ssa.SSALinear(8, 5)
    torch.manual_seed(0)
    e = ssa.SSALinear(8, 5)
    f = ssa.SSALinear(8, 5)  # the global RNG moved on: another layer
    td, te = tensors(d), tensors(e)
    assert d.seed == e.seed and all(torch.equal(td[k], te[k]) for k in td)
    assert not torch.equal(e.U, f.U)


# ---------------------------------------------------------------------- dense round trip

def test_from_dense_full_rank_and_back():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    layer = ssa.SSALinear.from_dense(lin)
    assert layer.rank == 6 and (layer.in_features, layer.out_features) == (10, 6)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)
    back = layer.to_dense()
    assert type(back) is nn.Linear and (back.in_features, back.out_features) == (10, 6)
    torch.testing.assert_close(back.weight, lin.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(back.bias, lin.bias, rtol=0, atol=0)
    torch.testing.assert_close(back(x), lin(x), rtol=1e-5, atol=1e-6)


def test_from_dense_keeps_bias_none_dtype_and_mode():
    lin = nn.Linear(7, 9, bias=False, dtype=torch.float64).eval()
    layer = ssa.SSALinear.from_dense(lin)
    assert layer.bias is None and layer.U.dtype == torch.float64 and not layer.training
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-10, atol=1e-12)
    back = layer.to_dense()
    assert back.bias is None and not back.training


@pytest.mark.parametrize("r", [1, 3, 5])
def test_from_dense_low_rank_is_the_best_approximation(r):
    torch.manual_seed(1)
    lin = nn.Linear(10, 6)
    low = ssa.SSALinear.from_dense(lin, rank=r)
    assert low.rank == r
    W = lin.weight.detach().double()
    S = torch.linalg.svdvals(W)
    err = (low.weight.double() - W).norm()
    torch.testing.assert_close(err, S[r:].pow(2).sum().sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low.s.double(), S[:r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation,module", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid),
                                               ("leaky_relu", nn.LeakyReLU)])
def test_to_dense_keeps_a_fused_activation(activation, module):
    layer = ssa.SSALinear(10, 6, activation=activation, negative_slope=0.2, seed=3)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Sequential) and len(dense) == 2
    assert type(dense[0]) is nn.Linear and isinstance(dense[1], module)
    if activation == "leaky_relu":
        assert dense[1].negative_slope == 0.2
    x = torch.randn(8, 10)
    want = dense(x)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    if activation == "relu":
        assert (want == 0).any() and torch.equal(layer(x) >= 0, torch.ones_like(want, dtype=torch.bool))


@pytest.mark.parametrize("activation", [None, "none"])
def test_to_dense_without_activation_is_a_linear(activation):
    assert type(ssa.SSALinear(4, 3, activation=activation, seed=0).to_dense()) is nn.Linear


# ---------------------------------------------------------------------- truncate

@pytest.mark.parametrize("r", [1, 5, 11])
def test_truncate_keeps_the_leading_singular_triplets(r):
    layer = framed(perturbed(ssa.SSALinear(16, 12, seed=4)))
    W = layer.weight.double()
    assert (layer.U.t() @ layer.U - torch.eye(12)).norm() > 1e-2  # really off the manifold
    old = {n: getattr(layer, n).clone() for n in ("target_U", "target_s", "target_V")}
    # targets follow their columns through the sort and only those of kept columns stay (DESIGN §6)
    pos = sort_positions(layer)
    kept = pos < r
    assert 0 < int(kept.sum()) <= r
    objs = (layer.U, layer.s, layer.V, layer.bias)
    layer.truncate(r)
    assert layer.rank == r and layer.r0 == 12
    assert all(a is b for a, b in zip((layer.U, layer.s, layer.V, layer.bias), objs))
    assert (layer.U.shape, layer.V.shape) == ((12, r), (16, r))
    torch.testing.assert_close(layer.weight.double(), best_rank(W, r), rtol=0, atol=2e-5)
    torch.testing.assert_close(layer.s.double(), torch.linalg.svdvals(W)[:r], rtol=1e-5, atol=1e-6)
    eye_close(layer.U.detach())
    eye_close(layer.V.detach())
    assert torch.all(layer.s[:-1] >= layer.s[1:])
    assert torch.equal(layer.target_cols, pos[kept])
    assert torch.equal(layer.target_U, old["target_U"][:, kept])
    assert torch.equal(layer.target_s, old["target_s"][kept])
    assert torch.equal(layer.target_V, old["target_V"][:, kept])
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_truncate_twice_and_to_the_same_rank():
    layer = framed(perturbed(ssa.SSALinear(16, 12, seed=4)))
    W = layer.weight.double()
    layer.truncate(8)
    cols = layer.target_cols.clone()
    layer.truncate(8)
    assert torch.equal(layer.target_cols, cols)  # already sorted: nothing moves, nothing dropped
    torch.testing.assert_close(layer.weight.double(), best_rank(W, 8), rtol=0, atol=2e-5)
    pos = sort_positions(layer)
    layer.truncate(3)
    torch.testing.assert_close(layer.weight.double(), best_rank(W, 3), rtol=0, atol=2e-5)
    want = pos[cols][pos[cols] < 3]
    assert torch.equal(layer.target_cols, want) and want.numel() > 0
    assert layer.target_U.shape == (12, want.numel()) and layer.target_V.shape == (16, want.numel())


def test_truncate_drops_the_optimizer_state_of_the_factors():
    layer = perturbed(ssa.SSALinear(16, 12, seed=4))
    opt = adam_after_one_step(layer, 16)
    bias_state = opt.state[layer.bias]["exp_avg"].clone()
    layer.truncate(5, optimizer=opt)
    assert all(p not in opt.state for p in (layer.U, layer.s, layer.V))
    assert layer.bias in opt.state and torch.equal(opt.state[layer.bias]["exp_avg"], bias_state)
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], layer.parameters()))
    opt.zero_grad()
    layer(torch.randn(3, 16)).pow(2).sum().backward()
    opt.step()  # state of the old shape would fail here; fresh state is built at the new shape
    assert opt.state[layer.U]["exp_avg"].shape == (12, 5)


@pytest.mark.parametrize("bad", [13, 0, -1])
def test_truncate_to_a_bad_rank_raises(bad):
    layer = ssa.SSALinear(16, 12, seed=4)
    with pytest.raises(ValueError, match="rank"):
        layer.truncate(bad)
    assert layer.rank == 12


def test_truncate_cannot_grow_back():
    layer = ssa.SSALinear(16, 12, seed=4)
    layer.truncate(4)
    with pytest.raises(ValueError, match="rank"):
        layer.truncate(5)


# ---------------------------------------------------------------------- reorthonormalize

@pytest.mark.parametrize("sort", [False, True])
def test_reorthonormalize_keeps_w(sort):
    # ascending, well separated s (an unmatched SVD would reverse the order), a mild perturbation
    layer = perturbed(separated(ssa.SSALinear(16, 12, seed=5), lo=1.0, hi=12.0), scale=0.005)
    W, U_old, s_old = layer.weight.clone(), layer.U.detach().clone(), layer.s.detach().clone()
    objs = (layer.U, layer.s, layer.V)
    layer.reorthonormalize(sort=sort)
    assert all(a is b for a, b in zip((layer.U, layer.s, layer.V), objs))
    torch.testing.assert_close(layer.weight, W, rtol=1e-5, atol=1e-5)
    eye_close(layer.U.detach())
    eye_close(layer.V.detach())
    if sort:
        assert torch.all(layer.s[:-1] >= layer.s[1:])
        return
    # columns stay matched to the old ones: the overlap is ~identity, signs kept
    overlap = (U_old.t() @ layer.U).detach()
    assert torch.all(overlap.diagonal() > 0.97)
    assert torch.equal(overlap.abs().argmax(0), torch.arange(layer.rank))
    assert (overlap - torch.diag(overlap.diagonal())).abs().max() < 0.2
    assert torch.all(layer.s[:-1] <= layer.s[1:])  # still ascending, in the old order
    torch.testing.assert_close(layer.s.detach(), s_old, rtol=0, atol=0.1)


def test_reorthonormalize_is_idempotent_on_an_orthonormal_layer():
    layer = ssa.SSALinear(9, 7, seed=5)
    before = [p.detach().clone() for p in (layer.U, layer.s, layer.V)]
    layer.reorthonormalize()
    for p, b in zip((layer.U, layer.s, layer.V), before):
        torch.testing.assert_close(p.detach(), b, rtol=1e-5, atol=1e-5)


def test_sorting_permutes_the_adam_state():
    layer = ssa.SSALinear(8, 6, seed=6)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([0.1, 3.0, 2.0, 0.5, 1.0, 4.0]))
    opt = torch.optim.Adam(layer.parameters())
    layer.U.grad = torch.randn(6, 6)
    layer.s.grad = torch.arange(6.0)
    layer.V.grad = torch.randn(8, 6)
    layer.bias.grad = torch.randn(6)
    opt.step()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in (layer.U, layer.s, layer.V)}
    s_before = layer.s.detach().clone()
    layer.reorthonormalize(sort=True, optimizer=opt)
    order = [5, 1, 2, 4, 3, 0]
    # (Adam moved U and V off the manifold a little, so s moves a little too)
    torch.testing.assert_close(layer.s.detach(), s_before[order], rtol=0, atol=0.05)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[layer.s][key], before[layer.s][key][order])
        torch.testing.assert_close(opt.state[layer.U][key], before[layer.U][key][:, order])
        torch.testing.assert_close(opt.state[layer.V][key], before[layer.V][key][:, order])
    assert torch.equal(opt.state[layer.s]["step"], before[layer.s]["step"])


# ---------------------------------------------------------------------- state_dict and feedback

def test_truncated_state_dict_loads_into_a_fresh_full_rank_layer():
    layer = framed(perturbed(ssa.SSALinear(10, 8, seed=7, activation="tanh")))
    layer.truncate(3)
    layer.frozen_rank = True
    state = layer.state_dict()
    assert "_extra_state" in state
    fresh = ssa.SSALinear(10, 8, seed=99, activation="tanh")
    assert fresh.rank == 8 and not fresh.frozen_rank and fresh.target_U is None
    result = fresh.load_state_dict(state)  # strict; the target buffers are created at the saved size
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.rank == 3 and fresh.r0 == 8 and fresh.frozen_rank and fresh.seed == 7
    assert fresh.targets == "frame"
    for name in ("U", "s", "V", "bias", "target_U", "target_s", "target_V", "target_cols"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name)), name
    x = torch.randn(2, 10)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_survives_torch_save():
    layer = ssa.SSALinear(10, 8, seed=7)
    layer.truncate(5)
    layer.init_feedback(3)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = ssa.SSALinear(10, 8, seed=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.rank == 5 and fresh.r0 == 8 and torch.equal(fresh.feedback_Q, layer.feedback_Q)


@pytest.mark.parametrize("C,out,rank", [(10, 32, None), (10, 6, None), (10, 32, 4), (3, 32, None)],
                         ids=["k=C", "k=out", "k=r0", "small C"])
def test_init_feedback_is_structured_with_unit_average_columns(C, out, rank):
    layer = ssa.SSALinear(20, out, rank=rank, seed=8)
    layer.init_feedback(C)
    k = min(C, out, layer.r0)
    P, sigma, Q = layer.feedback_P, layer.feedback_sigma, layer.feedback_Q
    assert layer.has_feedback
    assert P.shape == (out, k) and sigma.shape == (k,) and Q.shape == (C, k)
    B = (P * sigma) @ Q.t()
    assert B.shape == (out, C)
    torch.testing.assert_close(B.norm() ** 2, torch.tensor(float(C)), rtol=1e-5, atol=0)
    eye_close(P)
    eye_close(Q)
    assert torch.all(sigma[:-1] >= sigma[1:]) and torch.all(sigma > 0)
    assert layer.feedback_form == "gaussian" and not torch.allclose(sigma, sigma[:1].expand(k))
    if k == min(C, out):  # an exact SVD of a Gaussian with unit-norm columns (DESIGN §5)
        torch.testing.assert_close(B.norm(dim=0), torch.ones(C), rtol=1e-5, atol=1e-5)
    layer.set_targets("feedback")  # the default targets are the feedback's own factors (DESIGN §6)
    assert torch.equal(layer.target_U, P[:, :layer.rank]) and torch.equal(layer.target_s, sigma)
    assert layer.target_V is None
    assert all(n in layer.state_dict() for n in ("feedback_P", "feedback_sigma", "feedback_Q"))
    assert not any(n.startswith("feedback") for n, _ in layer.named_parameters())
    # the papers' literal "frame" targets: P, sigma taken from the frame, Q random orthonormal
    lit = ssa.SSALinear(20, out, rank=rank, seed=8)
    lit.set_targets("frame", C)
    torch.testing.assert_close(lit.feedback_P, lit.target_U[:, :k])
    eye_close(lit.feedback_Q)
    Bf = (lit.feedback_P * lit.feedback_sigma) @ lit.feedback_Q.t()
    torch.testing.assert_close(Bf.norm() ** 2, torch.tensor(float(C)), rtol=1e-5, atol=0)


def test_feedback_is_seeded_and_idempotent():
    a, b = ssa.SSALinear(20, 12, seed=8), ssa.SSALinear(20, 12, seed=8)
    a.init_feedback(5)
    b.init_feedback(5)
    names = ("feedback_P", "feedback_sigma", "feedback_Q")
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)
    Q = a.feedback_Q
    a.init_feedback(5)
    assert a.feedback_Q is Q
    a.init_feedback(7)
    assert a.feedback_Q.shape == (7, 7)


def test_feedback_loads_into_a_fresh_layer_without_feedback():
    layer = ssa.SSALinear(20, 12, seed=8)
    layer.init_feedback(5)
    layer.truncate(4)
    fresh = ssa.SSALinear(20, 12, seed=0)
    assert not fresh.has_feedback
    fresh.load_state_dict(layer.state_dict())
    assert fresh.has_feedback
    for n in ("feedback_P", "feedback_sigma", "feedback_Q"):
        assert torch.equal(getattr(fresh, n), getattr(layer, n)), n


# ---------------------------------------------------------------------- bad input

def test_wrong_input_width():
    layer = ssa.SSALinear(4, 3, seed=0)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("rank", [0, -2, 4])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        ssa.SSALinear(4, 3, rank=rank)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        ssa.SSALinear(4, 3, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        ssa.SSALinear(4, 3, activation=nn.ReLU())


@pytest.mark.parametrize("args,name", [((4.0, 3), "in_features"), ((4, "3"), "out_features"),
                                       ((True, 3), "in_features")])
def test_non_int_features(args, name):
    with pytest.raises(TypeError, match=name):
        ssa.SSALinear(*args)


def test_bad_from_dense():
    with pytest.raises(TypeError, match="nn.Linear"):
        ssa.SSALinear.from_dense(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        ssa.SSALinear.from_dense(torch.randn(3, 4))
    with pytest.raises(ValueError, match="rank"):
        ssa.SSALinear.from_dense(nn.Linear(4, 3), rank=4)


def test_reorthonormalize_keeps_the_sign_of_a_negative_singular_value():
    layer = ssa.SSALinear(8, 6, seed=11)
    with torch.no_grad():
        layer.s[2] = -0.7
    W, V_old = layer.weight.clone(), layer.V.detach().clone()
    layer.reorthonormalize()
    torch.testing.assert_close(layer.weight, W, rtol=1e-5, atol=1e-5)
    assert layer.s[2] < 0
    assert (V_old[:, 2] @ layer.V[:, 2]).item() > 0.99
