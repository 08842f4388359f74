"""Wan 2.1 / 2.2 (T2V, I2V, TI2V): self-attention is `blocks.<i>.attn1`, video tokens only."""

from __future__ import annotations

import torch

from accel.pipelines.adapter import (
    AccelProcessor,
    FamilyAdapter,
    as_tuple3,
    latent_grid,
    project_qkv,
    register_adapter,
)


def _rotate(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (same arithmetic as diffusers' WanAttnProcessor)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanSelfAttnProcessor(AccelProcessor):
    """Wan self-attention with diffusers' projections, norms and rope, and our attention in the middle."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            # Not the self-attention call this processor was installed for: keep diffusers' behaviour.
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_qkv(attn, hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *rotary_emb)
        hidden_states = self.attend(query, key, value).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


@register_adapter
class WanAdapter(FamilyAdapter):
    family = "wan"
    transformer_classes = ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel")
    self_attention_patterns = ("blocks.*.attn1",)
    processor_class = WanSelfAttnProcessor

    def grid(self, transformer, args, kwargs):
        return latent_grid(args, kwargs, as_tuple3(transformer.config.patch_size))
