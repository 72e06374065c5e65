"""``dfa``: Direct Feedback Alignment, and ``drtp``: Direct Random Target Projection.

``dfa`` (Nøkland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks",
NeurIPS 2016) on the model kept dense: a fixed random feedback matrix per hidden layer carries
the output error ``e`` to the layer's output, ``δa = (e Bᵀ) ⊙ f'(a)``; the output layer gets ``e``
itself. ``B`` is Gaussian with unit-norm columns (``‖B‖_F² = C``, the scale DESIGN §5 gives SSA),
seeded per layer name; a convolution's signal is per output channel and shared by every
position. ``drtp`` (Frenkel, Lefebvre & Bol, Front. Neurosci. 2021): as ``dfa`` but every hidden
layer receives the projection of the centred one-hot target ``(1/C − y*)/p`` instead of ``e``.

:class:`DFA` is also the local engine :class:`~ssa.methods.ssa.SSA` builds on: it records a
forward (:mod:`ssa.local.recording`), finds the output unit, and updates every unit from its
signal, in one pass after the forward (``memory="store"``) or while a second forward runs
(``memory="recompute"``, DESIGN §5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..convert import to_dense
from ..local import recording
from ..local.units import discover
from ..local.update import dense_grads, output_error, spread, through_tail, width
from ..metrics import dense_forward_flops, ssa_layer_costs
from .base import UnitMethod, cross_entropy, restore_buffers, snapshot_buffers

__all__ = ["DFA", "DRTP", "MEMORY_MODES", "FEEDBACKS"]

MEMORY_MODES = ("store", "recompute")
FEEDBACKS = ("gaussian", "orthogonal")


class DFA(UnitMethod):
    """Direct Feedback Alignment of every unit (see the module docstring)."""

    names = ("dfa",)
    options = {"memory": "store", "local_modules": (), "freeze_norms": False, "feedback": "gaussian"}
    feedback_kind = "direct"
    records = True

    def __init__(self, name, ctx, **options) -> None:
        super().__init__(name, ctx, **options)
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"Trainer: memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.feedback not in FEEDBACKS:
            raise ValueError(f"Trainer: feedback must be one of {FEEDBACKS}, got {self.feedback!r}")
        if not isinstance(self.freeze_norms, bool):
            raise TypeError(f"Trainer: freeze_norms must be a bool, got {type(self.freeze_norms).__name__}")
        self.recorder: recording.Recorder | None = None
        self._source: Tensor | None = None  # the signal hidden units get this step (e, or drtp's target)
        self._recorded = False

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module) -> nn.Module:
        to_dense(model)
        self.discover(model)
        return model

    def discover(self, model: nn.Module) -> None:
        self.units, self.handled = discover(model, self.local_modules, self.freeze_norms, method=self.name)
        self.unit_of = {u.head: u for u in self.units}
        for u in self.units:
            if u.kind in ("dense", "local"):
                self.matrices[u.name] = None
        self.recorder = recording.Recorder(self, model)
        self.hooks = self.recorder.hooks

    # ------------------------------------------------------------------ recording
    def record(self):
        """Context manager: a forward inside it records what :meth:`local_backward` needs."""
        self._clear()
        self._recorded = True
        return self.recorder.tape("store")

    @torch.no_grad()
    def local_backward(self, z: Tensor, y: Tensor, step: int = 0) -> Tensor:
        """Every unit's update from the recorded forward, into ``.grad``; returns the mean cross-entropy."""
        if not self._recorded or not any(u.cap is not None for u in self.units):
            self._recorded = False
            raise RuntimeError("Trainer.local_backward: nothing was recorded; run the forward inside "
                               "`with trainer.record():` on this thread, once per backward (a forward in "
                               "another thread, nn.DataParallel replicas, or no forward at all are not "
                               "recorded)")
        self._recorded = False
        try:
            loss, e = self._output_error(z, y, step)
            for unit in self.units:
                if unit.cap is not None:
                    self.update(unit, e)
        finally:
            self._clear()
        return loss

    def gradients(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.memory == "store":
            with self.record():
                z = model(x)
            return z, self.local_backward(z, y, self.step_count)
        return self._recompute(model, x, y)

    @torch.no_grad()
    def _recompute(self, model: nn.Module, x: Tensor, y: Tensor):
        """DESIGN §5 ``recompute``: a light forward for ``e``, then a forward that updates as it goes."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if x.is_cuda else None
        stats = snapshot_buffers(model)  # the second forward must see the same statistics
        self._clear()
        with self.recorder.tape("light"):
            z = model(x)
        loss, e = self._output_error(z, y, self.step_count)
        del z
        restore_buffers(stats)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        try:
            with self.recorder.tape("apply", e):  # units keep is_output from the first pass
                z = model(x)
        finally:
            self._clear()
        return z, loss

    def _clear(self) -> None:
        for unit in self.units:
            unit.cap = None
            unit.chain = None
            unit.out_ref = None

    # ------------------------------------------------------------------ the output
    def _output_error(self, z: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Checks, the mean cross-entropy (non-finite: raise), ``e``; marks the output unit."""
        loss = cross_entropy(z, y, self.ctx.num_classes, step)
        self.mark_output(z)
        e = output_error(z, y)
        self._source = self.hidden_source(z, y, e)
        return loss, e

    def hidden_source(self, z: Tensor, y: Tensor, e: Tensor) -> Tensor:
        """What the hidden units' feedback projects: the output error ``e`` (``drtp`` overrides)."""
        return e

    def mark_output(self, z: Tensor) -> None:
        """Find the unit that produced ``z`` (it gets ``e`` itself); raise when nothing did.

        ``z`` may be the unit's output or a view of it (a flatten of an ``N×C×1×1`` map); an
        output computed from it (``log_softmax``, a scale, a dtype cast) would send the last layer
        a random projection instead of its error, so it raises.
        """
        found = None
        for unit in self.units:
            out = unit.out_ref() if unit.out_ref is not None else None
            unit.is_output = out is not None and (out is z or _view_of(z, out))
            if unit.is_output:
                found = unit
        if found is not None:
            return
        tape_frozen = self.recorder.last.frozen_outputs if self.recorder.last is not None else ()
        if any(r() is z or (r() is not None and _view_of(z, r())) for r in tape_frozen):
            return  # a frozen output layer: every trained unit is hidden
        last = [u for u in self.units if u.out_ref is not None and u.out_ref() is not None]
        after = f" after {last[-1].name!r}" if last else ""
        raise ValueError(f"Trainer: the model's output is not the output of any trained layer (computed"
                         f"{after}: e.g. log_softmax, a scale, a dtype cast in forward); the local update "
                         "needs the logits as the last layer returns them: return them unchanged (apply "
                         "log_softmax "
                         "etc. outside the model)")

    # ------------------------------------------------------------------ the update
    def feedback_matrix(self, unit, d: int, like: Tensor) -> Tensor:
        """The fixed ``B`` (d × C) of a dense or local unit, drawn from the seed at first use."""
        B = self.matrices.get(unit.name)
        if B is None or B.shape[0] != d:
            B = torch.randn(d, self.ctx.num_classes, generator=self.ctx.generator(unit.name),
                            dtype=torch.float64)
            if self.feedback == "orthogonal":  # equal singular values (orthonormal columns if d >= C)
                P, _, Qh = torch.linalg.svd(B, full_matrices=False)
                B = P @ Qh
            B = B / B.norm(dim=0, keepdim=True)  # unit-norm columns: ‖B‖_F² = C
            B = B.to(device=like.device, dtype=like.dtype)
            self.matrices[unit.name] = B
        return B

    def signal(self, unit, out: Tensor, e: Tensor) -> Tensor:
        """``δ`` at the unit's output: ``e`` for the output unit, the feedback projection otherwise."""
        if unit.is_output:
            return e.to(out.dtype).reshape(out.shape)
        src = self._source.to(out.dtype)
        return spread(self.project(unit, src, out), out)

    def project(self, unit, src: Tensor, out: Tensor) -> Tensor:
        """``src Bᵀ`` (p × d) for a hidden unit."""
        return src @ self.feedback_matrix(unit, width(out), out).t()

    @torch.no_grad()
    def update(self, unit, e: Tensor) -> None:
        """The unit's gradients from the recorded forward and the output error ``e``."""
        try:
            if unit.kind == "local":
                self._update_local(unit, e)
            else:
                self.update_layer(unit, e)
        finally:
            unit.cap = None

    def update_layer(self, unit, e: Tensor) -> None:
        cap = unit.cap
        delta = through_tail(unit, self.signal(unit, cap["out"], e), not self.freeze_norms)
        dense_grads(unit.head, cap["x"], delta)

    def _update_local(self, unit, e: Tensor) -> None:
        cap = unit.cap
        out = cap["out"]
        delta = self.signal(unit, out.detach(), e)
        if out.requires_grad:
            with torch.enable_grad():
                torch.autograd.backward(out, delta)
        self.update_inner(cap.get("inner", []))

    def update_inner(self, inner) -> None:
        """Factor gradients of SSA layers inside a local module (``ssa`` only)."""

    # ------------------------------------------------------------------ state, measurement
    def direct_feedback(self, name: str, layer: nn.Module) -> Tensor | None:
        return self.matrices.get(name)

    def layer_flops(self, L: dict, module: nn.Module, B: int, C: int, signal: bool) -> int:
        d, trainable, input_grad, local = L["out"], L["trainable"], L["input_grad"], L["local"] is not None
        if L["rank"] is not None:  # an SSA layer (ssa models; inside local modules too)
            forward, _, update, _ = ssa_layer_costs(L, B)
            if not signal:
                project = 0
            elif local:  # a local module's dense feedback at its output
                project = 2 * B * C * d
            else:  # δh = ((e Q) ⊙ σ) Pᵀ
                P = module.feedback_P
                k = P.shape[1] if P is not None else min(C, d, L["rank"])
                project = 2 * B * k * (C + d)
            backprop = forward if local and input_grad else 0
            return forward + (update + project if trainable else 0) + backprop
        f = dense_forward_flops(L, B)
        project = 2 * B * C * d if signal else 0
        return f + (f if trainable else 0) + project + (f if local and input_grad else 0)


class DRTP(DFA):
    """Direct Random Target Projection: hidden units project the centred target, not the error.

    ``δa = (((1/C − y*)/p) Bᵀ) ⊙ f'(a)`` — the error ``e`` at the uninformed output
    ``softmax = 1/C`` (the paper projects ``y*`` itself); the output layer gets ``e``. Same ``B``
    as ``dfa``. Uncentred, the mean column of ``B`` is pushed into every sample at every step and
    never cancels (measured: LeNet on digits stays at chance for 10 epochs; centred: up to 52 %).
    """

    names = ("drtp",)

    def hidden_source(self, z: Tensor, y: Tensor, e: Tensor) -> Tensor:
        p = y.shape[0]
        target = torch.full_like(z, 1.0 / (z.shape[1] * p))
        target[torch.arange(p, device=z.device), y] -= 1.0 / p
        return target


def _view_of(z: Tensor, out: Tensor) -> bool:
    """``z`` is a reshape/flatten/squeeze view of ``out`` (same storage, offset and elements)."""
    return (z.numel() == out.numel() and z.dtype == out.dtype and z.device == out.device
            and z.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
            and z.storage_offset() == out.storage_offset() and z.is_contiguous() and out.is_contiguous())
