"""Pyramid attention's block-importance estimate as one Triton kernel (same formula as the PyTorch one).

`accel.kernels.pyramid_reference.estimate_block_importance` materialises every sampled logit: (n * sq) x (n * sk)
per head, about 1.6 GB at Wan2.1-1.3B 480p with blocks of 128, written by a matmul and read back by the block
max (1.9 ms of a 5.8 ms pyramid call on the H200, `pyramid_stages_b128.json`). Here one program owns the sampled
queries of ``BI`` consecutive query blocks (``BI * SQP`` = 128 rows, so the dots are full tensor-core tiles and
each sampled key is read once per 128 query rows) and walks the KV blocks once, ``KB`` = 4 blocks per dot. Each
block's max over its sampled keys (from a reshape of the dot's columns) is that block's max logit per sampled
query: it goes to a scratch of n floats per sampled query (1/sk of the logits; heads beyond 512 MB of scratch
run as further launches) and into the row max over all keys. After a barrier the same program reads its scratch
rows back and keeps ``max over a query block's samples of exp(block max - row max)``. The logits are computed
once (a matmul of the sampled tokens only: 1/32 of dense attention's FLOPs at b/4 samples) and never stored.
On the H200 at Wan2.1-1.3B 480p: 0.64 ms at block 128, 0.68 ms at block 64 (PyTorch estimate: 1.85, 2.25 ms).

Sampled positions come from `sample_positions`, shared with the PyTorch estimate, so both see the same tokens.
The logits stay in fp32 accumulators (the PyTorch path rounds half-precision logits to the input dtype before
the block max), so half-precision results agree to rounding, not bit for bit.
"""

# No `from __future__ import annotations`: kept like the other kernel modules.

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import triton_input_reason
from ._triton_common import LOG2E, dot_precision
from .pyramid_reference import estimate_setup, normalise_rows

__all__ = ["estimate_block_importance_triton"]

_ROWS = 128  # sampled query rows per program (BI query blocks x SQP samples)
_SCRATCH_BYTES = 1 << 29  # per launch; more heads run as further launches
_OUT_COLUMNS = 32  # KV blocks per step of the read-back
# KV blocks per dot: on the H200 4 was best at both block sizes (`pyramid_stages_b*.json`,
# ``estimate_fused_blocks_per_dot_ms``): block 64 (16 samples each) 1/2/4/8 blocks 1.02/0.74/0.68/0.74 ms, block
# 128 (32 samples) 0.90/0.91/0.64 ms (8 does not fit in shared memory).
_BLOCKS_PER_DOT = 4
_NUM_STAGES = 3


