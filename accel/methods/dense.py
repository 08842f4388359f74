"""Dense attention through PyTorch SDPA (cuDNN / FlashAttention on GPUs): the exact baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from accel.geometry import TokenLayout
from accel.methods.base import AttentionMethod


def sdpa_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on (B, S, H, D) tensors, as diffusers' native backend calls it.

    A key-padding mask that hides nothing is dropped: any mask at all makes SDPA leave its fastest
    kernels (cuDNN / FlashAttention), which costs HunyuanVideo about 2x in attention.
    """
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=mask, scale=scale
    )
    return out.permute(0, 2, 1, 3)


@dataclass(frozen=True)
class Dense(AttentionMethod):
    """Full attention; `accel.patch(pipe, Dense())` must reproduce the unpatched pipeline."""

    name: ClassVar[str] = "dense"

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        plan: Any,
        *,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        return sdpa_bshd(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
