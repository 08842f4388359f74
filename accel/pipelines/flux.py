"""Flux: joint attention over [text, image] in dual-stream (`transformer_blocks.<i>.attn`) and
single-stream (`single_transformer_blocks.<i>.attn`) blocks; images are 1-frame grids."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from accel.pipelines.adapter import (
    AccelProcessor,
    FamilyAdapter,
    forward_arg,
    key_padding_from_mask,
    project_added_qkv,
    project_qkv,
)
from accel.pipelines.family import FamilyFacts


class FluxJointAttnProcessor(AccelProcessor):
    """As diffusers' FluxAttnProcessor, through our attention. Text tokens come first."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in project_qkv(attn, hidden_states))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        joint = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
        if joint:
            enc_q, enc_k, enc_v = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in project_added_qkv(attn, encoder_hidden_states)
            )
            query = torch.cat([attn.norm_added_q(enc_q), query], dim=1)
            key = torch.cat([attn.norm_added_k(enc_k), key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        batch, seq = query.shape[:2]
        grid = self.state.grid
        text = seq - grid[0] * grid[1] * grid[2] if grid is not None else 0
        hidden_states = self.attend(
            query, key, value, text_tokens=max(text, 0), text_position="before",
            key_padding_mask=key_padding_from_mask(attention_mask, batch, seq),
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if not joint:
            return hidden_states
        text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :text], hidden_states[:, text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


FACTS = FamilyFacts(
    name="flux",
    label="Flux",
    transformer_classes=("FluxTransformer2DModel",),
    pipeline_prefixes=("Flux",),
    is_video=False,
    text_position="before",  # [text, image]
    text_tokens=512,
    vae_spatial=8,
    vae_temporal=1,
    patch=(1, 1, 1),
    latent_packing=2,  # latents are packed in 2x2 patches (the pipeline resizes with a warning otherwise)
    vae_spatial_attr="vae_scale_factor",
    vae_temporal_attr=None,
    context_parallel=True,
    tiny_models=("tiny-flux",),
    name_hints=("flux",),
)


class FluxAdapter(FamilyAdapter):
    family = FACTS.name
    transformer_classes = FACTS.transformer_classes
    self_attention_patterns = ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")
    processor_class = FluxJointAttnProcessor

    def grid(self, transformer, args, kwargs):
        img_ids = kwargs.get("img_ids")
        latents = forward_arg(args, kwargs, "hidden_states", 0)
        if img_ids is None or latents is None:
            return None
        img_ids = img_ids[0] if img_ids.dim() == 3 else img_ids
        height = int(img_ids[:, 1].max().item()) + 1
        width = int(img_ids[:, 2].max().item()) + 1
        if height * width != latents.shape[1]:
            return None  # extra conditioning tokens (Kontext, ...): layout unknown
        return (1, height, width)


ADAPTER = FluxAdapter()
