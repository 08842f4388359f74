"""Pyramid attention's pooled K/V (levels 2, 4, 8) for both K and V in one Triton launch.

`accel.kernels.pyramid_reference.pool_levels` builds the group means with a chain of PyTorch ops (pad, fp32 copy,
three view-sums, divides, casts, then a concatenation per tensor): 1.44 ms of a 7 ms pyramid call at Wan2.1-1.3B
480p on the H200 (`pyramid_stages_b128.json`), for ~0.4 GB of memory traffic. Here one program loads a chunk of
``CHUNK`` tokens of K and of V once, sums pairs hierarchically in fp32 (level 4 from level 2, 8 from 4: the same
additions in the same order as `pool_levels`), divides by the real token count of each group and writes all
three levels into the buffer layout `accel.kernels.pyramid.pooled_buffer` returns. Rows past the last token are 0.
"""

# No `from __future__ import annotations`: kept like the other kernel modules.
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import head_dim_pad

__all__ = ["pool_kv_levels"]


@triton.jit
def _half_sum(s, ROWS: tl.constexpr, D: tl.constexpr):
    """(ROWS, D) -> (ROWS // 2, D): rows 2i and 2i+1 added."""
    return tl.sum(tl.reshape(s, (ROWS // 2, 2, D)), 1)


@triton.jit
def _store_level(Out, s, base, row0, V, stride_n, offs_d, d_mask, P: tl.constexpr, ROWS: tl.constexpr):
    """Group means of level P: ``s`` (ROWS, D) sums of groups row0 .. row0 + ROWS - 1 (tokens [g*P, g*P + P))."""
    g = row0 + tl.arange(0, ROWS)
    cnt = tl.minimum(tl.maximum(V - g * P, 0), P)
    mean = s / tl.maximum(cnt, 1).to(tl.float32)[:, None]
    tl.store(Out + base + g[:, None].to(tl.int64) * stride_n + offs_d[None, :], mean.to(Out.dtype.element_ty),
             mask=d_mask[None, :])


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
    offs_n = c * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, DP)
    d_mask = offs_d < D
    ok = (offs_n < V)[:, None] & d_mask[None, :]
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows * stride_kn + offs_d[None, :] * stride_kd, mask=ok,
                other=0.0).to(tl.float32)
    v = tl.load(V_ + b * stride_vb + h * stride_vh + rows * stride_vn + offs_d[None, :] * stride_vd, mask=ok,
                other=0.0).to(tl.float32)
    base = b * stride_pb + h * stride_ph
    k2 = _half_sum(k, CHUNK, DP)
    v2 = _half_sum(v, CHUNK, DP)
    _store_level(KP, k2, base, c * (CHUNK // 2), V, stride_pn, offs_d, d_mask, 2, CHUNK // 2)
    _store_level(VP, v2, base, c * (CHUNK // 2), V, stride_pn, offs_d, d_mask, 2, CHUNK // 2)
    k4 = _half_sum(k2, CHUNK // 2, DP)
    v4 = _half_sum(v2, CHUNK // 2, DP)
    _store_level(KP + R4 * stride_pn, k4, base, c * (CHUNK // 4), V, stride_pn, offs_d, d_mask, 4, CHUNK // 4)
    _store_level(VP + R4 * stride_pn, v4, base, c * (CHUNK // 4), V, stride_pn, offs_d, d_mask, 4, CHUNK // 4)
    k8 = _half_sum(k4, CHUNK // 4, DP)
    v8 = _half_sum(v4, CHUNK // 4, DP)
    _store_level(KP + R8 * stride_pn, k8, base, c * (CHUNK // 8), V, stride_pn, offs_d, d_mask, 8, CHUNK // 8)
    _store_level(VP + R8 * stride_pn, v8, base, c * (CHUNK // 8), V, stride_pn, offs_d, d_mask, 8, CHUNK // 8)


def pool_kv_levels(k: Tensor, v: Tensor, block: int) -> tuple[Tensor, Tensor, int, int]:
    """Levels 2, 4, 8 of video keys and values (B, V, H, D) each in one contiguous (B, R, H, D) buffer.

    Returns ``(kp, vp, r4, r8)``: rows ``[0, r4)`` are level 2 (n*b/2 rows for n = ceil(V/b) blocks of ``block``),
    ``[r4, r8)`` level 4 and ``[r8, R)`` level 8; the same values as `pool_levels` concatenated per tensor.
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
    chunk = min(64, block)
    dp = head_dim_pad(D)
    _pool_kernel[(padded // chunk, B * H)](
        k, v, kp, vp, V, r4, r8, H, *k.stride(), *v.stride(), kp.stride(0), kp.stride(1), kp.stride(2),
        D=D, DP=dp, CHUNK=chunk, num_warps=4 if chunk * dp >= 64 * 128 else 2)
    return kp, vp, r4, r8
