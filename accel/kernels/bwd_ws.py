"""Warp-specialised Hopper backward (sm_90, no text keys, all I/O through TMA): dK/dV and dQ, then launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import LOG2E, _rows_desc, _vec_desc, head_dim_pad
from .configs import KernelConfig
from .layout import BlockLayout


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



def launch_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, t: BlockLayout, scale: float,
                cfg: KernelConfig) -> None:
    """Warp-specialised dK/dV launch; ``t`` is the transposed layout (key block -> query blocks)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    _bwd_dkdv_ws_kernel[(triton.cdiv(Sk, cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, t.offsets, t.indices,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3], lse.stride(0), lse.stride(1), t.offsets.stride(0), t.indices.stride(0),
        H, Sq, Sk, scale, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BLOCK_Q=t.block_n, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        LAYOUT_PER_HEAD=t.heads > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
              delta: torch.Tensor, dq: torch.Tensor, layout: BlockLayout, scale: float, cfg: KernelConfig) -> None:
    """Warp-specialised dQ launch."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    _bwd_dq_ws_kernel[(triton.cdiv(Sq, cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq, layout.offsets, layout.indices,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        lse.stride(0), lse.stride(1), layout.offsets.stride(0), layout.indices.stride(0),
        H, Sq, Sk, scale, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BLOCK_K=layout.block_n, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, LAYOUT_PER_HEAD=layout.heads > 1, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
