"""Token geometry of known model families without loading weights (for `accel mask` and planning)."""

from __future__ import annotations

from dataclasses import dataclass

from accel.geometry import TextPosition, TokenLayout


@dataclass(frozen=True)
class FamilyGeometry:
    """How pixels become tokens in one family: VAE stride x patch size, and where text sits."""

    spatial_stride: int  # pixels per token side (VAE spatial factor x patch size)
    temporal_stride: int  # pixel frames per latent frame (1 for images)
    text_tokens: int  # typical text tokens inside the self-attention sequence (0: cross-attention)
    text_position: TextPosition

    def layout(self, frames: int, height: int, width: int, batch: int = 1) -> TokenLayout:
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(
                f"height and width must be multiples of {self.spatial_stride} for this family, got {height}x{width}"
            )
        latent_frames = 1 if self.temporal_stride == 1 else (frames - 1) // self.temporal_stride + 1
        return TokenLayout(
            batch, latent_frames, height // self.spatial_stride, width // self.spatial_stride,
            self.text_tokens, self.text_position,
        )


FAMILY_GEOMETRY: dict[str, FamilyGeometry] = {
    "wan": FamilyGeometry(16, 4, 0, "none"),
    "hunyuan_video": FamilyGeometry(16, 4, 256, "after"),
    "cogvideox": FamilyGeometry(16, 4, 226, "before"),
    "ltx": FamilyGeometry(32, 8, 0, "none"),
    "flux": FamilyGeometry(16, 1, 512, "before"),
    "sd3": FamilyGeometry(16, 1, 333, "after"),
}

_NAME_HINTS = (
    ("hunyuan", "hunyuan_video"),
    ("wan", "wan"),
    ("cogvideo", "cogvideox"),
    ("ltx", "ltx"),
    ("flux", "flux"),
    ("stable-diffusion-3", "sd3"),
    ("sd3", "sd3"),
)


def family_of(model: str) -> str:
    """The family of a tiny model name, a Hub id or a local path, by name; ValueError if unknown."""
    from accel.pipelines.tiny import TINY_MODELS

    if model in TINY_MODELS:
        return TINY_MODELS[model].family
    if model in FAMILY_GEOMETRY:
        return model
    lowered = model.lower()
    for hint, family in _NAME_HINTS:
        if hint in lowered:
            return family
    raise ValueError(
        f"cannot tell the model family of {model!r}; name a family ({', '.join(FAMILY_GEOMETRY)}) "
        "or a model id containing one"
    )


def layout_for_model(model: str, frames: int, height: int, width: int, batch: int = 1) -> TokenLayout:
    """Self-attention token layout of `model` generating frames x height x width pixels."""
    return FAMILY_GEOMETRY[family_of(model)].layout(frames, height, width, batch)
