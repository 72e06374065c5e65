"""ssa.RankSchedule against an independent transcription of the DESIGN §8 pseudo-code, on a fake layer
and on a real SSALinear; Hoyer epochs; bad arguments."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import ssa


class FakeLayer:
    """What RankSchedule may touch on a layer, recording the surgery it asks for."""

    def __init__(self, s, m, n):
        self.s = torch.as_tensor(s, dtype=torch.float64)
        self.r0 = self.rank = len(self.s)
        assert self.r0 <= min(m, n)
        self.factor_shape = (m, n)  # rows of U and V
        self.frozen_rank = False
        self.calls: list[tuple] = []

    def reorthonormalize(self, sort=False, optimizer=None):
        self.calls.append(("reorthonormalize", sort))
        if sort:
            self.s = torch.sort(self.s, descending=True).values

    def truncate(self, rank, optimizer=None):
        self.calls.append(("truncate", rank))
        assert 1 <= rank <= self.rank
        self.s = torch.sort(self.s, descending=True).values[:rank]
        self.rank = rank


def spec(s, m, n, K, interval, zeta, energy, min_fraction, start, cap):
    """DESIGN §8 in exact arithmetic, on a plain list of singular values.

    Returns, per epoch, ``(new rank or None, rank, frozen, energy check done)``."""
    s = sorted((float(v) for v in s), reverse=True)  # a layer's s, already in SVD order
    r0, rank, frozen, out = len(s), len(s), False, []
    zeta, energy, min_fraction = Fraction(str(zeta)), Fraction(str(energy)), Fraction(str(min_fraction))
    for E in range(K):
        new, checked = None, False
        k = E - start + 1
        if E >= start and not frozen and k % interval == 0:
            floor = max(1, math.ceil(min_fraction * r0))
            target = math.ceil(r0 * (1 - Fraction(k // interval) / Fraction(K - start, interval)))
            if target <= zeta * r0:
                checked = True
                s2 = [Fraction(v) ** 2 for v in s[:rank]]
                target = next(r for r in range(1, rank + 1) if sum(s2[:r]) >= energy * sum(s2))
                if target >= rank:
                    frozen = True
            if not frozen:
                if cap:
                    target = min(target, max(floor, (m * n) // (m + n)))
                if max(floor, min(target, rank)) < rank:
                    new = rank = max(floor, min(target, rank))
        out.append((new, rank, frozen, checked))
    return out


def run(layer, sched, K, **kw):
    got = []
    for E in range(K):
        before = len(layer.calls)
        new = sched.step_layer(layer, E, **kw)
        checked = ("reorthonormalize", True) in layer.calls[before:]
        got.append((new, layer.rank, layer.frozen_rank, checked))
    return got


def profile(kind, r0):
    if kind == "linear":
        return torch.linspace(3.0, 0.01, r0) ** 2
    if kind == "flat":
        return torch.ones(r0) + 1e-3 * torch.arange(r0, 0, -1)
    if kind == "geometric":
        return 0.8 ** torch.arange(r0, dtype=torch.float64)
    if kind == "shuffled":
        perm = torch.randperm(r0, generator=torch.Generator().manual_seed(0))
        return (torch.linspace(3.0, 0.01, r0) ** 2)[perm]
    raise AssertionError(kind)


CASES = {  # K, interval, zeta, energy, min_fraction, start, cap, (m, n), s profile
    "defaults": (30, 10, 0.7, 0.95, 0.3, 0, True, (48, 64), "linear"),  # energy check from the first cut
    "cap": (40, 10, 0.7, 0.95, 0.3, 0, True, (48, 64), "linear"),  # the cap binds: 27 < 36
    "no cap": (40, 10, 0.7, 0.95, 0.3, 0, False, (48, 64), "linear"),
    "r0=9": (30, 10, 0.3, 0.95, 0.1, 0, True, (9, 40), "linear"),  # 9 (1 - 1/3) = 6 exactly, not 7
    "r0=21": (30, 10, 0.3, 0.95, 0.1, 0, False, (21, 21), "linear"),  # 14 and 7 exactly
    "start": (25, 4, 0.5, 0.9, 0.2, 3, True, (30, 100), "shuffled"),
    "every epoch": (12, 1, 0.9, 0.99, 0.1, 0, True, (16, 16), "geometric"),
    "late start": (40, 5, 0.7, 0.5, 0.3, 10, True, (48, 64), "linear"),
    "energy freeze": (30, 5, 0.9, 0.95, 0.1, 0, False, (20, 20), "flat"),
    "energy cut": (30, 5, 0.9, 0.95, 0.1, 0, False, (40, 40), "geometric"),
    "zeta 1": (20, 5, 1.0, 0.95, 0.3, 0, False, (24, 30), "linear"),
    "floor = r0": (20, 5, 0.7, 0.95, 1.0, 0, True, (24, 30), "linear"),
    "0.7*90": (10, 3, 0.7, 0.95, 0.3, 0, False, (90, 200), "flat"),  # target 63 <= 0.7·90: energy check
    "span < interval": (7, 10, 0.7, 0.95, 0.3, 0, True, (12, 12), "linear"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_layer_is_the_design_pseudo_code(case):
    K, interval, zeta, energy, min_fraction, start, cap, (m, n), kind = CASES[case]
    s = profile(kind, min(m, n))
    sched = ssa.RankSchedule(K, interval=interval, zeta=zeta, energy=energy, min_fraction=min_fraction,
                             start_epoch=start, cap=cap)
    layer = FakeLayer(s, m, n)
    got = run(layer, sched, K)
    want = spec(s, m, n, K, interval, zeta, energy, min_fraction, start, cap)
    assert got == want
    cuts = [c[1] for c in layer.calls if c[0] == "truncate"]
    assert cuts == [w[0] for w in want if w[0] is not None]


def test_the_cases_cover_every_branch():
    outcomes = {}
    for case, (K, interval, zeta, energy, min_fraction, start, cap, (m, n), kind) in CASES.items():
        s = profile(kind, min(m, n))
        outcomes[case] = spec(s, m, n, K, interval, zeta, energy, min_fraction, start, cap)
    assert outcomes["energy freeze"][-1][2] and any(w[3] for w in outcomes["energy freeze"])
    assert any(w[3] and w[0] is not None for w in outcomes["energy cut"])
    assert outcomes["cap"][9][0] == 27 and outcomes["no cap"][9][0] == 36  # cap branch
    assert outcomes["defaults"][9][3] and not outcomes["cap"][9][3]  # energy check from the first cut
    assert [w[0] for w in outcomes["r0=9"] if w[0]] == [6, 3]
    assert [w[0] for w in outcomes["r0=21"] if w[0]] == [14, 7]
    assert outcomes["0.7*90"][2] == (86, 86, False, True)
    assert all(w[0] is None for w in outcomes["floor = r0"])
    late = outcomes["late start"]
    assert all(w[0] is None for w in late[:14]) and late[14][0] == 27 and late[-1][1] == 15  # the floor
    assert all(w[0] is None for w in outcomes["span < interval"])


def test_frozen_and_output_layers_are_left_alone():
    sched = ssa.RankSchedule(30)
    frozen = FakeLayer(profile("linear", 20), 20, 30)
    frozen.frozen_rank = True
    out = FakeLayer(profile("linear", 20), 20, 30)
    for E in range(30):
        assert sched.step_layer(frozen, E) is None
        assert sched.step_layer(out, E, is_output=True) is None
    assert frozen.calls == [] and out.calls == [] and out.rank == frozen.rank == 20
    opted = FakeLayer(profile("linear", 20), 20, 30)
    run(opted, ssa.RankSchedule(30, include_output=True), 30, is_output=True)
    assert opted.rank < 20


def test_on_a_real_layer():
    torch.manual_seed(0)
    layer = ssa.SSALinear(64, 32, seed=9)
    layer.set_targets("frame")  # targets on every column, to check they follow the cuts
    with torch.no_grad():
        layer.U.add_(0.05 * torch.randn_like(layer.U))
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, 64)).sum().backward()
    opt.step()
    sched = ssa.RankSchedule(30)
    floor, cap = sched.floor(32), 64 * 32 // (64 + 32)
    assert (floor, cap) == (10, 21)
    ranks, prev = [], layer.rank
    for E in range(30):
        new = sched.step_layer(layer, E, optimizer=opt)
        assert layer.rank <= prev and layer.rank >= floor
        if new is not None:
            assert new == layer.rank < prev
            assert layer.U not in opt.state and layer.s not in opt.state  # state of new directions dropped
            torch.testing.assert_close(layer.U.t() @ layer.U, torch.eye(layer.rank), rtol=0, atol=1e-5)
        if E >= sched.interval - 1:
            assert layer.rank <= cap
        ranks.append(layer.rank)
        prev = layer.rank
    assert ranks[:9] == [32] * 9 and ranks[9] == 21 and ranks[-1] < 21
    cols = layer.target_cols
    k = cols.numel()  # only the targets of kept columns remain, each still on a kept column
    assert 0 < k <= layer.rank and int(cols.max()) < layer.rank and cols.unique().numel() == k
    assert layer.target_U.shape == (32, k) and layer.target_s.shape == (k,)
    assert layer.target_V.shape == (64, k)
    out = ssa.SSALinear(64, 32, seed=9)
    for E in range(30):
        sched.step_layer(out, E, is_output=True)
    assert out.rank == 32


def test_hoyer_epochs():
    def active(sched):
        return {E for E in range(sched.total_epochs) if sched.hoyer_active(E)}

    def cuts(sched):
        return [E for E in range(sched.total_epochs) if sched.is_cut_epoch(E)]

    a = ssa.RankSchedule(30, interval=10)  # cuts after epochs 9, 19, 29
    assert cuts(a) == [9, 19, 29]
    assert active(a) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                         23, 24, 25, 26, 27, 28, 29}
    b = ssa.RankSchedule(25, interval=10, start_epoch=3)  # cuts after 12, 22; none after 23, 24
    assert cuts(b) == [12, 22]
    assert active(b) == {3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22}
    c = ssa.RankSchedule(25, interval=10)  # cuts after 9, 19; 20-24 precede no cut
    assert cuts(c) == [9, 19]
    assert active(c) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}
    assert active(ssa.RankSchedule(5, interval=10)) == set()


@pytest.mark.parametrize("bad", [dict(interval=0), dict(zeta=0.0), dict(zeta=1.5), dict(start_epoch=30),
                                 dict(start_epoch=31), dict(start_epoch=-1), dict(energy=0.0),
                                 dict(min_fraction=1.5), dict(total_epochs=0)])
def test_bad_arguments(bad):
    kw = dict(total_epochs=30) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        ssa.RankSchedule(**kw)


def test_non_int_epochs():
    with pytest.raises(TypeError, match="interval"):
        ssa.RankSchedule(30, interval=2.0)
    with pytest.raises(TypeError, match="total_epochs"):
        ssa.RankSchedule(30.0)


def test_to_dict_round_trip():
    sched = ssa.RankSchedule(25, interval=4, zeta=0.5, start_epoch=3, cap=False, include_output=True)
    assert ssa.RankSchedule(**sched.to_dict()) == sched


# ------------------------------------------------------------------ stop_epoch and the default timing
def test_stop_epoch_ends_the_schedule_and_spans_the_decay():
    s = ssa.RankSchedule(15, interval=1, stop_epoch=5)
    assert [e for e in range(15) if s.is_cut_epoch(e)] == [0, 1, 2, 3, 4]
    # The linear decay runs over [start, stop): 100 → 80, 60, 40, 20 (not 100·(1 − k/15)).
    assert [s.target(e, 100) for e in range(4)] == [80, 60, 40, 20]
    assert [e for e in range(15) if s.hoyer_active(e)] == [0, 1, 2, 3, 4]
    full = ssa.RankSchedule(15, interval=1)
    assert full.target(0, 100) == 94 and full.is_cut_epoch(14)


def test_stop_epoch_stops_cutting_a_real_layer():
    torch.manual_seed(0)
    layer = ssa.SSALinear(64, 48)
    s = ssa.RankSchedule(12, interval=1, stop_epoch=3)
    ranks = []
    for epoch in range(12):
        s.step_layer(layer, epoch)
        ranks.append(layer.rank)
    assert ranks[2] < 48 and len(set(ranks[2:])) == 1  # cut in the first three epochs, never after


@pytest.mark.parametrize("bad", [dict(stop_epoch=0), dict(stop_epoch=11), dict(start_epoch=4, stop_epoch=4)])
def test_bad_stop_epoch(bad):
    with pytest.raises(ValueError, match="stop_epoch"):
        ssa.RankSchedule(10, **bad)
    with pytest.raises(TypeError, match="stop_epoch"):
        ssa.RankSchedule(10, stop_epoch=2.0)


@pytest.mark.parametrize("epochs", [1, 3, 5, 6, 15, 20, 30])
def test_default_timing_cuts_in_the_first_third(epochs):
    s = ssa.RankSchedule.default(epochs)
    cuts = [e for e in range(epochs) if s.is_cut_epoch(e)]
    assert cuts == (list(range(epochs // 3)) if epochs >= 6 else [])
    assert ssa.RankSchedule(**s.to_dict()) == s


def test_trainer_default_schedule_is_made_by_fit():
    train, _ = ssa.data.digits(batch_size=256, seed=0)
    nn = torch.nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    t = ssa.Trainer(model, 10, method="ssa")
    assert t.schedule is None
    t.fit(train, 6)
    assert t.schedule == ssa.RankSchedule.default(6)
    assert t.ranks()["1"] < 32  # cut in the first two epochs
    assert ssa.Trainer(model, 10, method="dfa").schedule is None
    t = ssa.Trainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), 10, schedule=None)
    t.fit(train, 6)
    assert t.schedule is None and t.ranks()["1"] == 10
    with pytest.raises(ValueError, match="schedule"):
        ssa.Trainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), 10, schedule="fast")


# ------------------------------------------------------------------ boundaries (mutation-testing blind spots)
# The energy criterion at an exact tie: "smallest r with Σ_{j<r} s_j² ≥ energy · Σ s_j²" (DESIGN §8), so a
# prefix holding exactly ``energy`` of the energy is enough. Powers of two (and integers) keep every
# sum exact in floating point; the last three are ties that float arithmetic on ``energy`` misses
# (0.55 · 220 = 121.00000000000001 in floats), read exactly like zeta and min_fraction.
ENERGY_TIES = [  # s (descending), energy, the rank DESIGN §8 asks for
    ((2, 1, 1, 1, 1), 0.5, 1),  # s² = 4, 1, 1, 1, 1: 4 of 8
    ((2, 1, 1, 1, 1), 0.625, 2),  # 5 of 8
    ((2, 1, 1, 1, 1), 0.75, 3),  # 6 of 8
    ((2, 1, 1, 1, 1), 0.875, 4),  # 7 of 8: one below the rank
    ((2, 1, 1, 1, 1), 1.0, 5),  # the whole rank: frozen, not cut
    ((0.5, 0.25, 0.25, 0.25, 0.25), 0.625, 2),  # s² = 1/4, 1/16 ×4: 5/16 of 1/2
    ((1, 1, 0, 0), 1.0, 2),  # zero singular values hold no energy: the first r reaching all of it
    ((1, 1, 0, 0), 0.5, 1),
    ((11, 9, 3, 3), 0.55, 1),  # s² = 121, 81, 9, 9: 121 = 0.55 · 220 exactly
    ((14, 12, 3, 1), 0.56, 1),  # 196 = 0.56 · 350
    ((45, 21, 5, 3), 0.81, 1),  # 2025 = 0.81 · 2500
]


@pytest.mark.parametrize("s,energy,want", ENERGY_TIES, ids=[f"{c[0]}-{c[1]}" for c in ENERGY_TIES])
def test_energy_criterion_at_an_exact_tie(s, energy, want):
    r0 = len(s)
    # One cut after the only epoch: the linear target is 0 <= zeta·r0, so the energy check decides;
    # floor 1 and cap (64·64)//128 = 32 leave its rank as it is.
    sched = ssa.RankSchedule(1, interval=1, energy=energy, min_fraction=0.1)
    layer = FakeLayer(s, 64, 64)
    new = sched.step_layer(layer, 0)
    assert ("reorthonormalize", True) in layer.calls
    if want < r0:
        assert new == layer.rank == want and not layer.frozen_rank
        assert layer.calls[-1] == ("truncate", want)
    else:
        assert new is None and layer.rank == r0 and layer.frozen_rank
        assert ("truncate", want) not in layer.calls
    assert spec(s, 64, 64, 1, 1, 0.7, energy, 0.1, 0, True)[0][:3] == (new, layer.rank, layer.frozen_rank)


@pytest.mark.parametrize("s,energy,want", ENERGY_TIES, ids=[f"{c[0]}-{c[1]}" for c in ENERGY_TIES])
def test_energy_rank_at_an_exact_tie(s, energy, want):
    sched = ssa.RankSchedule(1, energy=energy)
    assert sched.energy_rank(torch.tensor(s, dtype=torch.float64)) == want
    assert sched.energy_rank(torch.tensor(s, dtype=torch.float32)) == want  # a layer's s is fp32
    if energy < 1:  # a tie: a hair more of the energy needs the next singular value
        assert ssa.RankSchedule(1, energy=energy + 1e-9).energy_rank(torch.tensor(s)) == want + 1


def test_energy_criterion_of_float32_singular_values():
    # A layer's s is fp32; its squares are exact in fp64 and in the integer arithmetic alike.
    s = torch.tensor([1.5, 1.0, 1.0, 0.5], dtype=torch.float32)  # s² = 2.25, 1, 1, 0.25: 4.5
    assert ssa.RankSchedule(1, energy=0.5).energy_rank(s) == 1  # 2.25 = 0.5 · 4.5: a tie
    assert ssa.RankSchedule(1, energy=0.6).energy_rank(s) == 2  # 2.7 needs 3.25
    s = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float32)
    assert [ssa.RankSchedule(1, energy=e).energy_rank(s) for e in (0.5, 0.625, 0.75, 0.875, 1.0)] == [
        1, 2, 3, 4, 5]
    with pytest.raises(FloatingPointError, match="not finite"):
        ssa.RankSchedule(1).energy_rank(torch.tensor([1.0, float("nan")]))


def _epochs(sched, upto):
    cuts = [E for E in range(upto) if sched.is_cut_epoch(E)]
    hoyer = [E for E in range(upto) if sched.hoyer_active(E)]
    return cuts, hoyer


HOYER_BOUNDARIES = {  # (K, interval, start_epoch, stop_epoch): cut epochs, Hoyer epochs
    "last cut at K-1": ((30, 10, 0, None), [9, 19, 29], list(range(30))),
    "next cut at K": ((29, 10, 0, None), [9, 19], list(range(20))),  # 20-28 precede no cut
    "one epoch past": ((31, 10, 0, None), [9, 19, 29], list(range(30))),  # 30 precedes none
    "single cut at K-1": ((10, 10, 0, None), [9], list(range(10))),
    "no cut": ((9, 10, 0, None), [], []),  # the first cut would be after epoch 9 = K
    "start, cut at K-1": ((23, 10, 3, None), [12, 22], list(range(3, 23))),
    "start, next cut at K": ((22, 10, 3, None), [12], list(range(3, 13))),
    "stop, cut at stop-1": ((30, 10, 0, 20), [9, 19], list(range(20))),
    "stop, next cut at stop": ((30, 10, 0, 19), [9], list(range(10))),
    "every epoch": ((6, 1, 0, None), [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
    "every epoch, stop": ((6, 1, 2, 4), [2, 3], [2, 3]),
    "interval 2, odd span": ((7, 2, 0, None), [1, 3, 5], [0, 1, 2, 3, 4, 5]),
}


@pytest.mark.parametrize("case", list(HOYER_BOUNDARIES))
def test_hoyer_and_cut_epochs_at_the_end_of_the_schedule(case):
    (K, interval, start, stop), cuts, hoyer = HOYER_BOUNDARIES[case]
    sched = ssa.RankSchedule(K, interval=interval, start_epoch=start, stop_epoch=stop)
    # Past the end too: nothing is cut or penalised after the schedule ends.
    assert _epochs(sched, K + 2 * interval + 2) == (cuts, hoyer)
    # step_layer cuts exactly at those epochs: floor 1, the energy check (only at a target of 0, at the
    # end of the decay) keeps 1 of the geometric profile, so every cut epoch cuts.
    layer = FakeLayer(profile("geometric", 40), 200, 200)
    sched = ssa.RankSchedule(K, interval=interval, start_epoch=start, stop_epoch=stop, min_fraction=0.01,
                             energy=0.3, zeta=0.01)
    assert [E for E in range(K) if sched.step_layer(layer, E) is not None] == cuts


@pytest.mark.parametrize("K", range(1, 23))
def test_hoyer_epochs_are_the_interval_before_each_cut(K):
    """DESIGN §8 read literally, for every start/stop/interval of short runs: cuts after the epochs E
    with (E − start + 1) % interval == 0 before the end; Hoyer on in the ``interval`` epochs ending
    with a cut (the cut comes at the end of its epoch)."""
    for interval in range(1, K + 3):
        for start in range(K):
            for stop in [None, *range(start + 1, K + 1)]:
                sched = ssa.RankSchedule(K, interval=interval, start_epoch=start, stop_epoch=stop)
                end = K if stop is None else stop
                cuts = [E for E in range(start, end) if (E - start + 1) % interval == 0]
                hoyer = [E for E in range(K + interval + 1) if any(c - interval < E <= c for c in cuts)]
                assert _epochs(sched, K + interval + 1) == (cuts, hoyer), (K, interval, start, stop)
