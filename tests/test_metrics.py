"""ssa.metrics: layer shapes, analytic training FLOPs, gradient and matrix alignment (DESIGN §10)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssa
from ssa import metrics
from ssa.baselines import FeedbackLinear
from ssa.trainer import METHODS


def _needs(method: str):
    return pytest.mark.skipif(method not in METHODS, reason=f"method {method!r} not in the trainer yet")


def mlp432():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def conv_net():
    """conv(1→2, 3×3, padding 1) on 4×4 maps → flatten (32) → linear(32→3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def fill_grads(tr, x, y):
    """The method's gradients of one batch, without a step."""
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.method in ("ssa", "dfa", "drtp"):
        with tr.record():
            z = tr.model(x)
        tr.local_backward(z, y)
    else:
        F.cross_entropy(tr.model(x), y).backward()


@pytest.fixture(scope="module")
def digits():
    train, _, classes, in_shape = ssa.data.get("digits", 64, 0)
    return train, classes, in_shape


# ---------------------------------------------------------------------- shapes
def test_layer_shapes_of_a_conv_net_and_nothing_disturbed():
    tr = ssa.Trainer(conv_net(), 3, method="ssa", seed=0)
    def hooks():
        return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in tr.model.named_modules()}

    before = hooks()
    tr.model.train()
    rng = torch.get_rng_state()
    shapes = metrics.layer_shapes(tr, (2, 1, 4, 4))
    assert list(shapes) == ["0", "3"]
    c, fc = shapes["0"], shapes["3"]
    assert (c["kind"], c["in"], c["out"], c["kernel"], c["in_size"], c["out_size"]) == \
        ("conv", 1, 2, (3, 3), (4, 4), (4, 4))
    assert c["t_size"] == (4, 6) and c["rank"] == 3 and c["order"] == 0  # m = 2·3, n = 1·3
    assert not c["input_grad"] and not c["is_output"] and c["type"] == "SSAConv2d"
    assert (fc["kind"], fc["in"], fc["out"], fc["rows"], fc["rank"], fc["order"]) == \
        ("linear", 32, 3, 1, 3, 1)
    assert fc["input_grad"] and fc["is_output"]
    assert all(m.training for m in tr.model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert hooks() == before
    dense = metrics.layer_shapes(ssa.Trainer(conv_net(), 3, method="bp"), (2, 1, 4, 4))
    assert dense["0"]["rank"] is None and dense["0"]["t_size"] is None and dense["0"]["type"] == "Conv2d"


# ---------------------------------------------------------------------- FLOPs
# p = 5 rows, layer 0: m = 3, n = 4; layer 1 (output): m = 2, n = 3; C = 2. Dense F0 = 2·5·3·4, F1 = 2·5·2·3.
MLP_FLOPS = {
    "bp": {"0": 120 + 120, "2": 60 + 60 + 60},  # first layer: no input-gradient
    "fa": {"0": 240, "2": 180},
    "dfa": {"0": 120 + 120 + 2 * 5 * 2 * 3, "2": 60 + 60},  # projection 2·B·C·d, none at the output
    "drtp": {"0": 300, "2": 120},
    # forward 2·p·r·(m+n); update 2·p·r·(2m+n) + 2·p·r² + 6·(m+n)·r²; projection 2·p·k·(C+d), k = 2
    "ssa": {"0": 2 * 5 * 3 * 7 + (2 * 5 * 3 * 10 + 2 * 5 * 9 + 6 * 7 * 9) + 2 * 5 * 2 * 5,
            "2": 2 * 5 * 2 * 5 + (2 * 5 * 2 * 7 + 2 * 5 * 4 + 6 * 5 * 4)},
    # forward; backward 2×forward (first layer: minus 2·p·n·r); penalty 4·r²·(m+n)
    "svd_bp": {"0": 210 + (420 - 2 * 5 * 4 * 3) + 4 * 9 * 7, "2": 100 + 200 + 4 * 4 * 5},
    # F + F + (F + 2F unless first) + head 2·2·B·d·C (not at the output)
    "sgr": {"0": 120 + 120 + 2 * 2 * 5 * 3 * 2, "2": 60 + 60 + 3 * 60},
}


@pytest.mark.parametrize("method", list(MLP_FLOPS), ids=str)
def test_flops_of_a_small_mlp_by_hand(method):
    if method not in METHODS:
        pytest.skip(f"method {method!r} not in the trainer yet")
    tr = ssa.Trainer(mlp432(), 2, method=method, seed=0)
    want = dict(MLP_FLOPS[method])
    want["total"] = sum(want.values())
    assert metrics.training_flops(tr, (5, 4)) == want


def test_ssa_flops_fall_after_truncation():
    tr = ssa.Trainer(mlp432(), 2, method="ssa", seed=0)
    full = metrics.training_flops(tr, (5, 4))
    tr.model[0].truncate(2)
    cut = metrics.training_flops(tr, (5, 4))
    # r = 2: 2·5·2·7 + (2·5·2·10 + 2·5·4 + 6·7·4) + projection (k = 2) 2·5·2·5
    assert cut["0"] == 140 + (200 + 40 + 168) + 100
    assert cut["2"] == full["2"] and cut["total"] == cut["0"] + cut["2"] < full["total"]


def test_flops_of_a_conv_and_a_linear_layer_by_hand():
    B = 2  # x (2, 1, 4, 4); conv 1→2, 3×3, padding 1: Ho = Wo = 4; linear 32→3; C = 3
    conv_f, lin_f = 2 * B * 4 * 4 * 2 * 1 * 9, 2 * B * 3 * 32
    bp = metrics.training_flops(ssa.Trainer(conv_net(), 3, method="bp"), (B, 1, 4, 4))
    assert bp == {"0": 2 * conv_f, "3": 3 * lin_f, "total": 2 * conv_f + 3 * lin_f}
    dfa = metrics.training_flops(ssa.Trainer(conv_net(), 3, method="dfa"), (B, 1, 4, 4))
    assert dfa == {"0": 2 * conv_f + 2 * B * 3 * 2, "3": 2 * lin_f, "total": 2 * conv_f + 12 * B + 2 * lin_f}
    # SSAConv2d: m = N·kw = 6, n = C·kh = 3, r = 3, Wt = 4 + 2
    conv1 = 2 * B * 3 * 1 * 3 * 4 * 6  # 2·B·r·C·kh·Ho·Wt
    conv2 = 2 * B * 2 * 3 * 3 * 4 * 4  # 2·B·N·r·kw·Ho·Wo
    update = 2 * conv2 + conv1 + 2 * B * 9 * 4 * 6 + 6 * 9 * 9
    project = 2 * B * 2 * (3 + 2)  # k = min(C, N) = 2
    lin = 2 * B * 3 * 35 + (2 * B * 3 * (6 + 32) + 2 * B * 9 + 6 * 35 * 9)
    ssa_f = metrics.training_flops(ssa.Trainer(conv_net(), 3, method="ssa"), (B, 1, 4, 4))
    conv = conv1 + conv2 + update + project
    assert ssa_f == {"0": conv, "3": lin, "total": conv + lin}
    assert (conv, lin) == (6574, 2802)


# ---------------------------------------------------------------------- gradient alignment
def bn_mlp(classes, in_shape, p_drop=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Dropout(p_drop), nn.Linear(32, classes))


@pytest.mark.parametrize("name", ["mlp", "lenet", "bn_mlp"])
def test_gradient_alignment_of_bp_with_itself_is_zero(name, digits):
    train, classes, in_shape = digits
    model = bn_mlp(classes, in_shape) if name == "bn_mlp" else ssa.models.get(name, classes, in_shape)
    tr = ssa.Trainer(model, classes, method="bp", seed=0)
    x, y = next(iter(train))
    fill_grads(tr, x, y)
    before = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
    angles = metrics.gradient_alignment(tr, x, y)  # the twin runs in train mode too (batch statistics)
    assert len(angles) == {"mlp": 3, "lenet": 5, "bn_mlp": 2}[name]
    assert all(0.0 <= a <= 1e-3 for a in angles.values()), angles
    assert all(torch.equal(p.grad, before[n]) for n, p in tr.model.named_parameters())


def test_gradient_alignment_leaves_the_run_untouched(digits):
    train, classes, in_shape = digits
    tr = ssa.Trainer(bn_mlp(classes, in_shape, p_drop=0.5), classes, method="dfa", seed=0)
    x, y = next(iter(train))
    tr.step(x, y)
    fill_grads(tr, x, y)
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
    rng = torch.get_rng_state()
    angles = metrics.gradient_alignment(tr, x, y)
    assert torch.equal(torch.get_rng_state(), rng)  # the twin's dropout draws do not shift the run
    assert all(torch.equal(v, state[k]) for k, v in tr.model.state_dict().items())  # BN statistics
    assert all(torch.equal(p.grad, grads[n]) for n, p in tr.model.named_parameters())
    assert all(m.training for m in tr.model.modules())
    assert list(angles) == ["1", "5"] and all(0 < a < 180 for a in angles.values()), angles


def test_dfa_gradients_align_after_training(digits):
    train, classes, in_shape = digits
    tr = ssa.Trainer(ssa.models.get("mlp", classes, in_shape), classes, method="dfa", lr=1e-3, seed=0)
    tr.fit(train, 2)
    x, y = next(iter(train))
    fill_grads(tr, x, y)
    angles = metrics.gradient_alignment(tr, x, y)
    assert list(angles) == ["1", "3", "5"]
    assert all(0.0 < angles[n] < 90.0 for n in ("1", "3")), angles
    assert angles["5"] <= 1e-3, angles  # the output layer gets the true error
    mat = metrics.matrix_alignment(tr)
    assert list(mat) == ["1", "3"] and all(0.0 < a < 90.0 for a in mat.values()), mat


def test_ssa_output_layer_pseudo_gradient_is_close_to_bp_at_step_0(digits):
    train, classes, in_shape = digits
    loss = ssa.LossConfig(align=0.0, ortho=0.0)  # the ce part alone: the true factor gradients
    tr = ssa.Trainer(ssa.models.get("mlp", classes, in_shape), classes, method="ssa", loss=loss, seed=0)
    x, y = next(iter(train))
    fill_grads(tr, x, y)
    angles = metrics.gradient_alignment(tr, x, y)
    assert angles["5"] < 30.0 and angles["5"] < min(angles["1"], angles["3"]) - 30, angles


@pytest.mark.parametrize("layer", [
    lambda: ssa.SSALinear(5, 4, seed=1),
    lambda: ssa.SSAConv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), seed=2, rank=4),
], ids=["linear", "conv"])
def test_pseudo_gradient_is_the_directional_derivative_of_the_layer(layer):
    """``gU diag(s) Vᵀ + U diag(gs) Vᵀ + U diag(s) gVᵀ`` against central differences of the forward."""
    layer = layer().double()
    g = torch.Generator().manual_seed(0)
    for p in (layer.U, layer.s, layer.V):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    dW = metrics._method_weight_grad(layer)
    shape = (2, 3, 6, 5) if isinstance(layer, ssa.SSAConv2d) else (7, 5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    base = [p.detach().clone() for p in (layer.U, layer.s, layer.V)]
    outs = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, b in zip((layer.U, layer.s, layer.V), base):
                p.copy_(b + sign * eps * p.grad)
            outs.append(layer(x))
    fd = (outs[0] - outs[1]) / (2 * eps)
    if isinstance(layer, ssa.SSAConv2d):
        lin = F.conv2d(x, dW, None, layer.stride, (1, 0))
    else:
        lin = F.linear(x, dW)
    assert dW.shape == layer.weight.shape
    torch.testing.assert_close(lin, fd, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------- matrix alignment
def test_matrix_alignment_of_direct_feedback_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    tr = ssa.Trainer(model, 2, method="dfa", seed=0)
    assert metrics.matrix_alignment(tr) == {}  # no feedback before the first step
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))  # a permutation
        model[4].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    # (W3 W2)ᵀ = [[0, 1], [1, 0], [0, 0]];  W3ᵀ = [[1, 0], [0, 1], [0, 0]]
    tr.feedback["0"] = torch.tensor([[0.0, 2], [2, 0], [0, 0]])  # parallel to (W3 W2)ᵀ: 0°
    tr.feedback["2"] = torch.tensor([[1.0, 0], [0, 0], [0, 1]])  # cos = 1/2 with W3ᵀ: 60°
    got = metrics.matrix_alignment(tr)
    assert list(got) == ["0", "2"]
    assert got["0"] == pytest.approx(0.0, abs=1e-6) and got["2"] == pytest.approx(60.0, abs=1e-6)
    tr.feedback["0"] = torch.tensor([[1.0, 0], [0, 1], [0, 0]])  # W3ᵀ without W2: orthogonal
    assert metrics.matrix_alignment(tr)["0"] == pytest.approx(90.0, abs=1e-6)


