"""What accel knows about one model family, as data: `FamilyFacts` (and `Geometry`, its pixel -> token rule).

Each family module (`accel.pipelines.wan`, ...) declares its `FACTS` next to its adapter, and
`accel.pipelines.families` lists the families. This module imports no diffusers and no other
`accel.pipelines` module, so anything may read facts without pulling in adapters or processors.

The facts hold the values of the family's released models (what `accel mask --model wan` plans with);
`FamilyFacts.geometry(pipe)` reads a loaded pipeline's own VAE factors and patch sizes instead, so tiny
test models (whose VAEs compress less) get their real grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accel.geometry import TextPosition

Limits = dict[str, tuple[int, str]]
"""``{field: (maximum, reason)}`` for ``height``, ``width``, ``num_frames``, ``num_inference_steps``."""


@dataclass(frozen=True)
class Geometry:
    """How pixels become tokens in one pipeline: VAE factors and the transformer's patch (packing included)."""

    vae_spatial: int  # pixels per latent pixel
    vae_temporal: int | None  # pixel frames per latent frame (causal: (F - 1) // t + 1); None for images
    patch: tuple[int, int, int]  # (frames, rows, columns) of latents per token

    @property
    def stride(self) -> tuple[int, int]:
        """Pixels per token row and column."""
        return self.vae_spatial * self.patch[1], self.vae_spatial * self.patch[2]

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(token frames, token rows, token columns) for frames x height x width pixels."""
        latent_frames = 1 if self.vae_temporal is None else (frames - 1) // self.vae_temporal + 1
        p_t, p_h, p_w = self.patch
        return (-(-latent_frames // p_t), height // (self.vae_spatial * p_h), width // (self.vae_spatial * p_w))


@dataclass(frozen=True)
class FamilyFacts:
    """Everything family-specific that is not an attention processor.

    Size rules: height and width are positive multiples of
    ``lcm(spatial_multiple, vae_spatial * patch_h, vae_spatial * patch_w)``; video frames satisfy
    ``frames % tmul == frame_offset`` with ``tmul = vae_temporal`` (times the temporal patch when
    ``frames_per_patch``), see `size_rules`.
    """

    name: str  # "wan", ...: the key everywhere (adapters, tiny models, CLI)
    label: str  # for messages: "Wan"
    transformer_classes: tuple[str, ...]  # diffusers class names (matched along the MRO)
    pipeline_prefixes: tuple[str, ...]  # diffusers pipeline class names start with one of these
    is_video: bool
    text_position: TextPosition  # where text sits in the self-attention sequence ("none": cross-attention)
    text_tokens: int  # typical text tokens in that sequence for the released models (0 with "none")
    # pixel -> token grid of the released models (a loaded pipeline's own values win, see `geometry`)
    vae_spatial: int
    vae_temporal: int  # 1 for images
    patch: tuple[int, int, int]  # transformer patch (t, h, w) in latents
    latent_packing: int = 1  # the pipeline packs k x k latents into one transformer input (Flux: 2)
    vae_spatial_attr: str = "vae_scale_factor_spatial"  # pipeline attributes holding the VAE factors
    vae_temporal_attr: str | None = "vae_scale_factor_temporal"
    # size rules
    spatial_multiple: int = 1  # what the pipeline's check_inputs demands on top of whole patches
    frame_offset: int = 1  # frames % tmul == frame_offset (causal video VAEs: 1)
    frames_per_patch: bool = False  # the frame multiple includes the temporal patch (no latent padding)
    limits: Callable[[Any, Geometry], Limits] | None = None  # (transformer config, geometry) -> maxima
    context_parallel: bool = False  # diffusers has a context-parallel plan accel can run (Ulysses)
    tiny_models: tuple[str, ...] = ()  # names in `accel.pipelines.tiny.TINY_MODELS`
    name_hints: tuple[str, ...] = ()  # lower-case substrings of Hub ids / paths that name the family

    def __post_init__(self) -> None:
        if self.text_position not in ("none", "before", "after"):
            raise ValueError(f"{self.name}: text_position must be 'none', 'before' or 'after'")
        if (self.text_tokens > 0) != (self.text_position != "none"):
            raise ValueError(f"{self.name}: text_tokens and text_position disagree")
        if not self.is_video and self.vae_temporal != 1:
            raise ValueError(f"{self.name}: an image family has vae_temporal 1")

    def default_geometry(self, *, vae: tuple[int, int] | None = None,
                         patch: tuple[int, int, int] | None = None) -> Geometry:
        """The released models' geometry, or one with the given VAE factors (spatial, temporal) and patch."""
        spatial, temporal = vae if vae is not None else (self.vae_spatial, self.vae_temporal)
        return self._geometry(spatial, temporal, patch or self.patch)

    def geometry(self, pipe: Any) -> Geometry:
        """The geometry of a loaded pipeline: its VAE factors and its transformer's patch size."""
        spatial = getattr(pipe, self.vae_spatial_attr, None) or self.vae_spatial
        temporal = (getattr(pipe, self.vae_temporal_attr, None) if self.vae_temporal_attr else None) or (
            self.vae_temporal
        )
        transformer = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
        cfg = getattr(transformer, "config", None)
        return self._geometry(int(spatial), int(temporal), config_patch(cfg) if cfg is not None else self.patch)

    def _geometry(self, spatial: int, temporal: int, patch: tuple[int, int, int]) -> Geometry:
        p_t, p_h, p_w = patch
        k = self.latent_packing
        return Geometry(spatial, temporal if self.is_video else None, (p_t, p_h * k, p_w * k))

    def size_rules(self, geometry: Geometry) -> tuple[int, int | None, int]:
        """(spatial multiple, frame multiple or None for images, frame offset) of a pipeline with `geometry`."""
        s_h, s_w = geometry.stride
        spatial = math.lcm(self.spatial_multiple, s_h, s_w)
        if not self.is_video or geometry.vae_temporal is None:
            return spatial, None, 0
        tmul = geometry.vae_temporal * (geometry.patch[0] if self.frames_per_patch else 1)
        return spatial, tmul, self.frame_offset

    def model_limits(self, config: Any, geometry: Geometry) -> Limits:
        """Maxima the model's own config sets (rotary tables, positional embeddings); {} if none."""
        if self.limits is None or config is None:
            return {}
        return self.limits(config, geometry)


def config_patch(cfg: Any) -> tuple[int, int, int]:
    """(t, h, w) patch of a diffusers transformer config: `patch_size` (int or tuple) and `patch_size_t`."""
    patch = getattr(cfg, "patch_size", None) or 1
    if isinstance(patch, (tuple, list)):
        patch = tuple(int(p) for p in patch)
        return (1, *patch) if len(patch) == 2 else patch  # type: ignore[return-value]
    return (int(getattr(cfg, "patch_size_t", None) or 1), int(patch), int(patch))
