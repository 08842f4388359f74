"""Block-sparse flash attention (forward and backward) over a :class:`BlockLayout`, in Triton.

FlashAttention-2 online softmax (Dao, 2023) restricted to the (query block, key block) tiles a CSR
layout lists, plus optional "extra" keys (text tokens) that every query sees inside the same softmax.
Tensors use diffusers' (batch, tokens, heads, head_dim) layout with arbitrary strides: callers pass
slices of bigger buffers and nothing is transposed or copied.

On Hopper the forward (head dim 128) and the backward run warp-specialised kernels: Triton's automatic warp
specialisation splits each 128-row tile over two consumer warp groups fed by a TMA producer warp group
(FA3's overlap of one group's softmax with the other's matmuls). They read and write everything through
tensor descriptors and need 128x128 blocks; other calls take the pipelined kernels, which run anywhere
(any GPU, the interpreter). benchmarks/NOTES.md has the measurements behind every choice.

File order: kernels -> launchers -> autograd Function -> public function.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .layout import BlockLayout

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k, v, n_valid, qk_scale, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) online-softmax step; k is (HEAD_DIM_PAD, BLOCK_N). n_valid used if MASK_N."""
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASK_N:
        qk = tl.where(n_valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A tile whose keys are all hidden must not turn -inf - -inf into NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _load_kv(k_ptrs, v_ptrs, n_valid, d_mask, MASK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """K tile transposed (HEAD_DIM_PAD, BLOCK_N) and V tile (BLOCK_N, HEAD_DIM_PAD) through pointers."""
    if MASK_N:
        k = tl.load(k_ptrs, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_valid[:, None] & d_mask[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    return k, v


@triton.jit
def _fwd_kernel(
    Q, K, V, EK, EV, EMask, Out, Lse, Offsets, Indices,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh,
    stride_offl, stride_idxl,
    H, Sq, Sk, T, num_k_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_MASK: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    SUB_M: tl.constexpr = BLOCK_Q // BLOCK_M
    SUB_N: tl.constexpr = BLOCK_K // BLOCK_N
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    qb = pid_m // SUB_M
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < Sq

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = (K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn
              + offs_d[:, None] * stride_kd)
    v_base = (V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn
              + offs_d[None, :] * stride_vd)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    if LAYOUT_PER_HEAD:
        layout_off = off_h
    else:
        layout_off = 0
    row_offsets = Offsets + layout_off * stride_offl + qb
    row_idx = Indices + layout_off * stride_idxl
    lo = tl.load(row_offsets)
    hi = tl.load(row_offsets + 1)
    # Only the last key block can be a partial one (indices are sorted): it alone is masked.
    n_full = hi
    if hi > lo:
        last = tl.load(row_idx + hi - 1)
        if (last + 1) * BLOCK_K > Sk:
            n_full = hi - 1
    all_n = offs_n < BLOCK_N
    if USE_TMA:
        # Hopper bulk copies; rows past Sk and columns past HEAD_DIM arrive as zeros.
        k_desc = _rows_desc(K + off_b * stride_kb + off_h * stride_kh, Sk, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
        v_desc = _rows_desc(V + off_b * stride_vb + off_h * stride_vh, Sk, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    for it in range(lo * SUB_N, n_full * SUB_N):
        kb = tl.load(row_idx + it // SUB_N)
        start_n = kb * BLOCK_K + (it % SUB_N) * BLOCK_N
        if USE_TMA:
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
        else:
            k, v = _load_kv(k_base + start_n.to(tl.int64) * stride_kn, v_base + start_n.to(tl.int64) * stride_vn,
                            all_n, d_mask, False, EVEN_D)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, all_n, qk_scale, False, DOT_PRECISION)
    for it in range(n_full * SUB_N, hi * SUB_N):
        kb = tl.load(row_idx + it // SUB_N)
        start_n = kb * BLOCK_K + (it % SUB_N) * BLOCK_N
        n_valid = start_n + offs_n < Sk
        if USE_TMA:  # rows past Sk arrive as zeros; n_valid hides them from the softmax
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
        else:
            k, v = _load_kv(k_base + start_n.to(tl.int64) * stride_kn, v_base + start_n.to(tl.int64) * stride_vn,
                            n_valid, d_mask, True, EVEN_D)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, n_valid, qk_scale, True, DOT_PRECISION)
    if HAS_EXTRA:
        ek_base = (EK + off_b * stride_ekb + off_h * stride_ekh
                   + offs_n[None, :] * stride_ekn + offs_d[:, None] * stride_ekd)
        ev_base = (EV + off_b * stride_evb + off_h * stride_evh
                   + offs_n[:, None] * stride_evn + offs_d[None, :] * stride_evd)
        for start_n in range(0, T, BLOCK_N):
            n_valid = start_n + offs_n < T
            if HAS_EXTRA_MASK:
                vis = tl.load(EMask + off_b * stride_emb + start_n + offs_n, mask=n_valid, other=0)
                n_valid = n_valid & (vis != 0)
            k, v = _load_kv(ek_base + start_n * stride_ekn, ev_base + start_n * stride_evn, n_valid, d_mask,
                            True, EVEN_D)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, n_valid, qk_scale, True, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=m_mask)


@triton.jit
def _rows_desc(base, rows, stride_row, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Descriptor over one (batch, head) slice of a (B, S, H, D) tensor: rows x HEAD_DIM, BLOCK-row tiles.

    Loads past the last row or column arrive as zeros; stores there are dropped.
    """
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK, HEAD_DIM_PAD])


@triton.jit
def _vec_desc(base, n, BLOCK: tl.constexpr):
    """Descriptor over a contiguous float32 row (LSE, Delta) of length n; base must be 16-byte aligned."""
    return tl.make_tensor_descriptor(base, shape=[n], strides=[1], block_shape=[BLOCK])


@triton.jit
def _fwd_ws_kernel(
    Q, K, V, TextLen, Out, Lse, Offsets, Indices,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_offl, stride_idxl,
    H, Sq, Sk, T, video_row, text_row, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, WRITE_LSE: tl.constexpr, MASK_KEYS: tl.constexpr,
    HAS_TEXT_LEN: tl.constexpr,
):
    """Hopper forward with Triton's automatic warp specialisation (FA3-style producer/consumers).

    One TMA producer warp group feeds two consumer warp groups of 64 query rows each, so one group's
    softmax overlaps the other's matmuls. Every load and store goes through tensor descriptors: under
    warp specialisation Triton 3.6 computes pointer-store addresses wrongly (benchmarks/NOTES.md).
    K and V hold the Sk video keys (from row ``video_row``) and the T extra (text) keys (from row
    ``text_row``) in one buffer of Sk + T rows; one loop visits the layout's key blocks, then the text
    tiles (a second loop would turn specialisation off). Text padding must be trailing: ``TextLen`` (B,)
    gives each batch's visible text keys and the loop stops there (a per-tile mask load in the loop
    stops specialisation from compiling or, through a descriptor, made it 2.7x slower). Needs one compute
    tile per layout block.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    q_desc = _rows_desc(Q + off_b * stride_qb + off_h * stride_qh, Sq, stride_qm, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    k_desc = _rows_desc(K + off_b * stride_kb + off_h * stride_kh, Sk + T, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    v_desc = _rows_desc(V + off_b * stride_vb + off_h * stride_vh, Sk + T, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    o_desc = _rows_desc(Out + off_b * stride_ob + off_h * stride_oh, Sq, stride_om, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    q = q_desc.load([start_m, 0])  # rows past Sq arrive as zeros and are never stored
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if LAYOUT_PER_HEAD:
        layout_off = off_h
    else:
        layout_off = 0
    row_offsets = Offsets + layout_off * stride_offl + pid_m
    row_idx = Indices + layout_off * stride_idxl
    lo = tl.load(row_offsets)
    hi = tl.load(row_offsets + 1)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_TEXT_LEN:
        T = tl.load(TextLen + off_b)
    # Keys past the end of their part (the video tail tile reads into the text, a text tile past T) and
    # padded text keys get a -inf bias; compiled in only when a tile can hold such keys.
    for it in tl.range(lo, hi + tl.cdiv(T, BLOCK_N), warp_specialize=True):
        is_video = it < hi
        kb = tl.load(row_idx + it, mask=is_video, other=0)
        local_n = tl.where(is_video, kb, it - hi) * BLOCK_N  # first key of the tile within its part
        start_n = local_n + tl.where(is_video, video_row, text_row)
        k = k_desc.load([start_n, 0]).T
        v = v_desc.load([start_n, 0])
        qk = tl.dot(q, k)
        if MASK_KEYS:
            qk = qk * qk_scale + tl.where(local_n + offs_n < tl.where(is_video, Sk, T), 0.0, float("-inf"))[None, :]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # Every tile holds a real key, but keep -inf - -inf from ever turning into NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_desc.store([start_m, 0], out.to(Out.dtype.element_ty))
    if WRITE_LSE:  # a 1-D descriptor: each (b, h) row of Lse starts 16-byte aligned (see _alloc_lse)
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        l_desc = _vec_desc(Lse + off_b * stride_lb + off_h * stride_lh, Sq, BLOCK_M)
        l_desc.store([start_m], lse)


@triton.jit
def _bwd_preprocess(
    Out, DO, DLse, Delta,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,
    H, Sq,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Delta = rowsum(dO * O) - dLse (the LSE gradient folds into Delta: dS = P * (dP - Delta))."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_off = off_b * stride_lb + off_h * stride_lh + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + l_off, mask=offs_m < Sq, other=0.0)
    tl.store(Delta + l_off, delta, mask=offs_m < Sq)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, m_valid, n_valid, d_mask, qk_scale,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate one query tile into dK, dV of a key tile (key-major: everything transposed)."""
    if MASK_M:
        qT = tl.load(q_ptrs, mask=m_valid[None, :] & d_mask[:, None], other=0.0)
        # +inf LSE makes P = 0 for rows past Sq and rows that see nothing (LSE = -inf).
        lse = tl.load(lse_ptrs, mask=m_valid, other=float("inf"))
        do = tl.load(do_ptrs, mask=m_valid[:, None] & d_mask[None, :], other=0.0)
        delta = tl.load(delta_ptrs, mask=m_valid, other=0.0)
    else:
        if EVEN_D:
            qT = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            qT = tl.load(q_ptrs, mask=d_mask[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=d_mask[None, :], other=0.0)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
    pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
    if MASK_N:
        pT = tl.where(n_valid[:, None], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, EK, EV, EMask, DO, Lse, Delta, DK, DV, DEK, DEV, TOffsets, TIndices,
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
    stride_offl, stride_idxl,
    H, Sq, Sk, T, num_extra_tiles, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    SUB_M: tl.constexpr = BLOCK_Q // BLOCK_M
    SUB_N: tl.constexpr = BLOCK_K // BLOCK_N
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM

    qT_base = (Q + off_b * stride_qb + off_h * stride_qh + offs_m[None, :] * stride_qm
               + offs_d[:, None] * stride_qd)
    do_base = (DO + off_b * stride_dob + off_h * stride_doh
               + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod)
    lse_base = Lse + off_b * stride_lb + off_h * stride_lh + offs_m
    delta_base = Delta + off_b * stride_lb + off_h * stride_lh + offs_m

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    all_m = offs_m < BLOCK_M
    # Extra-key tiles come first in the grid: they visit every query, so they are the longest programs.
    if pid_n < num_extra_tiles:
        start_n = pid_n * BLOCK_N
        n_valid = start_n + offs_n < T
        if HAS_EXTRA_MASK:
            vis = tl.load(EMask + off_b * stride_emb + start_n + offs_n, mask=n_valid, other=0)
            n_valid = n_valid & (vis != 0)
        kv_mask = (start_n + offs_n < T)[:, None] & d_mask[None, :]
        k = tl.load(EK + off_b * stride_ekb + off_h * stride_ekh + (start_n + offs_n)[:, None] * stride_ekn
                    + offs_d[None, :] * stride_ekd, mask=kv_mask, other=0.0)
        v = tl.load(EV + off_b * stride_evb + off_h * stride_evh + (start_n + offs_n)[:, None] * stride_evn
                    + offs_d[None, :] * stride_evd, mask=kv_mask, other=0.0)
        q_ptrs = qT_base
        do_ptrs = do_base
        for start_m in range(0, Sq, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_base + start_m,
                delta_base + start_m, start_m + offs_m < Sq, n_valid, d_mask, qk_scale,
                True, True, EVEN_D, DOT_PRECISION,
            )
            # Advance pointers instead of multiplying: start_m * stride can pass 2**31.
            q_ptrs += BLOCK_M * stride_qm
            do_ptrs += BLOCK_M * stride_dom
        dk *= sm_scale
        e_rows = (start_n + offs_n)[:, None]
        tl.store(DEK + off_b * stride_dekb + off_h * stride_dekh + e_rows * stride_dekn
                 + offs_d[None, :] * stride_dekd, dk.to(DEK.dtype.element_ty), mask=kv_mask)
        tl.store(DEV + off_b * stride_devb + off_h * stride_devh + e_rows * stride_devn
                 + offs_d[None, :] * stride_devd, dv.to(DEV.dtype.element_ty), mask=kv_mask)
    else:
        pid_k = pid_n - num_extra_tiles
        kb = pid_k // SUB_N
        start_n = pid_k * BLOCK_N
        n_valid = start_n + offs_n < Sk
        kv_mask = n_valid[:, None] & d_mask[None, :]
        rows = (start_n + offs_n)[:, None].to(tl.int64)
        k = tl.load(K + off_b * stride_kb + off_h * stride_kh + rows * stride_kn
                    + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + off_b * stride_vb + off_h * stride_vh + rows * stride_vn
                    + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if LAYOUT_PER_HEAD:
            layout_off = off_h
        else:
            layout_off = 0
        col_offsets = TOffsets + layout_off * stride_offl + kb
        col_idx = TIndices + layout_off * stride_idxl
        lo = tl.load(col_offsets)
        hi = tl.load(col_offsets + 1)
        n_full = hi
        if hi > lo:
            last = tl.load(col_idx + hi - 1)
            if (last + 1) * BLOCK_Q > Sq:
                n_full = hi - 1
        for it in range(lo * SUB_M, n_full * SUB_M):
            qb = tl.load(col_idx + it // SUB_M)
            start_m = qb * BLOCK_Q + (it % SUB_M) * BLOCK_M
            sm = start_m.to(tl.int64)
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, qT_base + sm * stride_qm, do_base + sm * stride_dom, lse_base + start_m,
                delta_base + start_m, all_m, n_valid, d_mask, qk_scale,
                False, False, EVEN_D, DOT_PRECISION,
            )
        for it in range(n_full * SUB_M, hi * SUB_M):
            qb = tl.load(col_idx + it // SUB_M)
            start_m = qb * BLOCK_Q + (it % SUB_M) * BLOCK_M
            sm = start_m.to(tl.int64)
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, qT_base + sm * stride_qm, do_base + sm * stride_dom, lse_base + start_m,
                delta_base + start_m, start_m + offs_m < Sq, n_valid, d_mask, qk_scale,
                True, False, EVEN_D, DOT_PRECISION,
            )
        dk *= sm_scale
        tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + rows * stride_dkn
                 + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + rows * stride_dvn
                 + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, n_valid, d_mask, qk_scale,
    MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    if MASK_N:
        kT = tl.load(k_ptrs, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        vT = tl.load(v_ptrs, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
    elif EVEN_D:
        kT = tl.load(k_ptrs)
        vT = tl.load(v_ptrs)
    else:
        kT = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        vT = tl.load(v_ptrs, mask=d_mask[:, None], other=0.0)
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where(n_valid[None, :], p, 0.0)
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, EK, EV, EMask, DO, Lse, Delta, DQ, Offsets, Indices,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    stride_offl, stride_idxl,
    H, Sq, Sk, T, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    SUB_M: tl.constexpr = BLOCK_Q // BLOCK_M
    SUB_N: tl.constexpr = BLOCK_K // BLOCK_N
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    qb = pid_m // SUB_M
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < Sq
    qd_mask = m_mask[:, None] & d_mask[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom
                 + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)
    l_off = off_b * stride_lb + off_h * stride_lh + offs_m
    lse = tl.load(Lse + l_off, mask=m_mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    kT_base = (K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn
               + offs_d[:, None] * stride_kd)
    vT_base = (V + off_b * stride_vb + off_h * stride_vh + offs_n[None, :] * stride_vn
               + offs_d[:, None] * stride_vd)
    if LAYOUT_PER_HEAD:
        layout_off = off_h
    else:
        layout_off = 0
    row_offsets = Offsets + layout_off * stride_offl + qb
    row_idx = Indices + layout_off * stride_idxl
    lo = tl.load(row_offsets)
    hi = tl.load(row_offsets + 1)
    n_full = hi
    if hi > lo:
        last = tl.load(row_idx + hi - 1)
        if (last + 1) * BLOCK_K > Sk:
            n_full = hi - 1
    all_n = offs_n < BLOCK_N
    for it in range(lo * SUB_N, n_full * SUB_N):
        kb = tl.load(row_idx + it // SUB_N)
        start_n = (kb * BLOCK_K + (it % SUB_N) * BLOCK_N).to(tl.int64)
        dq = _bwd_dq_tile(dq, q, do, lse, delta, kT_base + start_n * stride_kn, vT_base + start_n * stride_vn,
                          all_n, d_mask, qk_scale, False, EVEN_D, DOT_PRECISION)
    for it in range(n_full * SUB_N, hi * SUB_N):
        kb = tl.load(row_idx + it // SUB_N)
        start_n = kb * BLOCK_K + (it % SUB_N) * BLOCK_N
        dq = _bwd_dq_tile(dq, q, do, lse, delta, kT_base + start_n.to(tl.int64) * stride_kn,
                          vT_base + start_n.to(tl.int64) * stride_vn, start_n + offs_n < Sk, d_mask, qk_scale,
                          True, EVEN_D, DOT_PRECISION)
    if HAS_EXTRA:
        ekT_base = (EK + off_b * stride_ekb + off_h * stride_ekh
                    + offs_n[None, :] * stride_ekn + offs_d[:, None] * stride_ekd)
        evT_base = (EV + off_b * stride_evb + off_h * stride_evh
                    + offs_n[None, :] * stride_evn + offs_d[:, None] * stride_evd)
        for start_n in range(0, T, BLOCK_N):
            n_valid = start_n + offs_n < T
            if HAS_EXTRA_MASK:
                vis = tl.load(EMask + off_b * stride_emb + start_n + offs_n, mask=n_valid, other=0)
                n_valid = n_valid & (vis != 0)
            dq = _bwd_dq_tile(dq, q, do, lse, delta, ekT_base + start_n * stride_ekn,
                              evT_base + start_n * stride_evn, n_valid, d_mask, qk_scale, True, EVEN_D,
                              DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_ws_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, TOffsets, TIndices,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    stride_offl, stride_idxl,
    H, Sq, Sk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_PER_HEAD: tl.constexpr,
):
    """dK, dV of one key tile, warp-specialised for Hopper like _fwd_ws_kernel (all I/O through TMA).

    No masks: rows past Sq arrive with dO = 0 and contribute nothing; key rows past Sk are never stored.
    """
    SUB_M: tl.constexpr = BLOCK_Q // BLOCK_M
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    q_desc = _rows_desc(Q + off_b * stride_qb + off_h * stride_qh, Sq, stride_qm, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    do_desc = _rows_desc(DO + off_b * stride_dob + off_h * stride_doh, Sq, stride_dom, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    lse_desc = _vec_desc(Lse + off_b * stride_lb + off_h * stride_lh, Sq, BLOCK_M)
    delta_desc = _vec_desc(Delta + off_b * stride_lb + off_h * stride_lh, Sq, BLOCK_M)
    k_desc = _rows_desc(K + off_b * stride_kb + off_h * stride_kh, Sk, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    v_desc = _rows_desc(V + off_b * stride_vb + off_h * stride_vh, Sk, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    if LAYOUT_PER_HEAD:
        layout_off = off_h
    else:
        layout_off = 0
    col_offsets = TOffsets + layout_off * stride_offl + pid_n
    col_idx = TIndices + layout_off * stride_idxl
    lo = tl.load(col_offsets)
    hi = tl.load(col_offsets + 1)
    for it in tl.range(lo * SUB_M, hi * SUB_M, warp_specialize=True):
        start_m = tl.load(col_idx + it // SUB_M) * BLOCK_Q + (it % SUB_M) * BLOCK_M
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        lse = lse_desc.load([start_m])
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = delta_desc.load([start_m])
        pT = tl.math.exp2(tl.dot(k, q.T) * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, do.T)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    dk_desc = _rows_desc(DK + off_b * stride_dkb + off_h * stride_dkh, Sk, stride_dkn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    dv_desc = _rows_desc(DV + off_b * stride_dvb + off_h * stride_dvh, Sk, stride_dvn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    dk_desc.store([start_n, 0], (dk * sm_scale).to(DK.dtype.element_ty))
    dv_desc.store([start_n, 0], dv.to(DV.dtype.element_ty))


@triton.jit
def _bwd_dq_ws_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Offsets, Indices,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    stride_offl, stride_idxl,
    H, Sq, Sk, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAYOUT_PER_HEAD: tl.constexpr,
):
    """dQ of one query tile, warp-specialised (all I/O through TMA).

    No masks: key rows past Sk arrive as zeros, so their dS meets K = 0 and adds nothing to dQ.
    """
    SUB_N: tl.constexpr = BLOCK_K // BLOCK_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    q_desc = _rows_desc(Q + off_b * stride_qb + off_h * stride_qh, Sq, stride_qm, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    do_desc = _rows_desc(DO + off_b * stride_dob + off_h * stride_doh, Sq, stride_dom, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    lse_desc = _vec_desc(Lse + off_b * stride_lb + off_h * stride_lh, Sq, BLOCK_M)
    delta_desc = _vec_desc(Delta + off_b * stride_lb + off_h * stride_lh, Sq, BLOCK_M)
    k_desc = _rows_desc(K + off_b * stride_kb + off_h * stride_kh, Sk, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    v_desc = _rows_desc(V + off_b * stride_vb + off_h * stride_vh, Sk, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    q = q_desc.load([start_m, 0])
    do = do_desc.load([start_m, 0])
    lse = lse_desc.load([start_m])
    # Rows past Sq (zero-filled) and rows that see nothing (LSE = -inf) get P = 0 through an LSE of +inf.
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = delta_desc.load([start_m])
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if LAYOUT_PER_HEAD:
        layout_off = off_h
    else:
        layout_off = 0
    row_offsets = Offsets + layout_off * stride_offl + pid_m
    row_idx = Indices + layout_off * stride_idxl
    lo = tl.load(row_offsets)
    hi = tl.load(row_offsets + 1)
    for it in tl.range(lo * SUB_N, hi * SUB_N, warp_specialize=True):
        start_n = tl.load(row_idx + it // SUB_N) * BLOCK_K + (it % SUB_N) * BLOCK_N
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        p = tl.math.exp2(tl.dot(q, k.T) * qk_scale - lse[:, None])
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    dq_desc = _rows_desc(DQ + off_b * stride_dqb + off_h * stride_dqh, Sq, stride_dqm, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    dq_desc.store([start_m, 0], (dq * sm_scale).to(DQ.dtype.element_ty))


# --------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class KernelConfig:
    """Compute tile (BLOCK_M x BLOCK_N, each dividing the layout's logical block) and launch knobs."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False  # forward only: K/V through Hopper tensor descriptors
    maxnreg: int | None = None  # register cap per thread (e.g. 128 for two 8-warp programs per SM)
    warp_specialize: bool = False  # the warp-specialised Hopper kernels (_fwd_ws_kernel, _bwd_*_ws_kernel)
    # What runs when a warp-specialised config cannot (extra keys on the backward, strides TMA refuses,
    # other blocks, other GPUs); None: this config itself, through the pipelined kernel.
    fallback: KernelConfig | None = None

    def pipelined(self) -> KernelConfig:
        """The config for the pipelined kernel when the warp-specialised one does not run."""
        return self.fallback if self.fallback is not None else self


# Forward, keyed by (compute capability major, head_dim_pad). Winners of the H100 sweeps in
# benchmarks/NOTES.md (bf16, S=32k, 25% tiles). D=128: the warp-specialised kernel (one TMA producer
# warp group, two 64-row consumer groups) 3.32 vs 3.47 ms for the pipelined 128x128/8-warp kernel.
# D=64: 128-key tiles with a 128-register cap run two programs per SM (82 KB shared each), whose
# softmax and matmuls overlap: 3.55-3.76 vs 4.08-4.12 ms; warp specialisation was slower there
# (3.96 vs 3.68 ms). sm80: untuned guesses.
_FWD_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 8, 2, tma=True, maxnreg=128),
    (9, 128): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(128, 128, 8, 3, tma=True)),
    (8, 64): KernelConfig(128, 64, 4, 3),
    (8, 128): KernelConfig(128, 64, 8, 3),
}
# Backward: dK/dV key-major with narrow query tiles, dQ query-major, as in FA2. Small 4-warp tiles won
# dK/dV on H100 (fwd+bwd 15.5 ms vs 16.0-21.3 for the other tiles at D=128).
# Hopper: warp-specialised kernels (H100 probe, fwd+bwd at 25% tiles: D=128 14.8 -> 11.9 ms with dK/dV
# 64 queries x 128 keys and dQ 128 x 128; D=64 16.1 -> 14.7 ms with 128 x 128 for both).
# Fallbacks: the pipelined kernels' sweep winners (round 1-2 in NOTES).
_BWD_DKDV_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(64, 64, 4, 3)),
    (9, 128): KernelConfig(64, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(32, 64, 4, 3)),
}
_BWD_DQ_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(64, 64, 4, 3)),
    (9, 128): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(128, 64, 8, 2)),
}
_DEFAULT_GPU_FWD = KernelConfig(64, 64, 4, 2)
# Below this many (batch, head, tile) units a padded-text call stays on the pipelined kernel: the
# warp-specialised one needs a host sync to check the padding. H100 (results/ws_text_probe.json): at 196k
# units the sync ate the gain (3.52 ms through the API vs 3.39 kernel-only vs 3.51 pipelined). That
# ~0.1 ms is ~0.1% of a HunyuanVideo call (~5M units, 81.6 ms radial attention in results/e2e.json).
_WS_MASK_MIN_TILES = 1_000_000
_DEFAULT_GPU_BWD = KernelConfig(64, 64, 4, 2)

# Test/benchmark hook: when set, these replace the tables above (tuple: fwd, dkdv, dq).
_CONFIG_OVERRIDE: list[KernelConfig | None] = [None, None, None]


def default_block_size(device: torch.device | str | None = None) -> int:
    """Logical layout block size that runs fastest on ``device``: 128 on Ampere/Hopper and newer, else 64."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        return 128 if major >= 8 else 64
    return 64


def _fit(cfg: KernelConfig, block_q: int, block_k: int, head_dim_pad: int, is_cuda: bool) -> KernelConfig:
    bm, bn = min(cfg.block_m, block_q), min(cfg.block_n, block_k)
    if is_cuda and head_dim_pad >= 256:  # register pressure: halve the tiles
        bm, bn = min(bm, 64), min(bn, 64)
    fallback = _fit(cfg.fallback, block_q, block_k, head_dim_pad, is_cuda) if cfg.fallback is not None else None
    return KernelConfig(bm, bn, cfg.num_warps, cfg.num_stages, cfg.tma, cfg.maxnreg if is_cuda else None,
                        cfg.warp_specialize and is_cuda, fallback)


def _pick(kind: int, table: dict, default: KernelConfig, block_q: int, block_k: int, hdp: int,
          device: torch.device, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    if _CONFIG_OVERRIDE[kind] is not None:
        return _fit(_CONFIG_OVERRIDE[kind], block_q, block_k, hdp, device.type == "cuda")
    if device.type != "cuda":  # interpreter: one tile per logical block
        return KernelConfig(block_q, block_k, 1, 1)
    if dtype == torch.float32:
        # The tables are tuned for 2-byte types; fp32 tiles of that size overflow shared memory
        # (128x128 at D=128 asked for 393 KB on an H100). fp32 is for checks, not speed.
        side = 64 if hdp <= 128 else 32
        return KernelConfig(min(side, block_q), min(side, block_k), 4, 2)
    major, _ = torch.cuda.get_device_capability(device)
    cfg = table.get((min(major, 9), hdp), default)
    return _fit(cfg, block_q, block_k, hdp, True)


# ------------------------------------------------------------------------------------------- launchers
def _launch_opts(cfg: KernelConfig) -> dict:
    return {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs promise fp32 accuracy: no silent tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _tma_ok(t: torch.Tensor) -> bool:
    """Tensor descriptors need Hopper+, 16-bit data, unit last stride and 16-byte aligned rows/heads."""
    if not (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and t.stride(-1) == 1):
        return False
    if torch.cuda.get_device_capability(t.device)[0] < 9 or not hasattr(tl, "make_tensor_descriptor"):
        return False
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all((st * es) % 16 == 0 for st in t.stride()[:-1])


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors need scratch memory: install a torch allocator unless one is set."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except Exception:  # layout of triton's private module changed: just set ours
        pass
    triton.set_allocator(_torch_alloc)


def _alloc_lse(B: int, H: int, Sq: int, device: torch.device) -> torch.Tensor:
    """(B, H, Sq) float32 LSE whose rows start 16-byte aligned (a view of (B, H, Sq rounded up to 4))."""
    return torch.empty(B, H, -(-Sq // 4) * 4, dtype=torch.float32, device=device)[..., :Sq]


def _lse_tma_ok(lse: torch.Tensor | None) -> bool:
    return lse is None or (lse.stride(-1) == 1 and lse.data_ptr() % 16 == 0
                           and all(st % 4 == 0 for st in lse.stride()[:-1]))


def _ws_ok(cfg: KernelConfig, q, out, lse, layout: BlockLayout) -> bool:
    """Whether the warp-specialised forward can take this call (else the pipelined kernel runs)."""
    return (cfg.warp_specialize and cfg.block_m == layout.block_m == 128 and cfg.block_n == layout.block_n
            and torch.cuda.get_device_capability(q.device)[0] == 9 and _tma_ok(q) and _tma_ok(out)
            and _lse_tma_ok(lse))


def _joint_keys(k: torch.Tensor, ek: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    """One buffer holding the video keys and the text keys: (base view, video row, text row).

    Diffusers' joint attention slices both parts out of one concatenated tensor; when they sit next to
    each other (text after or before the video, same strides) the base is that buffer and nothing is
    copied. Otherwise the two are concatenated once.
    """
    if ek is None:
        return k, 0, 0
    Sk, T = k.shape[1], ek.shape[1]
    es = k.element_size()
    if k.stride() == ek.stride():
        if ek.data_ptr() == k.data_ptr() + Sk * k.stride(1) * es:
            return k, 0, Sk
        if k.data_ptr() == ek.data_ptr() + T * ek.stride(1) * es:
            return ek, T, 0
    return torch.cat([k, ek], 1), 0, Sk


def _fwd_ws(q, k, v, layout, scale, out, lse, cfg, ek=None, ev=None, emask=None, require_tma: bool = True) -> bool:
    """Launch the warp-specialised forward; False (nothing launched) when K/V cannot be TMA-addressed."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    T = ek.shape[1] if ek is not None else 0
    kk, k_video_row, k_text_row = _joint_keys(k, ek)
    vv, v_video_row, v_text_row = _joint_keys(v, ev)
    if (k_video_row, k_text_row) != (v_video_row, v_text_row):
        kk, vv = torch.cat([k, ek], 1), torch.cat([v, ev], 1)
        k_video_row, k_text_row = 0, Sk
    if require_tma and not (_tma_ok(kk) and _tma_ok(vv)):
        return False
    text_len = None
    if emask is not None:  # trailing padding only: each batch's text is cut to its visible prefix
        visible = emask != 0
        text_len = visible.sum(1, dtype=torch.int32)
        if not bool((visible == (torch.arange(T, device=q.device) < text_len[:, None])).all()):
            return False
    _ensure_allocator()
    _fwd_ws_kernel[(triton.cdiv(Sq, cfg.block_m), B * H)](
        q, kk, vv, text_len if text_len is not None else layout.offsets, out, lse if lse is not None else out,
        layout.offsets, layout.indices,
        q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        layout.offsets.stride(0), layout.indices.stride(0),
        H, Sq, Sk, T, k_video_row, k_text_row, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=_head_dim_pad(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        LAYOUT_PER_HEAD=layout.heads > 1, WRITE_LSE=lse is not None,
        MASK_KEYS=Sk % cfg.block_n != 0 or T % cfg.block_n != 0 or emask is not None,
        HAS_TEXT_LEN=emask is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return True


def _ws_compile_failed(err: Exception) -> bool:
    """Whether ``err`` is Triton failing to build a warp-specialised kernel (then the pipelined one runs).

    Tested with triton 3.6 on the H100 and compiled for sm_90 with 3.9; a future Triton whose
    specialisation pass rejects these loops must cost speed, not the call.
    """
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    if isinstance(err, (CompilationError, OutOfResources)) or "PassManager" in str(err):
        warnings.warn(f"accel: the warp-specialised kernel did not build with triton {triton.__version__} "
                      f"({type(err).__name__}: {str(err)[:200]}); using the pipelined kernel", RuntimeWarning,
                      stacklevel=3)
        return True
    return False


def _fwd(q, k, v, layout, ek, ev, emask, scale, out, lse):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    T = ek.shape[1] if ek is not None else 0
    hdp = _head_dim_pad(D)
    cfg = _pick(0, _FWD_CONFIGS, _DEFAULT_GPU_FWD, layout.block_m, layout.block_n, hdp, q.device, q.dtype)
    if cfg.warp_specialize:
        # A padding mask costs one host sync (the trailing-padding check): worth it on big calls only.
        masked_small = emask is not None and B * H * layout.indices.shape[1] < _WS_MASK_MIN_TILES
        if _ws_ok(cfg, q, out, lse, layout) and not masked_small:
            try:
                if _fwd_ws(q, k, v, layout, scale, out, lse, cfg, ek, ev, emask):
                    return
            except Exception as err:  # only a failed build falls back; anything else is re-raised
                if not _ws_compile_failed(err):
                    raise
        cfg = cfg.pipelined()
    lse_t = lse if lse is not None else out  # dummy pointer when not written
    use_tma = cfg.tma and _tma_ok(k) and _tma_ok(v)
    if use_tma:
        _ensure_allocator()
    elif cfg.maxnreg and q.is_cuda:
        # The register cap is tuned for the descriptor loads; pointer loads would spill under it.
        cfg = KernelConfig(cfg.block_m, min(cfg.block_n, 64), cfg.num_warps, 3)
    grid = (triton.cdiv(Sq, cfg.block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, ek if ek is not None else q, ev if ev is not None else q, emask if emask is not None else q,
        out, lse_t, layout.offsets, layout.indices,
        *q.stride(), *k.stride(), *v.stride(), *_strides4(ek), *_strides4(ev),
        emask.stride(0) if emask is not None else 0,
        *out.stride(),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        layout.offsets.stride(0), layout.indices.stride(0),
        H, Sq, Sk, T, layout.num_k_blocks, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=hdp, BLOCK_Q=layout.block_m, BLOCK_K=layout.block_n,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        LAYOUT_PER_HEAD=layout.heads > 1, HAS_EXTRA=T > 0, HAS_EXTRA_MASK=emask is not None,
        WRITE_LSE=lse is not None, DOT_PRECISION=_dot_precision(q.dtype), USE_TMA=use_tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_launch_opts(cfg),
    )


def _try_ws(launch, *args) -> bool:
    """Run a warp-specialised backward launch; False if Triton could not build it (see _ws_compile_failed)."""
    _ensure_allocator()
    try:
        launch(*args)
    except Exception as err:  # only a failed build falls back; anything else is re-raised
        if not _ws_compile_failed(err):
            raise
        return False
    return True


def _bwd(do, q, k, v, out, lse, layout, ek, ev, emask, scale, dlse):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    T = ek.shape[1] if ek is not None else 0
    hdp = _head_dim_pad(D)
    dev = q.device
    # Delta (and dLse) share LSE's strides: the kernels index all three with one (stride_lb, stride_lh).
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=dev)
    if dlse is not None and dlse.stride() != lse.stride():
        dlse = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=dev).copy_(dlse)
    pre_bm = 64 if hdp <= 128 else 32
    _bwd_preprocess[(triton.cdiv(Sq, pre_bm), B * H)](
        out, do, dlse if dlse is not None else lse, delta, *out.stride(), *do.stride(),
        lse.stride(0), lse.stride(1), H, Sq,
        HEAD_DIM=D, HEAD_DIM_PAD=hdp, BLOCK_M=pre_bm, HAS_DLSE=dlse is not None,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    dek = torch.empty(ek.shape, dtype=ek.dtype, device=dev) if ek is not None else None
    dev_ = torch.empty(ev.shape, dtype=ev.dtype, device=dev) if ev is not None else None
    common = dict(HEAD_DIM=D, HEAD_DIM_PAD=hdp, BLOCK_Q=layout.block_m, BLOCK_K=layout.block_n,
                  LAYOUT_PER_HEAD=layout.heads > 1, HAS_EXTRA=T > 0, HAS_EXTRA_MASK=emask is not None,
                  DOT_PRECISION=_dot_precision(q.dtype))
    ekp = ek if ek is not None else q
    evp = ev if ev is not None else q
    emp = emask if emask is not None else q
    em_stride = emask.stride(0) if emask is not None else 0

    t = layout.transpose()
    # Warp-specialised kernels (Hopper, no extra keys, every tensor TMA-addressable) where the tables ask.
    ws_ok = (T == 0 and q.is_cuda and torch.cuda.get_device_capability(dev)[0] == 9
             and all(_tma_ok(x) for x in (q, k, v, do, dq, dk, dv)) and _lse_tma_ok(lse))
    cfg = _pick(1, _BWD_DKDV_CONFIGS, _DEFAULT_GPU_BWD, layout.block_m, layout.block_n, hdp, dev, q.dtype)
    launched = cfg.warp_specialize and ws_ok and cfg.block_n == layout.block_n == 128 and _try_ws(
        _bwd_dkdv_ws, q, k, v, do, lse, delta, dk, dv, t, scale, cfg)
    if not launched:
        cfg = cfg.pipelined()
        _bwd_dkdv(q, k, v, ekp, evp, emp, em_stride, do, lse, delta, dk, dv, dek, dev_, ek, ev, t, H, Sq, Sk, T,
                  scale, cfg, common)
    cfg = _pick(2, _BWD_DQ_CONFIGS, _DEFAULT_GPU_BWD, layout.block_m, layout.block_n, hdp, dev, q.dtype)
    launched = cfg.warp_specialize and ws_ok and cfg.block_m == layout.block_m == 128 and _try_ws(
        _bwd_dq_ws, q, k, v, do, lse, delta, dq, layout, scale, cfg)
    if not launched:
        cfg = cfg.pipelined()
        _bwd_dq_kernel[(triton.cdiv(Sq, cfg.block_m), B * H)](
            q, k, v, ekp, evp, emp, do, lse, delta, dq, layout.offsets, layout.indices,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(ek), *_strides4(ev), em_stride,
            *do.stride(), *dq.stride(), lse.stride(0), lse.stride(1),
            layout.offsets.stride(0), layout.indices.stride(0),
            H, Sq, Sk, T, scale, scale * LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **_launch_opts(cfg), **common,
        )
    return dq, dk, dv, dek, dev_


def _bwd_dkdv_ws(q, k, v, do, lse, delta, dk, dv, t: BlockLayout, scale: float, cfg: KernelConfig) -> None:
    """Warp-specialised dK/dV launch; ``t`` is the transposed layout (key block -> query blocks)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    _bwd_dkdv_ws_kernel[(triton.cdiv(Sk, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, t.offsets, t.indices,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3], lse.stride(0), lse.stride(1), t.offsets.stride(0), t.indices.stride(0),
        H, Sq, Sk, scale, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=_head_dim_pad(D), BLOCK_Q=t.block_n, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        LAYOUT_PER_HEAD=t.heads > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _bwd_dq_ws(q, k, v, do, lse, delta, dq, layout: BlockLayout, scale: float, cfg: KernelConfig) -> None:
    """Warp-specialised dQ launch."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    _bwd_dq_ws_kernel[(triton.cdiv(Sq, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq, layout.offsets, layout.indices,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        lse.stride(0), lse.stride(1), layout.offsets.stride(0), layout.indices.stride(0),
        H, Sq, Sk, scale, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=_head_dim_pad(D), BLOCK_K=layout.block_n, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, LAYOUT_PER_HEAD=layout.heads > 1, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _bwd_dkdv(q, k, v, ekp, evp, emp, em_stride, do, lse, delta, dk, dv, dek, dev_, ek, ev, t, H, Sq, Sk, T,
              scale, cfg, common):
    """The pipelined dK/dV launch (any GPU, extra keys, the interpreter)."""
    B = q.shape[0]
    n_extra = triton.cdiv(T, cfg.block_n) if T else 0
    grid = (n_extra + triton.cdiv(Sk, cfg.block_n), B * H)
    _bwd_dkdv_kernel[grid](
        q, k, v, ekp, evp, emp, do, lse, delta, dk, dv, dek if dek is not None else dk,
        dev_ if dev_ is not None else dv, t.offsets, t.indices,
        *q.stride(), *k.stride(), *v.stride(), *_strides4(ek), *_strides4(ev), em_stride,
        *do.stride(), *dk.stride(), *dv.stride(), *_strides4(dek), *_strides4(dev_),
        lse.stride(0), lse.stride(1), t.offsets.stride(0), t.indices.stride(0),
        H, Sq, Sk, T, n_extra, scale, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_launch_opts(cfg), **common,
    )


# -------------------------------------------------------------------------------------- autograd Function
class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ek, ev, emask, layout, scale):
        B, Sq, H, D = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = _alloc_lse(B, H, Sq, q.device)
        _fwd(q, k, v, layout, ek, ev, emask, scale, out, lse)
        ctx.save_for_backward(q, k, v, ek, ev, emask, out, lse)
        ctx.layout = layout
        ctx.scale = scale
        ctx.mark_non_differentiable(emask) if emask is not None else None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, ek, ev, emask, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dek, dev_ = _bwd(dout, q, k, v, out, lse, ctx.layout, ek, ev, emask, ctx.scale, dlse)
        return dq, dk, dv, dek, dev_, None, None, None


# ------------------------------------------------------------------------------------- torch backend
def _torch_attention(q, k, v, layout, ek, ev, emask, scale):
    """Chunked pure-PyTorch path: one query block at a time, gathering only its key blocks.

    Peak extra memory is (B, H, block_m, keys of one row); autograd works through it.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    bm, bn = layout.block_m, layout.block_n
    offsets = layout.offsets.cpu()
    indices = layout.indices.cpu()
    arange_n = torch.arange(bn, device=q.device)
    out_rows, lse_rows = [], []
    head_groups = [slice(None)] if layout.heads == 1 else [slice(h, h + 1) for h in range(H)]
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    for qb in range(layout.num_q_blocks):
        q_blk = q[:, qb * bm:(qb + 1) * bm].to(cdtype).transpose(1, 2)  # (B, H, m, D)
        outs, lses = [], []
        for l, hs in enumerate(head_groups):
            blocks = indices[l, offsets[l, qb]:offsets[l, qb + 1]].to(q.device).long()
            tok = (blocks[:, None] * bn + arange_n[None, :]).reshape(-1)
            tok = tok[tok < Sk]
            kk = k[:, tok, hs].to(cdtype)
            vv = v[:, tok, hs].to(cdtype)
            vis = torch.ones(B, tok.numel(), dtype=torch.bool, device=q.device)
            if ek is not None:
                kk = torch.cat([kk, ek[:, :, hs].to(cdtype)], 1)
                vv = torch.cat([vv, ev[:, :, hs].to(cdtype)], 1)
                em = emask if emask is not None else torch.ones(
                    B, ek.shape[1], dtype=torch.bool, device=q.device)
                vis = torch.cat([vis, em], 1)
            qh = q_blk[:, hs]
            s = torch.matmul(qh, kk.permute(0, 2, 3, 1)) * scale  # (B, h, m, n)
            s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
            lse = torch.logsumexp(s, -1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
            finite = torch.isfinite(lse) | torch.isnan(lse)
            p = torch.exp(s - torch.where(finite, lse, 0.0)[..., None])
            o = torch.matmul(p, vv.transpose(1, 2))
            outs.append(torch.where(lse[..., None] == float("-inf"), 0.0, o))
            lses.append(lse)
        out_rows.append(torch.cat(outs, 1))
        lse_rows.append(torch.cat(lses, 1))
    out = torch.cat(out_rows, 2).transpose(1, 2).to(q.dtype) if out_rows else q.new_zeros(q.shape)
    lse = torch.cat(lse_rows, 2).float() if lse_rows else q.new_zeros(B, H, 0, dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------------------------------- validation
_BACKENDS = ("auto", "triton", "torch")


def can_run_triton(q: torch.Tensor, layout: BlockLayout, raise_error: bool = False) -> bool:
    """Whether the Triton backend can run on these inputs (CUDA, or CPU under TRITON_INTERPRET=1)."""
    reason = None
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        reason = f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got device={q.device}"
    elif q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reason = f"supports float16/bfloat16/float32, got dtype={q.dtype}"
    elif q.is_cuda and q.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        reason = "bfloat16 needs compute capability >= 8.0"
    elif layout.block_m not in (16, 32, 64, 128, 256) or layout.block_n not in (16, 32, 64, 128, 256):
        reason = (f"layout blocks must be powers of two in [16, 256], got block_m={layout.block_m}, "
                  f"block_n={layout.block_n}")
    if reason and raise_error:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return reason is None


def can_run_torch(q: torch.Tensor, layout: BlockLayout, raise_error: bool = False) -> bool:
    """The PyTorch backend runs anywhere (slowly on GPUs)."""
    return True


def _check_inputs(q, k, v, layout, extra_k, extra_v, extra_mask, out):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, S, H, D), got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    B, Sq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be (B, Sk, H, D) matching q's B, H, D, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got dtype={q.dtype}")
    if D > 256:
        raise NotImplementedError(f"head_dim must be <= 256, got D={D}")
    if D < 1:
        raise ValueError(f"head_dim must be >= 1, got D={D}")
    layout.check_shapes(Sq, k.shape[1], H)
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra_k and extra_v must be given together, got only one of them")
    if extra_mask is not None and extra_k is None:
        raise ValueError("extra_mask needs extra_k/extra_v, got extra_mask alone")
    if extra_k is not None:
        for name, t in (("extra_k", extra_k), ("extra_v", extra_v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != (H, D):
                raise ValueError(
                    f"{name} must be (B, T, H, D) = ({B}, T, {H}, {D}), got {name}.shape={tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must match q's dtype/device ({q.dtype}, {q.device}), "
                                 f"got ({t.dtype}, {t.device})")
        if extra_k.shape != extra_v.shape:
            raise ValueError(f"extra_k and extra_v shapes differ, got {tuple(extra_k.shape)} and "
                             f"{tuple(extra_v.shape)}")
        if extra_mask is not None:
            if not isinstance(extra_mask, torch.Tensor):
                raise TypeError(f"extra_mask must be a torch.Tensor, got {type(extra_mask).__name__}")
            if extra_mask.dtype != torch.bool or extra_mask.shape != (B, extra_k.shape[1]):
                raise ValueError(f"extra_mask must be bool (B, T) = ({B}, {extra_k.shape[1]}), "
                                 f"got dtype={extra_mask.dtype}, shape={tuple(extra_mask.shape)}")
            if extra_mask.device != q.device:
                raise ValueError(f"extra_mask must be on {q.device}, got {extra_mask.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}), "
                             f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}")


# ---------------------------------------------------------------------------------------- public API
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention (FlashAttention-2 algorithm) over a CSR block layout.

    Query block ``i`` (tokens ``[i*block_m, (i+1)*block_m)``) attends to the key blocks the layout
    lists for it, plus every extra key, in one softmax.

    Args:
        q: (B, Sq, H, D) queries; k, v: (B, Sk, H, D). Any strides (views of bigger buffers are read in
            place). float16/bfloat16 (fast) or float32 (exact, no tf32). D <= 256.
        layout: :class:`BlockLayout` with ``num_q_blocks == ceil(Sq / block_m)``,
            ``num_k_blocks == ceil(Sk / block_n)``, shared (L=1) or per head (L=H). Blocks 16..256
            (powers of two) for the Triton backend; :func:`default_block_size` gives the fastest.
        extra_k, extra_v: optional (B, T, H, D) keys/values seen by every query (e.g. text tokens).
        extra_mask: optional (B, T) bool, True = visible (key padding).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp (B, H, Sq) float32 (natural log) for merging partial
            results; differentiable. A view whose rows start 16-byte aligned (the Hopper kernels store it
            through a tensor descriptor), so not contiguous when Sq is not a multiple of 4.
        out: optional preallocated (B, Sq, H, D) output (may be a strided view); not allowed when
            autograd records the call.
        backend: "triton", "torch" (chunked PyTorch, no S x S memory) or "auto" (Triton on CUDA or
            under TRITON_INTERPRET=1, else torch). An explicit backend that cannot run raises.

    Returns:
        out (B, Sq, H, D), or (out, lse). A query row with no visible key gets zeros and LSE = -inf.
        NaN/inf in the inputs propagate to the rows that see them.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, layout, extra_k, extra_v, extra_mask, out)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    layout = layout.to(q.device)
    if backend == "auto":
        backend = "triton" if can_run_triton(q, layout) else "torch"
    elif backend == "triton":
        can_run_triton(q, layout, raise_error=True)

    if extra_k is not None and extra_k.shape[1] == 0:
        extra_k = extra_v = extra_mask = None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, extra_k, extra_v))
    if out is not None and needs_grad:
        raise ValueError("out= is for inference only: got inputs that require grad with grad mode on")

    if backend == "torch":
        o, lse = _torch_attention(q, k, v, layout, extra_k, extra_v, extra_mask, scale)
        if out is not None:
            out.copy_(o)
            o = out
        return (o, lse) if return_lse else o

    emask = extra_mask.to(torch.int8).contiguous() if extra_mask is not None else None
    if needs_grad:
        o, lse = _BlockSparseAttention.apply(q, k, v, extra_k, extra_v, emask, layout, scale)
        return (o, lse) if return_lse else o
    B, Sq, H, _ = q.shape
    o = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _alloc_lse(B, H, Sq, q.device) if return_lse else None
    _fwd(q, k, v, layout, extra_k, extra_v, emask, scale, o, lse)
    return (o, lse) if return_lse else o
