"""HunyuanVideo: joint attention over [video, text] in the dual- and single-stream blocks.

Layer indices follow the reference: dual-stream blocks 0..N-1, single-stream blocks N..N+M-1.
The token refiner's attention is text-only and stays untouched.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import apply_rotary_emb

from accel.pipelines.adapter import (
    AccelProcessor,
    FamilyAdapter,
    forward_arg,
    key_padding_from_mask,
    latent_grid,
    project_added_qkv,
    project_qkv,
)
from accel.pipelines.context import TokenStream, permute_named_inputs
from accel.pipelines.family import FamilyFacts


class HunyuanVideoJointAttnProcessor(AccelProcessor):
    """Joint attention with video first and text last, as diffusers' HunyuanVideoAttnProcessor2_0."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        dual_stream = attn.add_q_proj is not None
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if not dual_stream and text:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in project_qkv(attn, hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            video = query.shape[1] - (0 if dual_stream else text)
            query = torch.cat([apply_rotary_emb(query[:, :video], image_rotary_emb, sequence_dim=1),
                               query[:, video:]], dim=1)
            key = torch.cat([apply_rotary_emb(key[:, :video], image_rotary_emb, sequence_dim=1),
                             key[:, video:]], dim=1)
        if dual_stream and text:
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

        batch, seq = query.shape[:2]
        hidden_states = self.attend(
            query, key, value, text_tokens=text, text_position="after",
            key_padding_mask=key_padding_from_mask(attention_mask, batch, seq),
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states, encoder_hidden_states
        hidden_states, encoder_hidden_states = hidden_states[:, :-text], hidden_states[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


FACTS = FamilyFacts(
    name="hunyuan_video",
    label="HunyuanVideo",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    pipeline_prefixes=("HunyuanVideo",),
    is_video=True,
    text_position="after",  # [video, text]
    text_tokens=256,
    vae_spatial=8,
    vae_temporal=4,
    patch=(1, 2, 2),
    spatial_multiple=16,
    frames_per_patch=True,
    tiny_models=("tiny-hunyuan-video",),
    name_hints=("hunyuan",),
)


class HunyuanVideoAdapter(FamilyAdapter):
    family = FACTS.name
    transformer_classes = FACTS.transformer_classes
    self_attention_patterns = ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")
    processor_class = HunyuanVideoJointAttnProcessor

    def text_visible(self, transformer, args, kwargs):
        mask = forward_arg(args, kwargs, "encoder_attention_mask", 3)
        return None if mask is None else mask.bool()

    def grid(self, transformer, args, kwargs):
        p = transformer.config.patch_size
        return latent_grid(args, kwargs, (transformer.config.patch_size_t, p, p))

    def token_stream(self, transformer: torch.nn.Module) -> TokenStream | None:
        """Plain HunyuanVideo transformers: the dual- and single-stream blocks carry the video tokens as
        ``hidden_states`` (the text rides apart, as ``encoder_hidden_states``), the (S, D) rotary tables are
        per-token inputs of every block and the attention mask hides text only, so a method's token order can be
        applied once per forward. The token-replace (I2V) blocks treat the first frame's tokens apart: those
        models reorder per layer instead."""
        blocks = [*getattr(transformer, "transformer_blocks", ()),
                  *getattr(transformer, "single_transformer_blocks", ())]
        if (type(transformer).__name__ != "HunyuanVideoTransformer3DModel" or not blocks
                or any(type(b).__name__ not in _PLAIN_BLOCKS for b in blocks)):
            return None
        return TokenStream(blocks, _permute_hunyuan_block_inputs)


_PLAIN_BLOCKS = ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock")
# blocks take (hidden_states, encoder_hidden_states, temb, attention_mask, rotary tables, ...), the (S, D) tables
# named freqs_cis by the dual-stream block and image_rotary_emb by the single-stream one
_TABLES = (0, 2)
_permute_hunyuan_block_inputs = functools.partial(
    permute_named_inputs, names=("hidden_states", "encoder_hidden_states", "temb", "attention_mask", "rotary_tables"),
    per_token={"rotary_tables": _TABLES, "freqs_cis": _TABLES, "image_rotary_emb": _TABLES})


ADAPTER = HunyuanVideoAdapter()