def test_matrix_alignment_of_ssa_and_of_convnets(digits):
    _, classes, in_shape = digits
    tr = ssa.Trainer(ssa.models.get("mlp", classes, in_shape), classes, method="ssa", seed=0)
    got = metrics.matrix_alignment(tr)
    L1, L3, L5 = (tr.model.get_submodule(n) for n in ("1", "3", "5"))
    B1 = (L1.feedback_P * L1.feedback_sigma) @ L1.feedback_Q.t()
    M = (L5.weight.double() @ L3.weight.double()).t()
    want = math.degrees(math.acos(float(F.cosine_similarity(B1.double().flatten(), M.flatten(), 0))))
    assert list(got) == ["1", "3"] and got["1"] == pytest.approx(want, abs=1e-9)
    lenet = ssa.Trainer(ssa.models.get("lenet", classes, in_shape), classes, method="ssa", seed=0)
    assert list(metrics.matrix_alignment(lenet)) == ["classifier.1", "classifier.3"]  # convs: no chain


@pytest.mark.parametrize("method", ["fa", "usf", "brsf"])
def test_matrix_alignment_of_layer_to_layer_feedback(method, digits):
    _, classes, in_shape = digits
    tr = ssa.Trainer(ssa.models.get("mlp", classes, in_shape), classes, method=method, seed=0)
    fb = [m for m in tr.model.modules() if isinstance(m, FeedbackLinear)]
    gens = [m._gen.get_state() for m in fb]
    got = metrics.matrix_alignment(tr)
    assert all(torch.equal(m._gen.get_state(), g) for m, g in zip(fb, gens))  # no extra draw for brsf
    assert all(m._magnitude is None for m in fb) or method != "brsf"
    assert list(got) == ["3", "5"]  # every feedback layer but the first
    for name in got:
        layer = tr.model.get_submodule(name)
        B, W = layer.feedback_matrix().double().flatten(), layer.weight.detach().double().flatten()
        cos = F.cosine_similarity(B, W, 0)
        assert got[name] == pytest.approx(math.degrees(math.acos(float(cos))), abs=1e-9)
    if method == "fa":
        assert all(abs(a - 90) < 10 for a in got.values()), got  # independent random B
    else:
        assert all(a < 60 for a in got.values()), got  # sign-concordant


