"""``convert``: swap a model's ``nn.Linear`` / ``nn.Conv2d`` layers for SSA layers in place."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import torch
from torch import nn

from .layers import SSAConv2d, SSALayer, SSALinear

__all__ = ["convert", "to_dense"]

log = logging.getLogger("ssa")

#: Parents that use a child ``nn.Linear``'s weight functionally instead of calling it, so a
#: swapped layer would never run (``nn.MultiheadAttention.out_proj``).
FUNCTIONAL_PARENTS = (nn.MultiheadAttention,)


def _skipped(name: str, module: nn.Module, skip, typed: set[str]) -> bool:
    for item in skip:
        if isinstance(item, str) and (name == item or name.startswith(item + ".")):
            return True
        if isinstance(item, type) and isinstance(module, item):
            return True
    return any(name.startswith(prefix + ".") for prefix in typed)


def _convertible_conv(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.padding_mode == "zeros"


RANK_KEYS = ("linear", "conv")


def check_rank(rank, owner: str = "convert"):
    """``None``, an int >= 1, or a mapping ``{"linear": r, "conv": r}`` (values int >= 1 or ``None``)."""
    if rank is None:
        return None
    if isinstance(rank, dict):
        bad = [k for k in rank if k not in RANK_KEYS]
        if bad:
            raise ValueError(f"{owner}: rank keys must be among {RANK_KEYS}, got {bad}")
        for k, v in rank.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{owner}: rank[{k!r}] must be None or an int >= 1, got {v!r}")
        return dict(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{owner}: rank must be None, an int >= 1 or a mapping {{'linear': r, 'conv': r}}, "
                         f"got {rank!r}")
    return rank


def check_skip(model: nn.Module, skip, owner: str = "convert") -> tuple:
    """``skip`` as a tuple; every name must be a submodule that is, or contains, an ``nn.Linear`` /
    ``nn.Conv2d`` (ValueError naming it otherwise); every type a module type."""
    if isinstance(skip, (str, type)):
        skip = (skip,)
    skip = tuple(skip)
    modules = dict(model.named_modules())
    for item in skip:
        if isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise TypeError(f"{owner}: skip types must be nn.Module subclasses, got {item!r}")
            continue
        if not isinstance(item, str):
            raise TypeError(f"{owner}: skip entries must be module names or types, got {item!r}")
        if item not in modules or item == "":
            near = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise ValueError(f"{owner}: skip names {item!r}, which is not a submodule of the model; its "
                             f"layers are {near[:12]}{' …' if len(near) > 12 else ''}")
        found = modules[item]
        if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in found.modules()):
            raise ValueError(f"{owner}: skip names {item!r}, a {type(found).__name__} that neither is nor "
                             "contains an nn.Linear / nn.Conv2d (nothing to leave dense)")
    return skip


def _rank_for(rank, child: nn.Module, full: int):
    """The initial rank of ``child`` (``None``: full), clipped to ``full``; a mapping is per type."""
    r = rank.get("conv" if isinstance(child, nn.Conv2d) else "linear") if isinstance(rank, dict) else rank
    return None if r is None else min(r, full)


def convert(model: nn.Module, rank=None, skip=(), seed: int = 0) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by an equivalent full-SVD SSA layer, in place.

    Each new layer comes from :meth:`SSALinear.from_dense` / :meth:`SSAConv2d.from_dense`
    (same output at full rank), with ``rank`` leading triplets and seed ``seed + i`` for the
    ``i``-th converted layer. ``rank``: ``None`` (full rank); an int; or a mapping
    ``{"linear": r, "conv": r}`` per layer type (a missing key or ``None``: full rank); each layer
    takes ``min(r, full)``, its full rank being ``min(m, n)`` (``m × n`` = ``out × in``, or
    ``N·kw × C·kh`` for a kernel). Existing SSA layers are kept. A frozen layer
    (``weight.requires_grad`` false) stays frozen: its factors do not require a gradient.
    ``skip`` holds qualified module names or module types to leave dense (a name, or a module
    of a listed type, also skips every layer under it); a name that is not a submodule, or
    names a module without any ``nn.Linear`` / ``nn.Conv2d``, raises ``ValueError``.

    Left dense: grouped / depthwise convolutions and padding modes other than ``"zeros"``
    (no spatial-SVD form here, DESIGN §4; counted in the report) and, with a warning
    because SSA could not train them correctly, linear layers whose parent never calls them
    (``nn.MultiheadAttention.out_proj``) and layers whose weight is tied to another
    parameter. Logs a per-type count on the ``ssa`` logger. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    skip = check_skip(model, skip)
    rank = check_rank(rank)
    if isinstance(model, nn.Linear) and not isinstance(model, SSALinear):
        raise TypeError("convert: model is itself an nn.Linear; use SSALinear.from_dense(model)")
    if isinstance(model, nn.Conv2d):
        raise TypeError("convert: model is itself an nn.Conv2d; use SSAConv2d.from_dense(model)")
    types = tuple(t for t in skip if isinstance(t, type))
    typed = {n for n, m in model.named_modules() if n and types and isinstance(m, types)}
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    counts: Counter = Counter()
    left: list[str] = []
    todo: list[tuple[nn.Module, str, nn.Module]] = []  # swapped only once every layer passed the checks
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, SSALayer) or not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if _skipped(name, child, skip, typed):
                counts["skipped"] += 1
                left.append(name)
                continue
            if isinstance(child, nn.Conv2d) and not _convertible_conv(child):
                kind = "grouped" if child.groups != 1 else f"padding_mode={child.padding_mode!r}"
                counts[f"Conv2d ({kind}, left dense)"] += 1
                left.append(name)
                continue
            if isinstance(parent, FUNCTIONAL_PARENTS):
                warnings.warn(f"convert: {name} is left dense: its parent {type(parent).__name__} uses the "
                              "weight directly and never calls the layer, so SSA could not train it",
                              stacklevel=2)
                left.append(name)
                continue
            if owners[id(child.weight)] > 1:
                warnings.warn(f"convert: {name} is left dense: its weight is tied to another parameter "
                              "(or the layer is used in several places)",
                              stacklevel=2)
                left.append(name)
                continue
            if isinstance(child, nn.Conv2d):
                kh, kw = child.kernel_size
                full = min(child.out_channels * kw, child.in_channels * kh)
            else:
                full = min(child.in_features, child.out_features)
            r = _rank_for(rank, child, full)
            todo.append((parent, child_name, child, r))
            target = "SSAConv2d" if isinstance(child, nn.Conv2d) else "SSALinear"
            counts[f"{type(child).__name__} -> {target}"] += 1
    for index, (parent, child_name, child, r) in enumerate(todo):
        cls = SSAConv2d if isinstance(child, nn.Conv2d) else SSALinear
        layer = cls.from_dense(child, rank=r, seed=seed + index)
        _keep_frozen(child, layer)
        setattr(parent, child_name, layer)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "skipped")
    log.info("convert: %s; %d left dense%s", summary or "nothing converted", len(left),
             f" ({', '.join(left)})" if left else "")
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every SSA layer (and feedback layer of :mod:`ssa.baselines`) of ``model`` by its
    dense equivalent, in place; returns ``model``."""
    from .baselines import FeedbackConv2d, FeedbackLinear

    special = (SSALayer, FeedbackLinear, FeedbackConv2d)
    if isinstance(model, special):
        raise TypeError(f"to_dense: model is itself an {type(model).__name__}; use model.to_dense()")
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, special):
                dense = child.to_dense()
                _keep_frozen(child, dense)
                setattr(parent, child_name, dense)
    return model


def _keep_frozen(old: nn.Module, new: nn.Module) -> None:
    """A frozen layer stays frozen when it changes form (``requires_grad_(False)`` on its weight
    freezes every weight-like parameter of the new form; a frozen bias stays frozen)."""
    weight = old.U if isinstance(old, SSALayer) else getattr(old, "weight", None)
    bias = getattr(old, "bias", None)
    for p in new.parameters():
        is_bias = p is getattr(new, "bias", None) or (isinstance(new, nn.Sequential) and p.dim() == 1
                                                      and p is getattr(new[0], "bias", None))
        src = bias if is_bias else weight
        if isinstance(src, nn.Parameter) and not src.requires_grad:
            p.requires_grad_(False)


@torch.no_grad()
def paper_init(model: nn.Module) -> None:
    """The SSA papers' initialisation, in place: He (Kaiming normal, fan-in, ReLU) for convolutions,
    Xavier (Glorot uniform) for linear layers, zero biases (torch's global RNG). Dense layers only."""
    for m in model.modules():
        if isinstance(m, SSALayer):
            raise ValueError("Trainer: init='paper' initialises dense layers; the model already holds SSA "
                             "layers (build it from nn.Linear / nn.Conv2d, or use init='torch')")
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
