"""`accel make-dataset`: captioned synthetic videos of moving shapes, deterministic per seed.

Each clip shows one shape (circle, square or triangle) of one colour and size moving in one direction at one
speed over a dark background; the caption names all five, e.g. "a small red circle moving left fast". Clip i of
seed s depends only on (s, i), so datasets of any size agree on their common prefix (tests, demos and the learned
demo model of issue #17 share it). Frames are drawn with vectorised numpy masks: thousands of frames per second.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}
SPEEDS: dict[str, float] = {"slow": 0.004, "fast": 0.012}  # fraction of the frame side per frame
SIZES: dict[str, float] = {"small": 0.12, "large": 0.24}  # radius as a fraction of the shorter side
FORMATS = ("mp4", "gif", "webm", "npz")  # npz: lossless uint8 frames, no codec (machines without ffmpeg)
BACKGROUND = (16, 16, 24)


@dataclass(frozen=True)
class ClipSpec:
    """What one synthetic clip shows."""

    colour: str
    shape: str
    direction: str
    speed: str
    size: str
    start: tuple[float, float]  # centre at frame 0, as fractions of (width, height)

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction} {self.speed}"


@dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic dataset: `count` clips of `frames` x `height` x `width` at `fps`, from `seed`."""

    count: int = 16
    frames: int = 17
    height: int = 64
    width: int = 64
    fps: int = 16
    seed: int = 0
    format: str = "mp4"

    def __post_init__(self) -> None:
        for name in ("count", "frames", "height", "width", "fps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticConfig.{name} must be a whole number >= 1, got {value!r}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"SyntheticConfig height and width must be >= 8, got {self.height}x{self.width}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed must be a whole number >= 0, got {self.seed!r}")
        if self.format not in FORMATS:
            raise ValueError(f"SyntheticConfig.format must be one of {', '.join(FORMATS)}, got {self.format!r}")


def clip_spec(seed: int, index: int) -> ClipSpec:
    """The attributes of clip `index` of dataset `seed` (independent of the dataset's size)."""
    rng = np.random.default_rng([seed, index])
    pick = lambda options: list(options)[int(rng.integers(len(options)))]  # noqa: E731
    start = (float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75)))
    return ClipSpec(pick(COLOURS), pick(SHAPES), pick(DIRECTIONS), pick(SPEEDS), pick(SIZES), start)


def render_clip(spec: ClipSpec, frames: int, height: int, width: int) -> np.ndarray:
    """(frames, height, width, 3) uint8 frames of `spec`; the shape wraps around the frame edges."""
    side = min(height, width)
    radius = SIZES[spec.size] * side
    dx, dy = DIRECTIONS[spec.direction]
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    cx = (spec.start[0] * width + dx * SPEEDS[spec.speed] * width * t) % width
    cy = (spec.start[1] * height + dy * SPEEDS[spec.speed] * height * t) % height
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    # Wrapped offsets so a shape leaving one edge enters at the other.
    ox = (xs[None] - cx + width / 2) % width - width / 2
    oy = (ys[None] - cy + height / 2) % height - height / 2
    if spec.shape == "circle":
        mask = ox**2 + oy**2 <= radius**2
    elif spec.shape == "square":
        half = radius * 0.85
        mask = (np.abs(ox) <= half) & (np.abs(oy) <= half)
    else:  # upward triangle inscribed in the circle of `radius`
        top, bottom = -radius, radius * 0.5
        inside_y = (oy >= top) & (oy <= bottom)
        half_width = (oy - top) / (bottom - top) * radius * 0.87
        mask = inside_y & (np.abs(ox) <= half_width)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    video[mask] = COLOURS[spec.colour]
    return video


def iter_clips(config: SyntheticConfig) -> Iterator[tuple[str, np.ndarray, ClipSpec]]:
    """(file stem, frames, spec) of each clip of `config`, in order."""
    for i in range(config.count):
        spec = clip_spec(config.seed, i)
        yield f"clip_{i:05d}", render_clip(spec, config.frames, config.height, config.width), spec


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 (F, H, W, 3) frames as mp4/webm (ffmpeg), gif or npz (numpy, key ``frames``), by the suffix."""
    if path.suffix == ".npz":
        np.savez_compressed(path, frames=np.ascontiguousarray(frames, dtype=np.uint8))
        return
    import imageio.v3 as iio

    if path.suffix == ".gif":
        iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    else:
        codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
        iio.imwrite(path, frames, extension=path.suffix, fps=fps, codec=codec, macro_block_size=1)


def make_dataset(out: str | Path, config: SyntheticConfig, *, manifest: bool = False, progress: bool = True) -> Path:
    """Write the clips of `config` under `out`, each with a same-name `.txt` caption (or one `metadata.jsonl`).

    Also writes `synthetic.json` with the config and every clip's attributes. Returns `out`.
    """
    from tqdm import tqdm

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for stem, frames, spec in tqdm(iter_clips(config), total=config.count, desc="make-dataset", disable=not progress):
        name = f"{stem}.{config.format}"
        write_video(root / name, frames, config.fps)
        if not manifest:
            (root / f"{stem}.txt").write_text(spec.caption + "\n")
        rows.append({"file": name, "caption": spec.caption, "colour": spec.colour, "shape": spec.shape,
                     "direction": spec.direction, "speed": spec.speed, "size": spec.size})
    if manifest:
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file": r["file"], "caption": r["caption"]}) + "\n"
                                                     for r in rows))
    info = {"config": {k: getattr(config, k) for k in config.__dataclass_fields__}, "clips": rows}
    (root / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n")
    return root


__all__ = ["ClipSpec", "SyntheticConfig", "clip_spec", "iter_clips", "make_dataset", "render_clip", "write_video"]
