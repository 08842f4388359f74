"""Pyramid sparse attention (PSA) in Triton: forward kernel, custom op, public function.

Semantics in `accel.kernels.pyramid_reference` (group means per level, +ln(count) logit bias, level 0 skipped).
Per call the pooled K/V of levels 2, 4 and 8 are built in one Triton launch (`pyramid_pool.pool_kv_levels`,
hierarchical sums) into one buffer each; level-1 keys and the text keys are read in place from the joint K/V
buffer. One program owns one query block and walks, level by level, the KV blocks of its row listed for that
level (index lists sorted by level from the (B, H, n, n) level map on the device: no host sync), loading b/p
pooled rows per block with the bias; the tile holds max(16, b/p) rows and the lanes past b/p (and empty groups
of the last partial block) are masked, so every (block size, level) pair is exact. Skipped blocks are never
read. Text keys join the same online softmax. On Hopper the video and pooled K/V tiles come through tensor
descriptors (TMA): the pointer form holds per-element addresses and spills at 255 registers. There the pooled
levels with few rows per block share wider tiles (``PACK`` = 64 lanes at blocks 64 and 128), gathered
through int32 row offsets, so a level-8 block of 16 rows no longer pays a whole tile's latency (`fwd_knobs`).
On an sm_90 GPU at blocks 64/128 and head dims 64/128 the forward runs as a Gluon kernel instead
(`pyramid_gluon`: p pooled blocks per full tile through TMA, warp-specialised and persistent at block 128: 25%
faster on the H200), with this one as the fallback.

The forward also writes the natural-log LSE per query row. Backward (`pyramid_bwd.py`): FA2's split with
Delta = rowsum(dO * O) - dLse, a dQ pass over query blocks (the same level lists as the forward) and a dK/dV pass
over (KV block, level) pairs walking the transposed level lists into pooled fp32 gradient buffers, which a
PyTorch op un-pools (each pooled row's gradient spread over its real tokens divided by their count: O(S*D)).
``accel::pyramid_fwd`` and ``accel::pyramid_bwd`` are ``torch.library`` custom ops, so torch.compile sees one
node each.
"""

# No `from __future__ import annotations`: torch.library reads the schema from real annotation objects.
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import resolve_key_parts, text_visibility, triton_input_reason
from ._triton_common import (
    LOG2E,
    _rows_desc,
    _softmax_update_masked,
    dot_precision,
    ensure_allocator,
    head_dim_pad,
    ws_compile_failed,
)
from .pyramid_gluon import gluon_fwd_problem, launch_fwd_gluon
from .pyramid_levels import level_lists as fused_level_lists
from .pyramid_pool import pool_kv_levels
from .pyramid_reference import LEVELS, pool_levels
from .select import tma_problem

__all__ = ["can_run_pyramid", "level_lists", "pyramid_attention"]

BLOCK_SIZES = (16, 32, 64, 128)
GLUON_WS = True  # block 128 on sm_90: the warp-specialised Gluon forward (False: the single-partition one)
_TEXT_BLOCK = 32


