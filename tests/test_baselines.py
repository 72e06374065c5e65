"""Layer-to-layer feedback baselines (DESIGN §9): fa, usf, brsf — layers, swap, trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssa
from ssa.baselines import FEEDBACK_MODES, FeedbackConv2d, FeedbackLinear, swap_feedback


def _grads(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    (layer(x) * g).sum().backward()
    return x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("mode", FEEDBACK_MODES)
def test_linear_backward_sends_the_error_through_B(mode):
    torch.manual_seed(0)
    dense = nn.Linear(6, 4)
    layer = FeedbackLinear.from_dense(dense, mode=mode, seed=3)
    x, g = torch.randn(5, 6), torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x))
    gx, gw, gb = _grads(layer, x, g)
    B = layer.feedback_matrix()  # brsf: the magnitudes drawn for this batch
    gx_bp, gw_bp, gb_bp = _grads(dense, x, g)
    torch.testing.assert_close(gw, gw_bp)  # the layer's own weight gradient is exact
    torch.testing.assert_close(gb, gb_bp)
    torch.testing.assert_close(gx, g @ B)  # the error sent down goes through B, not W
    assert not torch.allclose(gx, gx_bp)
    W = layer.weight.detach()
    if mode == "fa":
        assert torch.equal(B, layer.feedback) and B.abs().max() <= 1 / 6**0.5
    elif mode == "usf":
        assert torch.equal(B, torch.sign(W))
    else:
        assert torch.equal(torch.sign(B), torch.sign(W)) and not torch.equal(B.abs(), torch.ones_like(B))
        _grads(layer, x, g)
        assert not torch.equal(layer.feedback_matrix(), B)  # R redrawn for the next batch
        layer.eval()
        with torch.no_grad():
            layer(x)
        assert torch.equal(layer.feedback_matrix(), layer.feedback_matrix())


@pytest.mark.parametrize("mode", FEEDBACK_MODES)
@pytest.mark.parametrize("padding,stride,groups", [(1, 1, 1), ("same", 1, 1), (0, 2, 2)])
def test_conv_backward_sends_the_error_through_B(mode, padding, stride, groups):
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, (3, 2) if padding == "same" else 3, stride, padding, groups=groups)
    layer = FeedbackConv2d.from_dense(dense, mode=mode, seed=1)
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        out = dense(x)
        torch.testing.assert_close(layer(x), out)
    g = torch.randn_like(out)
    gx, gw, gb = _grads(layer, x, g)
    B = layer.feedback_matrix()
    gx_bp, gw_bp, gb_bp = _grads(dense, x, g)
    torch.testing.assert_close(gw, gw_bp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, gb_bp, rtol=1e-4, atol=1e-5)
    # the input gradient of a convolution whose kernel is B
    xb = x.detach().clone().requires_grad_(True)
    ref = F.conv2d(xb, B, None, stride, padding, 1, groups)
    want = torch.autograd.grad(ref, xb, g)[0]
    torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-5)


def test_swap_feedback_and_back():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    swap_feedback(model, "fa", seed=0)
    assert isinstance(model[0], FeedbackConv2d) and isinstance(model[3], FeedbackLinear)
    assert model[0].seed == 0 and model[3].seed == 1
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    ssa.to_dense(model)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="mode must be one of"):
        swap_feedback(model, "dfa")
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        FeedbackConv2d(2, 2, 3, padding=1, padding_mode="reflect")
