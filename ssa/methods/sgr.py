"""``sgr``: Successive Gradient Reconciliation (Yang et al., "Towards Interpretable Deep Local
Learning with Successive Gradient Reconciliation", ICML 2024), in its BP-free form.

Every unit (a layer with its tail, or a local module; :mod:`ssa.local.units`) gets its input
detached; the unit before unit ``j`` is trained on ``L_{j−1}``, the cross-entropy of a fixed
simplex-ETF classifier on unit ``j``'s input ``a_j`` (global average pooling first for feature
maps; no learnable head), the output unit on the model's loss; unit ``j`` also gets the
reconciliation penalty ``sgr_lambda · p · ‖∂L_j/∂a_j − sg(∂L_{j−1}/∂a_j)‖²`` — its own loss's
gradient with respect to its input pulled toward the previous unit's gradient at its output,
held constant. Autograd runs inside each unit only (plus the double backward of the penalty).

Differs from the paper in: the local heads are fixed ETFs for every setting (the paper's
local-BP setting has learnable auxiliary networks); the squared distance is scaled by the batch
size ``p`` so that ``sgr_lambda`` does not depend on it; every unit's graph lives until the
step's one backward, so this form saves no memory over BP. Units must form a chain (each unit's
input produced by the previous one; residual blocks are local modules).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import to_dense
from ..local.recording import Hooks
from ..local.units import discover
from ..metrics import dense_forward_flops
from .base import UnitMethod, cross_entropy, finite_number
from .bp import autograd_flops

__all__ = ["SGR"]


class SGR(UnitMethod):
    """Successive Gradient Reconciliation (see the module docstring)."""

    names = ("sgr",)
    options = {"local_modules": (), "freeze_norms": False, "sgr_lambda": 1.0}

    def __init__(self, name, ctx, **options) -> None:
        super().__init__(name, ctx, **options)
        if not (finite_number(self.sgr_lambda) and self.sgr_lambda >= 0):
            raise ValueError(f"Trainer: sgr_lambda must be a finite number >= 0, got {self.sgr_lambda!r}")
        self.sgr_lambda = float(self.sgr_lambda)
        self._pairs: list | None = None  # (name, input, detached leaf) per unit while a forward runs

    def prepare(self, model: nn.Module) -> nn.Module:
        to_dense(model)
        self.units, self.handled = discover(model, self.local_modules, self.freeze_norms, method=self.name)
        self.hooks = Hooks(self)
        me = weakref.ref(self)  # the hooks must not keep the method (and its trainer) alive
        for unit in self.units:
            self.hooks.add(unit.head.register_forward_pre_hook(
                lambda module, args, unit=unit: me()._cut(unit, args) if me() is not None else None))
        return model

    def _cut(self, unit, args):
        """Detach a unit's input while an ``sgr`` forward runs (pre-hook)."""
        pairs = self._pairs
        if pairs is None:
            return None
        if any(name == unit.name for name, _, _ in pairs):
            raise RuntimeError(f"Trainer: module {unit.name!r} ran twice in one forward; sgr's local "
                               "losses need one call per layer per forward")
        x = args[0]
        if not isinstance(x, Tensor):
            raise TypeError(f"Trainer: sgr needs a Tensor input to {unit.name!r}, got {type(x).__name__}")
        leaf = x.detach().requires_grad_(True)
        pairs.append((unit.name, x, leaf))
        return (leaf,) + tuple(args[1:])

    def etf(self, name: str, d: int, like: Tensor) -> Tensor:
        """The fixed local classifier (d×C) of the unit consuming ``name``'s input: a simplex ETF.

        ``E = √(C/(C−1))·P(I − 11ᵀ/C)``, ``P`` a seeded d×C matrix with orthonormal columns
        (unit-norm columns, pairwise cosine ``−1/(C−1)``). With ``d < C`` no ETF exists in
        ``d`` dimensions: ``P`` then has orthonormal rows, a random projection of the C-dim ETF.
        """
        key = f"sgr_head:{name}"
        E = self.matrices.get(key)
        if E is None or E.shape[0] != d:
            C = self.ctx.num_classes
            A = torch.randn(max(d, C), min(d, C), generator=self.ctx.generator(key), dtype=torch.float64)
            Q = torch.linalg.qr(A)[0]
            P = Q if d >= C else Q.t()  # d×C
            center = torch.eye(C, dtype=torch.float64) - 1.0 / C
            E = math.sqrt(C / (C - 1)) * P @ center
            E = E.to(device=like.device, dtype=torch.float32)
            self.matrices[key] = E
        return E

    def head_loss(self, name: str, a: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy of the fixed ETF head on ``a`` (global average pooling first for maps)."""
        f = a.float()
        if f.dim() == 4:
            f = f.mean((2, 3))
        elif f.dim() > 2:  # sequences: features last
            f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(1)
        return F.cross_entropy(f @ self.etf(name, f.shape[1], f), y)

    def gradients(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self._pairs = []
        try:
            z = model(x)
        finally:
            pairs, self._pairs = self._pairs, None
        loss = cross_entropy(z, y, self.ctx.num_classes, self.step_count)
        # heads[j]: the loss of the unit *before* unit j, on unit j's input a_j (None for the data).
        heads = [self.head_loss(name, a, y) if a.requires_grad else None for name, a, _ in pairs]
        total, p = loss, y.shape[0]
        for j, (name, a, leaf) in enumerate(pairs):
            if heads[j] is None:
                continue
            total = total + heads[j]
            if self.sgr_lambda == 0:
                continue
            own = heads[j + 1] if j + 1 < len(pairs) else loss  # unit j's own local loss
            g_next = torch.autograd.grad(own, leaf, retain_graph=True, create_graph=True,
                                         allow_unused=True)[0]
            if g_next is None:
                raise RuntimeError(f"Trainer: sgr needs the units to form a chain, but the loss after "
                                   f"{name!r} does not depend on its input (declare branching parts as "
                                   "local_modules=)")
            g_prev = torch.autograd.grad(heads[j], a, retain_graph=True)[0]  # a constant (stop-gradient)
            total = total + self.sgr_lambda * p * (g_next.float() - g_prev.float()).pow(2).sum()
        total.backward()
        return z, loss.detach()

    def layer_flops(self, L: dict, module: nn.Module, B: int, C: int, signal: bool) -> int:
        if L["rank"] is not None:
            return autograd_flops(L, B)
        f = dense_forward_flops(L, B)
        head = 2 * 2 * B * L["out"] * C if signal else 0
        return f + (f if L["trainable"] else 0) + (3 * f if L["input_grad"] else 0) + head
