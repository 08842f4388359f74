"""Pyramid attention's block-importance estimate as one Triton kernel (same formula as the PyTorch one).

`accel.kernels.pyramid_reference.estimate_block_importance` materialises every sampled logit: (n * sq) x (n * sk)
per head, about 1.6 GB at Wan2.1-1.3B 480p with blocks of 128, written by a matmul and read back by the block
max; that memory traffic was 1.9 of the 8.2 ms of a pyramid call on the H200 (`pyramid_stages_b128.json`). Here
one program owns one (query block, batch x head) and walks the KV blocks twice: the first pass finds each sampled
query's max logit over all sampled keys, the second recomputes the logits, takes each block's max and keeps
``max over sampled queries of exp(block max - row max)``. Nothing but the (B, H, n, n) result reaches memory; the
logits are computed twice (a matmul of the sampled tokens only, 1/16 of dense attention's at b/4 samples).

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

_COLUMNS = 128  # sampled keys per dot (BJ blocks x SKP samples)


@triton.jit
def _sampled_logits(q, KS, k_base, j0, n, rd, cb, cs, SK: tl.constexpr, D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Logits of the sampled queries ``q`` against the sampled keys of KV blocks j0 .. j0 + BJ - 1."""
    blk = j0 + cb
    ok = (blk < n) & (cs < SK)
    k = tl.load(KS + k_base + (blk * SK + cs)[:, None].to(tl.int64) * D + rd[None, :],
                mask=ok[:, None] & (rd[None, :] < D), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return tl.where(ok[None, :], s, float("-inf"))


@triton.jit
def _estimate_kernel(QS, KS, S, n, qk_scale, SQ: tl.constexpr, SK: tl.constexpr, SQP: tl.constexpr,
                     SKP: tl.constexpr, BJ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rq = tl.arange(0, SQP)
    rd = tl.arange(0, BD)
    q_ok = rq < SQ
    q = tl.load(QS + bh * n * SQ * D + (i * SQ + rq)[:, None].to(tl.int64) * D + rd[None, :],
                mask=q_ok[:, None] & (rd[None, :] < D), other=0.0)
    c = tl.arange(0, BJ * SKP)
    cb = c // SKP  # which block of the chunk a column belongs to
    cs = c % SKP  # which sample of that block
    k_base = bh * n * SK * D
    row_max = tl.full([SQP], float("-inf"), tl.float32)
    for j0 in range(0, n, BJ):
        s = _sampled_logits(q, KS, k_base, j0, n, rd, cb, cs, SK, D, DOT_PRECISION)
        row_max = tl.maximum(row_max, tl.max(s, 1))
    out = tl.arange(0, BJ)
    for j0 in range(0, n, BJ):
        s = _sampled_logits(q, KS, k_base, j0, n, rd, cb, cs, SK, D, DOT_PRECISION)
        block_max = tl.max(tl.reshape(s, (SQP, BJ, SKP)), 2)  # (SQP, BJ)
        e = tl.exp2((block_max - row_max[:, None]) * qk_scale)
        e = tl.where(q_ok[:, None], e, 0.0)  # padding rows (all-zero queries) never count
        tl.store(S + (bh * n + i) * n + j0 + out, tl.max(e, 0), mask=j0 + out < n)


def estimate_block_importance_triton(
    q: Tensor, k: Tensor, block_size: int, *, seed: int = 0, sample_q: int | None = None,
    sample_k: int | None = None, scale: float | None = None,
) -> Tensor:
    """(B, H, n, n) float32 block importance, `estimate_block_importance`'s formula in one kernel (no host sync).

    ``q``, ``k``: (B, V, H, D) video rows on CUDA (or CPU under TRITON_INTERPRET=1), fp16/bf16/fp32.
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
    sqp = max(16, triton.next_power_of_2(sq))
    skp = triton.next_power_of_2(sk)
    bj = max(1, min(triton.next_power_of_2(n), _COLUMNS // skp))
    bj = max(bj, -(-16 // skp))  # a dot needs at least 16 columns
    importance = torch.empty(B * H, n, n, dtype=torch.float32, device=q.device)
    _estimate_kernel[(n, B * H)](
        qs, ks, importance, n, scale * LOG2E, SQ=sq, SK=sk, SQP=sqp, SKP=skp, BJ=bj, D=D,
        BD=max(16, triton.next_power_of_2(D)), DOT_PRECISION=dot_precision(q.dtype), num_warps=4,
    )
    return normalise_rows(importance.view(B, H, n, n))
