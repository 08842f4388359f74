"""Dense attention through PyTorch SDPA (cuDNN / FlashAttention on GPUs): the exact baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from accel.geometry import TokenLayout
from accel.methods.base import Attended, AttentionCall, AttentionMethod


def sdpa_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on (B, S, H, D) tensors, as diffusers' native backend calls it.

    Callers pass a key-padding mask only when it hides something (`AttentionCall` is built once per forward):
    any mask at all makes SDPA leave its fastest kernels (cuDNN / FlashAttention), about 2x in attention.
    """
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=mask, scale=scale
    )
    return out.permute(0, 2, 1, 3)


@dataclass(frozen=True)
class Dense(AttentionMethod):
    """Full attention; `accel.patch(pipe, Dense())` must reproduce the unpatched pipeline."""

    name: ClassVar[str] = "dense"

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, plan: Any, call: AttentionCall
    ) -> Attended:
        return Attended(sdpa_bshd(q, k, v, key_padding_mask=call.key_padding_mask, scale=call.scale), 1.0)

    def token_mask(self, layout: TokenLayout, plan: Any = None) -> torch.Tensor:
        s = layout.total_tokens
        return torch.ones(s, s, dtype=torch.bool)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout | None = None,
        plan: Any = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Direct use: SDPA, dropping a mask that hides nothing (one host check; not on the patched path)."""
        if key_padding_mask is not None and bool(key_padding_mask.all()):
            key_padding_mask = None
        return sdpa_bshd(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
