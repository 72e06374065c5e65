"""What the local learning rules (``dfa``, ``drtp``, ``ssa``) share: unit discovery
(:mod:`~ssa.local.units`), recording a forward (:mod:`~ssa.local.recording`) and the pieces of
the update (:mod:`~ssa.local.update`). Nothing here imports the trainer or the methods."""

from .recording import Recorder, paused
from .units import Unit, discover
from .update import accumulate, output_error

__all__ = ["Recorder", "Unit", "accumulate", "discover", "output_error", "paused"]
