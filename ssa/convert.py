"""``convert``: swap a model's ``nn.Linear`` layers for :class:`~ssa.layers.SSALinear` in place."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

from torch import nn

from .layers import SSALinear

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


def convert(model: nn.Module, rank: int | None = None, skip=(), seed: int = 0) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an equivalent full-SVD :class:`SSALinear`, in place.

    Each new layer comes from :meth:`SSALinear.from_dense` (same output at full rank), with
    ``rank`` leading triplets (``None``: full rank; an int is clipped to nothing — it must be
    ``<= min(in, out)`` of every converted layer) and seed ``seed + i`` for the ``i``-th
    converted layer. Existing SSA layers are kept. ``skip`` holds qualified module names
    or module types to leave dense (a name, or a module of a listed type, also skips every
    linear layer under it).

    Left dense with a warning, because SSA could not train them correctly: linear layers
    whose parent never calls them (``nn.MultiheadAttention.out_proj``) and linear layers
    whose weight is tied to another parameter. Logs a per-type count on the ``ssa`` logger.
    Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, (str, type)):
        skip = (skip,)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"convert: rank must be None or an int >= 1, got {rank!r}")
    if isinstance(model, nn.Linear) and not isinstance(model, SSALinear):
        raise TypeError("convert: model is itself an nn.Linear; use SSALinear.from_dense(model)")
    types = tuple(t for t in skip if isinstance(t, type))
    typed = {n for n, m in model.named_modules() if n and types and isinstance(m, types)}
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    counts: Counter = Counter()
    left: list[str] = []
    todo: list[tuple[nn.Module, str, nn.Linear]] = []  # swapped only once every layer passed the checks
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is SSALinear or not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if _skipped(name, child, skip, typed):
                counts["skipped"] += 1
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
            full = min(child.in_features, child.out_features)
            if rank is not None and rank > full:
                raise ValueError(f"convert: rank {rank} exceeds min(in_features, out_features) = {full} "
                                 f"of layer {name!r}")
            todo.append((parent, child_name, child))
            counts[type(child).__name__] += 1
    for index, (parent, child_name, child) in enumerate(todo):
        setattr(parent, child_name, SSALinear.from_dense(child, rank=rank, seed=seed + index))
    summary = ", ".join(f"{n} {k} -> SSALinear" for k, n in counts.items() if k != "skipped")
    log.info("convert: %s; %d left dense%s", summary or "nothing converted", len(left),
             f" ({', '.join(left)})" if left else "")
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every :class:`SSALinear` of ``model`` by its dense equivalent, in place; returns ``model``."""
    if isinstance(model, SSALinear):
        raise TypeError("to_dense: model is itself an SSALinear; use model.to_dense()")
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, SSALinear):
                setattr(parent, child_name, child.to_dense())
    return model
