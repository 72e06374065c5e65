"""ssa: train PyTorch models with SVD-Space Alignment — no global backpropagation.

Every weight is kept as SVD factors ``W = U diag(s) Vᵀ`` (:class:`SSALinear`, a drop-in
``nn.Linear``; :class:`SSAConv2d`, a drop-in ``nn.Conv2d`` kept as its spatial SVD) and each
layer is updated locally from a Direct Feedback Alignment error plus alignment, orthogonality
and sparsity terms (:class:`LossConfig`), with a Stiefel projection and a rank that shrinks
during training (:class:`RankSchedule`). :class:`Trainer` runs the
autograd-free update on any model (``method="ssa"``) or the same model with backprop
(``method="bp"``); ``python -m ssa train`` is the command line. The fused kernels live in
``ssa_kernels``; the formulas in DESIGN.md.
"""

from __future__ import annotations

import importlib

from .convert import convert, to_dense
from .layers import SSAConv2d, SSALayer, SSALinear
from .loss import LossConfig
from .schedule import RankSchedule
from .trainer import METHODS, Trainer

__all__ = ["SSALinear", "SSAConv2d", "SSALayer", "convert", "to_dense", "LossConfig", "RankSchedule",
           "Trainer", "METHODS", "data",
           "models"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Submodules load on first use (``data`` needs scikit-learn, ``plots`` matplotlib).
    if name in ("data", "models", "cli", "plots", "metrics"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ssa' has no attribute {name!r}")
