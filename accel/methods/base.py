"""The contract every attention method follows.

A method is a frozen dataclass (its config). It turns a token layout into a plan once
(`build_plan`, cached by the caller per layout, heads and device) and runs attention with that plan
(`attend`). Methods know tensors and token layouts, never pipelines or diffusers modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from accel.geometry import TokenLayout


@dataclass(frozen=True)
class AttentionMethod:
    """Base class of method configs. Subclasses are frozen dataclasses and so hashable cache keys."""

    name: ClassVar[str] = "base"

    def can_run(
        self,
        layout: TokenLayout,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        raise_error: bool = False,
    ) -> bool:
        """Whether this method can run these shapes; with raise_error, raise the reason instead of False."""
        return True

    def build_plan(self, layout: TokenLayout, heads: int, device: torch.device) -> Any:
        """Precompute what `attend` needs for this geometry (masks, block lists). Pure; cached by callers."""
        return None

    def plan_density(self, plan: Any) -> float:
        """Fraction of attention tiles the plan computes (1.0 = dense)."""
        return 1.0

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
        """Attention over a whole joint sequence.

        Args:
            q, k, v: (B, S, H, D) in diffusers' layout, S = layout.total_tokens, tokens in layout order.
            layout: where video and text tokens sit.
            plan: this method's `build_plan` result for `layout`.
            key_padding_mask: optional (B, S) bool, True where a key may be attended (text padding).
            scale: softmax scale, default 1/sqrt(D).

        Returns:
            (B, S, H, D) output (may be a strided view).
        """
        raise NotImplementedError


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> None:
    """Raise ValueError unless q, k, v are (B, S, H, D) self-attention tensors matching the layout."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, S, H, D) with equal shapes, got q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"v={tuple(v.shape)}"
        )
    if q.shape[1] != layout.total_tokens:
        raise ValueError(
            f"sequence length {q.shape[1]} does not match the token layout ({layout.video_tokens} video + "
            f"{layout.text_tokens} text tokens)"
        )