@pytest.mark.parametrize("method", ["bp", pytest.param("svd_bp", marks=_needs("svd_bp")),
                                    pytest.param("sgr", marks=_needs("sgr"))])
def test_matrix_alignment_without_feedback_is_empty(method):
    assert metrics.matrix_alignment(ssa.Trainer(mlp432(), 2, method=method, seed=0)) == {}


# ---------------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_the_argument(digits):
    train, classes, in_shape = digits
    tr = ssa.Trainer(ssa.models.get("lenet", classes, in_shape), classes, method="bp", seed=0)
    for shape in [(64,), (64, 0, 8, 8), "64", (64, 1.5)]:
        with pytest.raises(ValueError, match="x_shape"):
            metrics.training_flops(tr, shape)
    with pytest.raises(ValueError, match="x_shape"):
        metrics.layer_shapes(tr, (64, 64))  # flat rows into a conv net
    x, y = next(iter(train))
    with pytest.raises(ValueError, match="y must be"):
        metrics.gradient_alignment(tr, x, y.float())
    with pytest.raises(ValueError, match="samples"):
        metrics.gradient_alignment(tr, x, y[:3])
    with pytest.raises(TypeError, match="trainer"):
        metrics.matrix_alignment(tr.model)
    tr.rule = object()  # not a method: metrics ask the method for its cost and feedback
    with pytest.raises(TypeError, match="method object"):
        metrics.training_flops(tr, (64, 1, 8, 8))
    with pytest.raises(TypeError, match="method object"):
        metrics.matrix_alignment(tr)


