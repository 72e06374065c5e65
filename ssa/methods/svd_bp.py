"""``svd_bp``: the SSA factors trained by backpropagation, with the orthogonality penalty of Yang
et al., "Learning Low-rank Deep Neural Networks via Singular Vector Orthogonality Regularization
and Singular Value Sparsification", CVPR-W 2020.

Same conversion and initial rank as ``ssa``; the objective is the cross-entropy plus
``loss.ortho·Σ(‖UᵀU − I‖² + ‖VᵀV − I‖²)`` and, with ``loss.hoyer > 0``, their Hoyer sparsity on
``s`` in every epoch. Differs from the paper in: no energy-based rank pruning (a rank schedule is
``ssa``'s only), the penalty is not divided by ``r²``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import SSALayer
from .bp import BP, autograd_flops
from .ssa import convert_for

__all__ = ["SVDBP", "svd_penalty"]


def svd_penalty(model: nn.Module, loss) -> Tensor:
    """``ortho·Σ(‖UᵀU − I‖² + ‖VᵀV − I‖²) + hoyer·Σ H(s)`` over the SSA layers of ``model``.

    ``H(s) = Σ√(s² + ε²)/‖s‖``, the smoothed Hoyer sparsity of DESIGN §6 (``loss``: a
    :class:`~ssa.LossConfig`).
    """
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = torch.zeros((), device=dev)
    for layer in model.modules():
        if not isinstance(layer, SSALayer):
            continue
        if loss.ortho > 0:
            for F_ in (layer.U, layer.V):
                eye = torch.eye(F_.shape[1], device=F_.device, dtype=F_.dtype)
                total = total + loss.ortho * (F_.t() @ F_ - eye).pow(2).sum()
        if loss.hoyer > 0:
            s = layer.s
            hoyer = torch.sqrt(s * s + loss.hoyer_eps ** 2).sum() / s.norm().clamp_min(1e-30)
            total = total + loss.hoyer * hoyer
    return total.float()


class SVDBP(BP):
    """Backpropagation through the low-rank forward of SSA layers, with the SVD penalty."""

    names = ("svd_bp",)
    options = {"rank": None, "skip": (), "output_layer": "ssa", "loss": None, "factor_lr": None}

    def prepare(self, model: nn.Module) -> nn.Module:
        self.dense_output = convert_for(self, model)
        return model

    def objective(self, model: nn.Module, loss: Tensor) -> Tensor:
        return loss + svd_penalty(model, self.ctx.loss)

    def layer_flops(self, L: dict, module: nn.Module, B: int, C: int, signal: bool) -> int:
        return autograd_flops(L, B, penalty=True)
