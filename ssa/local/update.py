"""The pieces of a local update that dfa, drtp and ssa share (DESIGN §5).

* :func:`output_error` — ``e = (softmax(z) − onehot(y)) / p``, the gradient of the mean cross-entropy;
* :func:`spread` — a per-feature signal ``(p, d)`` broadcast over a unit's output (conv maps: per
  channel, shared by every position);
* :func:`through_tail` — carry ``δ`` back through a unit's tail (activation derivative, dropout
  mask and rescale, norms forward-only with their affine gradients);
* :func:`dense_grads` — a dense layer's weight/bias gradient from ``δ`` at its output;
* :func:`accumulate` — add into ``.grad`` as autograd would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssa_kernels.functional import activation_grad

from .units import DROPOUTS, FUSIBLE, NORMS, Unit

__all__ = ["output_error", "spread", "through_tail", "norm_grads", "dense_grads", "accumulate"]


def output_error(z: Tensor, y: Tensor) -> Tensor:
    """``e = (softmax(z) − onehot(y)) / p`` (DESIGN §5), the gradient of the mean cross-entropy."""
    p = z.shape[0]
    e = z.float().softmax(1)
    e[torch.arange(p, device=z.device), y] -= 1
    return (e / p).to(z.dtype)


def spread(dh: Tensor, out: Tensor) -> Tensor:
    """``dh`` (p × d) broadcast to the shape of ``out`` (features: last dim; conv maps: channels)."""
    if out.dim() == 2:
        return dh
    chan = 1 if out.dim() == 4 else out.dim() - 1
    shape = [out.shape[0]] + [1] * (out.dim() - 1)
    shape[chan] = out.shape[chan]
    return dh.reshape(shape).expand(out.shape)


def width(out: Tensor) -> int:
    """``d``: the channels of a conv map, the features of anything else."""
    return out.shape[1 if out.dim() == 4 else out.dim() - 1]


def through_tail(unit: Unit, delta: Tensor, train_norms: bool = True) -> Tensor:
    """``δ`` at the unit's head output from ``δ`` at its last tail module's output.

    Dropout: the same mask and ``1/(1−p)`` rescale as the forward; fusible activations: their
    derivative from the output; norms: treated as forward-only on the error path, their affine
    parameters get ``∂/∂γ = Σ δ·x̂``, ``∂/∂β = Σ δ`` (unless ``train_norms`` is false); any other
    elementwise module: local autograd.
    """
    for module in reversed(unit.tail):
        if module not in unit.cap:
            raise RuntimeError(f"Trainer: the {type(module).__name__} after {unit.name!r} did not receive "
                               f"{unit.name!r}'s output in this forward; a layer's tail in an nn.Sequential "
                               "must run right after it")
        inp, out = unit.cap[module]
        if isinstance(module, nn.Identity):
            continue
        if isinstance(module, DROPOUTS):
            if module.training and module.p > 0:
                delta = delta * (out != 0).to(delta.dtype) / (1 - module.p)
        elif type(module) in FUSIBLE:
            slope = float(getattr(module, "negative_slope", 0.01))
            delta = delta * activation_grad(out, FUSIBLE[type(module)], slope)
        elif isinstance(module, NORMS):
            if train_norms:
                norm_grads(module, inp, delta)  # the error path treats the norm as forward-only
        else:
            with torch.enable_grad():
                xi = inp.detach().requires_grad_(True)
                delta = torch.autograd.grad(module(xi), xi, delta)[0]
    return delta


def norm_grads(norm: nn.Module, inp: Tensor, delta: Tensor) -> None:
    """Accumulate the affine gradients of a norm from ``δ`` at its output."""
    if norm.weight is None or not norm.weight.requires_grad:
        return
    if isinstance(norm, nn.LayerNorm):
        xhat = F.layer_norm(inp, norm.normalized_shape, None, None, norm.eps)
        dims = tuple(range(inp.dim() - len(norm.normalized_shape)))
    else:
        use_batch = norm.training or norm.running_mean is None
        xhat = F.batch_norm(inp, None if use_batch else norm.running_mean,
                            None if use_batch else norm.running_var, None, None, use_batch, 0.0, norm.eps)
        dims = (0,) + tuple(range(2, inp.dim()))
    accumulate(norm.weight, (delta * xhat).sum(dims))
    if norm.bias is not None:
        accumulate(norm.bias, delta.sum(dims))


def dense_grads(layer: nn.Module, x: Tensor, delta: Tensor) -> None:
    """Plain DFA of a dense layer: its own weight-gradient from its input and ``δ`` at its output."""
    if isinstance(layer, nn.Conv2d):
        with torch.enable_grad():
            w = layer.weight.detach().requires_grad_(True)
            gw = torch.autograd.grad(layer._conv_forward(x, w, None), w, delta)[0]
        accumulate(layer.weight, gw)
        if layer.bias is not None:
            accumulate(layer.bias, delta.sum((0, 2, 3)) if delta.dim() == 4 else delta.sum((1, 2)))
        return
    d2 = delta.reshape(-1, delta.shape[-1])
    accumulate(layer.weight, d2.t() @ x)
    if layer.bias is not None:
        accumulate(layer.bias, d2.sum(0))


def accumulate(param: nn.Parameter, grad: Tensor) -> None:
    """Add ``grad`` into ``param.grad`` as autograd would."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.clone() if grad.data_ptr() == param.data_ptr() else grad.contiguous()
    else:
        param.grad.add_(grad)
