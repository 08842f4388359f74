"""Stable Diffusion 3 / 3.5: joint attention over [image, text] (`transformer_blocks.<i>.attn`) and,
in SD3.5's dual-attention blocks, image-only self-attention (`attn2`, numbered after all `attn`)."""

from __future__ import annotations

import torch

from accel.pipelines.adapter import (
    AccelProcessor,
    FamilyAdapter,
    latent_grid,
    project_added_qkv,
    project_qkv,
)
from accel.pipelines.family import FamilyFacts, Geometry, Limits


class SD3JointAttnProcessor(AccelProcessor):
    """As diffusers' JointAttnProcessor2_0, in (B, S, H, D) and through our attention."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        if attention_mask is not None or hidden_states.dim() != 3:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        image = hidden_states.shape[1]
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in project_qkv(attn, hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = 0
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            enc_q, enc_k, enc_v = (
                t.unflatten(2, (attn.heads, -1)) for t in project_added_qkv(attn, encoder_hidden_states)
            )
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query = torch.cat([query, enc_q], dim=1)
            key = torch.cat([key, enc_k], dim=1)
            value = torch.cat([value, enc_v], dim=1)
        hidden_states = self.attend(query, key, value, text_tokens=text, text_position="after")
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image], hidden_states[:, image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _limits(cfg, geometry: Geometry) -> Limits:
    """SD3's positional embedding covers `pos_embed_max_size` patches per axis."""
    if not getattr(cfg, "pos_embed_max_size", None):
        return {}
    px = int(cfg.pos_embed_max_size) * geometry.stride[0]
    return {key: (px, f"its positional embedding covers {px} px") for key in ("height", "width")}


FACTS = FamilyFacts(
    name="sd3",
    label="Stable Diffusion 3",
    transformer_classes=("SD3Transformer2DModel",),
    pipeline_prefixes=("StableDiffusion3",),
    is_video=False,
    text_position="after",  # [image, text]
    text_tokens=333,
    vae_spatial=8,
    vae_temporal=1,
    patch=(1, 2, 2),
    vae_spatial_attr="vae_scale_factor",
    vae_temporal_attr=None,
    limits=_limits,
    tiny_models=("tiny-sd3",),
    name_hints=("stable-diffusion-3", "sd3"),
)


class SD3Adapter(FamilyAdapter):
    family = FACTS.name
    transformer_classes = FACTS.transformer_classes
    self_attention_patterns = ("transformer_blocks.*.attn", "transformer_blocks.*.attn2")
    processor_class = SD3JointAttnProcessor

    def grid(self, transformer, args, kwargs):
        p = transformer.config.patch_size
        return latent_grid(args, kwargs, (1, p, p), dims="BCHW")


ADAPTER = SD3Adapter()
