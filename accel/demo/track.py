"""The demo model's task metric: does the generated shape have the caption's colour and move as the caption says?

Per frame, every pixel is classified to its nearest colour of the synthetic palette (`COLOURS` plus the
`BACKGROUND`); pixels of the caption's colour within `TrackConfig.colour_distance` (RGB, 0-255) form the shape.
Its centre is the circular mean of those pixels' coordinates (the synthetic shapes wrap around the frame edges,
so a plain mean would jump when the shape straddles an edge). Frame-to-frame displacements are unwrapped the same
way, and a least-squares line through the path gives the velocity in frame fractions per frame, the unit of
`accel.lora.synthetic.SPEEDS`. The dominant axis and its sign give the direction; the speed class is the nearer
(geometric midpoint) of "slow" and "fast". An attribute the caption does not name is not checked.

Videos are (F, H, W, 3) arrays, uint8 in [0, 255] or floats in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from accel.lora.synthetic import BACKGROUND, COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

_PALETTE_NAMES = (*COLOURS, "background")
_PALETTE = np.array([*COLOURS.values(), BACKGROUND], dtype=np.float32)


@dataclass(frozen=True)
class TrackConfig:
    """Thresholds of the tracker.

    Attributes:
        colour_distance: largest RGB distance (0-255 scale) from a pixel to the named colour to count as shape.
        min_pixels: fewest shape pixels, as a fraction of the frame, for the shape to be present in a frame.
        min_present: fraction of frames the shape must be present in for `colour_ok` (and for any motion).
        min_speed: below this speed (frame fraction per frame) the shape counts as still: no direction.
        speed_split: speeds below it are "slow", at or above it "fast" (default: geometric mean of `SPEEDS`).
    """

    colour_distance: float = 80.0
    min_pixels: float = 0.002
    min_present: float = 0.6
    min_speed: float = 0.0015
    speed_split: float = math.sqrt(SPEEDS["slow"] * SPEEDS["fast"])

    def __post_init__(self) -> None:
        for name in ("colour_distance", "min_pixels", "min_present", "min_speed", "speed_split"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"TrackConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.min_present > 1:
            raise ValueError(f"TrackConfig.min_present must be at most 1, got {self.min_present}")


@dataclass(frozen=True)
class Caption:
    """The attributes a caption names (None for those it does not)."""

    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    speed: str | None = None
    size: str | None = None


def parse_caption(caption: str) -> Caption:
    """The colour, shape, direction, speed and size words of `caption` (the last one of each kind wins)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    found: dict[str, str] = {}
    kinds = (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS), ("speed", SPEEDS), ("size", SIZES))
    for word in "".join(c if c.isalnum() else " " for c in caption.lower()).split():
        for kind, words in kinds:
            if word in words:
                found[kind] = word
    return Caption(**found)


@dataclass(frozen=True)
class TrackResult:
    """The tracked path of one video and how it compares with its caption.

    Attributes:
        path: (F, 2) centre (x, y) per frame in frame fractions, unwrapped across edges; NaN where absent.
        present: (F,) whether the shape was found in each frame.
        velocity: fitted (vx, vy) in frame fractions per frame (image y points down); None if not tracked.
        direction: "left"/"right"/"up"/"down", or None (absent or still); speed: |velocity| along that axis.
        speed_class: "slow" or "fast" (None without a direction).
        expected: what the caption names.
        colour_ok, direction_ok, speed_ok: each check (True when the caption does not name that attribute);
        matches: all three.
    """

    path: np.ndarray
    present: np.ndarray
    velocity: tuple[float, float] | None
    direction: str | None
    speed: float | None
    speed_class: str | None
    expected: Caption
    colour_ok: bool
    direction_ok: bool
    speed_ok: bool

    @property
    def matches(self) -> bool:
        return self.colour_ok and self.direction_ok and self.speed_ok


def _as_uint8_scale(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (frames, height, width, 3), got shape {video.shape}")
    if video.dtype == np.uint8:
        return video.astype(np.float32)
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"video must be uint8 or floating point, got dtype {video.dtype}")
    return np.clip(video.astype(np.float32), 0.0, 1.0) * 255.0


