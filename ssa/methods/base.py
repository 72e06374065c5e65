"""The interface every training method implements, and the context the trainer gives it."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import SSALayer
from ..loss import LossConfig

__all__ = ["Context", "Method", "UnitMethod", "check_batch", "check_output", "cross_entropy",
           "restore_buffers", "snapshot_buffers"]


@dataclass(frozen=True)
class Context:
    """What a method needs from the trainer: the task, the seed, the loss coefficients, the backend."""

    num_classes: int
    seed: int
    loss: LossConfig
    backend: str = "auto"

    def generator(self, key: str) -> torch.Generator:
        """A CPU generator seeded by the seed and ``key`` (a unit's fixed random matrices)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))


def check_batch(x, y, num_classes: int) -> None:
    """``x`` and ``y`` tensors with as many samples, ``y`` 1-D integer labels in ``[0, num_classes)``."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("Trainer: x and y must be Tensors")
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        raise ValueError(f"Trainer: y must be a 1-D integer tensor of class labels, got shape "
                         f"{tuple(y.shape)} dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"Trainer: x has {x.shape[0]} samples but y has {y.shape[0]}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"Trainer: labels must be in [0, num_classes={num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")


def check_output(z, num_classes: int) -> None:
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != num_classes:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"Trainer: the model output must be (batch, num_classes={num_classes}), "
                         f"got {shape}: num_classes does not match the output layer")


def cross_entropy(z: Tensor, y: Tensor, num_classes: int, step: int) -> Tensor:
    """The checked mean cross-entropy of ``z``; a non-finite value raises ``FloatingPointError``."""
    check_output(z, num_classes)
    loss = F.cross_entropy(z.float(), y)
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(f"Trainer: non-finite loss ({float(loss.detach())}) at step {step + 1}; "
                                 "the step was "
                                 "not applied (the last checkpoint is kept)")
    return loss


class Method:
    """One training method: prepares the model, fills ``.grad`` each step, owns its state.

    Subclasses set :attr:`name` (or :attr:`names` for a family), :attr:`options` (the
    :class:`~ssa.Trainer` keywords that apply to them, with their defaults — any other
    keyword given a non-default value makes the trainer raise) and implement :meth:`prepare`
    and :meth:`gradients`. Adding a method is one new file and a line in the registry
    (:mod:`ssa.methods`).
    """

    #: The method names this class implements.
    names: ClassVar[tuple[str, ...]] = ()
    #: Trainer keyword options that apply to this method, with their defaults.
    options: ClassVar[dict] = {}
    #: How the error reaches hidden layers, for :func:`ssa.metrics.matrix_alignment`:
    #: ``"direct"`` (a fixed matrix from the output), ``"layer"`` (layer-to-layer), or ``None``.
    feedback_kind: ClassVar[str | None] = None
    #: Whether the method trains from a recorded forward (:meth:`ssa.Trainer.record`).
    records: ClassVar[bool] = False

    def __init__(self, name: str, ctx: Context, **options) -> None:
        self.name, self.ctx = name, ctx
        for key, default in self.options.items():
            setattr(self, key, options.pop(key, default))
        if options:
            raise TypeError(f"{type(self).__name__}: unknown options {sorted(options)}")
        self.step_count, self.epoch = 0, 0

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module) -> nn.Module:
        """Turn ``model`` into the form this method trains (in place where possible); returns it."""
        raise NotImplementedError

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in model.parameters() if p.requires_grad]

    def set_epochs(self, epochs: int) -> None:
        """Called by :meth:`ssa.Trainer.fit` with the number of epochs (a default schedule's length)."""

    # ------------------------------------------------------------------ training
    def gradients(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One step's gradients into ``.grad`` (no optimizer step); returns ``(z, loss)``."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """After the optimizer step number ``step`` (1-based)."""

    def end_epoch(self, model: nn.Module, epoch: int, optimizer) -> dict[str, int]:
        """After epoch ``epoch`` (0-based); returns the layers whose rank was cut and their new ranks."""
        return {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def check_state_dict(self, state: dict) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would fail (nothing is changed)."""

    def close(self) -> None:
        """Remove what :meth:`prepare` installed on the model (hooks)."""

    # ------------------------------------------------------------------ measurement
    def layer_flops(self, L: dict, module: nn.Module, B: int, C: int, signal: bool) -> int:
        """Training FLOPs of one weight layer in one iteration (see :func:`ssa.metrics.training_flops`)."""
        raise NotImplementedError

    def local_heads(self) -> list[nn.Module]:
        """Modules whose input the method detaches (local modules)."""
        return []

    def direct_feedback(self, name: str, layer: nn.Module) -> Tensor | None:
        """``B`` (d × C) of a layer trained from a direct feedback, or ``None``."""
        return None


class UnitMethod(Method):
    """A method that trains the units of :func:`ssa.local.units.discover` (``dfa``, ``drtp``, ``ssa``,
    ``sgr``): only their parameters, with hooks removed by :meth:`close`, and fixed random matrices
    by name (:attr:`matrices`: feedback ``B``, or ETF heads) saved as the state's ``"feedback"``."""

    def __init__(self, name: str, ctx: Context, **options) -> None:
        super().__init__(name, ctx, **options)
        self.units, self.unit_of, self.handled = [], {}, set()
        self.matrices: dict[str, Tensor | None] = {}
        self.hooks = None  # ssa.local.recording.Hooks, set by prepare

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad and id(p) in self.handled]

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()

    def local_heads(self) -> list[nn.Module]:
        return [u.head for u in self.units if u.kind == "local"]

    def state_dict(self) -> dict:
        return {"feedback": {k: v for k, v in self.matrices.items() if v is not None}}

    def check_state_dict(self, state: dict) -> None:
        fb = state.get("feedback", {})
        if not isinstance(fb, dict) or not all(isinstance(v, Tensor) and v.dim() == 2 for v in fb.values()):
            raise ValueError("checkpoint: 'feedback' must map names to 2-D tensors")

    def load_state_dict(self, state: dict) -> None:
        device = next((p.device for u in self.units for p in u.head.parameters()), torch.device("cpu"))
        self.matrices.update({k: v.to(device) for k, v in state.get("feedback", {}).items()})


def snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of the buffers a forward may change (norm statistics, a user's running averages):
    every buffer outside SSA layers (theirs, targets and feedback, never change in a forward)."""
    return [(b, b.clone()) for m in model.modules() if not isinstance(m, SSALayer)
            for b in m.buffers(recurse=False)]


@torch.no_grad()
def restore_buffers(snapshot: list[tuple[Tensor, Tensor]]) -> None:
    """Put the buffers of :func:`snapshot_buffers` back as they were."""
    for buf, saved in snapshot:
        buf.copy_(saved)


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
