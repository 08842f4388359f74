"""Triton-free helpers shared by the public API, the backends and the reference: joint K/V parts, LSE."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch


def triton_runs_here(t: torch.Tensor) -> bool:
    """Whether Triton kernels can take ``t``'s device: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def triton_input_reason(q: torch.Tensor, max_head_dim: int = 256) -> str | None:
    """Why the Triton kernels cannot take ``q`` (device, dtype, head dim), or None: every kernel's first check."""
    if not triton_runs_here(q):
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got device={q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"supports float16/bfloat16/float32, got dtype={q.dtype}"
    if q.shape[-1] > max_head_dim:
        return f"supports head_dim <= {max_head_dim}, got {q.shape[-1]}"
    return None


class KeyParts(NamedTuple):
    """Where the video keys (indexed by the layout's key blocks) and the text keys sit in a joint K/V buffer."""

    video_start: int
    video_len: int
    text_start: int = 0
    text_len: int = 0


def _span(name: str, span, rows: int) -> tuple[int, int]:
    if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(x, int) for x in span)):
        raise TypeError(f"{name} must be a (start, length) tuple of ints, got {span!r}")
    start, length = span
    if start < 0 or length < 0 or start + length > rows:
        raise ValueError(f"{name}=({start}, {length}) must lie within the {rows} rows of k/v (dim 1)")
    return start, length


def resolve_key_parts(rows: int, video_keys=None, text_keys=None) -> KeyParts:
    """Check ``video_keys``/``text_keys`` against a K/V buffer of ``rows`` rows; fill in the video default.

    Default video keys: every row that is not text (text must then sit at the start or the end).
    """
    t0, tl = _span("text_keys", text_keys, rows) if text_keys is not None else (0, 0)
    if tl == 0:
        t0 = 0
    if video_keys is not None:
        v0, vl = _span("video_keys", video_keys, rows)
    elif tl == 0:
        v0, vl = 0, rows
    elif t0 + tl == rows:
        v0, vl = 0, t0
    elif t0 == 0:
        v0, vl = tl, rows - tl
    else:
        raise ValueError(f"text_keys=({t0}, {tl}) sit inside the {rows} rows of k/v: pass video_keys as well")
    if tl and vl and v0 < t0 + tl and t0 < v0 + vl:
        raise ValueError(f"video_keys=({v0}, {vl}) and text_keys=({t0}, {tl}) overlap")
    return KeyParts(v0, vl, t0, tl)


def alloc_lse(B: int, H: int, Sq: int, device: torch.device) -> torch.Tensor:
    """(B, H, Sq) float32 LSE whose rows start 16-byte aligned (a view of (B, H, Sq rounded up to 4))."""
    return torch.empty(B, H, -(-Sq // 4) * 4, dtype=torch.float32, device=device)[..., :Sq]


def text_visibility(text_len: int, text_lengths: torch.Tensor | None, text_mask: torch.Tensor | None,
                    dtype: torch.dtype = torch.bool) -> torch.Tensor | None:
    """(B, T) visibility of the text keys from per-batch lengths or a mask, on the device (no host sync)."""
    if text_mask is not None:
        return text_mask.to(dtype).contiguous()
    if text_lengths is not None:
        ar = torch.arange(text_len, device=text_lengths.device, dtype=torch.int32)
        return (ar[None, :] < text_lengths.to(torch.int32)[:, None]).to(dtype)
    return None
