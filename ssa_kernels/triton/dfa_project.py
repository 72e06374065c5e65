"""DFA feedback projection in Triton, DESIGN §5 (and the cosine term of §6).

``e (p×C), P (d×k), sigma (k), Q (C×k), h (p×d) or (p×d×H×W…) -> delta`` (shape of h)::

    eq    = (e Q) ⊙ σ                         (p×k, tiny: torch)
    δh    = eq Pᵀ                             (p×d, tiles recomputed in every program)
    delta = δh ⊙ f'(h)                        (δh shared by the HW positions of a channel)
    delta += alpha_i δh + beta_i a            (when cos != 0)

with, per row ``i``, ``na = max(‖a_i‖, 1e-12)``, ``ng = max(sqrt(HW Σ_c δh_ic²), 1e-12)``,
``dot = −Σ a_i·δh_i``, ``alpha = cos/(p na ng)``, ``beta = cos·dot/(p na³ ng)`` — the gradient
of ``cos · mean_i [1 − cos(a_i, −δh_i)]``.

One kernel, ``_dfa_project_kernel``, over a grid (row blocks, channel blocks, position
chunks). Each program forms its ``δh`` tile with ``tl.dot`` (k is small, so recomputing it
per position chunk is cheaper than storing it) and either writes ``delta`` or, when
``cos != 0``, first runs in ``STATS`` mode: every program writes its partial
``(Σ a², Σ a·δh, Σ δh²)`` per row to its own slot of a workspace, torch sums the slots
(deterministic, no atomics) into ``alpha, beta``, and the write pass adds the cosine term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import reference as ref
from ._common import act_code, activation_grad, cdiv, dot_block, dot_precision, target_programs


@triton.jit
def _feedback_tile(eq_ptr, P_ptr, rows, chans, row_ok, chan_ok, k, stride_pd, stride_pk,
                   PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """``δh[rows, chans] = eq[rows] P[chans]ᵀ`` in fp32 (eq is contiguous p×k, fp32)."""
    dh = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        eqt = tl.load(eq_ptr + rows[:, None] * k + ks[None, :],
                      mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        pt = tl.load(P_ptr + ks[:, None] * stride_pk + chans[None, :] * stride_pd,
                     mask=k_ok[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
        dh = tl.dot(eqt, pt, dh, input_precision=PRECISION)
    return dh


@triton.jit
def _dfa_project_kernel(
    eq_ptr, P_ptr, h_ptr, a_ptr, alpha_ptr, beta_ptr, out_ptr, stats_ptr,
    p, d, k, hw, q_per_prog,
    stride_pd, stride_pk,
    slope,
    ACT: tl.constexpr, STATS: tl.constexpr, HAS_COS: tl.constexpr, SPATIAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_q = tl.program_id(2)
    # 64-bit row offsets: h may hold more than 2³¹ elements.
    rows = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < p
    chan_ok = chans < d
    dh = _feedback_tile(eq_ptr, P_ptr, rows, chans, row_ok, chan_ok, k, stride_pd, stride_pk,
                        PRECISION, BLOCK_P, BLOCK_D, BLOCK_K)
    row_len = d * hw
    if HAS_COS and not STATS:
        alpha = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
        beta = tl.load(beta_ptr + rows, mask=row_ok, other=0.0)

    if not SPATIAL:
        offs = rows[:, None] * row_len + chans[None, :]
        ok = row_ok[:, None] & chan_ok[None, :]
        if STATS:
            av = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            na2 = tl.sum(av * av, 1)
            adh = tl.sum(av * dh, 1)
        else:
            hv = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            delta = dh * activation_grad(hv, ACT, slope)
            if HAS_COS:
                av = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                delta += alpha[:, None] * dh + beta[:, None] * av
            tl.store(out_ptr + offs, delta.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        # Tiles (rows, channels, positions): positions are contiguous in memory.
        base = rows[:, None, None] * row_len + chans[None, :, None] * hw
        ok2 = (row_ok[:, None] & chan_ok[None, :])[:, :, None]
        dh3 = dh[:, :, None]
        na2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
        asum = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        q_start = pid_q * q_per_prog
        q_end = tl.minimum(q_start + q_per_prog, hw)
        for q0 in range(q_start, q_end, BLOCK_Q):
            qs = q0 + tl.arange(0, BLOCK_Q)
            offs = base + qs[None, None, :]
            ok = ok2 & (qs < q_end)[None, None, :]
            if STATS:
                av = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                na2 += tl.sum(tl.sum(av * av, 2), 1)
                asum += tl.sum(av, 2)
            else:
                hv = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                delta = dh3 * activation_grad(hv, ACT, slope)
                if HAS_COS:
                    av = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                    delta += alpha[:, None, None] * dh3 + beta[:, None, None] * av
                tl.store(out_ptr + offs, delta.to(out_ptr.dtype.element_ty), mask=ok)
        if STATS:
            adh = tl.sum(asum * dh, 1)

    if STATS:
        # ‖δh_i‖² counts each channel once per position; only the first chunk adds it.
        dh2 = tl.sum(dh * dh, 1) * hw
        dh2 = tl.where(pid_q == 0, dh2, 0.0)
        slot = pid_d * tl.num_programs(2) + pid_q
        sp = stats_ptr + (slot * p + rows) * 3
        tl.store(sp, na2, mask=row_ok)
        tl.store(sp + 1, adh, mask=row_ok)
        tl.store(sp + 2, dh2, mask=row_ok)


def dfa_project(e, P, sigma, Q, h, a, activation, negative_slope, cos, *, q_splits=None):
    """Plain launcher of DESIGN §5 (+ §6 cosine term); returns a contiguous tensor like h.

    ``q_splits`` forces the number of position chunks per tile (tests); ``None`` picks it.
    """
    p, d = h.shape[0], h.shape[1]
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if h.numel() == 0:
        return out
    hw = h.numel() // (p * d)
    spatial = h.dim() > 2
    k = P.shape[1]
    eq = (torch.mm(e.float(), Q.float()) * sigma.float()).contiguous()
    h = h.contiguous()
    has_cos = cos != 0.0
    a = a.contiguous() if has_cos else h

    block_k = dot_block(k, 32)
    if spatial:
        block_p, block_d = 16, 16
        block_q = min(32, triton.next_power_of_2(hw))
    else:
        block_p, block_d, block_q = dot_block(p, 32), dot_block(d, 64), 1
    row_programs, chan_programs = cdiv(p, block_p), cdiv(d, block_d)
    q_blocks = cdiv(hw, block_q)
    splits = q_splits or cdiv(target_programs(h.device), row_programs * chan_programs)
    splits = max(1, min(splits, q_blocks)) if spatial else 1
    q_per_prog = cdiv(q_blocks, splits) * block_q
    splits = cdiv(hw, q_per_prog)
    grid = (row_programs, chan_programs, splits)
    num_warps = 8 if block_p * block_d * block_q >= 8192 else 4
    precision = dot_precision(h.dtype)

    def launch(alpha, beta, stats, stats_mode):
        wrap_triton(_dfa_project_kernel)[grid](
            eq, P, h, a, alpha, beta, out, stats,
            p, d, k, hw, q_per_prog,
            P.stride(0), P.stride(1),
            negative_slope,
            ACT=act_code(activation), STATS=stats_mode, HAS_COS=has_cos, SPATIAL=spatial,
            PRECISION=precision, BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_K=block_k,
            BLOCK_Q=block_q, num_warps=num_warps)

    if not has_cos:
        launch(eq, eq, eq, False)
        return out
    stats = torch.empty((chan_programs * splits, p, 3), dtype=torch.float32, device=h.device)
    launch(eq, eq, stats, True)
    na2, adh, dh2 = stats.sum(0).unbind(1)
    na = na2.sqrt().clamp_min(ref.COS_NORM_EPS)
    ng = dh2.sqrt().clamp_min(ref.COS_NORM_EPS)
    alpha = (cos / (p * na * ng)).contiguous()
    beta = (-cos * adh / (p * na**3 * ng)).contiguous()
    launch(alpha, beta, stats, False)
    return out
