"""Recording a forward for a local update: hooks with a lifetime, and the per-forward tape.

A :class:`Recorder` installs, for one learning rule, what its units need: a forward override on
every SSA layer (:meth:`ssa.SSALayer.register_forward_override`), forward hooks on dense layers
and tail modules, pre/post hooks on local modules. They stay idle unless a :class:`Tape` of
*this* recorder is active on the current thread (:func:`activate`), so two trainers on one
model do not see each other's forwards. :meth:`Recorder.close` removes every hook; so does the
garbage collection of the rule that owns the recorder.

Tape modes: ``store`` keeps every unit's input/output for a later update; ``light`` keeps only
which tensor each unit produced (to find the output unit); ``apply`` updates each unit as soon
as its output exists (``memory="recompute"``).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor, nn

from ..layers import SSALayer
from .units import DENSE, Unit

__all__ = ["Recorder", "Tape", "Hooks", "activate", "active", "paused"]

_local = threading.local()


def active():
    """The tape of the current thread, or ``None``."""
    return getattr(_local, "tape", None)


class activate:
    """Context manager making ``tape`` the active one on this thread (nesting restores the previous)."""

    def __init__(self, tape) -> None:
        self.tape = tape

    def __enter__(self):
        self.prev = active()
        _local.tape = self.tape
        return self.tape

    def __exit__(self, *exc) -> None:
        _local.tape = self.prev


def paused():
    """Context manager: no recording on this thread inside it (a measurement forward)."""
    return activate(None)


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class Hooks:
    """Removable hook handles tied to an owner: removed by :meth:`close` or when ``owner`` is collected."""

    def __init__(self, owner) -> None:
        self.handles: list = []
        self._finalizer = weakref.finalize(owner, _remove, self.handles)

    def add(self, handle) -> None:
        self.handles.append(handle)

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


class Recorder:
    """The hooks of one local learning rule on its model (see the module docstring).

    ``owner`` must provide ``units``, ``unit_of`` (head module -> unit) and ``update(unit, e)``;
    the recorder keeps only a weak reference to it.
    """

    def __init__(self, owner, model: nn.Module) -> None:
        self._owner = weakref.ref(owner)
        self.last: Tape | None = None  # the tape of the latest forward
        self.hooks = Hooks(owner)
        me = weakref.ref(self)
        units = owner.units

        def tape_for_me():
            tape = active()
            return tape if tape is not None and tape.recorder is me() else None

        def ssa_forward(layer, x):
            tape = tape_for_me()
            return tape.ssa(layer, x) if tape is not None else None

        for layer in model.modules():
            if isinstance(layer, SSALayer):
                self.hooks.add(layer.register_forward_override(ssa_forward))
        for unit in units:
            if unit.kind == "dense":
                def head_hook(module, inputs, output, unit=unit):
                    tape = tape_for_me()
                    if tape is not None:
                        tape.head_hook(unit, inputs, output)
                self.hooks.add(unit.head.register_forward_hook(head_hook))
            elif unit.kind == "local":
                def pre(module, args, unit=unit):
                    tape = tape_for_me()
                    return tape.local_pre(unit, args) if tape is not None else None

                def post(module, args, output, unit=unit):
                    tape = tape_for_me()
                    return tape.local_post(unit, output) if tape is not None else None
                self.hooks.add(unit.head.register_forward_pre_hook(pre))
                self.hooks.add(unit.head.register_forward_hook(post))
            for t in unit.tail:
                def tail_hook(module, inputs, output, unit=unit):
                    tape = tape_for_me()
                    if tape is not None:
                        tape.tail_hook(unit, module, inputs, output)
                self.hooks.add(t.register_forward_hook(tail_hook))
        # Frozen layers: only which tensor they produced (the output may come from one).
        trained = {u.head for u in units}
        for layer in model.modules():
            if isinstance(layer, DENSE) and layer not in trained:
                def frozen_hook(module, inputs, output):
                    tape = tape_for_me()
                    if tape is not None and isinstance(output, Tensor):
                        tape.frozen_outputs.append(weakref.ref(output))
                self.hooks.add(layer.register_forward_hook(frozen_hook))

    @property
    def owner(self):
        return self._owner()

    def tape(self, mode: str, e: Tensor | None = None) -> activate:
        """A context manager running one forward under a new tape of this recorder."""
        if self.hooks.closed:
            raise RuntimeError("Trainer: this trainer was closed (its recording hooks are removed)")
        self.last = Tape(self, mode, e)
        return activate(self.last)

    def close(self) -> None:
        self.hooks.close()


class Tape:
    """Routes SSA layer forwards and module hooks of one recorder during one forward."""

    def __init__(self, recorder: Recorder, mode: str, e: Tensor | None = None) -> None:
        self.recorder, self.mode, self.e = recorder, mode, e  # mode: store | light | apply
        self.rule = recorder.owner
        self.local: list[Unit] = []
        self.seen: set[int] = set()
        self.frozen_outputs: list = []

    def once(self, unit: Unit) -> None:
        """A unit's update needs its one input and output: refuse a second call in one forward."""
        if id(unit) in self.seen:
            raise RuntimeError(f"Trainer: module {unit.name!r} ran twice in one forward; SSA's local update "
                               "needs one call per layer per forward (declare the enclosing module in "
                               "local_modules=, or use separate layers)")
        self.seen.add(id(unit))

    def _started(self, unit: Unit, cap: dict, out: Tensor) -> None:
        unit.out_ref = weakref.ref(out)
        unit.chain = out  # the tensor the unit's next tail module must receive
        if self.mode == "light":
            return
        unit.cap = cap
        if not unit.tail and self.mode == "apply":
            self.rule.update(unit, self.e)

    def ssa(self, layer: SSALayer, x: Tensor) -> Tensor:
        """An SSA layer's forward while the tape is active."""
        x2 = layer.flat_input(x)
        if self.local:  # inside a local module: autograd to x, factor gradients by the fused op
            owner = self.local[-1]
            if self.mode == "light":
                with torch.no_grad():
                    h, _ = layer.lowrank(x2)
                return layer.shape_output(h, x)
            b = layer.bias.detach() if layer.bias is not None else None
            h, t = layer.lowrank(x2, (layer.U.detach(), layer.s.detach(), layer.V.detach(), b))
            if not layer.U.requires_grad:  # a frozen layer: its input-gradient only
                return layer.shape_output(h, x)
            if h.requires_grad:
                h.retain_grad()
            else:
                h = h.detach().requires_grad_(True)
            owner.cap.setdefault("inner", []).append((layer, x2.detach(), t.detach(), h))
            return layer.shape_output(h, x)
        unit = self.rule.unit_of.get(layer)
        with torch.no_grad():
            h, t = layer.lowrank(x2)
        out = layer.shape_output(h, x)
        if unit is None:  # an SSA layer the rule does not train (frozen)
            self.frozen_outputs.append(weakref.ref(out))
            return out
        self.once(unit)
        self._started(unit, {"x": x2, "t": t, "h": h, "out": out}, out)
        return out

    def head_hook(self, unit: Unit, inputs, output) -> None:  # dense layers
        self.once(unit)
        x = inputs[0]
        x2 = x if isinstance(unit.head, nn.Conv2d) else x.reshape(-1, x.shape[-1])
        self._started(unit, {"x": x2, "out": output}, output)

    def tail_hook(self, unit: Unit, module: nn.Module, inputs, output) -> None:
        # A parameter-free module may follow several layers (one nn.Dropout used twice): it
        # belongs to this unit's chain only when it receives this unit's latest tensor.
        if unit.chain is None or inputs[0] is not unit.chain:
            return
        unit.chain = output if module is not unit.last else None
        if module is unit.last:
            unit.out_ref = weakref.ref(output)
        if self.mode == "light" or unit.cap is None:
            return
        unit.cap[module] = (inputs[0], output)
        if module is unit.last:
            unit.cap["out"] = output
            if self.mode == "apply":
                self.rule.update(unit, self.e)

    def local_pre(self, unit: Unit, args):
        self.once(unit)
        self.local.append(unit)
        unit.cap = {} if self.mode != "light" else None
        unit.grad_mode = torch.is_grad_enabled()
        if self.mode != "light":
            torch.set_grad_enabled(True)
        return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)

    def local_post(self, unit: Unit, output):
        self.local.pop()
        torch.set_grad_enabled(unit.grad_mode)
        if not isinstance(output, Tensor):
            raise TypeError(f"Trainer: local module {unit.name!r} must return a Tensor, got "
                            f"{type(output).__name__}")
        detached = output.detach()
        unit.out_ref = weakref.ref(detached)
        if self.mode != "light":
            unit.cap["out"] = output
            if self.mode == "apply":
                self.rule.update(unit, self.e)
        return detached
