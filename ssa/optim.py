"""The optimizer and learning-rate schedule a :class:`~ssa.Trainer` builds (torch.optim)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import SSALayer

__all__ = ["OPTIMIZERS", "DEFAULT_FACTOR_LR", "check_factor_lr", "make_optimizer", "make_scheduler"]

OPTIMIZERS = ("adam", "adamw", "sgd")
#: ``factor_lr="default"`` for ``method="ssa"``: the singular values learn 3× faster (docs/fidelity.md).
DEFAULT_FACTOR_LR = {"s": 3.0}


def check_factor_lr(factor_lr, method: str, named: bool, takes_factors: bool) -> dict:
    """The learning-rate multipliers of the SSA factors, ``{"U"|"s"|"V": factor}``, checked.

    ``"default"``: :data:`DEFAULT_FACTOR_LR` for ``ssa`` with a named optimizer, nothing otherwise.
    """
    if isinstance(factor_lr, str):
        if factor_lr != "default":
            raise ValueError(f"Trainer: factor_lr must be 'default', a mapping or None, got {factor_lr!r}")
        factor_lr = dict(DEFAULT_FACTOR_LR) if method == "ssa" and named else {}
    factor_lr = dict(factor_lr or {})
    for key, value in factor_lr.items():
        if key not in ("U", "s", "V"):
            raise ValueError(f"Trainer: factor_lr keys must be among 'U', 's', 'V', got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"Trainer: factor_lr[{key!r}] must be a positive number, got {value!r}")
    if factor_lr and not takes_factors:
        raise ValueError(f"Trainer: factor_lr applies to SSA factors (method 'ssa' or 'svd_bp'), "
                         f"got method={method!r}")
    return factor_lr


def make_optimizer(optimizer, params: list, lr: float, factor_lr: dict,
                   model: nn.Module) -> torch.optim.Optimizer:
    """``"adam"`` (fused where torch supports it), ``"adamw"``, ``"sgd"`` (momentum 0.9) or a callable
    ``params -> Optimizer``; with ``factor_lr``, one parameter group per learning rate."""
    if callable(optimizer) and not isinstance(optimizer, str):
        if factor_lr:
            raise ValueError("Trainer: factor_lr applies to the named optimizers; with an optimizer "
                             "callable, build the parameter groups in it")
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("Trainer: an optimizer callable must return a torch.optim.Optimizer")
        return opt
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Trainer: optimizer must be one of {OPTIMIZERS} or a callable, got {optimizer!r}")
    if factor_lr:  # one group per learning rate (SSA factors by name)
        role = {id(getattr(m, k)): k for m in model.modules() if isinstance(m, SSALayer) for k in ("U", "s",
                                                                                                   "V")}
        groups: dict[float, list] = {}
        for p in params:
            groups.setdefault(lr * factor_lr.get(role.get(id(p)), 1.0), []).append(p)
        params = [{"params": ps, "lr": g} for g, ps in groups.items()]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    try:
        return cls(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # fused kernels unsupported for this device/dtype
        return cls(params, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, milestones, gamma, factory):
    """``MultiStepLR(milestones, gamma)``, or ``factory(optimizer)``, or ``None``."""
    milestones = tuple(milestones or ())
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones):
        raise ValueError(f"Trainer: lr_milestones must be ints >= 1 (epochs), got {milestones!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"Trainer: lr_gamma must be a positive finite number, got {gamma!r}")
    if factory is not None:
        if milestones:
            raise ValueError("Trainer: give lr_milestones or lr_scheduler, not both")
        sched = factory(optimizer)
        if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError("Trainer: lr_scheduler must return a torch.optim.lr_scheduler.LRScheduler")
        return sched
    if milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted(milestones), gamma=float(gamma))
    return None
