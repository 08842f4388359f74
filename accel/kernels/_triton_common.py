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

__all__ = ["LOG2E", "dot_precision", "ensure_allocator", "head_dim_pad", "launch_opts", "strides4",
           "ws_compile_failed"]


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) online-softmax step; k is (HEAD_DIM_PAD, BLOCK_N). ``visible`` (broadcastable
    to the tile: ``n_valid[None, :]`` or a 2-D mask) is used if MASK_N."""
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASK_N:
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A tile whose keys are all hidden must not turn -inf - -inf into NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _box_ok(row_lo, row_hi, key):
    """(rows, columns) bool of a `layout.BoxMask`: every guarded 10-bit field of ``key`` (columns, packed key
    coordinates plus the guard bits) within the rows' [lo, hi]. A field's guard bit survives the subtraction
    iff it did not borrow, so one AND tests the three axes' lower and upper bounds at once."""
    a = key[None, :] - row_lo[:, None]
    b = row_hi[:, None] - key[None, :]
    return (a & b & _BOX_GUARD) == _BOX_GUARD


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


def ws_compile_failed(err: Exception) -> bool:
    """Whether ``err`` is Triton failing to build a warp-specialised kernel (then the pipelined one runs).

    Tested with triton 3.6 on the H100 and compiled for sm_90 with 3.9; a future Triton whose
    specialisation pass rejects these loops must cost speed, not the call.
    """
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    if isinstance(err, (CompilationError, OutOfResources)) or "PassManager" in str(err):
        warnings.warn(f"accel: the warp-specialised kernel did not build with triton {triton.__version__} "
                      f"({type(err).__name__}: {str(err)[:200]}); using the pipelined kernel", RuntimeWarning,
                      stacklevel=3)
        return True
    return False
