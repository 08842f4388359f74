"""Pipelined block-sparse backward (any GPU, the interpreter): preprocess, dK/dV, dQ kernels, then launchers.

FA2's split: dK/dV key-major over the transposed layout (text-key tiles first: they visit every query),
dQ query-major over the layout plus the text tiles. Text keys (``EK``/``EV``) are views of the joint
K/V buffer and their gradients (``DEK``/``DEV``) views of the joint gradient buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import LOG2E, dot_precision, head_dim_pad, launch_opts, strides4
from .configs import KernelConfig
from .layout import BlockLayout


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



def launch_preprocess(out: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                      delta: torch.Tensor) -> None:
    """Delta = rowsum(dO * O) - dLse; delta and dlse share lse's strides."""
    B, Sq, H, D = out.shape
    hdp = head_dim_pad(D)
    pre_bm = 64 if hdp <= 128 else 32
    _bwd_preprocess[(triton.cdiv(Sq, pre_bm), B * H)](
        out, do, dlse if dlse is not None else lse, delta, *out.stride(), *do.stride(),
        lse.stride(0), lse.stride(1), H, Sq,
        HEAD_DIM=D, HEAD_DIM_PAD=hdp, BLOCK_M=pre_bm, HAS_DLSE=dlse is not None,
    )


def _common(q: torch.Tensor, layout: BlockLayout, T: int, emask: torch.Tensor | None) -> dict:
    D = q.shape[-1]
    return dict(HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BLOCK_Q=layout.block_m, BLOCK_K=layout.block_n,
                LAYOUT_PER_HEAD=layout.heads > 1, HAS_EXTRA=T > 0, HAS_EXTRA_MASK=emask is not None,
                DOT_PRECISION=dot_precision(q.dtype))


def launch_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor | None,
                ev: torch.Tensor | None, emask: torch.Tensor | None, do: torch.Tensor, lse: torch.Tensor,
                delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dek: torch.Tensor | None,
                dev_: torch.Tensor | None, layout: BlockLayout, t: BlockLayout, scale: float,
                cfg: KernelConfig) -> None:
    """dK, dV of the video keys (k, v) and of the text keys (ek, ev); ``t`` is ``layout.transpose()``."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    T = ek.shape[1] if ek is not None else 0
    n_extra = triton.cdiv(T, cfg.block_n) if T else 0
    grid = (n_extra + triton.cdiv(Sk, cfg.block_n), B * H)
    _bwd_dkdv_kernel[grid](
        q, k, v, ek if ek is not None else q, ev if ev is not None else q, emask if emask is not None else q,
        do, lse, delta, dk, dv, dek if dek is not None else dk, dev_ if dev_ is not None else dv,
        t.offsets, t.indices,
        *q.stride(), *k.stride(), *v.stride(), *strides4(ek), *strides4(ev),
        emask.stride(0) if emask is not None else 0,
        *do.stride(), *dk.stride(), *dv.stride(), *strides4(dek), *strides4(dev_),
        lse.stride(0), lse.stride(1), t.offsets.stride(0), t.indices.stride(0),
        H, Sq, Sk, T, n_extra, scale, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_opts(cfg), **_common(q, layout, T, emask),
    )


def launch_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor | None,
              ev: torch.Tensor | None, emask: torch.Tensor | None, do: torch.Tensor, lse: torch.Tensor,
              delta: torch.Tensor, dq: torch.Tensor, layout: BlockLayout, scale: float, cfg: KernelConfig) -> None:
    """dQ over the layout's key blocks and the text keys."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    T = ek.shape[1] if ek is not None else 0
    _bwd_dq_kernel[(triton.cdiv(Sq, cfg.block_m), B * H)](
        q, k, v, ek if ek is not None else q, ev if ev is not None else q, emask if emask is not None else q,
        do, lse, delta, dq, layout.offsets, layout.indices,
        *q.stride(), *k.stride(), *v.stride(), *strides4(ek), *strides4(ev),
        emask.stride(0) if emask is not None else 0,
        *do.stride(), *dq.stride(), lse.stride(0), lse.stride(1),
        layout.offsets.stride(0), layout.indices.stride(0),
        H, Sq, Sk, T, scale, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_opts(cfg), **_common(q, layout, T, emask),
    )
