"""Wan 2.1 / 2.2 (T2V, I2V, TI2V): self-attention is `blocks.<i>.attn1`, video tokens only."""

from __future__ import annotations

import functools

import torch

from accel.pipelines.adapter import (
    AccelProcessor,
    FamilyAdapter,
    as_tuple3,
    latent_grid,
    project_qkv,
)
from accel.pipelines.context import TokenStream, permute_named_inputs
from accel.pipelines.family import FamilyFacts, Geometry, Limits


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


def _limits(cfg, geometry: Geometry) -> Limits:
    """Wan's rotary table covers `rope_max_seq_len` tokens per axis."""
    if not getattr(cfg, "rope_max_seq_len", None):
        return {}
    rope = int(cfg.rope_max_seq_len)
    p_t, p_h, p_w = geometry.patch
    vs, vt = geometry.vae_spatial, geometry.vae_temporal
    return {
        "height": (rope * vs * p_h, f"its rotary embedding table covers {rope * vs * p_h} px"),
        "width": (rope * vs * p_w, f"its rotary embedding table covers {rope * vs * p_w} px"),
        "num_frames": ((rope * p_t - 1) * vt + 1, f"its rotary embedding table covers {rope * p_t} latent frames"),
    }


FACTS = FamilyFacts(
    name="wan",
    label="Wan",
    transformer_classes=("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel"),
    pipeline_prefixes=("Wan",),
    is_video=True,
    text_position="none",  # text enters through cross-attention (attn2)
    text_tokens=0,
    vae_spatial=8,
    vae_temporal=4,
    patch=(1, 2, 2),
    spatial_multiple=16,  # check_inputs: height/width % 16; __call__ rounds to VAE x patch and frames to 4k+1
    limits=_limits,
    context_parallel=True,
    tiny_models=("tiny-wan", "tiny-wan-i2v", "tiny-wan22", "accel-demo"),
    name_hints=("wan",),
)


class WanAdapter(FamilyAdapter):
    family = FACTS.name
    transformer_classes = FACTS.transformer_classes
    self_attention_patterns = ("blocks.*.attn1",)
    processor_class = WanSelfAttnProcessor

    def grid(self, transformer, args, kwargs):
        return latent_grid(args, kwargs, as_tuple3(transformer.config.patch_size))

    def token_stream(self, transformer: torch.nn.Module) -> TokenStream | None:
        """Plain Wan transformers: the blocks carry video tokens only; rotary tables (and Wan 2.2 TI2V's
        per-token timestep embeddings) are per-token inputs of every block. Wan VACE: its hint blocks run first
        on the same tokens (hidden and control states in, per-token hints out) and the hints are added after
        main blocks, so the stream is the hint blocks then the main blocks, with the first of each taking
        raster-order inputs; unless a hint follows the last main block (the stream restores raster order there),
        when it reorders per layer. Animate adds face features between blocks: per layer."""
        name = type(transformer).__name__
        blocks = list(getattr(transformer, "blocks", ()))
        if not blocks:
            return None
        if name == "WanTransformer3DModel":
            return TokenStream(blocks, _permute_wan_block_inputs)
        if name == "WanVACETransformer3DModel":
            hints = list(getattr(transformer, "vace_blocks", ()))
            if not hints or len(blocks) - 1 in transformer.config.vace_layers:
                return None
            return TokenStream([*hints, *blocks], _permute_wan_vace_block_inputs, entries=(blocks[0],))
        return None


_WAN_PER_TOKEN = {"temb": (1, 4), "rotary_emb": (1, 2)}
# `WanTransformerBlock`'s per-token inputs: rotary tables (B, S, 1, D) and Wan 2.2 TI2V's per-token timestep
# embeddings (B, S, 6, C); its usual (B, 6, C) is not per-token
_permute_wan_block_inputs = functools.partial(
    permute_named_inputs, names=("hidden_states", "encoder_hidden_states", "temb", "rotary_emb"),
    per_token=_WAN_PER_TOKEN)
_VACE_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "control_hidden_states", "temb", "rotary_emb")


def _permute_wan_vace_block_inputs(args: tuple, kwargs: dict, permute, first: bool) -> tuple[tuple, dict]:
    """Wan VACE's stream: a hint block (`WanVACETransformerBlock`, five inputs) takes the control states beside
    the hidden states, which the first one adds to them; main blocks as plain Wan's."""
    if len(args) + len(kwargs) < 5 and "control_hidden_states" not in kwargs:
        return _permute_wan_block_inputs(args, kwargs, permute, first)
    per_token = dict(_WAN_PER_TOKEN, control_hidden_states=(1, 3)) if first else _WAN_PER_TOKEN
    return permute_named_inputs(args, kwargs, permute, first, names=_VACE_BLOCK_ARGS, per_token=per_token)


ADAPTER = WanAdapter()
