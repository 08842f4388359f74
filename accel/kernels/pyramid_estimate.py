"""Pyramid attention's block-importance estimate as one Triton kernel (same formula as the PyTorch one).

`accel.kernels.pyramid_reference.estimate_block_importance` materialises every sampled logit: (n * sq) x (n * sk)
per head, about 1.6 GB at Wan2.1-1.3B 480p with blocks of 128, written by a matmul and read back by the block
max (1.9 ms of a 5.8 ms pyramid call on the H200, `pyramid_stages_b128.json`). Here a work item is the sampled
queries of ``BI`` consecutive query blocks of one (batch, head) (``BI * SQP`` = 256 or 128 rows, so the dots are
full tensor-core tiles and each sampled key is read once per item); it walks the KV blocks once, ``KB``
blocks per dot. Each block's max over its sampled keys (from a reshape of the dot's columns) is that block's max
logit per sampled query: it goes to the program's scratch slot (n floats per sampled query, 1/sk of the logits)
and into the row max over all keys. After a barrier the program reads its slot back and keeps ``max over a query
block's samples of exp(block max - row max)``. The logits are computed once (a matmul of the sampled tokens
only: 1/32 of dense attention's FLOPs at b/4 samples) and never stored.

The kernel reads the sampled rows straight from q and k ((B, V, H, D), any strides): row ``j * b + pos % r`` of
block j (r its length) for the within-block positions of `sample_offsets`, the tokens `sample_positions` names,
so no gathered copies are made (two gathers were 0.65 ms at Wan2.1-14B 720p). Programs are persistent, each
taking the next item from an atomic counter, so the scratch is one slot per program (80 MB at 14B 720p; a slot
per item was 1.8 GB there, in four launches): one per SM with items of 256 rows for 16-bit inputs (head dims up
to 128), two per SM with 128 rows otherwise (at 14B 720p, 128 rows one per SM: 8.8-8.9 ms; `_LAUNCH_ROWS`). Full
KV tiles run without masks.

The logits stay in fp32 accumulators (the PyTorch path rounds half-precision logits to the input dtype before
the block max), so half-precision results agree to rounding, not bit for bit. On the H200
(`benchmarks/results/pyramid_profile_inplace_estimate_stdout.txt`, `pyramid_profile_wan14b-720p_round5.json`,
`pyramid_profile_*_est_r6.json`):
Wan2.1-14B 720p 7.1-7.2 ms (128 rows: 7.2-7.7; with gathered copies, 4 KV blocks a dot and a slot per item: 9.0 ms
plus 0.65 of gathers), Wan2.1-1.3B 480p 0.47 ms (0.63 plus 0.09).
"""

# No `from __future__ import annotations`: kept like the other kernel modules.

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import triton_input_reason
from ._triton_common import LOG2E, dot_precision
from .pyramid_reference import normalise_rows, sample_offsets

__all__ = ["estimate_block_importance_triton"]

# Sampled query rows per item (BI query blocks x SQP samples) -> persistent programs per SM. 256 rows with one
# program per SM for 16-bit inputs with head dims <= 128 (on the H200, two sweeps, `pyramid_profile_*_est_r6.json`
# and the round-5 one: 14B 720p 7.13-7.15 ms against 7.23-7.52 for 128 rows two per SM, 1.3B 480p 0.471 against
# 0.484); 128 rows two per SM otherwise (fp32, head dims above 128: not measured with 256 rows, whose Q tile would
# take twice the shared memory).
_LAUNCH_ROWS = {256: 1, 128: 2}
_ROWS_16BIT = 256
_ROWS = 128
_OUT_COLUMNS = 32  # KV blocks per step of the read-back
# KV blocks per dot: 2 on the H200 (`pyramid_profile_*_before.json` ``estimate_configs``; with the gathered copies:
# 14B 720p 8.18 ms against 9.05 with 4, 1.3B 480p 0.57 against 0.64; rows 256 or 512 per item, 16 warps or 4
# stages no better)
_BLOCKS_PER_DOT = 2
_NUM_STAGES = 3
_INTERPRETER_PROGRAMS = 3


