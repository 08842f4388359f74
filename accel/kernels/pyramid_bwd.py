"""Pyramid sparse attention backward in Triton: dQ and dK/dV kernels, the un-pooling, the launcher.

FlashAttention-2's split (Dao, 2023), with the forward's LSE and Delta = rowsum(dO * O) - dLse:

- dQ: one program per (query block, batch x head) walks the forward's level lists (`level_lists`), recomputes
  P = exp(q.k * scale + ln(count) - lse) against each listed block's pooled rows and accumulates dS.K, then the
  text keys.
- dK/dV: one program per (KV block, level, batch x head) walks the transposed level lists (the query blocks that
  see this KV block at this level) and accumulates the gradients of the block's b/p pooled rows in fp32 buffers
  (level 1 straight into per-token rows); text-key tiles come first in the same grid (they visit every query, so
  they are the longest programs). A pooled row is the mean of its real tokens, so its gradient is spread back
  over them divided by their count (`_unpool`, one O(S*D) PyTorch pass per level).

Every level reads its lanes through `pyramid._pooled_lanes`, so the forward and both passes see the same keys,
biases and masks. Imported lazily by ``accel::pyramid_bwd``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import LOG2E, dot_precision, head_dim_pad
from .bwd_pipelined import launch_preprocess
from .pyramid import _TEXT_BLOCK, _parts, _pooled_lanes, _strides, tile_rows
from .pyramid_levels import level_lists
from .pyramid_pool import pool_kv_levels

__all__ = ["bwd_knobs", "pyramid_backward"]


def bwd_knobs(block: int, hdp: int = 128) -> dict[str, int]:
    """Launch knobs of the two backward passes: dQ (warps, stages, key rows per tile) and dK/dV (warps, stages,
    key rows, query rows per tile). From the H200 sweep at Wan2.1-1.3B 480p, rank quotas at 15%
    (benchmarks/results/pyramid_bwd_knobs_b*.json; every set gives identical gradients): block 128 12.1 ms with
    8-warp dQ in 2 stages (1 stage 12.7; 8-warp or 128-key dK/dV 15.8-16.2), block 64 15.6 ms with 4-warp dQ in
    3 stages and 64-query dK/dV tiles (16.1 with 2 stages and 32; 8-warp dQ 22-31). 128-row query blocks with 3
    dQ stages need 256 KB of shared memory (the H200 has 227 KB); head dims padded past 128 (``hdp``) double
    every tile, so there dQ keeps one stage fewer and dK/dV 32-query tiles."""
    if hdp > 128:
        return {"dq_warps": 8 if block >= 128 else 4, "dq_stages": 1 if block >= 128 else 2, "dq_key_rows": 64,
                "dkdv_warps": 4, "dkdv_stages": 3, "dkdv_key_rows": 64, "dkdv_query_rows": 32}
    if block >= 128:
        return {"dq_warps": 8, "dq_stages": 2, "dq_key_rows": 64,
                "dkdv_warps": 4, "dkdv_stages": 3, "dkdv_key_rows": 64, "dkdv_query_rows": 32}
    return {"dq_warps": 4, "dq_stages": 3, "dq_key_rows": 64,
            "dkdv_warps": 4, "dkdv_stages": 3, "dkdv_key_rows": 64, "dkdv_query_rows": 64}


@triton.jit
def _dq_tile(dq, q, do, lse, delta, kT, vT, valid, bias, qk_scale, DOT_PRECISION: tl.constexpr):
    """dQ += dS K for one key tile (kT, vT transposed: HEAD_DIM_PAD x lanes); lse in log2 units."""
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale + bias[None, :] - lse[:, None])
    p = tl.where(valid[None, :], p, 0.0)
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)


@triton.jit
def _dq_level(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, Idx, lo, hi, row0, NV, qk_scale,
              d_mask, P: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr, NSUB: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """The KV blocks ``Idx[lo:hi]`` at level P, in NSUB tiles of ROWS pooled rows each."""
    for it in range(lo, hi):
        kb = tl.load(Idx + it)
        for sub in tl.static_range(NSUB):
            lrow, valid, bias, _ = _pooled_lanes(kb, sub, NV, P, BS, ROWS)
            rows = (row0 + lrow).to(tl.int64)
            m = valid[None, :] & d_mask[:, None]
            kT = tl.load(k_base + rows[None, :] * stride_kn, mask=m, other=0.0)
            vT = tl.load(v_base + rows[None, :] * stride_vn, mask=m, other=0.0)
            dq = _dq_tile(dq, q, do, lse, delta, kT, vT, valid, bias, qk_scale, DOT_PRECISION)
    return dq


@triton.jit
def _pyramid_bwd_dq_kernel(
    Q, K, V, KP, VP, EK, EV, EMask, DO, Lse, Delta, DQ, Idx, Ends,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_pkb, stride_pkn, stride_pkh, stride_pkd,
    stride_pvb, stride_pvn, stride_pvh, stride_pvd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    H, NV, NB, T, R4, R8, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BS: tl.constexpr,
    R1_: tl.constexpr, N1_: tl.constexpr, R2_: tl.constexpr, N2_: tl.constexpr,
    R4_: tl.constexpr, N4_: tl.constexpr, R8_: tl.constexpr, N8_: tl.constexpr,
    HAS_TEXT: tl.constexpr, HAS_TEXT_MASK: tl.constexpr, TEXT_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    q_rows = (qb * BS + offs_m).to(tl.int64)
    m_valid = q_rows < NV
    qd_mask = m_valid[:, None] & d_mask[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + q_rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + q_rows[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
    l_off = off_b * stride_lb + off_h * stride_lh + q_rows
    # +inf LSE makes P = 0 for rows past NV and for rows that see nothing (LSE = -inf)
    lse = tl.load(Lse + l_off, mask=m_valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=m_valid, other=0.0)
    dq = tl.zeros([BS, HEAD_DIM_PAD], dtype=tl.float32)

    row = pid_bh.to(tl.int64) * NB + qb
    idx = Idx + row * NB
    e1 = tl.load(Ends + row * 4)
    e2 = tl.load(Ends + row * 4 + 1)
    e4 = tl.load(Ends + row * 4 + 2)
    e8 = tl.load(Ends + row * 4 + 3)
    k1 = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None] * stride_kd
    v1 = V + off_b * stride_vb + off_h * stride_vh + offs_d[:, None] * stride_vd
    kp = KP + off_b * stride_pkb + off_h * stride_pkh + offs_d[:, None] * stride_pkd
    vp = VP + off_b * stride_pvb + off_h * stride_pvh + offs_d[:, None] * stride_pvd
    dq = _dq_level(dq, q, do, lse, delta, k1, v1, stride_kn, stride_vn, idx, 0, e1, 0, NV, qk_scale, d_mask,
                   1, BS, R1_, N1_, DOT_PRECISION)
    dq = _dq_level(dq, q, do, lse, delta, kp, vp, stride_pkn, stride_pvn, idx, e1, e2, 0, NV, qk_scale, d_mask,
                   2, BS, R2_, N2_, DOT_PRECISION)
    dq = _dq_level(dq, q, do, lse, delta, kp, vp, stride_pkn, stride_pvn, idx, e2, e4, R4, NV, qk_scale, d_mask,
                   4, BS, R4_, N4_, DOT_PRECISION)
    dq = _dq_level(dq, q, do, lse, delta, kp, vp, stride_pkn, stride_pvn, idx, e4, e8, R8, NV, qk_scale, d_mask,
                   8, BS, R8_, N8_, DOT_PRECISION)
    if HAS_TEXT:
        offs_t = tl.arange(0, TEXT_BLOCK)
        ek = EK + off_b * stride_ekb + off_h * stride_ekh + offs_d[:, None] * stride_ekd
        ev = EV + off_b * stride_evb + off_h * stride_evh + offs_d[:, None] * stride_evd
        zero = tl.zeros([TEXT_BLOCK], dtype=tl.float32)
        for start_n in range(0, T, TEXT_BLOCK):
            n_in = start_n + offs_t < T
            valid = n_in
            if HAS_TEXT_MASK:
                vis = tl.load(EMask + off_b * stride_emb + start_n + offs_t, mask=n_in, other=0)
                valid = valid & (vis != 0)
            rows = (start_n + offs_t).to(tl.int64)
            m = n_in[None, :] & d_mask[:, None]
            kT = tl.load(ek + rows[None, :] * stride_ekn, mask=m, other=0.0)
            vT = tl.load(ev + rows[None, :] * stride_evn, mask=m, other=0.0)
            dq = _dq_tile(dq, q, do, lse, delta, kT, vT, valid, zero, qk_scale, DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + q_rows[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_tile(dk, dv, k, v, valid, bias, q_base, do_base, lse_base, delta_base, start_m, NV,
               stride_qm, stride_qd, stride_dom, stride_dod, offs_d, d_mask, qk_scale,
               MT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of one key tile (lanes x HEAD_DIM_PAD) += the contribution of query rows [start_m, start_m + MT)."""
    q_rows = start_m + tl.arange(0, MT)
    m_ok = q_rows < NV
    rows = q_rows.to(tl.int64)
    qT = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                 mask=m_ok[None, :] & d_mask[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=m_ok[:, None] & d_mask[None, :], other=0.0)
    lse = tl.load(lse_base + rows, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_base + rows, mask=m_ok, other=0.0)
    qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
    pT = tl.math.exp2(qkT * qk_scale + bias[:, None] - lse[None, :])
    pT = tl.where(valid[:, None], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_level(q_base, do_base, lse_base, delta_base, k_base, v_base, dk_base, dv_base,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                TIdx, TEnds, kb, row0, NV, sm_scale, qk_scale, offs_d, d_mask,
                P: tl.constexpr, LEVEL: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr, NSUB: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, MT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Gradients of KV block kb's pooled rows at level P (LEVEL = its index in 1, 2, 4, 8), over the query
    blocks ``TIdx[lo:hi]`` that see it at that level; every lane of the block is stored (zeros if unseen)."""
    if LEVEL == 0:
        lo = 0
    else:
        lo = tl.load(TEnds + LEVEL - 1)
    hi = tl.load(TEnds + LEVEL)
    for sub in tl.static_range(NSUB):
        lrow, valid, bias, lane_ok = _pooled_lanes(kb, sub, NV, P, BS, ROWS)
        rows = (row0 + lrow).to(tl.int64)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        dk = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
        # one flat loop over (listed query block, MT-row part): pipelined, not unrolled BS/MT times
        for it in range(lo * (BS // MT), hi * (BS // MT)):
            qb = tl.load(TIdx + it // (BS // MT))
            dk, dv = _dkdv_tile(dk, dv, k, v, valid, bias, q_base, do_base, lse_base, delta_base,
                                qb * BS + (it % (BS // MT)) * MT, NV, stride_qm, stride_qd, stride_dom, stride_dod,
                                offs_d, d_mask, qk_scale, MT, DOT_PRECISION)
        dk *= sm_scale
        out_mask = lane_ok[:, None] & d_mask[None, :]
        tl.store(dk_base + rows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk, mask=out_mask)
        tl.store(dv_base + rows[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv, mask=out_mask)


@triton.jit
def _pyramid_bwd_dkdv_kernel(
    Q, K, V, KP, VP, EK, EV, EMask, DO, Lse, Delta, DK1, DV1, DKP, DVP, DEK, DEV, TIdx, TEnds,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_pkb, stride_pkn, stride_pkh, stride_pkd,
    stride_pvb, stride_pvn, stride_pvh, stride_pvd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_g1b, stride_g1n, stride_g1h, stride_g1d,
    stride_gpb, stride_gpn, stride_gph, stride_gpd,
    stride_dekb, stride_dekn, stride_dekh, stride_dekd,
    stride_devb, stride_devn, stride_devh, stride_devd,
    stride_lb, stride_lh,
    H, NV, NB, T, NT, R4, R8, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BS: tl.constexpr, MT: tl.constexpr,
    R1_: tl.constexpr, N1_: tl.constexpr, R2_: tl.constexpr, N2_: tl.constexpr,
    R4_: tl.constexpr, N4_: tl.constexpr, R8_: tl.constexpr, N8_: tl.constexpr,
    HAS_TEXT_MASK: tl.constexpr, TEXT_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = Lse + off_b * stride_lb + off_h * stride_lh
    delta_base = Delta + off_b * stride_lb + off_h * stride_lh
    if pid < NT:  # a tile of text keys: every video query sees it
        offs_t = pid * TEXT_BLOCK + tl.arange(0, TEXT_BLOCK)
        n_in = offs_t < T
        valid = n_in
        if HAS_TEXT_MASK:
            vis = tl.load(EMask + off_b * stride_emb + offs_t, mask=n_in, other=0)
            valid = valid & (vis != 0)
        rows = offs_t.to(tl.int64)
        kv_mask = n_in[:, None] & d_mask[None, :]
        k = tl.load(EK + off_b * stride_ekb + off_h * stride_ekh + rows[:, None] * stride_ekn
                    + offs_d[None, :] * stride_ekd, mask=kv_mask, other=0.0)
        v = tl.load(EV + off_b * stride_evb + off_h * stride_evh + rows[:, None] * stride_evn
                    + offs_d[None, :] * stride_evd, mask=kv_mask, other=0.0)
        zero = tl.zeros([TEXT_BLOCK], dtype=tl.float32)
        dk = tl.zeros([TEXT_BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([TEXT_BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
        for start_m in range(0, NV, MT):
            dk, dv = _dkdv_tile(dk, dv, k, v, valid, zero, q_base, do_base, lse_base, delta_base, start_m, NV,
                                stride_qm, stride_qd, stride_dom, stride_dod, offs_d, d_mask, qk_scale, MT,
                                DOT_PRECISION)
        dk *= sm_scale
        tl.store(DEK + off_b * stride_dekb + off_h * stride_dekh + rows[:, None] * stride_dekn
                 + offs_d[None, :] * stride_dekd, dk.to(DEK.dtype.element_ty), mask=kv_mask)
        tl.store(DEV + off_b * stride_devb + off_h * stride_devh + rows[:, None] * stride_devn
                 + offs_d[None, :] * stride_devd, dv.to(DEV.dtype.element_ty), mask=kv_mask)
    else:
        w = pid - NT
        level = w // NB
        kb = w % NB
        row = pid_bh.to(tl.int64) * NB + kb
        tidx = TIdx + row * NB
        tends = TEnds + row * 4
        k1 = K + off_b * stride_kb + off_h * stride_kh
        v1 = V + off_b * stride_vb + off_h * stride_vh
        kp = KP + off_b * stride_pkb + off_h * stride_pkh
        vp = VP + off_b * stride_pvb + off_h * stride_pvh
        g1k = DK1 + off_b * stride_g1b + off_h * stride_g1h
        g1v = DV1 + off_b * stride_g1b + off_h * stride_g1h
        gpk = DKP + off_b * stride_gpb + off_h * stride_gph
        gpv = DVP + off_b * stride_gpb + off_h * stride_gph
        if level == 0:
            _dkdv_level(q_base, do_base, lse_base, delta_base, k1, v1, g1k, g1v,
                        stride_qm, stride_qd, stride_dom, stride_dod, stride_kn, stride_kd, stride_vn, stride_vd,
                        stride_g1n, stride_g1d, stride_g1n, stride_g1d, tidx, tends, kb, 0, NV, sm_scale, qk_scale,
                        offs_d, d_mask, 1, 0, BS, R1_, N1_, HEAD_DIM_PAD, MT, DOT_PRECISION)
        elif level == 1:
            _dkdv_level(q_base, do_base, lse_base, delta_base, kp, vp, gpk, gpv,
                        stride_qm, stride_qd, stride_dom, stride_dod, stride_pkn, stride_pkd, stride_pvn,
                        stride_pvd, stride_gpn, stride_gpd, stride_gpn, stride_gpd, tidx, tends, kb, 0, NV,
                        sm_scale, qk_scale, offs_d, d_mask, 2, 1, BS, R2_, N2_, HEAD_DIM_PAD, MT, DOT_PRECISION)
        elif level == 2:
            _dkdv_level(q_base, do_base, lse_base, delta_base, kp, vp, gpk, gpv,
                        stride_qm, stride_qd, stride_dom, stride_dod, stride_pkn, stride_pkd, stride_pvn,
                        stride_pvd, stride_gpn, stride_gpd, stride_gpn, stride_gpd, tidx, tends, kb, R4, NV,
                        sm_scale, qk_scale, offs_d, d_mask, 4, 2, BS, R4_, N4_, HEAD_DIM_PAD, MT, DOT_PRECISION)
        else:
            _dkdv_level(q_base, do_base, lse_base, delta_base, kp, vp, gpk, gpv,
                        stride_qm, stride_qd, stride_dom, stride_dod, stride_pkn, stride_pkd, stride_pvn,
                        stride_pvd, stride_gpn, stride_gpd, stride_gpn, stride_gpd, tidx, tends, kb, R8, NV,
                        sm_scale, qk_scale, offs_d, d_mask, 8, 3, BS, R8_, N8_, HEAD_DIM_PAD, MT, DOT_PRECISION)


# ------------------------------------------------------------------------------------------------ launcher
def _tiles(block: int, most: int) -> dict[str, int]:
    out = {}
    for name, p in (("1", 1), ("2", 2), ("4", 4), ("8", 8)):
        out[f"R{name}_"], out[f"N{name}_"] = tile_rows(block, p, most)
    return out


def _unpool(g1: Tensor, gp: Tensor, nv: int, block: int, r4: int, r8: int) -> Tensor:
    """Per-token gradients (B, V, H, D) fp32: level-1 rows plus each pooled row's gradient spread over its real
    tokens divided by their count (the gradient of a mean)."""
    B, rows, H, D = g1.shape
    for p, start in ((2, 0), (4, r4), (8, r8)):
        n = rows // p
        count = (nv - torch.arange(0, rows, p, device=g1.device)).clamp(min=1, max=p).to(torch.float32)
        g1.view(B, n, p, H, D).add_((gp[:, start:start + n] / count[None, :, None, None])[:, :, None])
    return g1[:, :nv]


def pyramid_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     levels: Tensor, text_vis: Tensor | None, parts: list[int], block: int, scale: float,
                     knobs: dict[str, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq (B, V, H, D) and the gradients of the joint k, v (B, S, H, D) of `pyramid_fwd`; ``knobs`` overrides
    `bwd_knobs` (probes)."""
    kn = bwd_knobs(block, head_dim_pad(q.shape[-1])) if knobs is None else knobs
    B, NV, H, D = q.shape
    v0, _, t0, T = parts
    kv, ek = _parts(k, parts)
    vv, ev = _parts(v, parts)
    kp, vp, r4, r8 = pool_kv_levels(kv, vv, block)
    nb = -(-NV // block)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    launch_preprocess(out, dout, lse, dlse.contiguous() if dlse is not None else None, delta)

    emask = text_vis if (T and text_vis is not None) else None
    hdp = head_dim_pad(D)
    common = dict(HEAD_DIM=D, HEAD_DIM_PAD=hdp, BS=block, HAS_TEXT_MASK=emask is not None, TEXT_BLOCK=_TEXT_BLOCK,
                  DOT_PRECISION=dot_precision(q.dtype))
    text_args = (ek if T else kp, ev if T else vp, emask if emask is not None else lse)
    text_strides = (*_strides(ek), *_strides(ev), emask.stride(0) if emask is not None else 0)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    idx, ends = level_lists(levels)
    _pyramid_bwd_dq_kernel[(nb, B * H)](
        q, kv, vv, kp, vp, *text_args, dout, lse, delta, dq, idx, ends,
        *q.stride(), *kv.stride(), *vv.stride(), *kp.stride(), *vp.stride(), *text_strides,
        *dout.stride(), *dq.stride(), lse.stride(0), lse.stride(1),
        H, NV, nb, T, r4, r8, scale, scale * LOG2E,
        HAS_TEXT=T > 0, num_warps=kn["dq_warps"], num_stages=kn["dq_stages"], **_tiles(block, kn["dq_key_rows"]),
        **common,
    )

    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    g1k = torch.empty(B, nb * block, H, D, dtype=torch.float32, device=q.device)
    g1v = torch.empty_like(g1k)
    gpk = torch.empty(kp.shape, dtype=torch.float32, device=q.device)
    gpv = torch.empty_like(gpk)
    dek, dev_ = (dk[:, t0:t0 + T], dv[:, t0:t0 + T]) if T else (gpk, gpv)
    tidx, tends = level_lists(levels.transpose(-1, -2))
    n_text = triton.cdiv(T, _TEXT_BLOCK) if T else 0
    _pyramid_bwd_dkdv_kernel[(n_text + 4 * nb, B * H)](
        q, kv, vv, kp, vp, *text_args, dout, lse, delta, g1k, g1v, gpk, gpv, dek, dev_, tidx, tends,
        *q.stride(), *kv.stride(), *vv.stride(), *kp.stride(), *vp.stride(), *text_strides,
        *dout.stride(), *g1k.stride(), *gpk.stride(), *dek.stride(), *dev_.stride(), lse.stride(0), lse.stride(1),
        H, NV, nb, T, n_text, r4, r8, scale, scale * LOG2E,
        MT=min(block, kn["dkdv_query_rows"]), num_warps=kn["dkdv_warps"], num_stages=kn["dkdv_stages"],
        **_tiles(block, kn["dkdv_key_rows"]), **common,
    )
    dk[:, v0:v0 + NV] = _unpool(g1k, gpk, NV, block, r4, r8)
    dv[:, v0:v0 + NV] = _unpool(g1v, gpv, NV, block, r4, r8)
    return dq, dk, dv
