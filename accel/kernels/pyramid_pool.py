"""Pyramid attention's pooled K/V (levels 2, 4, 8) for both K and V in one Triton launch.

`accel.kernels.pyramid_reference.pool_levels` builds the group means with a chain of PyTorch ops (pad, fp32 copy,
three view-sums, divides, casts, then a concatenation per tensor): 1.44 ms of a 7 ms pyramid call at Wan2.1-1.3B
480p on the H200 (`pyramid_stages_b128.json`), for ~0.4 GB of memory traffic. Here one program loads a chunk of
``CHUNK`` tokens of K and of V once (as 8 interleaved row sets, so no sum needs a reshape), sums pairs
hierarchically in fp32 (level 4 from level 2, 8 from 4: the same additions in the same order as `pool_levels`),
divides by the real token count of each group and writes all three levels into the buffer layout
`accel.kernels.pyramid.pooled_buffer` returns. Rows past the last token are 0.
"""

# No `from __future__ import annotations`: kept like the other kernel modules.
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import head_dim_pad

__all__ = ["pool_kv_levels"]

# Launch defaults: 32 tokens per program with 2 warps holds the 8 row sets in 148 registers without spilling (sm_90
# compile; 64 tokens with 4 warps needs 255 and spills). On the H200 every tried config ran in 0.100-0.112 ms at
# Wan2.1-1.3B 480p, memory speed (`pyramid_stages_b*.json`, ``pool_fused_configs_ms``; reshape sums: 0.45 ms).
_CHUNK = 32
_NUM_WARPS = 2


@triton.jit
def _store_level(Out, s, base, g, V, stride_n, offs_d, d_mask, P: tl.constexpr):
    """Group means of level P: ``s`` (rows, D) sums of groups ``g`` (tokens [g*P, g*P + P), cut at V)."""
    cnt = tl.minimum(tl.maximum(V - g * P, 0), P)
    mean = s / tl.maximum(cnt, 1).to(tl.float32)[:, None]
    tl.store(Out + base + g[:, None].to(tl.int64) * stride_n + offs_d[None, :], mean.to(Out.dtype.element_ty),
             mask=d_mask[None, :])


@triton.jit
def _rows(X, x_base, tok, V, stride_n, in_cols, d_mask):
    """Token rows ``tok`` of one (batch, head) slice as fp32 (zeros past V)."""
    ok = (tok < V)[:, None] & d_mask[None, :]
    return tl.load(X + x_base + tok[:, None].to(tl.int64) * stride_n + in_cols[None, :], mask=ok,
                   other=0.0).to(tl.float32)


@triton.jit
def _pool_one(X, P_, R4, R8, V, x_base, p_base, stride_n, stride_pn, c, in_cols, offs_d, d_mask,
              CHUNK: tl.constexpr):
    """All three levels of one tensor's CHUNK tokens from c * CHUNK. The tokens are read as 8 interleaved row sets
    (token 8i + j in set j), so every sum is of whole tensors: no reshape, and the additions are `pool_levels`'
    hierarchical ones (pairs, then pairs of pairs)."""
    i = tl.arange(0, CHUNK // 8)
    tok = c * CHUNK + 8 * i
    g2 = c * (CHUNK // 2) + 4 * i
    s0 = _rows(X, x_base, tok, V, stride_n, in_cols, d_mask) + _rows(X, x_base, tok + 1, V, stride_n, in_cols, d_mask)
    _store_level(P_, s0, p_base, g2, V, stride_pn, offs_d, d_mask, 2)
    s1 = _rows(X, x_base, tok + 2, V, stride_n, in_cols, d_mask) + _rows(X, x_base, tok + 3, V, stride_n, in_cols,
                                                                         d_mask)
    _store_level(P_, s1, p_base, g2 + 1, V, stride_pn, offs_d, d_mask, 2)
    s2 = _rows(X, x_base, tok + 4, V, stride_n, in_cols, d_mask) + _rows(X, x_base, tok + 5, V, stride_n, in_cols,
                                                                         d_mask)
    _store_level(P_, s2, p_base, g2 + 2, V, stride_pn, offs_d, d_mask, 2)
    s3 = _rows(X, x_base, tok + 6, V, stride_n, in_cols, d_mask) + _rows(X, x_base, tok + 7, V, stride_n, in_cols,
                                                                         d_mask)
    _store_level(P_, s3, p_base, g2 + 3, V, stride_pn, offs_d, d_mask, 2)
    s4a = s0 + s1
    s4b = s2 + s3
    _store_level(P_ + R4 * stride_pn, s4a, p_base, c * (CHUNK // 4) + 2 * i, V, stride_pn, offs_d, d_mask, 4)
    _store_level(P_ + R4 * stride_pn, s4b, p_base, c * (CHUNK // 4) + 2 * i + 1, V, stride_pn, offs_d, d_mask, 4)
    _store_level(P_ + R8 * stride_pn, s4a + s4b, p_base, c * (CHUNK // 8) + i, V, stride_pn, offs_d, d_mask, 8)


@triton.jit
def _pool_kernel(K, V_, KP, VP, V, R4, R8, H,
                 stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_pb, stride_pn, stride_ph,
                 D: tl.constexpr, DP: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, DP)
    d_mask = offs_d < D
    base = b * stride_pb + h * stride_ph
    _pool_one(K, KP, R4, R8, V, b * stride_kb + h * stride_kh, base, stride_kn, stride_pn, c, offs_d * stride_kd,
              offs_d, d_mask, CHUNK)
    _pool_one(V_, VP, R4, R8, V, b * stride_vb + h * stride_vh, base, stride_vn, stride_pn, c, offs_d * stride_vd,
              offs_d, d_mask, CHUNK)


def pool_kv_levels(k: Tensor, v: Tensor, block: int, *, chunk: int | None = None,
                   num_warps: int | None = None) -> tuple[Tensor, Tensor, int, int]:
    """Levels 2, 4, 8 of video keys and values (B, V, H, D) each in one contiguous (B, R, H, D) buffer.

    Returns ``(kp, vp, r4, r8)``: rows ``[0, r4)`` are level 2 (n*b/2 rows for n = ceil(V/b) blocks of ``block``),
    ``[r4, r8)`` level 4 and ``[r8, R)`` level 8; the same values as `pool_levels` concatenated per tensor.
    ``chunk`` (tokens per program, a power of two from 16 dividing the block) and ``num_warps`` override the
    launch defaults (probes time them).
    """
    if k.shape != v.shape:
        raise ValueError(f"pool_kv_levels: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if block % 16:
        raise ValueError(f"pool_kv_levels: block must be a multiple of 16, got {block}")
    B, V, H, D = k.shape
    padded = -(-V // block) * block
    r4, r8 = padded // 2, padded // 2 + padded // 4
    rows = r8 + padded // 8
    kp = torch.empty(B, rows, H, D, dtype=k.dtype, device=k.device)
    vp = torch.empty_like(kp)
    chunk = chunk or min(_CHUNK, block)
    if chunk < 16 or block % chunk or chunk & (chunk - 1):
        raise ValueError(f"pool_kv_levels: chunk must be a power of two >= 16 dividing the block, got {chunk}")
    dp = head_dim_pad(D)
    _pool_kernel[(padded // chunk, B * H)](
        k, v, kp, vp, V, r4, r8, H, *k.stride(), *v.stride(), kp.stride(0), kp.stride(1), kp.stride(2),
        D=D, DP=dp, CHUNK=chunk, num_warps=num_warps or _NUM_WARPS)
    return kp, vp, r4, r8
