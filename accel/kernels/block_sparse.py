"""Block-sparse flash attention over a :class:`BlockLayout`: the public function, validation, backend choice.

FlashAttention-2 online softmax (Dao, 2023) restricted to the (query block, key block) tiles a CSR
layout lists, plus optional text keys that every query sees inside the same softmax. Tensors use
diffusers' (batch, tokens, heads, head_dim) layout with arbitrary strides: callers pass slices of bigger
buffers and nothing is transposed or copied. K and V are *joint* buffers: ``video_keys`` names the rows the
layout's key blocks index, ``text_keys`` the always-visible rows (diffusers' joint text+video attention
reads both in place from one buffer).

Backends: ``triton`` (kernels in fwd_pipelined.py, fwd_ws.py, bwd_pipelined.py, bwd_ws.py; selection in
select.py; configs in configs.py) and ``torch`` (torch_impl.py, no Triton needed). Both run behind
``torch.library`` custom ops (ops.py), so ``torch.compile`` sees no graph break. This module never imports
Triton: the Triton modules load when that backend first runs.
"""

from __future__ import annotations

import math

import torch

from . import ops as _ops  # noqa: F401  (registers the accel:: custom ops)
from ._common import KeyParts, resolve_key_parts, triton_input_reason
from .configs import KernelConfigs
from .layout import BlockLayout

_BACKENDS = ("auto", "triton", "torch")
_TRITON_IMPORT: dict[str, str | None] = {}  # "error": None once triton imported, else why it did not


