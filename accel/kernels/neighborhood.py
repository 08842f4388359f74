"""Neighborhood attention (NATTEN / GNA semantics) in Triton: kernels, launchers, custom ops, public function.

Video tokens come in tile-major order (`neighborhood_reference.tile_major_order`): one program owns one query
tile (a 3-D box of the token grid, ``block`` rows) and visits only the key tiles its plan lists
(`neighborhood_reference.build_tile_plan`, computed once per geometry at tile granularity). Per key tile the
element mask is computed in the kernel from token coordinates (NATTEN's window rule with stride, dilation and
causality per axis); tile pairs wholly inside every query's window come first in each list and skip the mask.
Text keys (views of the joint K/V buffer) are extra keys in the same online softmax, with per-batch visibility.

Backward: FlashAttention-2's two kernels, dK/dV key-major over the transposed tile lists (plus the text-key
blocks, which every video query reaches) and dQ query-major. Both passes are Triton; ``accel::neighborhood_fwd``
and ``accel::neighborhood_bwd`` are ``torch.library`` custom ops, so ``torch.compile`` sees one node per call.
"""

# No `from __future__ import annotations`: torch.library reads the schema from real annotation objects.
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import resolve_key_parts, text_visibility, triton_input_reason
from ._triton_common import LOG2E, _softmax_update_masked, dot_precision, head_dim_pad, strides4
from .neighborhood_reference import INDEX_BITS, INDEX_MASK, TilePlan

__all__ = ["can_run_neighborhood", "neighborhood_attention"]

