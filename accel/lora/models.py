"""What training needs to know about a model family: its encoders, its transformer call and its LoRA targets.

Wan 2.1 and Wan 2.2 (both experts) are supported. HunyuanVideo shares the objective (`accel.lora.objective`) but
its two text encoders, pooled projection and embedded guidance are not wired into the cache and forward here
yet, so `training_adapter` refuses it with NotImplementedError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Self-attention projections per family (peft regex over module names); FFN layers added with `ffn=True`.
SELF_ATTENTION_TARGETS = {"wan": r".*blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)"}
FFN_TARGETS = {"wan": r".*blocks\.\d+\.ffn\.(net\.0\.proj|net\.2)"}
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

    def encode_text(self, caption: str) -> torch.Tensor:
        """(L, D) UMT5 embeddings, zero after the caption's tokens, as WanPipeline builds them."""
        device = next(self.pipe.text_encoder.parameters()).device
        embeds, _ = self.pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=device)
        return embeds[0]

    @staticmethod
    def forward(transformer: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                text: torch.Tensor) -> torch.Tensor:
        return transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=text, return_dict=False)[0]



def default_targets(family: str, ffn: bool = False) -> str:
    """peft `target_modules` regex: self-attention q/k/v/out (cross-attention untouched), plus FFN if asked."""
    parts = [SELF_ATTENTION_TARGETS[family]] + ([FFN_TARGETS[family]] if ffn else [])
    return parts[0] if len(parts) == 1 else "(" + ")|(".join(parts) + ")"


def training_adapter(pipe: Any, max_sequence_length: int = 512) -> WanTraining:
    """The training adapter of a pipeline; NotImplementedError naming the family when training is not wired."""
    from accel.pipelines.families import family_for_pipeline

    fam = family_for_pipeline(pipe)
    name = fam.facts.name if fam is not None else type(pipe).__name__
    if name == "wan" and type(pipe).__name__ == "WanPipeline":
        return WanTraining(pipe, max_sequence_length)
    raise NotImplementedError(f"LoRA training supports Wan 2.1/2.2 text-to-video (WanPipeline); got {name} "
                              f"({type(pipe).__name__}). HunyuanVideo shares the objective but its text encoders "
                              "are not wired into training yet")


__all__ = ["FFN_TARGETS", "SELF_ATTENTION_TARGETS", "WanTraining", "default_targets", "training_adapter"]