def default_block_size(device: torch.device | str | None = None) -> int:
    """Logical layout block size that runs fastest on ``device``: 128 on Ampere/Hopper and newer, else 64."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        return 128 if major >= 8 else 64
    return 64


def triton_import_error() -> str | None:
    """Why ``import triton`` fails here (None: it works). Checked once."""
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            _TRITON_IMPORT["error"] = None
        except ImportError as err:
            _TRITON_IMPORT["error"] = f"triton is not importable ({err})"
    return _TRITON_IMPORT["error"]


def can_run_triton(q: torch.Tensor, layout: BlockLayout, raise_error: bool = False) -> bool:
    """Whether the Triton backend can run on these inputs (CUDA, or CPU under TRITON_INTERPRET=1)."""
    reason = triton_input_reason(q)
    if reason is not None:
        pass  # device, dtype or head dim
    elif q.is_cuda and q.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        reason = "bfloat16 needs compute capability >= 8.0"
    elif layout.block_m not in (16, 32, 64, 128, 256) or layout.block_n not in (16, 32, 64, 128, 256):
        reason = (f"layout blocks must be powers of two in [16, 256], got block_m={layout.block_m}, "
                  f"block_n={layout.block_n}")
    else:
        reason = triton_import_error()
    if reason and raise_error:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return reason is None


# ---------------------------------------------------------------------------------------- validation
def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_inputs(q, k, v, layout, out) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, S, H, D), got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    B, Sq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be (B, Sk, H, D) matching q's B, H, D, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got dtype={q.dtype}")
    if D > 256:
        raise NotImplementedError(f"head_dim must be <= 256, got D={D}")
    if D < 1:
        raise ValueError(f"head_dim must be >= 1, got D={D}")
    if out is not None:
        _check_tensor("out", out)
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}), "
                             f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}")


def _joint_from_extra(q, k, v, extra_k, extra_v, extra_mask):
    """The deprecated ``extra_k/extra_v/extra_mask`` API: one joint buffer [video; text] (a copy)."""
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra_k and extra_v must be given together, got only one of them")
    if extra_mask is not None and extra_k is None:
        raise ValueError("extra_mask needs extra_k/extra_v, got extra_mask alone")
    B, _, H, D = q.shape
    for name, t in (("extra_k", extra_k), ("extra_v", extra_v)):
        _check_tensor(name, t)
        if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != (H, D):
            raise ValueError(f"{name} must be (B, T, H, D) = ({B}, T, {H}, {D}), got {name}.shape={tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype/device ({q.dtype}, {q.device}), "
                             f"got ({t.dtype}, {t.device})")
    if extra_k.shape != extra_v.shape:
        raise ValueError(f"extra_k and extra_v shapes differ, got {tuple(extra_k.shape)} and {tuple(extra_v.shape)}")
    Sk, T = k.shape[1], extra_k.shape[1]
    if extra_mask is not None:
        _check_tensor("extra_mask", extra_mask)
        if extra_mask.dtype != torch.bool or extra_mask.shape != (B, T):
            raise ValueError(f"extra_mask must be bool (B, T) = ({B}, {T}), "
                             f"got dtype={extra_mask.dtype}, shape={tuple(extra_mask.shape)}")
    if T == 0:
        return k, v, (0, Sk), None, None
    return torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1), (0, Sk), (Sk, T), extra_mask


def _check_text(q: torch.Tensor, parts: KeyParts, has_text_keys: bool, text_lengths, text_mask) -> None:
    B = q.shape[0]
    T = parts.text_len
    if text_lengths is not None and text_mask is not None:
        raise ValueError("give text_lengths (trailing padding) or text_mask (any visibility), not both")
    if (text_lengths is not None or text_mask is not None) and not has_text_keys:
        raise ValueError("text_lengths/text_mask need text_keys (the rows of k/v holding the text keys)")
    if text_lengths is not None:
        _check_tensor("text_lengths", text_lengths)
        if text_lengths.shape != (B,) or text_lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text_lengths must be int32 (B,) = ({B},), got dtype={text_lengths.dtype}, "
                             f"shape={tuple(text_lengths.shape)}")
        if text_lengths.device != q.device:
            raise ValueError(f"text_lengths must be on {q.device}, got {text_lengths.device}")
    if text_mask is not None:
        _check_tensor("text_mask", text_mask)
        if text_mask.dtype != torch.bool or text_mask.shape != (B, T):
            raise ValueError(f"text_mask must be bool (B, T) = ({B}, {T}), "
                             f"got dtype={text_mask.dtype}, shape={tuple(text_mask.shape)}")
        if text_mask.device != q.device:
            raise ValueError(f"text_mask must be on {q.device}, got {text_mask.device}")


# ---------------------------------------------------------------------------------------- public API
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    video_keys: tuple[int, int] | None = None,
    text_keys: tuple[int, int] | None = None,
    text_lengths: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    configs: KernelConfigs | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention (FlashAttention-2 algorithm) over a CSR block layout.

    Query block ``i`` (tokens ``[i*block_m, (i+1)*block_m)``) attends to the video key blocks the layout
    lists for it, plus every visible text key, in one softmax.

    Args:
        q: (B, Sq, H, D) queries (any strides, e.g. ``joint_q[:, video_slice]``). float16/bfloat16 (fast)
            or float32 (exact, no tf32). D <= 256.
        k, v: (B, Sk_total, H, D) joint key/value buffers, read in place.
        layout: :class:`BlockLayout` with ``num_q_blocks == ceil(Sq / block_m)``,
            ``num_k_blocks == ceil(video_len / block_n)``, shared (L=1) or per head (L=H). Blocks 16..256
            (powers of two) for the Triton backend; :func:`default_block_size` gives the fastest.
        video_keys: (start, length) rows of k/v (dim 1) the layout's key blocks index; default: every row
            that is not text (text at the start or the end of k/v).
        text_keys: (start, length) rows of k/v holding keys every query sees (text); default: none.
        text_lengths: (B,) int32 on q's device: batch b sees only its first ``text_lengths[b]`` text keys
            (trailing padding; values in [0, text length]). Read on the device: no host sync, and the
            Hopper warp-specialised kernel stays in use.
        text_mask: (B, T) bool, True = visible: arbitrary text visibility (pipelined kernel).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp (B, H, Sq) float32 (natural log) for merging partial
            results; differentiable. A view whose rows start 16-byte aligned (the Hopper kernels store it
            through a tensor descriptor), so not contiguous when Sq is not a multiple of 4.
        out: optional preallocated (B, Sq, H, D) output (may be a strided view); not allowed when
            autograd records the call.
        backend: "triton", "torch" (chunked PyTorch, no S x S memory) or "auto" (Triton on CUDA or
            under TRITON_INTERPRET=1 when it imports, else torch). An explicit backend that cannot run raises.
        configs: :class:`KernelConfigs` replacing the tuned tables for this call (and its backward).
        extra_k, extra_v, extra_mask: deprecated: separate (B, T, H, D) text keys/values and (B, T) bool
            mask; concatenated into a joint buffer (a copy). Use ``text_keys`` on a joint buffer instead.

    Returns:
        out (B, Sq, H, D), or (out, lse). A query row with no visible key gets zeros and LSE = -inf.
        Gradients reach q and the whole joint k, v (zero on rows that are neither video nor text keys).
        NaN/inf in the inputs propagate to the rows that see them.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, layout, out)
    if extra_k is not None or extra_v is not None or extra_mask is not None:
        if video_keys is not None or text_keys is not None or text_lengths is not None or text_mask is not None:
            raise ValueError("extra_k/extra_v/extra_mask (deprecated) cannot be mixed with video_keys/text_keys/"
                             "text_lengths/text_mask")
        k, v, video_keys, text_keys, text_mask = _joint_from_extra(q, k, v, extra_k, extra_v, extra_mask)
    parts = resolve_key_parts(k.shape[1], video_keys, text_keys)
    _check_text(q, parts, text_keys is not None, text_lengths, text_mask)
    B, Sq, H, D = q.shape
    layout.check_shapes(Sq, parts.video_len, H)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    layout = layout.to(q.device)
    if backend == "auto":
        backend = "triton" if can_run_triton(q, layout) else "torch"
    elif backend == "triton":
        can_run_triton(q, layout, raise_error=True)
    if parts.text_len == 0:
        text_lengths = text_mask = None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if out is not None and needs_grad:
        raise ValueError("out= is for inference only: got inputs that require grad with grad mode on")
    ints = (layout.block_m, layout.block_n, layout.num_q_blocks, layout.num_k_blocks, *parts)

    if backend == "torch":
        if torch.compiler.is_compiling():  # the block loop is data-dependent: one opaque op for dynamo
            o, lse = torch.ops.accel.block_sparse_torch_fwd(q, k, v, layout.offsets, layout.indices, text_lengths,
                                                            text_mask, *ints, scale)
        else:
            from .torch_impl import torch_block_sparse_attention
            o, lse = torch_block_sparse_attention(q, k, v, layout, parts, text_lengths, text_mask, scale)
        if out is not None:
            out.copy_(o)
            o = out
        return (o, lse) if return_lse else o

    cfg = configs.encode() if configs is not None else ""
    if out is not None:
        lse = torch.ops.accel.block_sparse_fwd_out(q, k, v, out, layout.offsets, layout.indices, text_lengths,
                                                   text_mask, *ints, scale, return_lse, cfg)
        return (out, lse) if return_lse else out
    t = layout.transpose() if needs_grad else None
    o, lse = torch.ops.accel.block_sparse_fwd(
        q, k, v, layout.offsets, layout.indices, t.offsets if t is not None else None,
        t.indices if t is not None else None, text_lengths, text_mask, *ints, scale, needs_grad or return_lse, cfg)
    return (o, lse) if return_lse else o