@triton.jit
def _step(acc, l_i, m_i, q, kT, v, valid, bias, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step; logits in log2 units, ``bias`` (columns, log2 units), ``valid`` (columns)."""
    qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale + bias[None, :]
    return _softmax_update_masked(acc, l_i, m_i, tl.where(valid[None, :], qk, float("-inf")), v, DOT_PRECISION)


@triton.jit
def _log2_count(cnt):
    """log2 of a pooled group's token count (1..8; anything below 1 gives 0, for lanes marked invalid), exactly,
    by a select chain: `tl.math.log2` lowers to libdevice's polynomial, which in the Gluon forward cost more per
    tile than the softmax (benchmarks/NOTES.md, pyramid item 46)."""
    return tl.where(cnt >= 8, 3.0, tl.where(cnt >= 7, 2.807354922057604, tl.where(
        cnt >= 6, 2.584962500721156, tl.where(cnt >= 5, 2.321928094887362, tl.where(
            cnt >= 4, 2.0, tl.where(cnt >= 3, 1.584962500721156, tl.where(cnt >= 2, 1.0, 0.0)))))))


@triton.jit
def _pooled_lanes(kb, sub, NV, P: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr):
    """Lanes ``sub * ROWS + arange(ROWS)`` of KV block ``kb`` at level P: (row in the level, valid, log2 bias,
    lane inside the block).

    Lane r is the pooled row of tokens [kb*BS + r*P, +P) cut at NV; lanes past BS/P and empty groups are invalid.
    The forward and both backward passes read their lanes here, so all three see the same keys and biases.
    """
    offs_r = sub * ROWS + tl.arange(0, ROWS)
    first = kb * BS + offs_r * P
    cnt = tl.minimum(NV - first, P)
    lane_ok = offs_r < BS // P
    bias = _log2_count(cnt)
    return kb * (BS // P) + offs_r, lane_ok & (cnt > 0), bias, lane_ok


@triton.jit
def _level_pass(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, Idx, lo, hi, row0, NV, qk_scale,
                offs_d, d_mask, P: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """KV blocks ``Idx[lo:hi]`` at level P: b/P pooled rows each (starting at row0 + block * b/P)."""
    for it in range(lo, hi):
        kb = tl.load(Idx + it)
        lrow, valid, bias, _ = _pooled_lanes(kb, 0, NV, P, BS, ROWS)
        rows = (row0 + lrow).to(tl.int64)
        kT = tl.load(k_base + rows[None, :] * stride_kn, mask=valid[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn, mask=valid[:, None] & d_mask[None, :], other=0.0)
        acc, l_i, m_i = _step(acc, l_i, m_i, q, kT, v, valid, bias, qk_scale, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _packed_lanes(Idx, it, hi, NV, P: tl.constexpr, BS: tl.constexpr, W: tl.constexpr):
    """The level-P list entries ``Idx[it:it + W*P/BS]`` packed into one W-lane tile: (row in the level, valid,
    log2 bias). Lane r holds pooled row r % (BS/P) of entry it + r // (BS/P): the rows and biases of
    `_pooled_lanes`, W/(BS/P) blocks per tile; entries past ``hi`` and empty groups of a partial block are
    invalid."""
    PER: tl.constexpr = BS // P
    lanes = tl.arange(0, W)
    j = it + lanes // PER
    listed = j < hi
    kb = tl.load(Idx + j, mask=listed, other=0)
    offs_r = lanes % PER
    cnt = tl.minimum(NV - (kb * BS + offs_r * P), P)
    bias = _log2_count(cnt)
    return kb * PER + offs_r, listed & (cnt > 0), bias


@triton.jit
def _level_pass_tma(acc, l_i, m_i, q, k_desc, v_desc, k_ptr, v_ptr, stride_kn, stride_vn, Idx, lo, hi, row0, NV,
                    qk_scale, offs_d, d_mask, P: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr,
                    PACK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`_level_pass` with K/V tiles through tensor descriptors (Hopper TMA): no per-element pointers or masks
    in registers. Lanes past b/P read the next block's rows or, past the buffer, zeros; `_pooled_lanes` marks
    them invalid, so the softmax gives them weight 0. With PACK (lanes per packed tile, 0 = off), the levels
    whose b/P pooled rows are fewer than PACK share PACK-lane tiles, PACK*P/b blocks each, gathered through
    int32 row offsets from ``k_ptr``/``v_ptr`` (descriptors cannot gather on Hopper; the launcher packs only
    where the pooled buffer's offsets fit in int32)."""
    if PACK > BS // P:
        for it in range(lo, hi, PACK // (BS // P)):
            lrow, valid, bias = _packed_lanes(Idx, it, hi, NV, P, BS, PACK)
            rows = row0 + lrow
            kT = tl.load(k_ptr + (rows * stride_kn)[None, :] + offs_d[:, None], mask=valid[None, :] & d_mask[:, None],
                         other=0.0)
            v = tl.load(v_ptr + (rows * stride_vn)[:, None] + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                        other=0.0)
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kT, v, valid, bias, qk_scale, DOT_PRECISION)
    else:
        for it in range(lo, hi):
            kb = tl.load(Idx + it)
            _, valid, bias, _ = _pooled_lanes(kb, 0, NV, P, BS, ROWS)
            start = row0 + kb * (BS // P)
            kT = k_desc.load([start, 0]).T
            v = v_desc.load([start, 0])
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kT, v, valid, bias, qk_scale, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _pyramid_fwd_kernel(
    Q, K, V, KP, VP, EK, EV, EMask, Out, Lse, Idx, Ends,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_pkb, stride_pkn, stride_pkh, stride_pkd,
    stride_pvb, stride_pvn, stride_pvh, stride_pvd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh,
    H, NV, NB, T, R4, R8, RP, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BS: tl.constexpr,
    R1_: tl.constexpr, R2_: tl.constexpr, R4_: tl.constexpr, R8_: tl.constexpr,
    USE_TMA: tl.constexpr, PACK: tl.constexpr,
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
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + q_rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BS], dtype=tl.float32)
    acc = tl.zeros([BS, HEAD_DIM_PAD], dtype=tl.float32)

    row = pid_bh.to(tl.int64) * NB + qb
    idx = Idx + row * NB
    e1 = tl.load(Ends + row * 4)
    e2 = tl.load(Ends + row * 4 + 1)
    e4 = tl.load(Ends + row * 4 + 2)
    e8 = tl.load(Ends + row * 4 + 3)
    if USE_TMA:
        kb1 = K + off_b * stride_kb + off_h * stride_kh
        vb1 = V + off_b * stride_vb + off_h * stride_vh
        kbp = KP + off_b * stride_pkb + off_h * stride_pkh
        vbp = VP + off_b * stride_pvb + off_h * stride_pvh
        acc, l_i, m_i = _level_pass_tma(
            acc, l_i, m_i, q, _rows_desc(kb1, NV, stride_kn, HEAD_DIM, HEAD_DIM_PAD, R1_),
            _rows_desc(vb1, NV, stride_vn, HEAD_DIM, HEAD_DIM_PAD, R1_), kb1, vb1, stride_kn, stride_vn,
            idx, 0, e1, 0, NV, qk_scale, offs_d, d_mask, 1, BS, R1_, PACK,
            DOT_PRECISION)
        acc, l_i, m_i = _level_pass_tma(
            acc, l_i, m_i, q, _rows_desc(kbp, RP, stride_pkn, HEAD_DIM, HEAD_DIM_PAD, R2_),
            _rows_desc(vbp, RP, stride_pvn, HEAD_DIM, HEAD_DIM_PAD, R2_), kbp, vbp, stride_pkn, stride_pvn,
            idx, e1, e2, 0, NV, qk_scale, offs_d, d_mask, 2, BS, R2_, PACK,
            DOT_PRECISION)
        acc, l_i, m_i = _level_pass_tma(
            acc, l_i, m_i, q, _rows_desc(kbp, RP, stride_pkn, HEAD_DIM, HEAD_DIM_PAD, R4_),
            _rows_desc(vbp, RP, stride_pvn, HEAD_DIM, HEAD_DIM_PAD, R4_), kbp, vbp, stride_pkn, stride_pvn,
            idx, e2, e4, R4, NV, qk_scale, offs_d, d_mask, 4, BS, R4_, PACK,
            DOT_PRECISION)
        acc, l_i, m_i = _level_pass_tma(
            acc, l_i, m_i, q, _rows_desc(kbp, RP, stride_pkn, HEAD_DIM, HEAD_DIM_PAD, R8_),
            _rows_desc(vbp, RP, stride_pvn, HEAD_DIM, HEAD_DIM_PAD, R8_), kbp, vbp, stride_pkn, stride_pvn,
            idx, e4, e8, R8, NV, qk_scale, offs_d, d_mask, 8, BS, R8_, PACK,
            DOT_PRECISION)
    else:
        k1 = K + off_b * stride_kb + off_h * stride_kh + offs_d[:, None] * stride_kd
        v1 = V + off_b * stride_vb + off_h * stride_vh + offs_d[None, :] * stride_vd
        kp = KP + off_b * stride_pkb + off_h * stride_pkh + offs_d[:, None] * stride_pkd
        vp = VP + off_b * stride_pvb + off_h * stride_pvh + offs_d[None, :] * stride_pvd
        acc, l_i, m_i = _level_pass(acc, l_i, m_i, q, k1, v1, stride_kn, stride_vn, idx, 0, e1, 0, NV, qk_scale,
                                    offs_d, d_mask, 1, BS, R1_, DOT_PRECISION)
        acc, l_i, m_i = _level_pass(acc, l_i, m_i, q, kp, vp, stride_pkn, stride_pvn, idx, e1, e2, 0, NV,
                                    qk_scale, offs_d, d_mask, 2, BS, R2_, DOT_PRECISION)
        acc, l_i, m_i = _level_pass(acc, l_i, m_i, q, kp, vp, stride_pkn, stride_pvn, idx, e2, e4, R4, NV,
                                    qk_scale, offs_d, d_mask, 4, BS, R4_, DOT_PRECISION)
        acc, l_i, m_i = _level_pass(acc, l_i, m_i, q, kp, vp, stride_pkn, stride_pvn, idx, e4, e8, R8, NV,
                                    qk_scale, offs_d, d_mask, 8, BS, R8_, DOT_PRECISION)
    if HAS_TEXT:
        offs_t = tl.arange(0, TEXT_BLOCK)
        ek = EK + off_b * stride_ekb + off_h * stride_ekh + offs_d[:, None] * stride_ekd
        ev = EV + off_b * stride_evb + off_h * stride_evh + offs_d[None, :] * stride_evd
        zero = tl.zeros([TEXT_BLOCK], dtype=tl.float32)
        for start_n in range(0, T, TEXT_BLOCK):
            n_in = start_n + offs_t < T
            valid = n_in
            if HAS_TEXT_MASK:
                vis = tl.load(EMask + off_b * stride_emb + start_n + offs_t, mask=n_in, other=0)
                valid = valid & (vis != 0)
            rows = (start_n + offs_t).to(tl.int64)
            kT = tl.load(ek + rows[None, :] * stride_ekn, mask=n_in[None, :] & d_mask[:, None], other=0.0)
            v = tl.load(ev + rows[:, None] * stride_evn, mask=n_in[:, None] & d_mask[None, :], other=0.0)
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kT, v, valid, zero, qk_scale, DOT_PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + q_rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])
    # natural-log LSE (log2 units times ln 2); -inf for a row that sees no key
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
                   * 0.6931471805599453)
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + q_rows, lse, mask=m_valid)