def colour_mask(video: np.ndarray, colour: str, config: TrackConfig = TrackConfig()) -> np.ndarray:
    """(F, H, W) bool: pixels whose nearest palette colour is `colour`, within ``config.colour_distance``."""
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {', '.join(COLOURS)}, got {colour!r}")
    rgb = _as_uint8_scale(video)
    d2 = ((rgb[..., None, :] - _PALETTE) ** 2).sum(-1)  # F, H, W, palette
    index = _PALETTE_NAMES.index(colour)
    return (d2.argmin(-1) == index) & (d2[..., index] <= config.colour_distance ** 2)


def _circular_centre(mask: np.ndarray) -> tuple[float, float]:
    """Circular mean (x, y) of a (H, W) mask's pixels, in frame fractions in [0, 1)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    out = []
    for coords, size in ((xs, w), (ys, h)):
        angle = 2 * np.pi * (coords + 0.5) / size
        mean = math.atan2(float(np.sin(angle).mean()), float(np.cos(angle).mean()))
        out.append((mean / (2 * np.pi)) % 1.0)
    return out[0], out[1]


def track(video: np.ndarray, caption: str, config: TrackConfig = TrackConfig()) -> TrackResult:
    """Track the caption's colour through `video` (F, H, W, 3) and check colour, direction and speed."""
    expected = parse_caption(caption)
    frames = np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"video must be (frames >= 2, height, width, 3), got shape {frames.shape}")
    n, h, w = frames.shape[:3]
    path = np.full((n, 2), np.nan)
    present = np.zeros(n, dtype=bool)
    if expected.colour is None:
        mask = _as_uint8_scale(frames)
        d2 = ((mask[..., None, :] - _PALETTE) ** 2).sum(-1)
        masks = (d2.argmin(-1) != len(COLOURS)) & (d2.min(-1) <= config.colour_distance ** 2)
    else:
        masks = colour_mask(frames, expected.colour, config)
    need = max(1, int(round(config.min_pixels * h * w)))
    for i in range(n):
        if masks[i].sum() >= need:
            present[i] = True
            path[i] = _circular_centre(masks[i])
    colour_ok = bool(present.mean() >= config.min_present)
    velocity = direction = speed = speed_class = None
    idx = np.nonzero(present)[0]
    if colour_ok and len(idx) >= 2:
        steps = np.diff(path[idx], axis=0)
        steps = (steps + 0.5) % 1.0 - 0.5  # unwrap: the shortest way around the torus
        unwrapped = np.concatenate([path[idx[:1]], path[idx[0]] + np.cumsum(steps, 0)])
        path[idx] = unwrapped
        t = idx.astype(np.float64)
        vx, vy = (float(np.polyfit(t, unwrapped[:, k], 1)[0]) for k in range(2))
        velocity = (vx, vy)
        axis_speed = max(abs(vx), abs(vy))
        if axis_speed >= config.min_speed:
            direction = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
            speed = axis_speed
            speed_class = "fast" if speed >= config.speed_split else "slow"
    direction_ok = expected.direction is None or direction == expected.direction
    speed_ok = expected.speed is None or (speed_class == expected.speed)
    return TrackResult(path, present, velocity, direction, speed, speed_class, expected, colour_ok,
                       bool(direction_ok and (direction is not None or expected.direction is None)), bool(speed_ok))


@dataclass(frozen=True)
class MotionSummary:
    """Fractions of (video, caption) pairs whose colour, direction, speed and all three match."""

    count: int
    colour_rate: float
    direction_rate: float
    speed_rate: float
    match_rate: float

    def summary(self) -> str:
        return (f"{self.count} videos: {self.match_rate:.0%} match (colour {self.colour_rate:.0%}, "
                f"direction {self.direction_rate:.0%}, speed {self.speed_rate:.0%})")


def summarize(results: Iterable[TrackResult]) -> MotionSummary:
    """Aggregate `TrackResult`s into rates."""
    results = list(results)
    if not results:
        raise ValueError("summarize needs at least one TrackResult, got none")
    n = len(results)
    return MotionSummary(n, sum(r.colour_ok for r in results) / n, sum(r.direction_ok for r in results) / n,
                         sum(r.speed_ok for r in results) / n, sum(r.matches for r in results) / n)


def motion_match_rate(pairs: Iterable[tuple[np.ndarray, str]], config: TrackConfig = TrackConfig()) -> MotionSummary:
    """Track each (video, caption) pair and aggregate: the fraction of prompts whose motion matches, and per check."""
    return summarize(track(video, caption, config) for video, caption in pairs)


__all__ = ["Caption", "MotionSummary", "TrackConfig", "TrackResult", "colour_mask", "motion_match_rate",
           "parse_caption", "summarize", "track"]
