"""What training needs to know about a model family: its encoders, its transformer call and its LoRA targets.

Wan 2.1, Wan 2.2 (each expert) and HunyuanVideo text-to-video. Each adapter encodes a clip to normalised latents
and a caption to a dict of conditioning tensors (cached on disk), calls its transformer on a batch, and names the
self-attention projections LoRA targets by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Self-attention projections per family (peft regex over module names); FFN layers added with `ffn=True`.
SELF_ATTENTION_TARGETS = {
    "wan": r".*blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    # joint video+text self-attention of the dual- and single-stream blocks (the token refiner is left alone)
    "hunyuan_video": r".*transformer_blocks\.\d+\.attn\."
                     r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
}
FFN_TARGETS = {
    "wan": r".*blocks\.\d+\.ffn\.(net\.0\.proj|net\.2)",
    "hunyuan_video": r"(.*transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2))"
                     r"|(.*single_transformer_blocks\.\d+\.proj_mlp)",
}


@dataclass
class WanTraining:
    """Wan 2.1 / 2.2 training adapter around a `WanPipeline` (VAE, UMT5 text encoder, one or two experts)."""

    pipe: Any
    max_sequence_length: int = 512
    family: str = "wan"

    @property
    def boundary_ratio(self) -> float | None:
        return getattr(self.pipe.config, "boundary_ratio", None)

    def transformer(self, expert: str | None) -> torch.nn.Module:
        """The transformer to train: `transformer`, or for Wan 2.2 the "high" or "low" noise expert."""
        two = getattr(self.pipe, "transformer_2", None) is not None
        if expert is None:
            if two:
                raise ValueError("this Wan 2.2 pipeline has two experts: choose expert='high' (transformer) or "
                                 "'low' (transformer_2); they are trained separately")
            return self.pipe.transformer
        if not two or self.boundary_ratio is None:
            raise ValueError(f"expert={expert!r} needs a Wan 2.2 pipeline with transformer_2 and boundary_ratio")
        return self.pipe.transformer if expert == "high" else self.pipe.transformer_2

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F', H', W') as WanPipeline decodes them."""
        vae = self.pipe.vae
        param = next(vae.parameters())
        z = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return (z - mean) / std

    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """{"text": (L, D)} UMT5 embeddings, zero after the caption's tokens, as WanPipeline builds them."""
        device = next(self.pipe.text_encoder.parameters()).device
        embeds, _ = self.pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=device)
        return {"text": embeds[0]}

    @staticmethod
    def forward(transformer: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["text"],
                           return_dict=False)[0]

    def validation_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    @staticmethod
    def tokens(transformer: torch.nn.Module, latent_shape: tuple[int, ...]) -> int:
        """Video tokens of a (B, C, F, H, W) latent batch."""
        pt, ph, pw = transformer.config.patch_size
        b, _, f, h, w = latent_shape
        return b * (f // pt) * (h // ph) * (w // pw)


@dataclass
class HunyuanVideoTraining:
    """HunyuanVideo training adapter: Llama + CLIP text encoders, pooled projection, embedded guidance."""

    pipe: Any
    max_sequence_length: int = 256
    prompt_template: dict | None = None  # None: the pipeline's default template
    guidance: float = 1.0  # embedded guidance scale seen in training (x1000 as the pipeline passes it)
    family: str = "hunyuan_video"
    boundary_ratio: float | None = None

    def transformer(self, expert: str | None) -> torch.nn.Module:
        if expert is not None:
            raise ValueError(f"expert={expert!r} is for Wan 2.2's two experts; HunyuanVideo has one transformer")
        return self.pipe.transformer

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> latents times the VAE's scaling factor, as the pipeline decodes them."""
        vae = self.pipe.vae
        param = next(vae.parameters())
        return vae.encode(video.to(param.device, param.dtype)).latent_dist.mode() * vae.config.scaling_factor

    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """Llama embeddings (L, D) with their mask (L,) and the pooled CLIP embedding, as the pipeline builds them."""
        device = next(self.pipe.text_encoder.parameters()).device
        kw = {} if self.prompt_template is None else {"prompt_template": self.prompt_template}
        embeds, pooled, mask = self.pipe.encode_prompt(caption, max_sequence_length=self.max_sequence_length,
                                                       device=device, **kw)
        return {"text": embeds[0], "text_mask": mask[0], "pooled": pooled[0]}

    def forward(self, transformer: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((x_t.shape[0],), self.guidance * 1000.0, device=x_t.device, dtype=x_t.dtype)
        return transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["text"],
                           encoder_attention_mask=cond["text_mask"], pooled_projections=cond["pooled"],
                           guidance=guidance, return_dict=False)[0]

    def validation_kwargs(self) -> dict:
        kw: dict = {"max_sequence_length": self.max_sequence_length, "guidance_scale": self.guidance}
        if self.prompt_template is not None:
            kw["prompt_template"] = self.prompt_template
        return kw

    @staticmethod
    def tokens(transformer: torch.nn.Module, latent_shape: tuple[int, ...]) -> int:
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        b, _, f, h, w = latent_shape
        return b * (f // pt) * (h // p) * (w // p)



def default_targets(family: str, ffn: bool = False) -> str:
    """peft `target_modules` regex: self-attention q/k/v/out (cross-attention untouched), plus FFN if asked."""
    parts = [SELF_ATTENTION_TARGETS[family]] + ([FFN_TARGETS[family]] if ffn else [])
    return parts[0] if len(parts) == 1 else "(" + ")|(".join(parts) + ")"


def training_adapter(pipe: Any, max_sequence_length: int | None = None,
                     prompt_template: dict | None = None) -> WanTraining | HunyuanVideoTraining:
    """The training adapter of a pipeline; NotImplementedError naming the family when training is not wired."""
    from accel.pipelines.families import family_for_pipeline

    fam = family_for_pipeline(pipe)
    name = fam.facts.name if fam is not None else type(pipe).__name__
    cls = type(pipe).__name__
    if name == "wan" and cls == "WanPipeline":
        return WanTraining(pipe, max_sequence_length or 512)
    if name == "hunyuan_video" and cls == "HunyuanVideoPipeline":
        return HunyuanVideoTraining(pipe, max_sequence_length or 256, prompt_template)
    raise NotImplementedError(f"LoRA training supports text-to-video Wan 2.1/2.2 (WanPipeline) and HunyuanVideo "
                              f"(HunyuanVideoPipeline); got {name} ({cls})")


__all__ = ["FFN_TARGETS", "SELF_ATTENTION_TARGETS", "HunyuanVideoTraining", "WanTraining", "default_targets",
           "training_adapter"]