def _strides(t: Tensor | None) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def level_lists(levels: Tensor) -> tuple[Tensor, Tensor]:
    """Per (b, h, query block) the KV blocks sorted by level (1, 2, 4, 8, then skipped) and the cumulative ends.

    Returns ``(indices (B, H, n, n) int32, ends (B, H, n, 4) int32)``: row entries ``[0, ends[0])`` are level 1,
    ``[ends[0], ends[1])`` level 2, and so on; entries past ``ends[3]`` are skipped blocks. On the device.
    The kernels use its one-launch Triton form (`pyramid_levels.level_lists`); this is its reference.
    """
    lv = levels.long()
    rank = torch.full_like(lv, 4)
    for t, p in enumerate(LEVELS):
        rank = torch.where(lv == p, t, rank)
    order = rank.argsort(dim=-1, stable=True).to(torch.int32)
    counts = torch.stack([(rank == t).sum(-1) for t in range(4)], -1)
    return order.contiguous(), counts.cumsum(-1).to(torch.int32).contiguous()


def _parts(x: Tensor, parts: list[int]) -> tuple[Tensor, Tensor | None]:
    v0, vl, t0, tl_ = parts
    return x[:, v0:v0 + vl], (x[:, t0:t0 + tl_] if tl_ else None)


def pooled_buffer(x: Tensor, block: int) -> tuple[Tensor, int, int]:
    """Levels 2, 4, 8 of video rows ``x`` (B, V, H, D) in one contiguous buffer, and where levels 4 and 8 start.

    The PyTorch form of `pool_kv_levels` (which the kernels use: one launch for K and V); kept as its reference."""
    pooled, _ = pool_levels(x, block)
    r2, r4 = pooled[0].shape[1], pooled[1].shape[1]
    return torch.cat(pooled, 1).contiguous(), r2, r2 + r4


