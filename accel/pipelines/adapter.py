"""The per-family adapter contract and the helpers family modules share.

An adapter knows three things about one model family: which attention modules are self-attention
(and their layer index), how to read the video token grid off the transformer's forward inputs,
and which processor to install. Everything else (schedules, plans, fallbacks) is shared; the family's
other facts (sizes, token geometry, ...) are `accel.pipelines.family.FamilyFacts`.

This module knows no family: each family module (`accel.pipelines.wan`, ...) subclasses
`FamilyAdapter`, and `accel.pipelines.families` lists them (`FAMILIES`, `adapter_for`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from accel.pipelines.context import TransformerState
from accel.pipelines.runtime import AttentionRuntime


@dataclass(frozen=True)
class SelfAttentionSite:
    """One self-attention module of a transformer."""

    name: str
    module: torch.nn.Module
    layer: int


class AccelProcessor:
    """Base of our processors: it knows its runtime, its transformer's state and its layer index.

    `_parallel_config` is set by diffusers' `model.enable_parallelism(...)`. Under Ulysses context
    parallelism each rank receives a slice of the sequence; `attend` then runs diffusers' Ulysses
    all-to-all so that our method sees the whole sequence for this rank's heads (the sparse plan is the
    same for every head slice). Ring attention would split the keys and break global block masks, so it
    is refused.
    """

    _parallel_config: Any = None

    def __init__(self, runtime: AttentionRuntime, state: TransformerState, layer: int, original: Any) -> None:
        self.runtime = runtime
        self.state = state
        self.layer = layer
        self.original = original

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        text_tokens: int = 0,
        text_position: str = "none",
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if cp is None:
            return self.runtime.attend(
                self.state, self.layer, q, k, v,
                text_tokens=text_tokens, text_position=text_position, key_padding_mask=key_padding_mask,
            )
        return ulysses_attend(self, cp, q, k, v, text_tokens, text_position, key_padding_mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, method={self.runtime.method!r})"


class FamilyAdapter:
    """Subclass per model family (with its `FamilyFacts`); list it in `accel.pipelines.families`."""

    family: ClassVar[str]
    transformer_classes: ClassVar[tuple[str, ...]]
    # fnmatch patterns of self-attention module paths, in layer order.
    self_attention_patterns: ClassVar[tuple[str, ...]]
    processor_class: ClassVar[type[AccelProcessor]]

    def self_attention_sites(self, transformer: torch.nn.Module) -> list[SelfAttentionSite]:
        names = dict(transformer.named_modules())
        sites: list[SelfAttentionSite] = []
        for pattern in self.self_attention_patterns:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern) and hasattr(names[n], "processor")]
            matched.sort(key=_natural_key)
            for name in matched:
                sites.append(SelfAttentionSite(name, names[name], len(sites)))
        return sites

    def grid(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        """(frames, height, width) in tokens of this forward call, or None if it cannot be told."""
        raise NotImplementedError

    def token_stream(self, transformer: torch.nn.Module) -> Any:
        """A `accel.pipelines.context.TokenStream` when a method's token order can be applied once per forward
        around this family's block stack; None (the default) reorders per layer instead."""
        return None

    def text_visible(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """(B, T) bool visibility of the text tokens joined into self-attention, or None (no padding known)."""
        return None

    def make_processor(
        self, runtime: AttentionRuntime, state: TransformerState, site: SelfAttentionSite
    ) -> AccelProcessor:
        return self.processor_class(runtime, state, site.layer, site.module.processor)


def ulysses_attend(
    processor: AccelProcessor,
    cp: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_tokens: int,
    text_position: str,
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of a rank's sequence slice through diffusers' Ulysses all-to-all (whole sequence, H/N heads)."""
    if cp.ring_degree > 1:
        raise NotImplementedError(
            "ring context parallelism splits the keys across GPUs and breaks accel's global block masks; "
            "use ContextParallelConfig(ulysses_degree=N) instead"
        )
    from diffusers.models.attention_dispatch import TemplatedUlyssesAttention

    world = cp.ulysses_degree
    if q.shape[2] % world:
        raise ValueError(f"Ulysses needs the head count ({q.shape[2]}) to be divisible by ulysses_degree={world}")
    # Each rank's chunk holds its share of video and text, so after the all-to-all a joint sequence is
    # rank-interleaved ([text_0, video_0, text_1, video_1, ...]); only video-only sequences keep the order
    # a spatiotemporal plan needs. Dense attention does not care about token order.
    interleaved = text_tokens > 0

    def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise NotImplementedError("accel's Ulysses path does not return LSE")
        return processor.runtime.attend(
            processor.state, processor.layer, query, key, value,
            text_tokens=text_tokens * world, text_position=text_position, key_padding_mask=attn_mask,
            unsupported=("a joint text+video sequence is rank-interleaved under Ulysses" if interleaved else None),
        )

    return TemplatedUlyssesAttention.apply(
        q, k, v, key_padding_mask, 0.0, False, None, False, False, forward_op, None, processor._parallel_config
    )


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def forward_arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """A forward argument given by keyword or position."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def latent_grid(
    args: tuple, kwargs: dict, patch: tuple[int, int, int], dims: str = "BCFHW"
) -> tuple[int, int, int] | None:
    """Token grid of the forward's `hidden_states` latent: dims names its axes (BCFHW, BFCHW or BCHW)."""
    latents = forward_arg(args, kwargs, "hidden_states", 0)
    if latents is None or latents.dim() != len(dims):
        return None
    size = dict(zip(dims, latents.shape, strict=True))
    p_t, p_h, p_w = patch
    return (-(-size.get("F", 1) // p_t), size["H"] // p_h, size["W"] // p_w)


def as_tuple3(patch: Any) -> tuple[int, int, int]:
    if isinstance(patch, int):
        return (1, patch, patch)
    patch = tuple(int(p) for p in patch)
    return patch if len(patch) == 3 else (1, *patch)


def project_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v projections of a self-attention module, fused or not (as diffusers computes them)."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def project_added_qkv(attn: torch.nn.Module, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Text-stream q, k, v projections of a joint-attention module, fused or not."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        return attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    return (
        attn.add_q_proj(encoder_hidden_states),
        attn.add_k_proj(encoder_hidden_states),
        attn.add_v_proj(encoder_hidden_states),
    )


def key_padding_from_mask(mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """Turn a diffusers key-padding mask ((B, S), (B, 1, 1, S) bool or additive) into (B, S) bool."""
    if mask is None:
        return None
    if mask.numel() != batch * seq:
        raise NotImplementedError(
            f"only key-padding attention masks are supported, got a mask of shape {tuple(mask.shape)} "
            f"for batch {batch} and {seq} tokens"
        )
    mask = mask.reshape(batch, seq)
    return mask if mask.dtype == torch.bool else mask > -1.0  # additive masks: 0 keep, -inf/-large drop
