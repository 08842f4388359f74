"""Shared Triton pieces of the block-sparse kernels: ``@triton.jit`` helpers and launch utilities.

Imported only when the Triton backend runs (``accel.kernels`` itself never imports Triton).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .configs import KernelConfig, head_dim_pad
from .layout import BOX_GUARD

LOG2E = 1.4426950408889634
_BOX_GUARD = tl.constexpr(BOX_GUARD)
# The box-mma form's penalty per violated axis, in raw logit units: a power of two (exact in fp16/bf16, whose
# largest finite values are 65504 / 3.4e38), and after the softmax scale far below exp2's underflow.
BOX_MMA_BIG = 32768.0
BOX_MMA_MIN_SCALED = 1024.0  # BIG * qk_scale must reach this (exp2(-1024) is 0 in fp32), else the SWAR form runs
_BOX_MMA_BIG = tl.constexpr(BOX_MMA_BIG)

__all__ = ["BOX_MMA_BIG", "BOX_MMA_MIN_SCALED", "LOG2E", "box_mma_slots", "dot_precision", "ensure_allocator",
           "head_dim_pad", "launch_opts", "strides4", "ws_compile_failed"]


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _rescale_accumulate(acc, l_i, alpha, p, v, DOT_PRECISION: tl.constexpr):
    """The end of every online-softmax step: rescale the running sum and output by ``alpha``, add P and P.V."""
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION), l_i


@triton.jit
def _softmax_update(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr):
    """The online-softmax update from raw logits ``qk`` (the scale folded into exp2's argument); every row of
    the tile must hold a finite logit (no hidden keys)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    acc, l_i = _rescale_accumulate(acc, l_i, tl.math.exp2(m_i - m_new), p, v, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _softmax_update_masked(acc, l_i, m_i, s, v, DOT_PRECISION: tl.constexpr):
    """The online-softmax update from scaled logits ``s`` (log2 units) where hidden keys are -inf: a row whose
    keys are all hidden must not turn -inf - -inf into NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    acc, l_i = _rescale_accumulate(acc, l_i, tl.math.exp2(m_i - m_use), p, v, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) online-softmax step; k is (HEAD_DIM_PAD, BLOCK_N). ``visible`` (broadcastable
    to the tile: ``n_valid[None, :]`` or a 2-D mask) is used if MASK_N."""
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASK_N:
        return _softmax_update_masked(acc, l_i, m_i, tl.where(visible, qk * qk_scale, float("-inf")), v,
                                      DOT_PRECISION)
    return _softmax_update(acc, l_i, m_i, qk, v, qk_scale, DOT_PRECISION)


@triton.jit
def _box_ok(row_lo, row_hi, key):
    """(rows, columns) bool of a `layout.BoxMask`: every guarded 10-bit field of ``key`` (columns, packed key
    coordinates plus the guard bits) within the rows' [lo, hi]. A field's guard bit survives the subtraction
    iff it did not borrow, so one AND tests the three axes' lower and upper bounds at once."""
    a = key[None, :] - row_lo[:, None]
    b = row_hi[:, None] - key[None, :]
    return (a & b & _BOX_GUARD) == _BOX_GUARD


@triton.jit
def _fwd_tile_bias(acc, l_i, m_i, q, k, v, qa, ka, qk_scale, DOT_PRECISION: tl.constexpr):
    """`_fwd_tile` with the mask as an additive bias from a second MMA: QK^T + QA @ KA (`_box_mma_operands`).

    Hidden entries get finite logits of at most -BIG x qk_scale below the visible ones: exp2 of them is 0 once
    the row has seen a visible key, and a row's tiles before that are rescaled by exp2(-BIG x qk_scale) = 0."""
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    return _softmax_update(acc, l_i, m_i, tl.dot(qa, ka, qk, input_precision=DOT_PRECISION), v, qk_scale,
                           DOT_PRECISION)


@triton.jit
def _box_mma_operands(row_lo, row_hi, key, origin, n_valid, SEG_T: tl.constexpr, SEG_H: tl.constexpr,
                      SEG_W: tl.constexpr, SLOTS: tl.constexpr):
    """QA (rows, SLOTS) float32 and KA (SLOTS, columns) int32 0/1 whose product is -BIG x (violated axes) of a
    `layout.BoxMask` (the caller casts both to the q dtype: -BIG and 1 are exact in fp16/bf16).

    Slots [0, SEG_T), [SEG_T, SEG_T + SEG_H), [.., + SEG_W) stand for the coordinates ``origin + j`` on the
    T, H, W axis (``origin``: the key tile's packed, guarded minimum corner); the last slot is "hidden". KA has a
    1 per axis at the slot of each key's coordinate, or only the hidden one for a column that is not
    ``n_valid`` or lies outside the segments. QA is -BIG where the slot's coordinate is outside the row's
    [lo, hi] on the slot's axis (the SWAR test of `_box_ok`, on rows x SLOTS only), and always on the hidden
    slot."""
    slot = tl.arange(0, SLOTS)
    is_t = slot < SEG_T
    is_h = (slot >= SEG_T) & (slot < SEG_T + SEG_H)
    is_w = (slot >= SEG_T + SEG_H) & (slot < SEG_T + SEG_H + SEG_W)
    rel = tl.where(is_t, slot, tl.where(is_h, slot - SEG_T, tl.where(is_w, slot - SEG_T - SEG_H, 0)))
    shift = tl.where(is_t, 20, tl.where(is_h, 10, 0))
    guard = tl.where(is_t, 1 << 29, tl.where(is_h, 1 << 19, tl.where(is_w, 1 << 9, 0)))
    # Each slot as a guarded key: the origin with the slot's axis field moved to the slot's coordinate. Fields
    # never borrow from each other (the guard), so testing only the slot axis' guard bit tests that axis alone.
    slot_key = origin + (rel << shift)
    a = slot_key[None, :] - row_lo[:, None]
    b = row_hi[:, None] - slot_key[None, :]
    hidden = ((a & b & guard[None, :]) != guard[None, :]) | (slot == SLOTS - 1)[None, :]
    qa = tl.where(hidden, -_BOX_MMA_BIG, 0.0)
    kt = ((key >> 20) & 511) - ((origin >> 20) & 511)
    kh = ((key >> 10) & 511) - ((origin >> 10) & 511)
    kw = (key & 511) - (origin & 511)
    inside = (n_valid & (kt.to(tl.uint32) < SEG_T) & (kh.to(tl.uint32) < SEG_H)
              & (kw.to(tl.uint32) < SEG_W))
    if SLOTS > 32:
        one = tl.full(kt.shape, 1, tl.uint64)
        uslot = slot.to(tl.uint64)
    else:
        one = tl.full(kt.shape, 1, tl.uint32)
        uslot = slot.to(tl.uint32)
    kt = tl.where(inside, kt, 0).to(one.dtype)
    kh = tl.where(inside, kh + SEG_T, 0).to(one.dtype)
    kw = tl.where(inside, kw + SEG_T + SEG_H, 0).to(one.dtype)
    bits = tl.where(inside, (one << kt) | (one << kh) | (one << kw), one << (SLOTS - 1))
    ka = ((bits[None, :] >> uslot[:, None]) & 1).to(tl.int32)
    return qa, ka


@triton.jit
def _load_kv(k_ptrs, v_ptrs, n_valid, d_mask, MASK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """K tile transposed (HEAD_DIM_PAD, BLOCK_N) and V tile (BLOCK_N, HEAD_DIM_PAD) through pointers."""
    if MASK_N:
        k = tl.load(k_ptrs, mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_valid[:, None] & d_mask[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    return k, v


@triton.jit
def _rows_desc(base, rows, stride_row, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Descriptor over one (batch, head) slice of a (B, S, H, D) tensor: rows x HEAD_DIM, BLOCK-row tiles.

    Loads past the last row or column arrive as zeros; stores there are dropped.
    """
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK, HEAD_DIM_PAD])


@triton.jit
def _vec_desc(base, n, BLOCK: tl.constexpr):
    """Descriptor over a contiguous float32 row (LSE, Delta) of length n; base must be 16-byte aligned."""
    return tl.make_tensor_descriptor(base, shape=[n], strides=[1], block_shape=[BLOCK])


# ------------------------------------------------------------------------------------------ launch helpers
def box_mma_slots(tile: tuple[int, int, int] | None) -> int | None:
    """Slots of the box-mma operands for key tiles within a (T, H, W) box: 32 or 64 (the extents plus the
    hidden slot must fit), None when the form cannot run."""
    if tile is None or len(tile) != 3 or min(tile) < 1:
        return None
    need = sum(tile) + 1
    return 32 if need <= 32 else 64 if need <= 64 else None


def launch_opts(cfg: KernelConfig) -> dict:
    """Extra launch keywords of a config (the register cap)."""
    return {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}


def strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """A 4-D tensor's strides, zeros for an absent one."""
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs promise fp32 accuracy: IEEE dots, no silent tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Device-side descriptors need scratch memory: install a torch allocator unless one is set."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except Exception:  # layout of triton's private module changed: just set ours
        pass
    triton.set_allocator(_torch_alloc)


def ws_compile_failed(err: Exception, kernel: str = "the warp-specialised kernel",
                      instead: str = "the pipelined kernel") -> bool:
    """Whether ``err`` is Triton failing to build ``kernel`` (then ``instead`` runs, with a warning).

    Tested with triton 3.6 on the H100 and compiled for sm_90 with 3.9; a future Triton whose
    specialisation pass (or Gluon API) rejects these kernels must cost speed, not the call.
    """
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    if isinstance(err, (CompilationError, OutOfResources)) or "PassManager" in str(err):
        warnings.warn(f"accel: {kernel} did not build with triton {triton.__version__} "
                      f"({type(err).__name__}: {str(err)[:200]}); using {instead}", RuntimeWarning,
                      stacklevel=3)
        return True
    return False
