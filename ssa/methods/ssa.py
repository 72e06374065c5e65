"""``ssa``: SVD-Space Alignment (DESIGN §5-§8).

Every ``nn.Linear`` / ``nn.Conv2d`` (groups 1) becomes an :class:`~ssa.SSALinear` /
:class:`~ssa.SSAConv2d` (:func:`ssa.convert`); an activation module after an SSA layer in an
``nn.Sequential`` is folded into the layer's fused kernel. One step:

1. a forward recorded by the local engine of :class:`~ssa.methods.dfa.DFA`: each SSA layer runs
   the fused :func:`ssa_kernels.lowrank_linear` under ``no_grad`` and keeps ``x``, ``t = x V``, ``h``;
2. output error ``e = (softmax(z) − onehot(y)) / p``;
3. for every unit: ``δ`` at its output (``e`` for the output unit, the DFA projection through the
   layer's factored feedback ``B = P diag(σ) Qᵀ`` otherwise, :func:`ssa_kernels.dfa_project`),
   carried back through its tail, then :func:`ssa_kernels.svd_factor_grads` (alignment,
   orthogonality, Hoyer terms of :class:`~ssa.LossConfig`, Stiefel projection) → ``.grad``;
4. after the optimizer step: re-orthonormalisation every ``reorth_every`` steps; after each
   epoch: the rank schedule (:class:`~ssa.RankSchedule`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import ssa_kernels
from ssa_kernels.functional import activation_grad, feedback_signal

from ..convert import check_rank, convert
from ..layers import SSALayer
from ..local.units import DENSE
from ..local.update import accumulate, through_tail
from ..schedule import RankSchedule
from .base import Method
from .dfa import DFA

__all__ = ["SSA", "OUTPUT_LAYERS", "convert_for", "last_layer"]

OUTPUT_LAYERS = ("ssa", "dense")


def last_layer(model: nn.Module) -> str:
    """Qualified name of the model's last ``nn.Linear`` / ``nn.Conv2d`` / SSA layer (module order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, DENSE + (SSALayer,))]
    if not names:
        raise ValueError("Trainer: output_layer='dense' found no nn.Linear / nn.Conv2d in the model")
    return names[-1]


def convert_for(method: Method, model: nn.Module) -> str | None:
    """The SSA conversion shared by ``ssa`` and ``svd_bp``: ``rank``, ``skip``, ``output_layer``.

    Returns the name of the output layer kept dense (``output_layer="dense"``) or ``None``.
    """
    if method.output_layer not in OUTPUT_LAYERS:
        raise ValueError(f"Trainer: output_layer must be one of {OUTPUT_LAYERS}, got {method.output_layer!r}")
    skip, dense_output = tuple(method.skip), None
    if method.output_layer == "dense":
        dense_output = last_layer(model)
        skip = skip + (dense_output,)
        parent, _, child = dense_output.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        if isinstance(getattr(holder, child), SSALayer):
            setattr(holder, child, getattr(holder, child).to_dense())
    convert(model, rank=check_rank(method.rank, "Trainer"), skip=skip, seed=method.ctx.seed)
    for layer in model.modules():
        if isinstance(layer, SSALayer):
            layer.backend = method.ctx.backend
    return dense_output


