"""``fa``, ``usf``, ``brsf``: layer-to-layer feedback (Lillicrap et al. 2016; Liao et al. 2016).

Every ``nn.Linear`` / ``nn.Conv2d`` is swapped for a layer of :mod:`ssa.baselines` whose backward
sends the error down through a feedback matrix ``B`` instead of ``W`` (random and fixed: ``fa``;
``sign(W)``: ``usf``; ``sign(W)`` with redrawn magnitudes: ``brsf``); trained by autograd.
"""

from __future__ import annotations

from torch import nn

from ..baselines import swap_feedback
from ..convert import to_dense
from .bp import BP

__all__ = ["Feedback"]


class Feedback(BP):
    """Layer-to-layer feedback alignment (the mode is the method name)."""

    names = ("fa", "usf", "brsf")
    feedback_kind = "layer"

    def prepare(self, model: nn.Module) -> nn.Module:
        to_dense(model)
        return swap_feedback(model, self.name, self.ctx.seed)
