"""Rank schedule of SSA (DESIGN §8, v1 §3.4, v2 §4.4)."""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch

__all__ = ["RankSchedule"]

#: The default timing (:meth:`RankSchedule.default`): cuts every epoch up to a third of the run.
DEFAULT_INTERVAL = 1
DEFAULT_STOP_DIVISOR = 3


@dataclass
class RankSchedule:
    """Shrinks each SSA layer's rank at the end of every ``interval``-th epoch.

    Exactly the pseudo-code of DESIGN §8: a linear decay of the target rank from ``r0``,
    then (once the target falls to ``zeta · r0``) an energy criterion that keeps the
    smallest rank holding ``energy`` of ``Σ s²`` and freezes a layer for good when that
    would not cut it. Never below ``ceil(min_fraction · r0)``; with ``cap`` never above the
    rank at which the factors hold as many parameters as the dense matrix. The output
    layer is not reduced unless ``include_output``. ``stop_epoch`` ends the schedule early: no
    cut after epoch ``stop_epoch − 1`` (0-based), and the linear decay spans
    ``[start_epoch, stop_epoch)`` instead of ``[start_epoch, total_epochs)``, so the low rank is
    reached early and the remaining epochs recover from the last cut (``None``: DESIGN §8 as
    written, cuts until the end).
    """

    total_epochs: int
    interval: int = 10
    zeta: float = 0.7
    energy: float = 0.95
    min_fraction: float = 0.3
    start_epoch: int = 0
    cap: bool = True
    include_output: bool = False
    stop_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("total_epochs", "interval", "start_epoch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"RankSchedule: {name} must be an int, got {type(v).__name__}")
        if self.total_epochs < 1:
            raise ValueError(f"RankSchedule: total_epochs must be >= 1, got {self.total_epochs}")
        if self.interval < 1:
            raise ValueError(f"RankSchedule: interval must be >= 1, got {self.interval}")
        if not 0 <= self.start_epoch < self.total_epochs:
            raise ValueError("RankSchedule: start_epoch must be in [0, total_epochs), "
                             f"got {self.start_epoch}")
        if self.stop_epoch is not None:
            if isinstance(self.stop_epoch, bool) or not isinstance(self.stop_epoch, int):
                raise TypeError(f"RankSchedule: stop_epoch must be an int or None, got "
                                f"{type(self.stop_epoch).__name__}")
            if not self.start_epoch < self.stop_epoch <= self.total_epochs:
                raise ValueError("RankSchedule: stop_epoch must be in (start_epoch, total_epochs], "
                                 f"got {self.stop_epoch}")
        for name in ("zeta", "energy", "min_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"RankSchedule: {name} must be in (0, 1], got {v!r}")

    @classmethod
    def default(cls, total_epochs: int) -> RankSchedule:
        """The package's default timing for a run of ``total_epochs`` (what ``ssa.Trainer`` and
        ``python -m ssa train`` use unless given a schedule; measured in ``docs/fidelity.md`` (d)):
        a cut after every epoch of the first third, so the low rank is reached early and the
        last two thirds recover from the last cut (the papers reach ``0.7·r0`` within the first
        30 % of epochs, v2 §4.4). Runs shorter than 6 epochs get no cut (too short to recover)."""
        stop = max(1, total_epochs // DEFAULT_STOP_DIVISOR)
        interval = DEFAULT_INTERVAL if total_epochs >= 6 else total_epochs + 1
        return cls(total_epochs, interval=interval, stop_epoch=stop)

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ queries
    @property
    def end(self) -> int:
        """The epoch the schedule ends at (``stop_epoch``, or ``total_epochs``)."""
        return self.total_epochs if self.stop_epoch is None else self.stop_epoch

    def is_cut_epoch(self, epoch: int) -> bool:
        """Whether the end of 0-based ``epoch`` is a cut point."""
        k = epoch - self.start_epoch + 1
        return self.start_epoch <= epoch < self.end and k % self.interval == 0

    def hoyer_active(self, epoch: int) -> bool:
        """Hoyer is on during the ``interval`` epochs that precede each cut (DESIGN §8)."""
        if epoch < self.start_epoch:
            return False
        k = epoch - self.start_epoch + 1
        next_cut = self.start_epoch + math.ceil(k / self.interval) * self.interval - 1
        return next_cut < self.end

    def floor(self, r0: int) -> int:
        return max(1, math.ceil(_decimal(self.min_fraction) * r0))

    def target(self, epoch: int, r0: int) -> int:
        """The linear-decay target rank after 0-based ``epoch`` (before the energy check)."""
        # ceil(r0 · (1 − (k // interval) / ((K − start) / interval))) in exact integer arithmetic:
        # in floats, 9 · (1 − 1/3) = 6.000000000000001 would ceil to 7.
        k = epoch - self.start_epoch + 1
        span = self.end - self.start_epoch
        return -(-r0 * (span - (k // self.interval) * self.interval) // span)

    def energy_rank(self, s: torch.Tensor) -> int:
        """The smallest ``r`` with ``Σ_{j<r} s_j² ≥ energy · Σ s_j²`` for ``s`` sorted descending
        (DESIGN §8); at an exact tie that ``r`` itself.

        Exact, like the other thresholds: ``s_j²`` of the stored values in integer arithmetic and
        ``energy`` as the decimal it prints as — in floats ``0.55 · 220`` is ``121.00000000000001``,
        so ``s = (11, 9, 3, 3)`` (``s² = 121, 81, 9, 9``) would keep 2 where 1 holds 55 %.
        """
        values = s.detach().double().cpu().tolist()
        if not values:
            raise ValueError("RankSchedule: the layer has no singular values")
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError("RankSchedule: the layer's singular values are not finite "
                                     f"({values}); the energy criterion needs finite s")
        ratios = [abs(v).as_integer_ratio() for v in values]
        q = max(d for _, d in ratios)  # powers of two: every s_j is an integer over q
        squares = [(num * (q // d)) ** 2 for num, d in ratios]  # s_j² · q², exact
        e = _decimal(self.energy)
        cum = list(itertools.accumulate(e.denominator * v for v in squares))
        # cum[r-1] = den · Σ_{j<r} s_j² ≥ num · Σ s_j²: the first such prefix (bisect_left: ties count).
        return bisect.bisect_left(cum, e.numerator * sum(squares)) + 1

    # ------------------------------------------------------------------ the step
    def step_layer(self, layer, epoch: int, is_output: bool = False, optimizer=None) -> int | None:
        """Apply the schedule to one SSA layer at the end of ``epoch``; the new rank if cut."""
        if epoch < self.start_epoch or layer.frozen_rank or (is_output and not self.include_output):
            return None
        if not self.is_cut_epoch(epoch):
            return None
        r0 = layer.r0
        floor = self.floor(r0)
        target = self.target(epoch, r0)
        if target <= _decimal(self.zeta) * r0:  # late phase: energy check (0.7 · 90 is 63, not 62.99…)
            layer.reorthonormalize(sort=True, optimizer=optimizer)
            target = self.energy_rank(layer.s)
            if target >= layer.rank:
                layer.frozen_rank = True
                return None
        if self.cap:
            m, n = layer.factor_shape  # out × in, or N·kw × C·kh for a kernel (DESIGN §8)
            target = min(target, max(floor, (m * n) // (m + n)))
        new_rank = max(floor, min(target, layer.rank))
        if new_rank < layer.rank:
            layer.truncate(new_rank, optimizer=optimizer)
            return new_rank
        return None


def _decimal(value: float) -> Fraction:
    """``value`` as the decimal it prints as (``0.7`` is 7/10), so thresholds times ranks are exact."""
    return Fraction(str(value))