class SSA(DFA):
    """SVD-Space Alignment (see the module docstring)."""

    names = ("ssa",)
    options = {**DFA.options, "rank": None, "skip": (), "output_layer": "ssa", "reorth_every": None,
               "schedule": None, "loss": None, "factor_lr": None}

    def __init__(self, name, ctx, **options) -> None:
        super().__init__(name, ctx, **options)
        if self.schedule is not None and not isinstance(self.schedule, RankSchedule):
            raise TypeError(f"Trainer: schedule must be 'default', a RankSchedule or None, "
                            f"got {type(self.schedule).__name__}")
        self.default_schedule = False  # set by the trainer for schedule="default"
        self.dense_output: str | None = None

    @property
    def lossconf(self):
        return self.ctx.loss

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module) -> nn.Module:
        self.dense_output = convert_for(self, model)
        self.discover(model)
        if not any(u.kind in ("ssa", "local") for u in self.units):
            raise ValueError("Trainer: method='ssa' found no SSA layer to train")
        targets = self.lossconf.targets
        for u in self.units:
            if u.kind == "ssa":
                u.head.feedback_form = self.feedback
                u.head.set_targets(targets, self.ctx.num_classes)
            elif u.kind == "local":  # SSA layers inside a local module have no feedback of their own
                for layer in u.head.modules():
                    if isinstance(layer, SSALayer):
                        layer.set_targets("frame" if targets == "frame" else "none")
        return model

    def set_epochs(self, epochs: int) -> None:
        if self.default_schedule and self.schedule is None:
            self.schedule = RankSchedule.default(epochs)

    def mark_output(self, z: Tensor) -> None:
        super().mark_output(z)
        if self.dense_output is not None:
            found = [u.name for u in self.units if u.is_output]
            if found and found[0] != self.dense_output:
                raise ValueError(f"Trainer: output_layer='dense' took {self.dense_output!r} (the model's "
                                 "last nn.Linear / nn.Conv2d) as the output layer, but the output comes from "
                                 f"{found[0]!r}; name the layer in skip= instead")

    # ------------------------------------------------------------------ the update
    def project(self, unit, src: Tensor, out: Tensor) -> Tensor:
        if unit.kind == "ssa":
            L = unit.head
            return feedback_signal(src, L.feedback_P, L.feedback_sigma, L.feedback_Q)
        return super().project(unit, src, out)

    def update_layer(self, unit, e: Tensor) -> None:
        if unit.kind != "ssa":
            return super().update_layer(unit, e)
        cap, layer = unit.cap, unit.head
        out = cap["out"]
        if not unit.tail and not unit.is_output and cap["h"].shape == out.shape:
            # the fully fused path: projection + activation mask (+ cosine) in one op
            a = layer.preactivation(cap["t"]) if self.lossconf.cos > 0 else None
            delta = ssa_kernels.dfa_project(self._source.to(out.dtype), layer.feedback_P,
                                            layer.feedback_sigma,
                                            layer.feedback_Q, cap["h"], layer.activation, a=a,
                                            cos=float(self.lossconf.cos), negative_slope=layer.negative_slope,
                                            backend=self.ctx.backend)
        else:
            delta = through_tail(unit, self.signal(unit, out, e), not self.freeze_norms)
            if layer.activation != "none":
                h = cap["h"].reshape(delta.shape)
                delta = delta * activation_grad(h, layer.activation, layer.negative_slope)
        self.factor_grads(layer, cap["x"], cap["t"], delta, unit.is_output)

    def update_inner(self, inner) -> None:
        for layer, x2, t, h in inner:
            g = h.grad if h.grad is not None else torch.zeros_like(h)
            fprime = activation_grad(h.detach(), layer.activation, layer.negative_slope)
            self.factor_grads(layer, x2, t, g * fprime)

    def hoyer_on(self, layer: SSALayer) -> bool:
        return (self.lossconf.hoyer > 0 and self.schedule is not None and not layer.frozen_rank
                and self.schedule.hoyer_active(self.epoch))

    def factor_grads(self, layer: SSALayer, x2: Tensor, t: Tensor, delta: Tensor,
                     is_output: bool = False) -> None:
        """The fused factor gradients of DESIGN §6 into ``U, s, V, bias`` ``.grad``."""
        kw = self.lossconf.factor_kwargs(self.hoyer_on(layer))
        # DESIGN §6: feedback targets exist only where the layer has a DFA signal (not the output layer).
        aligned = kw["align"] > 0 and layer.has_targets and not (is_output and layer.targets == "feedback")
        order = layer.target_order() if aligned else None
        if not aligned:
            kw["align"] = 0.0
            gU, gs, gV, gb = layer.factor_grads(x2, t, delta, **kw)
        elif order is None:
            kw.update(layer.op_targets(layer.U.detach(), layer.V.detach()))
            gU, gs, gV, gb = layer.factor_grads(x2, t, delta, **kw)
        else:  # targets on columns a sort moved: run the (column-equivariant) op on permuted factors
            U, s_, V = (layer.U.detach()[:, order], layer.s.detach()[order], layer.V.detach()[:, order])
            kw.update(layer.op_targets(U, V))
            gU, gs, gV, gb = layer.factor_grads(x2, t.index_select(1, order), delta, factors=(U, s_, V), **kw)
            inv = torch.argsort(order)
            gU, gs, gV = gU[:, inv], gs[inv], gV[:, inv]
        accumulate(layer.U, gU)
        accumulate(layer.s, gs)
        accumulate(layer.V, gV)
        if layer.bias is not None:
            accumulate(layer.bias, gb)

    # ------------------------------------------------------------------ per step / epoch
    def after_step(self, model: nn.Module, step: int) -> None:
        self.step_count = step
        if self.reorth_every and step % self.reorth_every == 0:
            for layer in model.modules():
                if isinstance(layer, SSALayer):
                    layer.reorthonormalize()

    def end_epoch(self, model: nn.Module, epoch: int, optimizer) -> dict[str, int]:
        cut = {}
        if self.schedule is not None:
            for unit in self.units:
                if unit.kind != "ssa":
                    continue
                new = self.schedule.step_layer(unit.head, epoch, is_output=unit.is_output,
                                               optimizer=optimizer)
                if new is not None:
                    cut[unit.name] = new
        self.epoch = epoch + 1
        return cut

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "schedule": self.schedule.to_dict() if self.schedule is not None else None}

    def check_state_dict(self, state: dict) -> None:
        super().check_state_dict(state)
        if state.get("schedule") is not None:
            try:
                RankSchedule(**state["schedule"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"checkpoint: bad 'schedule': {err}") from None

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("schedule") is not None:
            self.schedule = RankSchedule(**state["schedule"])

