"""Warp-specialised Hopper forward (sm_90, 128x128 blocks, all I/O through TMA): kernel, then launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import LOG2E, _rows_desc, _vec_desc, ensure_allocator, head_dim_pad
from .configs import KernelConfig
from .layout import BlockLayout


@triton.jit
def _fwd_ws_kernel(
    Q, K, V, TextLen, Out, Lse, Offsets, Indices,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_offl, stride_idxl,
    H, Sq, Sk, T, kv_rows, video_row, text_row, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, WRITE_LSE: tl.constexpr, MASK_KEYS: tl.constexpr,
    HAS_TEXT_LEN: tl.constexpr,
):
    """Hopper forward with Triton's automatic warp specialisation (FA3-style producer/consumers).

    One TMA producer warp group feeds two consumer warp groups of 64 query rows each, so one group's
    softmax overlaps the other's matmuls. Every load and store goes through tensor descriptors: under
    warp specialisation Triton 3.6 computes pointer-store addresses wrongly (benchmarks/NOTES.md).
    K and V hold the Sk video keys (from row ``video_row``) and the T extra (text) keys (from row
    ``text_row``) in one buffer of ``kv_rows`` rows; one loop visits the layout's key blocks, then the text
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
    k_desc = _rows_desc(K + off_b * stride_kb + off_h * stride_kh, kv_rows, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    v_desc = _rows_desc(V + off_b * stride_vb + off_h * stride_vh, kv_rows, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
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



def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float,
           out: torch.Tensor, lse: torch.Tensor | None, cfg: KernelConfig, *, video_row: int, video_len: int,
           text_row: int = 0, text_len: int = 0, text_lengths: torch.Tensor | None = None) -> None:
    """Run the warp-specialised forward on joint K/V buffers (video and text rows read in place).

    ``text_lengths`` (B,) int32: each batch sees only its first ``text_lengths[b]`` text keys (values in
    [0, text_len]; read on the device, no host sync). The caller checks TMA-addressability (see select.py).
    """
    B, Sq, H, D = q.shape
    ensure_allocator()
    _fwd_ws_kernel[(triton.cdiv(Sq, cfg.block_m), B * H)](
        q, k, v, text_lengths if text_lengths is not None else layout.offsets, out,
        lse if lse is not None else out, layout.offsets, layout.indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        layout.offsets.stride(0), layout.indices.stride(0),
        H, Sq, video_len, text_len, k.shape[1], video_row, text_row, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        LAYOUT_PER_HEAD=layout.heads > 1, WRITE_LSE=lse is not None,
        MASK_KEYS=video_len % cfg.block_n != 0 or text_len % cfg.block_n != 0 or text_lengths is not None,
        HAS_TEXT_LEN=text_lengths is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
