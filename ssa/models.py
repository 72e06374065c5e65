"""Plain PyTorch models for the trainer (no SSA layers: :class:`ssa.Trainer` converts them)."""

from __future__ import annotations

import math

from torch import nn

__all__ = ["get", "available", "mlp"]

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}


def mlp(num_classes: int, in_shape, hidden=(256, 256), activation: str = "relu") -> nn.Sequential:
    """``Flatten → (Linear → activation) × len(hidden) → Linear`` (DESIGN §6: 64-256-256-10 on digits)."""
    if activation not in _ACTS:
        raise ValueError(f"mlp: activation must be one of {sorted(_ACTS)}, got {activation!r}")
    sizes = [math.prod(in_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for n, m in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n, m), _ACTS[activation]()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


_MODELS = {"mlp": mlp}


def available() -> list[str]:
    """Names accepted by :func:`get` (the known models)."""
    return sorted(_MODELS)


def get(name: str, num_classes: int, in_shape, **kw) -> nn.Module:
    """A model by name: ``"mlp"`` (convnets arrive with the convolution layer)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {available()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    in_shape = tuple(in_shape)
    if not in_shape or any(not isinstance(d, int) or d < 1 for d in in_shape):
        raise ValueError(f"in_shape must be a tuple of positive ints, got {in_shape!r}")
    return _MODELS[name](num_classes, in_shape, **kw)
