"""Layer-to-layer feedback baselines (DESIGN §9): ``fa``, ``usf``, ``brsf``.

The error travels back layer by layer as in backprop, but through a feedback matrix ``B``
of the weight's shape in place of the weight (``B_{i+1}`` where BP uses ``W_{i+1}ᵀ``), as
biotorch's FA layers do. Each layer's own weight gradient ``δᵀx`` is exact for its ``δ``:

* ``fa`` — Feedback Alignment (Lillicrap et al., "Random synaptic feedback weights support
  error backpropagation for deep learning", Nat. Commun. 2016): ``B`` fixed, random, drawn
  once (seeded) with the layer's own init distribution.
* ``usf`` — Uniform Sign-concordant Feedback (Liao, Leibo & Poggio, "How important is weight
  symmetry in backpropagation?", AAAI 2016): ``B = sign(W)``, read at every backward.
* ``brsf`` — Batchwise Random magnitude Sign-concordant Feedback (same paper):
  ``B = |R| ⊙ sign(W)``, ``R`` standard Gaussian redrawn for every batch (every training
  forward, from the layer's own seeded generator).

:func:`swap_feedback` replaces every ``nn.Linear`` / ``nn.Conv2d`` of a model by the
feedback layer of a mode; the trainer then trains the model with autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssa_kernels import functional as _kf

__all__ = ["FEEDBACK_MODES", "FeedbackLinear", "FeedbackConv2d", "swap_feedback"]

FEEDBACK_MODES = ("fa", "usf", "brsf")


class _Feedback:
    """The feedback matrix ``B`` of one layer (shape of its weight) for a mode."""

    def _init_feedback(self, mode: str, seed: int) -> None:
        if mode not in FEEDBACK_MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {FEEDBACK_MODES}, got {mode!r}")
        self.mode, self.seed = mode, int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        W = self.weight
        if mode == "fa":  # the layer's own init distribution: kaiming_uniform(a=√5), bound 1/√fan_in
            fan_in = W[0].numel()
            B = (torch.rand(W.shape, generator=self._gen, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)
            self.register_buffer("feedback", B.to(device=W.device, dtype=W.dtype))
        else:
            self.register_buffer("feedback", None)
        self._magnitude: Tensor | None = None

    def feedback_matrix(self) -> Tensor:
        """``B`` as the backward uses it now (``usf``/``brsf`` read the current ``W``)."""
        W = self.weight.detach()
        if self.mode == "fa":
            return self.feedback
        if self.mode == "usf":
            return torch.sign(W)
        if self._magnitude is None or self._magnitude.shape != W.shape:
            self._redraw()
        return self._magnitude * torch.sign(W)

    def _redraw(self) -> None:
        R = torch.randn(self.weight.shape, generator=self._gen, dtype=torch.float32)
        self._magnitude = R.abs().to(device=self.weight.device, dtype=self.weight.dtype)

    @torch.no_grad()
    def _copy_from(self, dense: nn.Module):
        """Take ``dense``'s weight, bias and train/eval mode; returns ``self``."""
        self.weight.copy_(dense.weight)
        if dense.bias is not None:
            self.bias.copy_(dense.bias)
        self.train(dense.training)
        return self

    def _before_forward(self) -> None:
        if self.mode == "brsf" and self.training and torch.is_grad_enabled():
            self._redraw()  # R resampled for every batch


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, B):
        ctx.save_for_backward(x, B)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = g @ B  # B (out×in) in place of W: the error sent to the layer below
        gw = g2.t() @ x.reshape(-1, x.shape[-1])
        gb = g2.sum(0) if ctx.has_bias else None
        return gx, gw, gb, None


class FeedbackLinear(nn.Linear, _Feedback):
    """``nn.Linear`` whose backward sends the error down through ``B`` instead of ``W`` (see module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 mode: str = "fa", seed: int = 0) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_feedback(mode, seed)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mode: str = "fa", seed: int = 0) -> FeedbackLinear:
        W = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, W.device, W.dtype,
                    mode=mode, seed=seed)
        return layer._copy_from(linear)

    def forward(self, x: Tensor) -> Tensor:
        self._before_forward()
        return _LinearFn.apply(x, self.weight, self.bias, self.feedback_matrix())

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.weight.device,
                           self.weight.dtype)
        linear.load_state_dict({k: v for k, v in self.state_dict().items() if k != "feedback"})
        return linear

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}"


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, B, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, B)
        ctx.geo = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight, B = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geo
        conv_bwd = torch.ops.aten.convolution_backward
        gx = conv_bwd(g, x, B, None, stride, padding, dilation, False, [0, 0], groups,
                      [True, False, False])[0]
        gw = conv_bwd(g, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                      [False, True, False])[1]
        gb = g.sum((0, 2, 3)) if ctx.has_bias else None
        return gx, gw, gb, None, None, None, None, None


class FeedbackConv2d(nn.Conv2d, _Feedback):
    """``nn.Conv2d`` whose backward sends the error down through ``B`` (a kernel) instead of ``W``."""

    def __init__(self, *args, mode: str = "fa", seed: int = 0, **kw) -> None:
        super().__init__(*args, **kw)
        if self.padding_mode != "zeros":
            raise ValueError(f"FeedbackConv2d: padding_mode must be 'zeros', got {self.padding_mode!r}")
        _, stride, pads, dilation = _kf.conv_geometry("FeedbackConv2d", self.kernel_size, self.stride,
                                                           self.padding, self.dilation)
        self._pads = pads
        self._init_feedback(mode, seed)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mode: str = "fa", seed: int = 0) -> FeedbackConv2d:
        W = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, W.device, W.dtype,
                    mode=mode, seed=seed)
        return layer._copy_from(conv)

    def forward(self, x: Tensor) -> Tensor:
        self._before_forward()
        pt, pb, pl, pr = self._pads
        if pt == pb and pl == pr:
            pad = [pt, pl]
        else:  # "same" with an even kernel pads asymmetrically, as nn.Conv2d does
            x, pad = F.pad(x, (pl, pr, pt, pb)), [0, 0]
        return _ConvFn.apply(x, self.weight, self.bias, self.feedback_matrix(), list(self.stride), pad,
                             list(self.dilation), self.groups)

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         self.weight.device, self.weight.dtype)
        conv.load_state_dict({k: v for k, v in self.state_dict().items() if k != "feedback"})
        return conv


def swap_feedback(model: nn.Module, mode: str, seed: int = 0) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` (zeros padding) of ``model`` by its feedback
    layer, in place.

    The ``i``-th swapped layer gets seed ``seed + i``; layers already swapped are kept.
    Returns ``model``.
    """
    if mode not in FEEDBACK_MODES:
        raise ValueError(f"swap_feedback: mode must be one of {FEEDBACK_MODES}, got {mode!r}")
    todo = []
    for _, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, (FeedbackLinear, FeedbackConv2d)):
                continue
            if type(child) is nn.Linear or (type(child) is nn.Conv2d and child.padding_mode == "zeros"):
                todo.append((parent, name, child))
    for i, (parent, name, child) in enumerate(todo):
        cls = FeedbackConv2d if isinstance(child, nn.Conv2d) else FeedbackLinear
        setattr(parent, name, cls.from_dense(child, mode=mode, seed=seed + i))
    return model
