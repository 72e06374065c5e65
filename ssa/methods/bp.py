"""``bp``: the model trained densely by backpropagation (autograd), the reference every method is
compared with. SSA layers are turned back into ``nn.Linear`` / ``nn.Conv2d``."""

from __future__ import annotations

from torch import Tensor, nn

from ..convert import to_dense
from ..metrics import dense_forward_flops, ssa_layer_costs
from .base import Method, cross_entropy

__all__ = ["BP", "autograd_flops"]


def autograd_flops(L: dict, B: int, penalty: bool = False) -> int:
    """FLOPs of one layer trained by autograd: forward, weight-gradient where trainable, input-gradient
    where its input needs one (SSA layers through their factors, plus the ortho penalty's gradient)."""
    trainable, input_grad = L["trainable"], L["input_grad"]
    if L["rank"] is not None:
        forward, v_side, _, pen = ssa_layer_costs(L, B)
        if not trainable:
            backward = forward if input_grad else 0
        elif input_grad:
            backward = 2 * forward
        else:  # factor gradients only: no x-gradient (2·p·n·r, conv1)
            backward = 2 * forward - v_side
        return forward + backward + (pen if penalty and trainable else 0)
    f = dense_forward_flops(L, B)
    return f + (f if trainable else 0) + (f if input_grad else 0)


class BP(Method):
    """Backpropagation of the mean cross-entropy through the dense model."""

    names = ("bp",)

    def prepare(self, model: nn.Module) -> nn.Module:
        return to_dense(model)

    def objective(self, model: nn.Module, loss: Tensor) -> Tensor:
        """What is backpropagated (``svd_bp`` adds its penalty)."""
        return loss

    def gradients(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        z = model(x)
        loss = cross_entropy(z, y, self.ctx.num_classes, self.step_count)
        self.objective(model, loss).backward()
        return z, loss.detach()

    def layer_flops(self, L: dict, module: nn.Module, B: int, C: int, signal: bool) -> int:
        return autograd_flops(L, B)
