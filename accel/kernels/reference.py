"""Reference block-sparse attention: the specification every backend is tested against.

Expands the block layout to a token mask and runs plain masked softmax attention in float64 (float64
inputs) or float32. Builds (B, H, Sq, Sk + T) tensors: small shapes only.
"""

from __future__ import annotations

import math

import torch

from ._common import resolve_key_parts, text_visibility
from .layout import BlockLayout


def token_mask(layout: BlockLayout, q_len: int, k_len: int) -> torch.Tensor:
    """(L, q_len, k_len) bool token mask of a block layout."""
    mask = layout.to_mask()
    mask = mask.repeat_interleave(layout.block_m, 1).repeat_interleave(layout.block_n, 2)
    return mask[:, :q_len, :k_len]


def reference_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    video_keys: tuple[int, int] | None = None,
    text_keys: tuple[int, int] | None = None,
    text_lengths: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`accel.kernels.block_sparse_attention` (q, k, v as (B, S, H, D)).

    Rows with no visible key give zeros and LSE = -inf. Differentiable. Output in q's dtype, LSE float32
    (float64 for float64 inputs). k, v may be joint buffers (``video_keys``/``text_keys`` rows, with
    ``text_lengths`` or ``text_mask``), or video-only with the deprecated ``extra_k/extra_v/extra_mask``.
    """
    if video_keys is not None or text_keys is not None:
        v0, vl, t0, tl = resolve_key_parts(k.shape[1], video_keys, text_keys)
        if tl:
            extra_k, extra_v = k[:, t0:t0 + tl], v[:, t0:t0 + tl]
            extra_mask = text_visibility(tl, text_lengths, text_mask)
        k, v = k[:, v0:v0 + vl], v[:, v0:v0 + vl]
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    layout.check_shapes(Sq, Sk, H)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(cdtype).transpose(1, 2)
    kh = k.to(cdtype).transpose(1, 2)
    vh = v.to(cdtype).transpose(1, 2)
    mask = token_mask(layout.to(q.device), Sq, Sk)[None].expand(B, H, Sq, Sk)
    if extra_k is not None:
        kh = torch.cat([kh, extra_k.to(cdtype).transpose(1, 2)], 2)
        vh = torch.cat([vh, extra_v.to(cdtype).transpose(1, 2)], 2)
        T = extra_k.shape[1]
        em = extra_mask if extra_mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        mask = torch.cat([mask, em[:, None, None, :].expand(B, H, Sq, T)], 3)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    any_visible = mask.any(-1)
    # Rows that see nothing are computed on zeros and then discarded, so no NaN reaches the gradients.
    s = s.masked_fill(~any_visible[..., None], 0.0)
    lse_all = torch.logsumexp(s, -1)
    lse = torch.where(any_visible, lse_all, float("-inf"))
    p = torch.exp(s - lse_all[..., None])
    o = torch.matmul(p, vh)
    o = torch.where(any_visible[..., None], o, 0.0)
    out = o.transpose(1, 2).to(q.dtype)
    if return_lse:
        return out, lse.to(torch.float64 if cdtype == torch.float64 else torch.float32)
    return out