@triton.jit
def _estimate_kernel(QS, KS, Scratch, S, n, rows_per_bh, bh0, qk_scale,
                     SQ: tl.constexpr, SK: tl.constexpr, SQP: tl.constexpr, SKP: tl.constexpr,
                     BI: tl.constexpr, KB: tl.constexpr, BJ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    g = tl.program_id(0)
    bh_local = tl.program_id(1).to(tl.int64)
    bh = bh0 + bh_local
    BM: tl.constexpr = BI * SQP
    r = tl.arange(0, BM)
    qi = g * BI + r // SQP  # the query block of each row
    q_ok = (r % SQP < SQ) & (qi < n)
    rd = tl.arange(0, BD)
    q = tl.load(QS + bh * n * SQ * D + (qi * SQ + r % SQP)[:, None].to(tl.int64) * D + rd[None, :],
                mask=q_ok[:, None] & (rd[None, :] < D), other=0.0)
    # KB KV blocks per dot (KB * SKP columns: a full-width tile), each block's max taken from a reshape
    c = tl.arange(0, KB * SKP)
    cb = c // SKP
    cs = c % SKP
    k_base = KS + bh * n * SK * D
    kk = tl.arange(0, KB)
    # scratch row of KV block j: rows_per_bh floats, this program's BM of them at g * BM
    scratch = Scratch + bh_local * n * rows_per_bh + g * BM + r
    row_max = tl.full([BM], float("-inf"), tl.float32)
    for j0 in range(0, n, KB):
        ok = (cs < SK) & (j0 + cb < n)
        k = tl.load(k_base + ((j0 + cb) * SK + cs)[:, None].to(tl.int64) * D + rd[None, :],
                    mask=ok[:, None] & (rd[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(ok[None, :], s, float("-inf"))
        block_max = tl.max(tl.reshape(s, (BM, KB, SKP)), 2)  # (BM, KB)
        row_max = tl.maximum(row_max, tl.max(block_max, 1))
        tl.store(scratch[:, None] + (j0 + kk)[None, :].to(tl.int64) * rows_per_bh, block_max,
                 mask=(j0 + kk < n)[None, :])
    tl.debug_barrier()  # the read-back below reads rows other threads of this program wrote
    jj = tl.arange(0, BJ)
    bi = tl.arange(0, BI)
    out_ok = g * BI + bi < n
    for j0 in range(0, n, BJ):
        j_ok = j0 + jj < n
        bm = tl.load(scratch[None, :] + (j0 + jj)[:, None].to(tl.int64) * rows_per_bh, mask=j_ok[:, None],
                     other=float("-inf"))  # (BJ, BM)
        e = tl.exp2((bm - row_max[None, :]) * qk_scale)
        e = tl.where(q_ok[None, :] & j_ok[:, None], e, 0.0)  # padding rows never count
        best = tl.max(tl.reshape(e, (BJ, BI, SQP)), 2)  # (BJ, BI): max over each query block's samples
        dst = S + (bh * n + g * BI + bi[None, :]).to(tl.int64) * n + (j0 + jj)[:, None]
        tl.store(dst, best, mask=j_ok[:, None] & out_ok[None, :])


def estimate_block_importance_triton(
    q: Tensor, k: Tensor, block_size: int, *, seed: int = 0, sample_q: int | None = None,
    sample_k: int | None = None, scale: float | None = None, blocks_per_dot: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> Tensor:
    """(B, H, n, n) float32 block importance, `estimate_block_importance`'s formula in one kernel (no host sync).

    ``q``, ``k``: (B, V, H, D) video rows on CUDA (or CPU under TRITON_INTERPRET=1), fp16/bf16/fp32.
    ``blocks_per_dot`` (a power of two) overrides how many KV blocks' sampled keys share one dot, ``num_warps``
    and ``num_stages`` the launch (probes).
    """
    reason = triton_input_reason(q)
    if reason is not None:
        raise ValueError(f"estimate_block_importance_triton: {reason}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same (B, V, H, D) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    B, V, H, D = q.shape
    n, scale, idx_q, idx_k = estimate_setup(q, block_size, seed=seed, sample_q=sample_q, sample_k=sample_k,
                                            scale=scale)
    sq, sk = idx_q.shape[-1], idx_k.shape[-1]

    def sampled(x: Tensor, idx: Tensor) -> Tensor:  # (B*H, n*samples, D), block-major
        xh = x.detach().transpose(1, 2)
        return torch.gather(xh, 2, idx.reshape(B, H, -1, 1).expand(-1, -1, -1, D)).reshape(B * H, -1, D).contiguous()

    qs, ks = sampled(q, idx_q), sampled(k, idx_k)
    sqp = triton.next_power_of_2(sq)
    bi = max(1, min(_ROWS // sqp, triton.next_power_of_2(n)))
    bi = max(bi, -(-16 // sqp))  # a dot needs at least 16 rows
    groups = -(-n // bi)
    rows_per_bh = groups * bi * sqp
    skp = triton.next_power_of_2(sk)
    kb = blocks_per_dot or min(_BLOCKS_PER_DOT, triton.next_power_of_2(n))
    if kb & (kb - 1):
        raise ValueError(f"estimate_block_importance_triton: blocks_per_dot must be a power of two, got {kb}")
    kb = max(kb, -(-16 // skp))  # a dot needs at least 16 columns
    bh_step = max(1, min(B * H, _SCRATCH_BYTES // (4 * n * rows_per_bh)))
    scratch = torch.empty(bh_step * n * rows_per_bh, dtype=torch.float32, device=q.device)
    importance = torch.empty(B * H, n, n, dtype=torch.float32, device=q.device)
    for bh0 in range(0, B * H, bh_step):
        _estimate_kernel[(groups, min(bh_step, B * H - bh0))](
            qs, ks, scratch, importance, n, rows_per_bh, bh0, scale * LOG2E, SQ=sq, SK=sk, SQP=sqp,
            SKP=skp, BI=bi, KB=kb, BJ=min(_OUT_COLUMNS, triton.next_power_of_2(n)), D=D,
            BD=max(16, triton.next_power_of_2(D)), DOT_PRECISION=dot_precision(q.dtype),
            num_warps=num_warps or (8 if bi * sqp * D >= 128 * 128 else 4), num_stages=num_stages or _NUM_STAGES,
        )
    return normalise_rows(importance.view(B, H, n, n))