def tile_rows(block: int, p: int, most: int) -> tuple[int, int]:
    """(lanes per tile, tiles per KV block) for the b/p pooled rows of a level: at least 16 lanes (tl.dot),
    at most ``most``."""
    rows = max(16, min(most, block // p))
    return rows, max(1, (block // p) // rows)


def _empty_lse(q: Tensor) -> Tensor:
    B, NV, H, _ = q.shape
    return torch.empty(B, H, NV, dtype=torch.float32, device=q.device)


@torch.library.custom_op("accel::pyramid_fwd", mutates_args=())
def pyramid_fwd(
    q: Tensor, k: Tensor, v: Tensor, levels: Tensor, text_vis: Tensor | None, parts: list[int], block: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Triton forward: video queries q (B, V, H, D) over the joint k, v with (B, H, n, n) levels.

    Returns (out (B, V, H, D), lse (B, H, V) float32, natural log, -inf for rows that see no key)."""
    B, NV, H, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _empty_lse(q)
    kv, ek = _parts(k, parts)
    vv, ev = _parts(v, parts)
    kp, vp, r4, r8 = pool_kv_levels(kv, vv, block)
    idx, ends = fused_level_lists(levels)
    T = ek.shape[1] if ek is not None else 0
    emask = text_vis if (T and text_vis is not None) else None
    tensors = {"q": q, "out": out, "video k": kv, "video v": vv, "pooled k": kp, "pooled v": vp}
    if T:
        tensors.update({"text k": ek, "text v": ev})
    if gluon_fwd_problem(q, tensors, block) is None and _launch_gluon_or_warn(
            (q, kv, vv, kp, vp, ek, ev, emask, out, lse, idx, ends, r4, r8, block, scale), GLUON_WS and block == 128):
        return out, lse
    knobs = fwd_knobs(block, head_dim_pad(D), fwd_uses_tma(kv, vv, kp, vp),
                      max(kp.shape[1] * kp.stride(1), vp.shape[1] * vp.stride(1)) < 2**31)
    launch_fwd(q, kv, vv, kp, vp, ek, ev, emask, out, lse, idx, ends, r4, r8, block, scale, knobs)
    return out, lse


def _launch_gluon_or_warn(args: tuple, ws: bool) -> bool:
    """Run the Gluon forward (`pyramid_gluon.launch_fwd_gluon` with ``args``); False, with a warning, when this
    Triton cannot build it (Gluon is experimental: a release that changes its API must cost speed, not the
    call). Any other error is raised."""
    try:
        launch_fwd_gluon(*args, ws=ws)
        return True
    except Exception as err:
        if not ws_compile_failed(err, "the Gluon pyramid forward", "the Triton kernel"):
            raise
        return False


def fwd_uses_tma(*tensors: Tensor) -> bool:
    """Whether the forward reads the video and pooled K/V through tensor descriptors (Hopper, 16-bit, aligned;
    `select.tma_problem`); otherwise through pointers (older GPUs, fp32, the interpreter)."""
    return all(tma_problem(t, "kv") is None for t in tensors)


def fwd_knobs(block: int, hdp: int, use_tma: bool, pooled_fit_int32: bool = True) -> dict[str, int | bool]:
    """Forward launch knobs from the H200 sweeps at Wan2.1-1.3B 480p (benchmarks/results/pyramid_stages_b*.json,
    ``kernel_configs_ms``). 128-row tiles at D=128: 8 warps, 3 stages, descriptors, and the pooled levels with
    fewer than 64 rows per block packed into 64-lane tiles (2.86 ms; unpacked 2.98, through pointers 3.15, with
    4 warps 4.39; 128-lane packs spill registers: 3.8-4.2). 64-row tiles: 4 warps, pooled blocks packed into
    full-width tiles with 2 stages (2.97-2.99 ms; unpacked 3.15, pointers 3.42). Pairs of pooled blocks sharing
    one softmax update (3.09 vs 3.12 ms) and query blocks split over two programs (3.70) did not pay and were
    removed. Packed tiles gather rows through int32 offsets, so they need ``pooled_fit_int32`` (every pooled row
    offset below 2**31). ``PACK`` is the lanes per packed tile (0: one pooled block per tile)."""
    wide = block * hdp >= 128 * 128
    pack = (block // 2 if wide else block) if use_tma and pooled_fit_int32 else 0
    # 128-row tiles of a head dim padded to 256 need 459 KB of shared memory in 3 stages, 197 KB in one
    stages = 1 if block * hdp > 128 * 128 else (2 if pack and not wide else 3)
    return {"num_warps": 8 if wide else 4, "num_stages": stages, "USE_TMA": use_tma, "PACK": pack}


def launch_fwd(q: Tensor, kv: Tensor, vv: Tensor, kp: Tensor, vp: Tensor, ek: Tensor | None, ev: Tensor | None,
               emask: Tensor | None, out: Tensor, lse: Tensor, idx: Tensor, ends: Tensor, r4: int, r8: int,
               block: int, scale: float, knobs: dict[str, int | bool]) -> None:
    """Launch the forward kernel into ``out``/``lse`` with explicit knobs (`fwd_knobs`; probes A/B others)."""
    B, NV, H, D = q.shape
    nb = -(-NV // block)
    T = ek.shape[1] if ek is not None else 0
    if knobs["USE_TMA"]:
        ensure_allocator()
    _pyramid_fwd_kernel[(nb, B * H)](
        q, kv, vv, kp, vp, ek if T else kp, ev if T else vp, emask if emask is not None else idx, out, lse, idx, ends,
        *q.stride(), *kv.stride(), *vv.stride(), *kp.stride(), *vp.stride(), *_strides(ek), *_strides(ev),
        emask.stride(0) if emask is not None else 0, *out.stride(), lse.stride(0), lse.stride(1),
        H, NV, nb, T, r4, r8, kp.shape[1], scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BS=block,
        R1_=max(16, block), R2_=max(16, block // 2), R4_=max(16, block // 4), R8_=max(16, block // 8),
        HAS_TEXT=T > 0, HAS_TEXT_MASK=emask is not None, TEXT_BLOCK=_TEXT_BLOCK, DOT_PRECISION=dot_precision(q.dtype),
        **knobs,
    )


@pyramid_fwd.register_fake
def _(q, k, v, levels, text_vis, parts, block, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), _empty_lse(q)


@torch.library.custom_op("accel::pyramid_bwd", mutates_args=())
def pyramid_bwd(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, levels: Tensor,
    text_vis: Tensor | None, parts: list[int], block: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: dq (B, V, H, D) and the gradients of the whole joint k, v (zero outside video and text)."""
    from .pyramid_bwd import pyramid_backward

    return pyramid_backward(dout, dlse, q, k, v, out, lse, levels, text_vis, parts, block, scale)


@pyramid_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, levels, text_vis, parts, block, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, levels, text_vis, parts, block, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, levels, text_vis, out, lse)
    ctx.meta = (parts, block, scale)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, levels, text_vis, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.accel.pyramid_bwd(dout, dlse, q, k, v, out, lse, levels, text_vis, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("accel::pyramid_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- public API
def can_run_pyramid(q: Tensor, raise_error: bool = False) -> bool:
    """Whether the Triton kernel can run on q's device and dtype (CUDA, or CPU under TRITON_INTERPRET=1)."""
    reason = triton_input_reason(q)
    if reason and raise_error:
        raise NotImplementedError(f"pyramid kernel cannot run: {reason}")
    return reason is None


def pyramid_attention(
    q: Tensor, k: Tensor, v: Tensor, levels: Tensor, block_size: int, *,
    video_keys: tuple[int, int] | None = None, text_keys: tuple[int, int] | None = None,
    text_lengths: Tensor | None = None, text_mask: Tensor | None = None, scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pyramid sparse attention of video queries over the joint k/v (semantics: `pyramid_reference`).

    Args:
        q: (B, V, H, D) video queries (any strides); fp16/bf16/fp32, D <= 256.
        k, v: (B, S, H, D) joint buffers read in place: rows ``video_keys`` (start, V) are the video keys, rows
            ``text_keys`` (start, T) text keys every query sees at full resolution.
        levels: (B, H, n, n) ints in {0, 1, 2, 4, 8}, n = ceil(V / block_size): the level of each
            (query block, KV block) pair (0 = skipped).
        block_size: tokens per query and KV block, one of 16, 32, 64, 128.
        text_lengths: (B,) ints, only the first ``text_lengths[b]`` text keys visible; or ``text_mask`` (B, T)
            bool, True = visible.
        scale: softmax scale (default 1/sqrt(D)).
        return_lse: also return the log-sum-exp (B, H, V) float32, natural log (-inf for a row that sees no
            key), for merging partial results; differentiable.

    Returns:
        (B, V, H, D), or (out, lse). Differentiable in q, k, v through the Triton backward (`pyramid_bwd`):
        gradients reach q, the text rows and, through the mean pooling, the video rows of k and v.
    """
    can_run_pyramid(q, raise_error=True)
    B, NV, H, D = q.shape
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    if k.shape != v.shape or k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be (B, S, H, D) matching q, got q={tuple(q.shape)}, k={tuple(k.shape)}, "
                         f"v={tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    parts = resolve_key_parts(k.shape[1], video_keys, text_keys)
    if parts.video_len != NV:
        raise ValueError(f"video_keys cover {parts.video_len} rows, q has {NV} video tokens")
    n = -(-NV // block_size)
    if tuple(levels.shape) != (B, H, n, n):
        raise ValueError(f"levels must be (B, H, n, n) = {(B, H, n, n)}, got {tuple(levels.shape)}")
    if text_lengths is not None and text_mask is not None:
        raise ValueError("give text_lengths (trailing padding) or text_mask, not both")
    vis = text_visibility(parts.text_len, text_lengths, text_mask, torch.int8) if parts.text_len else None
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out, lse = torch.ops.accel.pyramid_fwd(q, k, v, levels.to(device=q.device, dtype=torch.int32), vis,
                                           list(parts), int(block_size), scale)
    return (out, lse) if return_lse else out
