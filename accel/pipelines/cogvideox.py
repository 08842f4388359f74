"""CogVideoX: joint attention over [text, video] in `transformer_blocks.<i>.attn1`."""

from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import apply_rotary_emb

from accel.pipelines.adapter import AccelProcessor, FamilyAdapter, latent_grid, project_qkv
from accel.pipelines.context import TokenStream, permute_named_inputs
from accel.pipelines.family import FamilyFacts, Geometry, Limits


class CogVideoXJointAttnProcessor(AccelProcessor):
    """As diffusers' CogVideoXAttnProcessor2_0, but in (B, S, H, D) and through our attention."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in project_qkv(attn, hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :text], apply_rotary_emb(query[:, text:], image_rotary_emb, sequence_dim=1)], 1)
            key = torch.cat([key[:, :text], apply_rotary_emb(key[:, text:], image_rotary_emb, sequence_dim=1)], 1)
        hidden_states = self.attend(query, key, value, text_tokens=text, text_position="before").flatten(2, 3)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split([text, hidden_states.size(1) - text], dim=1)
        return hidden_states, encoder_hidden_states


def _limits(cfg, geometry: Geometry) -> Limits:
    """A learned positional embedding (without rotary embeddings) is fixed to the training size."""
    if not getattr(cfg, "use_learned_positional_embeddings", False) or getattr(
        cfg, "use_rotary_positional_embeddings", False
    ):
        return {}
    vs = geometry.vae_spatial
    reason = "its learned positional embedding is fixed to the training size"
    return {
        "height": (int(cfg.sample_height) * vs, reason),
        "width": (int(cfg.sample_width) * vs, reason),
        "num_frames": (int(cfg.sample_frames), reason),
    }


FACTS = FamilyFacts(
    name="cogvideox",
    label="CogVideoX",
    transformer_classes=("CogVideoXTransformer3DModel",),
    pipeline_prefixes=("CogVideoX",),
    is_video=True,
    text_position="before",  # [text, video]
    text_tokens=226,
    vae_spatial=8,
    vae_temporal=4,
    patch=(1, 2, 2),
    # check_inputs: % 8; CogVideoX 1.5 (patch_size_t) pads latent frames itself, so frames stay 4k+1.
    spatial_multiple=8,
    limits=_limits,
    tiny_models=("tiny-cogvideox",),
    name_hints=("cogvideo",),
)


class CogVideoXAdapter(FamilyAdapter):
    family = FACTS.name
    transformer_classes = FACTS.transformer_classes
    self_attention_patterns = ("transformer_blocks.*.attn1",)
    processor_class = CogVideoXJointAttnProcessor

    def grid(self, transformer, args, kwargs):
        p = transformer.config.patch_size
        return latent_grid(args, kwargs, (transformer.config.patch_size_t or 1, p, p), dims="BFCHW")

    def token_stream(self, transformer: torch.nn.Module) -> TokenStream | None:
        """CogVideoX transformers: the blocks carry the video tokens as ``hidden_states`` (the text apart, as
        ``encoder_hidden_states``; positional embeddings are added before the first block) and the (S, D) rotary
        tables are per-token inputs of every block, so a method's token order is applied once per forward."""
        blocks = list(getattr(transformer, "transformer_blocks", ()))
        if (type(transformer).__name__ != "CogVideoXTransformer3DModel" or not blocks
                or any(type(b).__name__ != "CogVideoXBlock" for b in blocks)):
            return None
        return TokenStream(blocks, _permute_cogvideox_block_inputs)


# blocks take (hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs); (S, D) tables
_permute_cogvideox_block_inputs = functools.partial(
    permute_named_inputs, names=("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"),
    per_token={"image_rotary_emb": (0, 2)})


ADAPTER = CogVideoXAdapter()