@triton.jit
def _sampled_rows(X, b, h, blk, pos, ok, V, stride_b, stride_n, stride_h, rd, D: tl.constexpr,
                  BLOCK: tl.constexpr, FULL: tl.constexpr):
    """(rows, BD) sampled tokens: row ``blk * BLOCK + pos % r`` of block ``blk`` (r its length, the last may be
    partial); ``FULL``: every block is whole and every row valid (no masks)."""
    if FULL:
        tok = blk * BLOCK + pos
        return tl.load(X + b * stride_b + tok[:, None].to(tl.int64) * stride_n + h * stride_h + rd[None, :])
    length = tl.maximum(tl.minimum(V - blk * BLOCK, BLOCK), 1)
    tok = blk * BLOCK + pos % length
    return tl.load(X + b * stride_b + tok[:, None].to(tl.int64) * stride_n + h * stride_h + rd[None, :],
                   mask=ok[:, None] & (rd[None, :] < D), other=0.0)


@triton.jit
def _block_maxes(q, k, ok, BM: tl.constexpr, KB: tl.constexpr, SKP: tl.constexpr, MASK: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(BM, KB): each KV block's max logit per sampled query (columns not ``ok`` excluded when ``MASK``)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK:
        s = tl.where(ok[None, :], s, float("-inf"))
    return tl.max(tl.reshape(s, (BM, KB, SKP)), 2)


@triton.jit
def _estimate_kernel(Q, K, PosQ, PosK, Scratch, S, Counter, V, n, H, groups, items, qk_scale,
                     sqb, sqn, sqh, skb, skn, skh,
                     BLOCK: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, SQP: tl.constexpr,
                     SKP: tl.constexpr, BI: tl.constexpr, KB: tl.constexpr, BJ: tl.constexpr, D: tl.constexpr,
                     BD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    BM: tl.constexpr = BI * SQP
    FULL_COLS: tl.constexpr = (SK == SKP) & (D == BD)
    r = tl.arange(0, BM)
    rd = tl.arange(0, BD)
    c = tl.arange(0, KB * SKP)
    cb = c // SKP
    cs = c % SKP
    kk = tl.arange(0, KB)
    jj = tl.arange(0, BJ)
    bi = tl.arange(0, BI)
    # this program's slot: KV block j's BM floats at j * BM
    slot = Scratch + tl.program_id(0).to(tl.int64) * n * BM + r
    whole = V // BLOCK  # blocks with BLOCK tokens
    full_end = whole // KB * KB  # dots whose KB blocks are all whole
    item = tl.atomic_add(Counter, 1)
    while item < items:
        bh = item // groups
        g = item % groups
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        qi = g * BI + r // SQP  # the query block of each row
        q_ok = (r % SQP < SQ) & (qi < n)
        pos_q = tl.load(PosQ + bh * SQ + r % SQP, mask=r % SQP < SQ, other=0)
        q = _sampled_rows(Q, b, h, qi, pos_q, q_ok, V, sqb, sqn, sqh, rd, D, BLOCK, False)
        pos_k = tl.load(PosK + bh * SK + cs, mask=cs < SK, other=0)
        row_max = tl.full([BM], float("-inf"), tl.float32)
        for j0 in range(0, full_end, KB):  # whole blocks: no masks when every column is a real sample
            k = _sampled_rows(K, b, h, j0 + cb, pos_k, cs < SK, V, skb, skn, skh, rd, D, BLOCK, FULL_COLS)
            block_max = _block_maxes(q, k, cs < SK, BM, KB, SKP, not FULL_COLS, DOT_PRECISION)
            row_max = tl.maximum(row_max, tl.max(block_max, 1))
            tl.store(slot[:, None] + (j0 + kk)[None, :].to(tl.int64) * BM, block_max)
        for j0 in range(full_end, n, KB):  # the last dot: a partial block, or fewer than KB blocks left
            ok = (cs < SK) & (j0 + cb < n)
            k = _sampled_rows(K, b, h, j0 + cb, pos_k, ok, V, skb, skn, skh, rd, D, BLOCK, False)
            block_max = _block_maxes(q, k, ok, BM, KB, SKP, True, DOT_PRECISION)
            row_max = tl.maximum(row_max, tl.max(block_max, 1))
            tl.store(slot[:, None] + (j0 + kk)[None, :].to(tl.int64) * BM, block_max, mask=(j0 + kk < n)[None, :])
        tl.debug_barrier()  # the read-back below reads rows other threads of this program wrote
        out_ok = g * BI + bi < n
        for j0 in range(0, n, BJ):
            j_ok = j0 + jj < n
            bm = tl.load(slot[None, :] + (j0 + jj)[:, None].to(tl.int64) * BM, mask=j_ok[:, None],
                         other=float("-inf"))  # (BJ, BM)
            e = tl.exp2((bm - row_max[None, :]) * qk_scale)
            e = tl.where(q_ok[None, :] & j_ok[:, None], e, 0.0)  # padding rows never count
            best = tl.max(tl.reshape(e, (BJ, BI, SQP)), 2)  # (BJ, BI): max over each query block's samples
            dst = S + (bh * n + g * BI + bi[None, :]).to(tl.int64) * n + (j0 + jj)[:, None]
            tl.store(dst, best, mask=j_ok[:, None] & out_ok[None, :])
        tl.debug_barrier()  # the next item overwrites the slot
        item = tl.atomic_add(Counter, 1)


def _programs(device: torch.device, items: int, per_sm: int) -> int:
    if device.type != "cuda":
        return max(1, min(items, _INTERPRETER_PROGRAMS))
    return max(1, min(items, per_sm * torch.cuda.get_device_properties(device).multi_processor_count))


def estimate_block_importance_triton(
    q: Tensor, k: Tensor, block_size: int, *, seed: int = 0, sample_q: int | None = None,
    sample_k: int | None = None, scale: float | None = None, blocks_per_dot: int | None = None,
    rows: int | None = None, programs_per_sm: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """(B, H, n, n) float32 block importance, `estimate_block_importance`'s formula in one kernel (no host sync).

    ``q``, ``k``: (B, V, H, D) video rows on CUDA (or CPU under TRITON_INTERPRET=1), fp16/bf16/fp32, read in
    place. ``blocks_per_dot`` (a power of two) overrides how many KV blocks' sampled keys share one dot, ``rows``
    (a power of two) the sampled query rows per item, ``programs_per_sm`` the persistent grid, ``num_warps`` and
    ``num_stages`` the launch (probes).
    """
    reason = triton_input_reason(q)
    if reason is not None:
        raise ValueError(f"estimate_block_importance_triton: {reason}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same (B, V, H, D) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    B, V, H, D = q.shape
    n = -(-V // block_size)
    scale = 1.0 / D ** 0.5 if scale is None else float(scale)
    pos_q, pos_k = sample_offsets(q.shape, block_size, seed=seed, sample_q=sample_q, sample_k=sample_k,
                                  device=q.device)
    sq, sk = pos_q.shape[-1], pos_k.shape[-1]
    pos_q, pos_k = (p.to(torch.int32).reshape(B * H, -1).contiguous() for p in (pos_q, pos_k))
    q, k = q.detach(), k.detach()
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        q, k = q.contiguous(), k.contiguous()
    sqp = triton.next_power_of_2(sq)
    launch_rows = _ROWS_16BIT if q.element_size() == 2 and D <= 128 else _ROWS
    bi = max(1, min((rows or launch_rows) // sqp, triton.next_power_of_2(n)))
    bi = max(bi, -(-16 // sqp))  # a dot needs at least 16 rows
    groups = -(-n // bi)
    skp = triton.next_power_of_2(sk)
    kb = blocks_per_dot or min(_BLOCKS_PER_DOT, triton.next_power_of_2(n))
    if kb & (kb - 1):
        raise ValueError(f"estimate_block_importance_triton: blocks_per_dot must be a power of two, got {kb}")
    if rows is not None and (rows < 1 or rows & (rows - 1)):
        raise ValueError(f"estimate_block_importance_triton: rows must be a power of two, got {rows}")
    kb = max(kb, -(-16 // skp))  # a dot needs at least 16 columns
    items = B * H * groups
    programs = _programs(q.device, items, programs_per_sm or _LAUNCH_ROWS.get(rows or launch_rows, 2))
    scratch = torch.empty(programs * n * bi * sqp, dtype=torch.float32, device=q.device)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    importance = torch.empty(B * H, n, n, dtype=torch.float32, device=q.device)
    _estimate_kernel[(programs,)](
        q, k, pos_q, pos_k, scratch, importance, counter, V, n, H, groups, items, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        BLOCK=block_size, SQ=sq, SK=sk, SQP=sqp, SKP=skp, BI=bi, KB=kb,
        BJ=min(_OUT_COLUMNS, triton.next_power_of_2(n)), D=D, BD=max(16, triton.next_power_of_2(D)),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps or (8 if bi * sqp * D >= 128 * 128 else 4), num_stages=num_stages or _NUM_STAGES,
    )
    return normalise_rows(importance.view(B, H, n, n))
