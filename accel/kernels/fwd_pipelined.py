"""Pipelined block-sparse forward (any GPU, the interpreter): kernel, then launcher.

FlashAttention-2 online softmax over the (query block, key block) tiles a CSR layout lists, then the
text keys (``EK``/``EV``: views of the joint K/V buffer) with an optional per-batch int8 visibility mask.
On Hopper the video K/V tiles may come through tensor descriptors (``USE_TMA``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_common import (
    BOX_MMA_BIG,
    BOX_MMA_MIN_SCALED,
    LOG2E,
    _box_mma_operands,
    _box_ok,
    _fwd_tile,
    _fwd_tile_bias,
    _load_kv,
    _rows_desc,
    box_mma_slots,
    dot_precision,
    ensure_allocator,
    head_dim_pad,
    launch_opts,
    strides4,
)
from .configs import KernelConfig
from .layout import BlockLayout, BoxMask

BOX_MASK_FORMS = ("swar", "mma")


def _box_mask_form_from_env() -> str:
    """``ACCEL_BOX_MASK`` (mma | swar; default mma): how the box-masked tiles apply their mask."""
    form = os.environ.get("ACCEL_BOX_MASK", "mma").strip().lower() or "mma"
    if form not in BOX_MASK_FORMS:
        raise ValueError(f"ACCEL_BOX_MASK must be one of {', '.join(BOX_MASK_FORMS)}, got "
                         f"{os.environ['ACCEL_BOX_MASK']!r}")
    return form


# "mma" (default): the mask as an additive bias from one small MMA per tile (`_box_mma_operands`), for key tiles
# within a known box (`launch`'s ``box_tile``); 1.17-1.28x faster than "swar", a per-element SWAR range test
# (`_box_ok`), on the H200 at the stride-1 HunyuanVideo windows (`benchmarks/results/box_mask_ab.json`). Where mma
# cannot run (no box tile, more than 63 coordinates per tile, a tiny softmax scale) the default uses swar.
BOX_MASK_FORM = _box_mask_form_from_env()


@triton.jit
def _fwd_kernel(
    Q, K, V, EK, EV, EMask, Out, Lse, Offsets, Indices, BoxLo, BoxHi, BoxKey, Blocks,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ekb, stride_ekn, stride_ekh, stride_ekd,
    stride_evb, stride_evn, stride_evh, stride_evd,
    stride_emb,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh,
    stride_offl, stride_idxl, stride_blk,
    H, Sq, Sk, T, num_k_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_PER_HEAD: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_MASK: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, HAS_BOX: tl.constexpr,
    RAGGED: tl.constexpr, BOX_MMA: tl.constexpr = False, BOX_T: tl.constexpr = 1, BOX_H: tl.constexpr = 1,
    BOX_W: tl.constexpr = 1, BOX_SLOTS: tl.constexpr = 32,
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

    if RAGGED:  # block i holds rows [start_i, start_i + count_i) (Blocks[i, 0:2]); one compute tile per block
        offs_m = tl.load(Blocks + pid_m * stride_blk) + tl.arange(0, BLOCK_M)
        m_mask = tl.arange(0, BLOCK_M) < tl.load(Blocks + pid_m * stride_blk + 1)
    else:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    k_base = (K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn
              + offs_d[:, None] * stride_kd)
    v_base = (V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn
              + offs_d[None, :] * stride_vd)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    if LAYOUT_PER_HEAD:
        layout_off = off_h
    else:
        layout_off = 0
    row_offsets = Offsets + layout_off * stride_offl + qb
    row_idx = Indices + layout_off * stride_idxl
    lo = tl.load(row_offsets)
    hi = tl.load(row_offsets + 1)
    # Only the last key block can be a partial one (indices are sorted): it alone is masked.
    n_full = hi
    if RAGGED or HAS_BOX:  # every tile masked: one loop
        n_full = lo
    elif hi > lo:
        last = tl.load(row_idx + hi - 1)
        if (last + 1) * BLOCK_K > Sk:
            n_full = hi - 1
    all_n = offs_n < BLOCK_N
    if HAS_BOX:  # per-token box mask inside every video tile (layout.BoxMask)
        box_lo = tl.load(BoxLo + offs_m, mask=m_mask, other=0)
        box_hi = tl.load(BoxHi + offs_m, mask=m_mask, other=0)
    if USE_TMA:
        # Hopper bulk copies; rows past Sk and columns past HEAD_DIM arrive as zeros.
        k_desc = _rows_desc(K + off_b * stride_kb + off_h * stride_kh, Sk, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
        v_desc = _rows_desc(V + off_b * stride_vb + off_h * stride_vh, Sk, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    for it in range(lo * SUB_N, n_full * SUB_N):
        kb = tl.load(row_idx + it // SUB_N)
        start_n = kb * BLOCK_K + (it % SUB_N) * BLOCK_N
        if USE_TMA:
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
        else:
            k, v = _load_kv(k_base + start_n.to(tl.int64) * stride_kn, v_base + start_n.to(tl.int64) * stride_vn,
                            all_n, d_mask, False, EVEN_D)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, all_n[None, :], qk_scale, False, DOT_PRECISION)
    for it in range(n_full * SUB_N, hi * SUB_N):
        kb = tl.load(row_idx + it // SUB_N)
        if RAGGED:  # the block's rows past its count belong to the next block: masked
            start_n = tl.load(Blocks + kb * stride_blk)
            n_valid = offs_n < tl.load(Blocks + kb * stride_blk + 1)
        else:
            start_n = kb * BLOCK_K + (it % SUB_N) * BLOCK_N
            n_valid = start_n + offs_n < Sk
        if USE_TMA:  # rows past Sk arrive as zeros; n_valid hides them from the softmax
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
        else:
            k, v = _load_kv(k_base + start_n.to(tl.int64) * stride_kn, v_base + start_n.to(tl.int64) * stride_vn,
                            n_valid, d_mask, True, EVEN_D)
        if HAS_BOX and BOX_MMA:  # the mask as a bias from one small MMA (key tiles within the BOX_* box)
            if RAGGED:  # the layout block's first key is its tiles' minimum corner
                origin = tl.load(BoxKey + start_n)
            else:
                origin = tl.load(BoxKey + kb * BLOCK_K)
            key = tl.load(BoxKey + start_n + offs_n, mask=n_valid, other=0)
            qa, ka = _box_mma_operands(box_lo, box_hi, key, origin, n_valid, BOX_T, BOX_H, BOX_W, BOX_SLOTS)
            acc, l_i, m_i = _fwd_tile_bias(acc, l_i, m_i, q, k, v, qa.to(q.dtype), ka.to(q.dtype), qk_scale,
                                           DOT_PRECISION)
        else:
            visible = n_valid[None, :]
            if HAS_BOX:
                key = tl.load(BoxKey + start_n + offs_n, mask=n_valid, other=0)
                visible = visible & _box_ok(box_lo, box_hi, key)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, True, DOT_PRECISION)
    if HAS_EXTRA:
        ek_base = (EK + off_b * stride_ekb + off_h * stride_ekh
                   + offs_n[None, :] * stride_ekn + offs_d[:, None] * stride_ekd)
        ev_base = (EV + off_b * stride_evb + off_h * stride_evh
                   + offs_n[:, None] * stride_evn + offs_d[None, :] * stride_evd)
        for start_n in range(0, T, BLOCK_N):
            n_valid = start_n + offs_n < T
            if HAS_EXTRA_MASK:
                vis = tl.load(EMask + off_b * stride_emb + start_n + offs_n, mask=n_valid, other=0)
                n_valid = n_valid & (vis != 0)
            k, v = _load_kv(ek_base + start_n * stride_ekn, ev_base + start_n * stride_evn, n_valid, d_mask,
                            True, EVEN_D)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k, v, n_valid[None, :], qk_scale, True, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=m_mask)



def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor | None, ev: torch.Tensor | None,
           emask: torch.Tensor | None, layout: BlockLayout, scale: float, out: torch.Tensor,
           lse: torch.Tensor | None, cfg: KernelConfig, box: BoxMask | None = None,
           blocks: torch.Tensor | None = None, box_mask_form: str | None = None,
           box_tile: tuple[int, int, int] | None = None) -> None:
    """Run the pipelined forward: k, v the video keys, ek, ev the text keys (views), emask int8 (B, T).

    ``box``: a per-token box mask inside the video tiles (text keys are not boxed). ``blocks``: (num blocks,
    >= 2) int32 [first row, rows] per layout block, for blocks of unequal sizes (queries and keys share
    them; needs ``box`` and one compute tile per layout block).

    ``box_mask_form``: "swar" or "mma" (None: `BOX_MASK_FORM`, from ``ACCEL_BOX_MASK``). The mma form needs
    ``box_tile`` (T, H, W): the keys of every layout block lie within a box of that size whose minimum corner is
    the block's first key (neighborhood tiles), keys outside it are hidden; and every query must see a key (its
    rows' earlier tiles are only rescaled away by a visible one). Asked for explicitly where it cannot run (tile
    too large, a softmax scale below ``BOX_MMA_MIN_SCALED / BOX_MMA_BIG``) it raises; by default the SWAR form
    runs then."""
    explicit = box_mask_form is not None
    form = BOX_MASK_FORM if box_mask_form is None else box_mask_form
    if form not in BOX_MASK_FORMS:
        raise ValueError(f"fwd_pipelined.launch: box_mask_form must be one of {BOX_MASK_FORMS}, got {form!r}")
    slots = box_mma_slots(box_tile)
    mma = box is not None and form == "mma"
    if mma and (slots is None or BOX_MMA_BIG * scale * LOG2E < BOX_MMA_MIN_SCALED):
        if explicit:
            raise ValueError(f"fwd_pipelined.launch: the mma box mask cannot run with box_tile={box_tile} "
                             f"(extents + 1 must fit 64 slots) and scale={scale} (at least "
                             f"{BOX_MMA_MIN_SCALED / (BOX_MMA_BIG * LOG2E):.4g})")
        mma = False
    tile = tuple(box_tile) if mma else (1, 1, 1)
    if blocks is not None and (box is None or (cfg.block_m, cfg.block_n) != (layout.block_m, layout.block_n)):
        raise ValueError("fwd_pipelined.launch: blocks= needs a box mask and compute tiles equal to the layout's "
                         f"blocks, got box={box is not None}, tiles {cfg.block_m}x{cfg.block_n}, blocks "
                         f"{layout.block_m}x{layout.block_n}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    T = ek.shape[1] if ek is not None else 0
    if cfg.tma:
        ensure_allocator()
    lse_t = lse if lse is not None else out  # dummy pointer when not written
    grid = (layout.num_q_blocks if blocks is not None else triton.cdiv(Sq, cfg.block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, ek if ek is not None else q, ev if ev is not None else q, emask if emask is not None else q,
        out, lse_t, layout.offsets, layout.indices,
        *((box.row_lo, box.row_hi, box.key) if box is not None else (layout.offsets,) * 3),
        blocks if blocks is not None else layout.offsets,
        *q.stride(), *k.stride(), *v.stride(), *strides4(ek), *strides4(ev),
        emask.stride(0) if emask is not None else 0,
        *out.stride(),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        layout.offsets.stride(0), layout.indices.stride(0), blocks.stride(0) if blocks is not None else 0,
        H, Sq, Sk, T, layout.num_k_blocks, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D), BLOCK_Q=layout.block_m, BLOCK_K=layout.block_n,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        LAYOUT_PER_HEAD=layout.heads > 1, HAS_EXTRA=T > 0, HAS_EXTRA_MASK=emask is not None,
        WRITE_LSE=lse is not None, DOT_PRECISION=dot_precision(q.dtype), USE_TMA=cfg.tma,
        HAS_BOX=box is not None, RAGGED=blocks is not None, BOX_MMA=mma, BOX_T=tile[0], BOX_H=tile[1],
        BOX_W=tile[2], BOX_SLOTS=slots if mma else 32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_opts(cfg),
    )
