"""LTX-Video: self-attention is `transformer_blocks.<i>.attn1`, video tokens only (text via attn2)."""

from __future__ import annotations

import functools

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from accel.pipelines.adapter import AccelProcessor, FamilyAdapter, forward_arg, project_qkv
from accel.pipelines.context import TokenStream, permute_named_inputs
from accel.pipelines.family import FamilyFacts


class LTXSelfAttnProcessor(AccelProcessor):
    """As diffusers' LTXVideoAttnProcessor for self-attention, through our attention."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = project_qkv(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        hidden_states = self.attend(query, key, value).flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


FACTS = FamilyFacts(
    name="ltx",
    label="LTX",
    transformer_classes=("LTXVideoTransformer3DModel",),
    pipeline_prefixes=("LTX",),
    is_video=True,
    text_position="none",  # text enters through cross-attention (attn2)
    text_tokens=0,
    vae_spatial=32,
    vae_temporal=8,
    patch=(1, 1, 1),
    vae_spatial_attr="vae_spatial_compression_ratio",
    vae_temporal_attr="vae_temporal_compression_ratio",
    spatial_multiple=32,
    context_parallel=True,
    tiny_models=("tiny-ltx",),
    name_hints=("ltx",),
)


class LTXAdapter(FamilyAdapter):
    family = FACTS.name
    transformer_classes = FACTS.transformer_classes
    self_attention_patterns = ("transformer_blocks.*.attn1",)
    processor_class = LTXSelfAttnProcessor

    def grid(self, transformer, args, kwargs):
        frames = kwargs.get("num_frames")
        height = kwargs.get("height")
        width = kwargs.get("width")
        if None in (frames, height, width):
            return None
        p = transformer.config.patch_size
        p_t = transformer.config.patch_size_t
        latents = forward_arg(args, kwargs, "hidden_states", 0)
        grid = (int(frames) // p_t, int(height) // p, int(width) // p)
        if latents is not None and latents.shape[1] != grid[0] * grid[1] * grid[2]:
            return None
        return grid

    def token_stream(self, transformer: torch.nn.Module) -> TokenStream | None:
        """LTX-Video transformers: the blocks carry video tokens only (text through cross-attention), and the
        (B, S, D) rotary tables and, with per-token timesteps (image-to-video conditioning), the (B, S, 6C)
        timestep embeddings are per-token inputs of every block, so a method's token order is applied once per
        forward."""
        blocks = list(getattr(transformer, "transformer_blocks", ()))
        if (type(transformer).__name__ != "LTXVideoTransformer3DModel" or not blocks
                or any(type(b).__name__ != "LTXVideoTransformerBlock" for b in blocks)):
            return None
        return TokenStream(blocks, _permute_ltx_block_inputs)


_permute_ltx_block_inputs = functools.partial(
    permute_named_inputs,
    names=("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "encoder_attention_mask"),
    per_token={"temb": (1, 3), "image_rotary_emb": (1, 3)})


ADAPTER = LTXAdapter()