BOX_FORM_CODES = (None, "swar", "mma")  # `neighborhood_fwd`'s box_meta[0]: None = the ACCEL_BOX_MASK default
_INDEX_MASK = tl.constexpr(INDEX_MASK)
_INDEX_BITS = tl.constexpr(INDEX_BITS)


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _tile_coords(Tiles, tile, offs):
    """Start row, token count and (t, h, w) coordinates of rows ``offs`` of one tile."""
    base = Tiles + tile * 8
    start = tl.load(base)
    count = tl.load(base + 1)
    t0 = tl.load(base + 2)
    h0 = tl.load(base + 3)
    w0 = tl.load(base + 4)
    eh = tl.load(base + 6)
    ew = tl.load(base + 7)
    t = t0 + offs // (eh * ew)
    h = h0 + (offs // ew) % eh
    w = w0 + offs % ew
    return start, count, t, h, w


@triton.jit
def _axis_window(i, L, K, S, D, C):
    """NATTEN's per-axis rule for query coordinates i (1-D): (dilation group, in-group [start, end))."""
    gi = i % D
    ii = i // D
    lg = (L - gi + D - 1) // D
    base = (ii // S) * S
    lead = tl.minimum(base + S // 2, lg - 1)
    start = tl.minimum(tl.maximum(lead - K // 2, 0), lg - K)
    lead_c = tl.minimum(base + S - 1, lg - 1)
    start_c = tl.maximum(lead_c - K + 1, 0)
    end = tl.where(C != 0, tl.minimum(ii + 1, lg), start + K)
    start = tl.where(C != 0, start_c, start)
    return gi, start, end


@triton.jit
def _query_windows(qt, qh, qw, LT, KT, ST, DT, CT, LH, KH, SH, DH, CH, LW, KW, SW, DW, CW):
    """Per-row windows of a query tile along T, H, W (computed once per query tile, not per key tile)."""
    gt, st, et = _axis_window(qt, LT, KT, ST, DT, CT)
    gh, sh, eh = _axis_window(qh, LH, KH, SH, DH, CH)
    gw, sw, ew = _axis_window(qw, LW, KW, SW, DW, CW)
    return gt, st, et, gh, sh, eh, gw, sw, ew


@triton.jit
def _axis_in(j, g, start, end, D):
    """(rows, columns) mask: key coordinate j (columns) inside the rows' windows (g, start, end)."""
    jj = (j // D)[None, :]
    return ((j % D)[None, :] == g[:, None]) & (jj >= start[:, None]) & (jj < end[:, None])


@triton.jit
def _window_mask(win, kt, kh, kw, DT, DH, DW):
    """(BLOCK_M, BLOCK_N) mask from the query rows' windows and key coordinates (columns)."""
    gt, st, et, gh, sh, eh, gw, sw, ew = win
    ok = _axis_in(kt, gt, st, et, DT) & _axis_in(kh, gh, sh, eh, DH)
    return ok & _axis_in(kw, gw, sw, ew, DW)


@triton.jit
def _in_range(j, start, end):
    """(rows, columns): start[row] <= j[column] < end[row], as one unsigned compare."""
    return (j[None, :] - start[:, None]).to(tl.uint32) < (end - start)[:, None].to(tl.uint32)


@triton.jit
def _pair_mask(win, kt, kh, kw, n_valid, need, offs):
    """The window mask of one tile pair without dilation, testing only the axes flagged in ``need``."""
    _gt, st, et, _gh, sh, eh, _gw, sw, ew = win
    mask = (offs[:, None] >= 0) & n_valid[None, :]
    if (need & 1) != 0:
        mask = mask & _in_range(kt, st, et)
    if (need & 2) != 0:
        mask = mask & _in_range(kh, sh, eh)
    if (need & 4) != 0:
        mask = mask & _in_range(kw, sw, ew)
    return mask


@triton.jit
def _softmax_step(acc, l_i, m_i, q, kT, v, mask, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
    return _softmax_update_masked(acc, l_i, m_i, qk, v, DOT_PRECISION)


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _nbhd_fwd_kernel(
    Q, K, V, EK, EV, EMask, Out, Lse, Tiles, Offsets, NFull, Indices,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh,
    H, T, qk_scale,
    LT, KT, ST, DT, CT, LH, KH, SH, DH, CH, LW, KW, SW, DW, CW,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DILATED: tl.constexpr, SKIP_FULL: tl.constexpr,
):
    tile_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    q_start, q_count, qt, qh, qw = _tile_coords(Tiles, tile_q, offs)
    m_valid = offs < q_count
    win = _query_windows(qt, qh, qw, LT, KT, ST, DT, CT, LH, KH, SH, DH, CH, LW, KW, SW, DW, CW)
    q_rows = (q_start + offs).to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + q_rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None] * stride_kd
    v_base = V + off_b * stride_vb + off_h * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
    lo = tl.load(Offsets + tile_q)
    hi = tl.load(Offsets + tile_q + 1)
    mid = lo + tl.load(NFull + tile_q)
    if SKIP_FULL:  # the unmasked pairs run in the block-sparse kernel (split path)
        lo = mid
    # Tiles wholly inside every query's window (both complete): no element mask.
    for it in range(lo, mid):
        tile_k = tl.load(Indices + it) & _INDEX_MASK
        k_start = tl.load(Tiles + tile_k * 8).to(tl.int64)
        rows = k_start + offs
        kT = tl.load(k_base + rows[None, :] * stride_kn, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn, mask=d_mask[None, :], other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kT, v, m_valid[:, None], qk_scale, False, DOT_PRECISION)
    for it in range(mid, hi):
        packed = tl.load(Indices + it)
        tile_k = packed & _INDEX_MASK
        need = packed >> _INDEX_BITS
        k_start, k_count, kt, kh, kw = _tile_coords(Tiles, tile_k, offs)
        n_valid = offs < k_count
        rows = (k_start + offs).to(tl.int64)
        kT = tl.load(k_base + rows[None, :] * stride_kn, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn, mask=n_valid[:, None] & d_mask[None, :], other=0.0)
        if DILATED:
            mask = n_valid[None, :] & _window_mask(win, kt, kh, kw, DT, DH, DW)
        else:  # only the axes (and the key tail) this pair needs, one subtract and compare per axis
            mask = _pair_mask(win, kt, kh, kw, n_valid, need, offs)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kT, v, mask, qk_scale, True, DOT_PRECISION)
    if HAS_TEXT:
        ek_base = EK + off_b * stride_ekb + off_h * stride_ekh + offs_d[:, None] * stride_ekd
        ev_base = EV + off_b * stride_evb + off_h * stride_evh + offs_d[None, :] * stride_evd
        for start_n in range(0, T, BLOCK):
            n_in = start_n + offs < T
            n_valid = n_in
            if HAS_TEXT_MASK:
                vis = tl.load(EMask + off_b * stride_emb + start_n + offs, mask=n_in, other=0)
                n_valid = n_valid & (vis != 0)
            rows = start_n + offs
            kT = tl.load(ek_base + rows[None, :] * stride_ekn, mask=n_in[None, :] & d_mask[:, None], other=0.0)
            v = tl.load(ev_base + rows[:, None] * stride_evn, mask=n_in[:, None] & d_mask[None, :], other=0.0)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, kT, v, n_valid[None, :], qk_scale, True,
                                          DOT_PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + q_rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + q_rows, lse, mask=m_valid)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse, delta, maskT, qk_scale, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Key-major: k, v (BLOCK_N, D); q, do (BLOCK_M, D); lse (log2 units), delta (BLOCK_M,); maskT (N, M)."""
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
    if MASKED:
        pT = tl.where(maskT, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _load_q_side(Q, DO, Lse, Delta, q_off, do_off, l_off, rows, m_valid, d_mask, stride_qm, stride_dom):
    """q, dO rows and their LSE (log2 units, +inf for hidden rows: P = 0) and Delta."""
    q = tl.load(Q + q_off + rows[:, None] * stride_qm, mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    do = tl.load(DO + do_off + rows[:, None] * stride_dom, mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    lse = tl.load(Lse + l_off + rows, mask=m_valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + l_off + rows, mask=m_valid, other=0.0)
    return q, do, lse, delta


@triton.jit
def _nbhd_dkdv_kernel(
    Q, K, V, EK, EV, EMask, DO, Lse, Delta, DK, DV, DEK, DEV, Tiles, TOffsets, TNFull, TIndices,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_dekb, stride_dekn, stride_dekh, stride_dekd,
    stride_devb, stride_devn, stride_devh, stride_devd,
    stride_lb, stride_lh,
    H, Sq, T, num_tiles, sm_scale, qk_scale,
    LT, KT, ST, DT, CT, LH, KH, SH, DH, CH, LW, KW, SW, DW, CW,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
    HAS_TEXT_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, SKIP_FULL: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    q_off = off_b * stride_qb + off_h * stride_qh + offs_d[None, :] * stride_qd
    do_off = off_b * stride_dob + off_h * stride_doh + offs_d[None, :] * stride_dod
    l_off = off_b * stride_lb + off_h * stride_lh
    dk = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
    if pid < num_tiles:
        k_start, k_count, kt, kh, kw = _tile_coords(Tiles, pid, offs)
        n_valid = offs < k_count
        k_rows = (k_start + offs).to(tl.int64)
        kv_mask = n_valid[:, None] & d_mask[None, :]
        k = tl.load(K + off_b * stride_kb + off_h * stride_kh + k_rows[:, None] * stride_kn
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + off_b * stride_vb + off_h * stride_vh + k_rows[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        lo = tl.load(TOffsets + pid)
        hi = tl.load(TOffsets + pid + 1)
        mid = lo + tl.load(TNFull + pid)
        if SKIP_FULL:
            lo = mid
        all_m = offs < BLOCK
        for it in range(lo, mid):
            tile_q = tl.load(TIndices + it)
            rows = (tl.load(Tiles + tile_q * 8) + offs).to(tl.int64)
            q, do, lse, delta = _load_q_side(Q, DO, Lse, Delta, q_off, do_off, l_off, rows, all_m, d_mask,
                                             stride_qm, stride_dom)
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, n_valid[:, None], qk_scale, False, DOT_PRECISION)
        for it in range(mid, hi):
            tile_q = tl.load(TIndices + it)
            q_start, q_count, qt, qh, qw = _tile_coords(Tiles, tile_q, offs)
            m_valid = offs < q_count
            rows = (q_start + offs).to(tl.int64)
            q, do, lse, delta = _load_q_side(Q, DO, Lse, Delta, q_off, do_off, l_off, rows, m_valid, d_mask,
                                             stride_qm, stride_dom)
            win = _query_windows(qt, qh, qw, LT, KT, ST, DT, CT, LH, KH, SH, DH, CH, LW, KW, SW, DW, CW)
            maskT = tl.trans(_window_mask(win, kt, kh, kw, DT, DH, DW))
            maskT = maskT & n_valid[:, None] & m_valid[None, :]
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, maskT, qk_scale, True, DOT_PRECISION)
        dk *= sm_scale
        tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + k_rows[:, None] * stride_dkn
                 + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + k_rows[:, None] * stride_dvn
                 + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)
    else:
        start_n = (pid - num_tiles) * BLOCK
        n_in = start_n + offs < T
        n_valid = n_in
        if HAS_TEXT_MASK:
            vis = tl.load(EMask + off_b * stride_emb + start_n + offs, mask=n_in, other=0)
            n_valid = n_valid & (vis != 0)
        e_rows = (start_n + offs).to(tl.int64)
        kv_mask = n_in[:, None] & d_mask[None, :]
        k = tl.load(EK + off_b * stride_ekb + off_h * stride_ekh + e_rows[:, None] * stride_ekn
                    + offs_d[None, :] * stride_ekd, mask=kv_mask, other=0.0)
        v = tl.load(EV + off_b * stride_evb + off_h * stride_evh + e_rows[:, None] * stride_evn
                    + offs_d[None, :] * stride_evd, mask=kv_mask, other=0.0)
        for start_m in range(0, Sq, BLOCK):
            m_valid = start_m + offs < Sq
            rows = (start_m + offs).to(tl.int64)
            q, do, lse, delta = _load_q_side(Q, DO, Lse, Delta, q_off, do_off, l_off, rows, m_valid, d_mask,
                                             stride_qm, stride_dom)
            maskT = n_valid[:, None] & m_valid[None, :]
            dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, maskT, qk_scale, True, DOT_PRECISION)
        dk *= sm_scale
        tl.store(DEK + off_b * stride_dekb + off_h * stride_dekh + e_rows[:, None] * stride_dekn
                 + offs_d[None, :] * stride_dekd, dk.to(DEK.dtype.element_ty), mask=kv_mask)
        tl.store(DEV + off_b * stride_devb + off_h * stride_devh + e_rows[:, None] * stride_devn
                 + offs_d[None, :] * stride_devd, dv.to(DEV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, kT, vT, mask, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(mask, p, 0.0)
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)


@triton.jit
def _nbhd_dq_kernel(
    Q, K, V, EK, EV, EMask, DO, Lse, Delta, DQ, Tiles, Offsets, NFull, Indices,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    H, T, sm_scale, qk_scale,
    LT, KT, ST, DT, CT, LH, KH, SH, DH, CH, LW, KW, SW, DW, CW,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, SKIP_FULL: tl.constexpr,
):
    tile_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    q_start, q_count, qt, qh, qw = _tile_coords(Tiles, tile_q, offs)
    m_valid = offs < q_count
    win = _query_windows(qt, qh, qw, LT, KT, ST, DT, CT, LH, KH, SH, DH, CH, LW, KW, SW, DW, CW)
    q_rows = (q_start + offs).to(tl.int64)
    q_off = off_b * stride_qb + off_h * stride_qh + offs_d[None, :] * stride_qd
    do_off = off_b * stride_dob + off_h * stride_doh + offs_d[None, :] * stride_dod
    l_off = off_b * stride_lb + off_h * stride_lh
    q, do, lse, delta = _load_q_side(Q, DO, Lse, Delta, q_off, do_off, l_off, q_rows, m_valid, d_mask,
                                     stride_qm, stride_dom)
    dq = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
    k_base = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None] * stride_kd
    v_base = V + off_b * stride_vb + off_h * stride_vh + offs_d[:, None] * stride_vd
    lo = tl.load(Offsets + tile_q)
    hi = tl.load(Offsets + tile_q + 1)
    mid = lo + tl.load(NFull + tile_q)
    if SKIP_FULL:
        lo = mid
    for it in range(lo, mid):
        tile_k = tl.load(Indices + it) & _INDEX_MASK
        rows = (tl.load(Tiles + tile_k * 8) + offs).to(tl.int64)
        kT = tl.load(k_base + rows[None, :] * stride_kn, mask=d_mask[:, None], other=0.0)
        vT = tl.load(v_base + rows[None, :] * stride_vn, mask=d_mask[:, None], other=0.0)
        dq = _dq_step(dq, q, do, lse, delta, kT, vT, m_valid[:, None], qk_scale, False, DOT_PRECISION)
    for it in range(mid, hi):
        tile_k = tl.load(Indices + it) & _INDEX_MASK
        k_start, k_count, kt, kh, kw = _tile_coords(Tiles, tile_k, offs)
        n_valid = offs < k_count
        rows = (k_start + offs).to(tl.int64)
        kT = tl.load(k_base + rows[None, :] * stride_kn, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        vT = tl.load(v_base + rows[None, :] * stride_vn, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        mask = n_valid[None, :] & _window_mask(win, kt, kh, kw, DT, DH, DW)
        dq = _dq_step(dq, q, do, lse, delta, kT, vT, mask, qk_scale, True, DOT_PRECISION)
    if HAS_TEXT:
        ek_base = EK + off_b * stride_ekb + off_h * stride_ekh + offs_d[:, None] * stride_ekd
        ev_base = EV + off_b * stride_evb + off_h * stride_evh + offs_d[:, None] * stride_evd
        for start_n in range(0, T, BLOCK):
            n_in = start_n + offs < T
            n_valid = n_in
            if HAS_TEXT_MASK:
                vis = tl.load(EMask + off_b * stride_emb + start_n + offs, mask=n_in, other=0)
                n_valid = n_valid & (vis != 0)
            rows = start_n + offs
            kT = tl.load(ek_base + rows[None, :] * stride_ekn, mask=n_in[None, :] & d_mask[:, None], other=0.0)
            vT = tl.load(ev_base + rows[None, :] * stride_evn, mask=n_in[None, :] & d_mask[:, None], other=0.0)
            dq = _dq_step(dq, q, do, lse, delta, kT, vT, n_valid[None, :], qk_scale, True, DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + q_rows[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def _num_warps(block: int, hdp: int) -> int:
    return 8 if block * hdp >= 128 * 128 else 4


def _launch_fwd(q, kv, ekv, emask, plan_t, params, block, scale, out, lse, skip_full=False) -> None:
    k, v = kv
    ek, ev = ekv
    tiles, offsets, nfull, indices = plan_t
    B, _, H, D = q.shape
    T = ek.shape[1] if ek is not None else 0
    hdp = head_dim_pad(D)
    _nbhd_fwd_kernel[(tiles.shape[0], B * H)](
        q, k, v, ek if ek is not None else q, ev if ev is not None else q, emask if emask is not None else q,
        out, lse, tiles, offsets, nfull, indices,
        *q.stride(), *k.stride(), *v.stride(), *strides4(ek), *strides4(ev),
        emask.stride(0) if emask is not None else 0, *out.stride(), lse.stride(0), lse.stride(1),
        H, T, scale * LOG2E, *params,
        HEAD_DIM=D, HEAD_DIM_PAD=hdp, BLOCK=block, HAS_TEXT=T > 0, HAS_TEXT_MASK=emask is not None,
        WRITE_LSE=True, DOT_PRECISION=dot_precision(q.dtype), DILATED=any(d > 1 for d in params[3::5]),
        SKIP_FULL=skip_full, num_warps=_num_warps(block, hdp), num_stages=2,
    )


def _launch_bwd(do, q, kv, ekv, emask, lse, delta, plan_t, params, block, scale, dq, dkv, dekv,
                skip_full=False) -> None:
    k, v = kv
    ek, ev = ekv
    dk, dv = dkv
    dek, dev_ = dekv
    tiles, offsets, nfull, indices, t_offsets, t_nfull, t_indices = plan_t
    B, Sq, H, D = q.shape
    T = ek.shape[1] if ek is not None else 0
    hdp = head_dim_pad(D)
    nt = tiles.shape[0]
    common = dict(HEAD_DIM=D, HEAD_DIM_PAD=hdp, BLOCK=block, HAS_TEXT_MASK=emask is not None,
                  DOT_PRECISION=dot_precision(q.dtype), SKIP_FULL=skip_full, num_warps=_num_warps(block, hdp),
                  num_stages=1)
    ekp = (ek if ek is not None else q, ev if ev is not None else q, emask if emask is not None else q)
    _nbhd_dkdv_kernel[(nt + (triton.cdiv(T, block) if T else 0), B * H)](
        q, k, v, *ekp, do, lse, delta, dk, dv, dek if dek is not None else dk, dev_ if dev_ is not None else dv,
        tiles, t_offsets, t_nfull, t_indices,
        *q.stride(), *k.stride(), *v.stride(), *strides4(ek), *strides4(ev),
        emask.stride(0) if emask is not None else 0,
        *do.stride(), *dk.stride(), *dv.stride(), *strides4(dek), *strides4(dev_),
        lse.stride(0), lse.stride(1), H, Sq, T, nt, scale, scale * LOG2E, *params, **common,
    )
    _nbhd_dq_kernel[(nt, B * H)](
        q, k, v, *ekp, do, lse, delta, dq, tiles, offsets, nfull, indices,
        *q.stride(), *k.stride(), *v.stride(), *strides4(ek), *strides4(ev),
        emask.stride(0) if emask is not None else 0,
        *do.stride(), *dq.stride(), lse.stride(0), lse.stride(1), H, T, scale, scale * LOG2E, *params,
        HAS_TEXT=T > 0, **common,
    )


def _parts(k: Tensor, parts: list[int]):
    v0, vl, t0, tl_ = parts
    kv = k[:, v0:v0 + vl]
    ek = k[:, t0:t0 + tl_] if tl_ else None
    return kv, ek


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("accel::neighborhood_fwd", mutates_args=())
def neighborhood_fwd(
    q: Tensor, k: Tensor, v: Tensor, text_vis: Tensor | None,
    tiles: Tensor, offsets: Tensor, nfull: Tensor, indices: Tensor,
    t_offsets: Tensor, t_nfull: Tensor, t_indices: Tensor,
    params: list[int], parts: list[int], block: int, scale: float, skip_full: bool,
    text_lengths: Tensor | None, box: list[Tensor], ragged: bool, box_meta: list[int],
) -> tuple[Tensor, Tensor]:
    """Triton forward over tile-major video queries q (B, V, H, D) and the joint k, v: (out, lse (B, H, V)).

    ``skip_full``: leave out the unmasked tile pairs (they run in the block-sparse kernel and are merged).
    ``box``: [row_lo, row_hi, key (`BoxMask`), all-pairs CSR offsets, indices] (`TilePlan.box`,
    `TilePlan.all_blocks`): run every pair in the block-sparse pipelined forward kernel (TMA loads on Hopper)
    with the window as a per-token box mask; ``ragged``: some tiles are partial (rows from ``tiles``);
    ``box_meta``: [form (`BOX_FORM_CODES`), tile T, H, W] of the box mask (`fwd_pipelined.launch`)."""
    B, V, H, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, V, dtype=torch.float32, device=q.device)
    if box:
        from ._common import KeyParts
        from .layout import BlockLayout, BoxMask
        from .triton_impl import forward

        n = offsets.shape[0] - 1
        layout = BlockLayout(box[3], box[4], block, block, n, n)
        mask = None if text_lengths is not None or text_vis is None else text_vis != 0
        forward(q, k, v, layout, KeyParts(*parts), text_lengths, mask, scale, out, lse, box=BoxMask(*box[:3]),
                blocks=tiles if ragged else None, box_mask_form=BOX_FORM_CODES[box_meta[0]],
                box_tile=tuple(box_meta[1:4]))
        return out, lse
    kv, ek = _parts(k, parts)
    vv, ev = _parts(v, parts)
    _launch_fwd(q, (kv, vv), (ek, ev), text_vis, (tiles, offsets, nfull, indices), params, block, scale, out, lse,
                skip_full)
    return out, lse


@neighborhood_fwd.register_fake
def _(q, k, v, text_vis, tiles, offsets, nfull, indices, t_offsets, t_nfull, t_indices, params, parts, block,
      scale, skip_full, text_lengths, box, ragged, box_meta):
    B, V, H, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(B, H, V, dtype=torch.float32, device=q.device))


@torch.library.custom_op("accel::neighborhood_bwd", mutates_args=())
def neighborhood_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
    text_vis: Tensor | None, tiles: Tensor, offsets: Tensor, nfull: Tensor, indices: Tensor,
    t_offsets: Tensor, t_nfull: Tensor, t_indices: Tensor,
    params: list[int], parts: list[int], block: int, scale: float, skip_full: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: dq and the gradients of the whole joint k, v (zero on rows that are neither part).

    ``dlse`` (B, H, V): the gradient reaching the LSE output (a merge uses it): dS = P * (dP - (delta - dlse)).
    """
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    kv, ek = _parts(k, parts)
    vv, ev = _parts(v, parts)
    dkv, dek = _parts(dk, parts)
    dvv, dev_ = _parts(dv, parts)
    _launch_bwd(dout, q, (kv, vv), (ek, ev), text_vis, lse, delta,
                (tiles, offsets, nfull, indices, t_offsets, t_nfull, t_indices), params, block, scale, dq,
                (dkv, dvv), (dek, dev_), skip_full)
    return dq, dk, dv


@neighborhood_bwd.register_fake
def _(dout, q, k, v, out, lse, *args):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, text_vis, *plan_t = inputs[:11]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, text_vis, *plan_t)
    ctx.meta = inputs[11:16]  # params, parts, block, scale, skip_full (the backward needs no box)
    ctx.box_len = len(inputs[17])
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, text_vis, *plan_t = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.accel.neighborhood_bwd(dout, q, k, v, out, lse, dlse, text_vis, *plan_t, *ctx.meta)
    # One entry per input, the box list as a list (torch.library matches the input structure).
    return (dq, dk, dv) + (None,) * 14 + ([None] * ctx.box_len, None, None)


torch.library.register_autograd("accel::neighborhood_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- public API
def can_run_neighborhood(q: Tensor, raise_error: bool = False) -> bool:
    """Whether the Triton kernel can run on q's device and dtype (CUDA, or CPU under TRITON_INTERPRET=1)."""
    reason = triton_input_reason(q)
    if reason and raise_error:
        raise NotImplementedError(f"neighborhood kernel cannot run: {reason}")
    return reason is None


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: TilePlan,
    *,
    video_keys: tuple[int, int] | None = None,
    text_keys: tuple[int, int] | None = None,
    text_lengths: Tensor | None = None,
    text_mask: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    split: bool | None = None,
    box: bool | None = None,
    box_mask_form: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Neighborhood attention of tile-major video queries over the joint k/v (NATTEN semantics per `plan`).

    Args:
        q: (B, V, H, D) video queries in the plan's tile-major order (any strides); fp16/bf16/fp32, D <= 256.
        k, v: (B, S, H, D) joint buffers read in place: rows ``video_keys`` (start, V) are the video keys in
            the same tile-major order, rows ``text_keys`` (start, T) keys every query sees.
        plan: `build_tile_plan` result for the grid (on q's device).
        text_lengths: (B,) int: only the first ``text_lengths[b]`` text keys are visible; or ``text_mask``
            (B, T) bool, True = visible. Read on the device (no host sync).
        scale: softmax scale (default 1/sqrt(D)).
        return_lse: also return the (B, H, V) float32 log-sum-exp.
        split: run the unmasked tile pairs in the block-sparse kernel and the rest in this module's kernel,
            merged by their LSEs (needs every tile complete: `TilePlan.full_blocks`). None: when at least
            `SPLIT_MIN_SHARE` of the pairs are unmasked and the box path does not apply.
        box: run every pair in the block-sparse pipelined forward with the window as a per-token box mask
            (`TilePlan.box`: no dilation; partial tiles need compute tiles equal to the plan's block, see
            `box_path_runs`; the backward stays this module's). None: whenever it can and ``split`` is not True.
        box_mask_form: how the box path applies the mask, "swar" or "mma" (None: ``ACCEL_BOX_MASK``; see
            `fwd_pipelined.launch`).

    A plan whose visited pairs are all unmasked (blocked windows, GNA/STA strides) runs as plain block-sparse
    attention, text keys included, forward and backward.

    Returns:
        (B, V, H, D) output (and LSE). Differentiable in q, k, v (Triton backward).
    """
    can_run_neighborhood(q, raise_error=True)
    if box_mask_form not in BOX_FORM_CODES:
        raise ValueError(f"box_mask_form must be None, 'swar' or 'mma', got {box_mask_form!r}")
    B, V, H, D = q.shape
    if V != plan.video_tokens:
        raise ValueError(f"q has {V} video tokens, the plan's grid {plan.grid} has {plan.video_tokens}")
    if k.shape != v.shape or k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be (B, S, H, D) matching q, got q={tuple(q.shape)}, k={tuple(k.shape)}, "
                         f"v={tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    parts = resolve_key_parts(k.shape[1], video_keys, text_keys)
    if parts.video_len != V:
        raise ValueError(f"video_keys cover {parts.video_len} rows, q has {V} video tokens")
    if text_lengths is not None and text_mask is not None:
        raise ValueError("give text_lengths (trailing padding) or text_mask, not both")
    if not parts.text_len:
        text_lengths = text_mask = None
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    plan = plan.to(q.device) if plan.tiles.device != q.device else plan
    if box and not box_path_runs(q, plan):
        raise ValueError("box=True needs a plan with a box mask (TilePlan.box: no dilation) and, for partial "
                         "tiles, compute tiles equal to the plan's block")
    if split and plan.full_blocks is None:
        raise ValueError("split=True needs a plan whose tiles are all complete (TilePlan.full_blocks)")
    if plan.full_blocks is not None and plan.full_pairs == plan.pairs and not box:
        from .block_sparse import block_sparse_attention

        text = (parts.text_start, parts.text_len) if parts.text_len else None
        return block_sparse_attention(q, k, v, plan.full_blocks, video_keys=(parts.video_start, V), text_keys=text,
                                      text_lengths=text_lengths, text_mask=text_mask, scale=scale,
                                      return_lse=return_lse)
    if box is None:
        box = not split and box_path_runs(q, plan)
    vis = text_visibility(parts.text_len, text_lengths, text_mask, torch.int8) if parts.text_len else None
    if box:
        split = False
    elif split is None:
        split = plan.full_blocks is not None and plan.full_pairs >= SPLIT_MIN_SHARE * max(plan.pairs, 1)
    if split:
        from .block_sparse import block_sparse_attention

        full_out, full_lse = block_sparse_attention(q, k, v, plan.full_blocks, video_keys=(parts.video_start, V),
                                                    scale=scale, return_lse=True)
    box_t = _box_tensors(plan) if box else []
    lengths = text_lengths.to(torch.int32) if box and text_lengths is not None else None
    out, lse = torch.ops.accel.neighborhood_fwd(
        q, k, v, vis, plan.tiles, plan.offsets, plan.nfull, plan.indices, plan.t_offsets, plan.t_nfull,
        plan.t_indices, plan.params(), list(parts), plan.block, scale, bool(split), lengths, box_t, plan.ragged,
        [BOX_FORM_CODES.index(box_mask_form), *plan.tile])
    if split:
        out, lse = merge_partial_attention(full_out, full_lse, out, lse)
    return (out, lse) if return_lse else out


def _box_tensors(plan: TilePlan) -> list[Tensor]:
    """The box path's tensors in `neighborhood_fwd`'s order."""
    b = plan.box
    return [b.row_lo, b.row_hi, b.key, plan.all_blocks.offsets, plan.all_blocks.indices]


def box_path_runs(q: Tensor, plan: TilePlan) -> bool:
    """Whether the box path can run this call: the plan has a box, and for partial tiles the pipelined
    forward's compute tile equals the plan's block (fp32 on a GPU uses smaller tiles: no)."""
    if plan.box is None:
        return False
    if not plan.ragged:
        return True
    from .configs import head_dim_pad, pick_config

    cfg = pick_config("fwd", plan.block, plan.block, head_dim_pad(q.shape[-1]), q.device, q.dtype).pipelined()
    return (cfg.block_m, cfg.block_n) == (plan.block, plan.block)


SPLIT_MIN_SHARE = 0.25  # unmasked share of tile pairs from which the split path pays for its merge


def merge_partial_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """One softmax from two over disjoint key sets: outputs (B, S, H, D) weighted by their (B, H, S) LSEs.

    A row empty in one part (LSE -inf) takes the other's output. Differentiable (through both LSEs)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    fa = (wa / safe).transpose(1, 2).unsqueeze(-1)
    fb = (wb / safe).transpose(1, 2).unsqueeze(-1)
    out = (out_a.float() * fa + out_b.float() * fb).to(out_a.dtype)
    return out, m + torch.log(total)