def test_every_method_owns_its_flop_model_and_feedback_kind():
    from ssa.methods import REGISTRY, Method

    assert sorted(REGISTRY) == sorted(METHODS)
    for name, cls in REGISTRY.items():
        assert cls.layer_flops is not Method.layer_flops, name
        assert cls.feedback_kind in (None, "direct", "layer"), name


def test_cpu_peak_bytes_drops_the_profilers_chatter_and_keeps_other_stderr():
    import subprocess
    import sys

    code = ("import sys, torch\nfrom ssa.metrics import cpu_peak_bytes\n"
            "def f():\n    print('user line', file=sys.stderr)\n    return torch.ones(1000) * 2\n"
            "print(cpu_peak_bytes(f), cpu_peak_bytes(f))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peaks = [int(v) for v in out.stdout.split()]
    assert peaks[0] == peaks[1] >= 8000  # a 1000-float temporary and the result
    assert out.stderr.count("user line") == 2 and "profiler_st" not in out.stderr, out.stderr


def test_truncated_accuracy_cuts_hidden_layers_by_svd():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 12),
                          nn.ReLU(), nn.Linear(12, 10))
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    full_acc = float((model(x).argmax(1) == y).float().mean())
    before = [p.clone() for p in model.parameters()]
    out = metrics.truncated_accuracy(model, loader, [1.0, 0.25])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is not touched
    assert out[0]["fraction"] == 1.0 and abs(out[0]["acc"] - full_acc) < 1e-6
    # conv K' is (4·3) × (1·3): full rank 3 -> ceil(0.25·3) = 1; linear 12 × 256: 12 -> 3; output kept.
    dense = sum(p.numel() for p in model.parameters())
    conv_cut = (12 + 3 + 1) * 1 - 12 * 3
    lin_cut = (12 + 256 + 1) * 3 - 12 * 256
    assert out[1]["params"] == dense + conv_cut + lin_cut
    # The same cut by hand (conv through its spatial SVD K'[(n, w), (c, h)], DESIGN §4): same accuracy.
    import copy

    def best(W2, r):
        U, s, Vh = torch.linalg.svd(W2.double(), full_matrices=False)
        return ((U[:, :r] * s[:r]) @ Vh[:r]).to(W2.dtype)

    clone = copy.deepcopy(model)
    with torch.no_grad():
        K = clone[0].weight  # 4×1×3×3
        K2 = K.permute(0, 3, 1, 2).reshape(12, 3)
        K.copy_(best(K2, 1).reshape(4, 3, 1, 3).permute(0, 2, 3, 1))
        clone[3].weight.copy_(best(clone[3].weight, 3))
        by_hand = float((clone(x).argmax(1) == y).float().mean())
    assert abs(out[1]["acc"] - by_hand) < 1e-6
