"""Where video and text tokens sit in a DiT attention sequence.

A `TokenLayout` is the one piece of model knowledge that methods (radial, neighborhood, ...) need:
the video token grid (frames x height x width, in tokens, frame-major and raster-scanned inside a
frame, as every diffusers video DiT orders them) and where the text tokens of joint attention sit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TextPosition = Literal["none", "before", "after"]


@dataclass(frozen=True)
class TokenLayout:
    """Token geometry of one self-attention call.

    Attributes:
        batch: batch size of the attention call (CFG batches count twice).
        frames: latent frames after temporal patching (1 for images).
        height: tokens per column of a frame (latent height / patch size).
        width: tokens per row of a frame (latent width / patch size).
        text_tokens: number of text tokens inside the same sequence (joint attention), else 0.
        text_position: "before" ([text, video]), "after" ([video, text]) or "none".
    """

    batch: int
    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: TextPosition = "none"

    def __post_init__(self) -> None:
        for name in ("batch", "frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenLayout.{name} must be a positive int, got {value!r}")
        if self.text_position not in ("none", "before", "after"):
            raise ValueError(
                f"TokenLayout.text_position must be 'none', 'before' or 'after', got {self.text_position!r}"
            )
        if self.text_tokens < 0:
            raise ValueError(f"TokenLayout.text_tokens must be >= 0, got {self.text_tokens}")
        if (self.text_tokens > 0) != (self.text_position != "none"):
            raise ValueError(
                "TokenLayout: text_position must be 'none' exactly when text_tokens == 0, "
                f"got text_tokens={self.text_tokens}, text_position={self.text_position!r}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def total_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_slice(self) -> slice:
        start = self.text_tokens if self.text_position == "before" else 0
        return slice(start, start + self.video_tokens)

    @property
    def text_slice(self) -> slice:
        if self.text_position == "before":
            return slice(0, self.text_tokens)
        if self.text_position == "after":
            return slice(self.video_tokens, self.total_tokens)
        return slice(0, 0)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    def with_batch(self, batch: int) -> TokenLayout:
        return TokenLayout(batch, self.frames, self.height, self.width, self.text_tokens, self.text_position)

    def geometry_key(self) -> tuple[int, int, int, int, str]:
        """What a sparsity plan depends on (batch excluded: plans are shared across the batch)."""
        return (self.frames, self.height, self.width, self.text_tokens, self.text_position)


def compact_tile(grid: tuple[int, int, int], tokens: int) -> tuple[int, int, int]:
    """A (T, H, W) box of ``tokens`` tokens (powers of two per axis, capped by the grid): each doubling goes to
    the axis with the most tiles left (width first on ties), so tiles are near-cubic in tile counts."""
    tile = [1, 1, 1]
    while tile[0] * tile[1] * tile[2] < tokens:
        grow = [a for a in (2, 1, 0) if tile[a] < grid[a]]
        if not grow:
            break
        a = max(grow, key=lambda x: grid[x] / tile[x])
        tile[a] *= 2
    return (tile[0], tile[1], tile[2])
