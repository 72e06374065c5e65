"""The recording context of the SSA trainer: what each layer keeps during a forward.

While a :class:`Tape` is active, every :class:`~ssa.layers.SSALinear` forward goes through
:meth:`Tape.linear` and the trainer's forward hooks on other modules report to the tape.
Outside a tape, layers behave as ordinary autograd-capable modules.
"""

from __future__ import annotations

import threading

_local = threading.local()


def active():
    """The tape of the current thread, or ``None``."""
    return getattr(_local, "tape", None)


class activate:
    """Context manager making ``tape`` the active one (nesting restores the previous)."""

    def __init__(self, tape) -> None:
        self.tape = tape

    def __enter__(self):
        self.prev = active()
        _local.tape = self.tape
        return self.tape

    def __exit__(self, *exc) -> None:
        _local.tape = self.prev
