"""Video folders with captions: scanning, bucketing, decoding and resizing to the training size.

A dataset is a folder of videos (mp4/webm/gif/mov/mkv, read through imageio) with captions in same-name `.txt`
files or in one manifest (`metadata.jsonl` / `metadata.csv` with `file` and `caption` columns). Each clip is
assigned the bucket (frames, height, width) with the most frames it can fill and the closest aspect ratio, then
resized (shorter side to cover), centre-cropped and sampled to that bucket. Every problem (unreadable video,
missing caption, too few frames) is a `DataError` naming the file; `on_error` decides skip or fatal.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("accel.lora")

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".npz")
MANIFESTS = ("metadata.jsonl", "metadata.csv")


class DataError(ValueError):
    """A problem with one file of a dataset; the message starts with the file name."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclass(frozen=True)
class Bucket:
    """One training shape: frames x height x width in pixels."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class DatasetConfig:
    """Where the clips are and the shapes they are trained at.

    Attributes:
        root: the folder of videos.
        buckets: training shapes; each clip goes to the one with the most frames it can fill, then the
            closest aspect ratio.
        frame_stride: take every n-th frame of the source (1: consecutive frames).
        on_error: "skip" reports a bad file and leaves it out; "error" stops at the first one.
    """

    root: Path
    buckets: tuple[Bucket, ...]
    frame_stride: int = 1
    on_error: str = "skip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if not self.buckets:
            raise ValueError("DatasetConfig.buckets must hold at least one Bucket")
        for b in self.buckets:
            if not isinstance(b, Bucket) or min(b.frames, b.height, b.width) < 1:
                raise ValueError(f"DatasetConfig.buckets must be Buckets with sizes >= 1, got {b!r}")
        if not isinstance(self.frame_stride, int) or self.frame_stride < 1:
            raise ValueError(f"DatasetConfig.frame_stride must be a whole number >= 1, got {self.frame_stride!r}")
        if self.on_error not in ("skip", "error"):
            raise ValueError(f"DatasetConfig.on_error must be 'skip' or 'error', got {self.on_error!r}")


@dataclass(frozen=True)
class VideoItem:
    """One clip of a dataset, with its caption and its bucket."""

    path: Path
    caption: str
    bucket: Bucket


@dataclass
class DataReport:
    """What a scan kept and what it skipped (file name -> reason)."""

    items: list[VideoItem] = field(default_factory=list)
    skipped: list[DataError] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.items)} clips"
        if self.skipped:
            text += f", {len(self.skipped)} skipped: " + "; ".join(str(e) for e in self.skipped)
        return text


def parse_buckets(text: str) -> tuple[Bucket, ...]:
    """``"17x64x64,33x64x64"`` (frames x height x width) -> Buckets; errors name the bad item."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        parts = item.lower().split("x")
        try:
            frames, height, width = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"buckets must be FRAMESxHEIGHTxWIDTH items like 17x64x64, got {item!r}") from None
        if min(frames, height, width) < 1:
            raise ValueError(f"bucket sizes must be >= 1, got {item!r}")
        out.append(Bucket(frames, height, width))
    if not out:
        raise ValueError(f"buckets must list at least one FRAMESxHEIGHTxWIDTH item, got {text!r}")
    return tuple(out)


def read_captions(root: Path) -> dict[str, str] | None:
    """Captions from a manifest in `root` (file name -> caption), or None when there is no manifest."""
    for name in MANIFESTS:
        path = root / name
        if not path.exists():
            continue
        rows: list[dict] = []
        if name.endswith(".jsonl"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(path, f"line {n} is not JSON: {err}") from None
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        captions = {}
        for n, row in enumerate(rows, 1):
            file = row.get("file") or row.get("video") or row.get("path")
            text = row.get("caption") or row.get("text") or row.get("prompt")
            if not file:
                raise DataError(path, f"row {n} has no 'file' column")
            captions[Path(file).name] = (text or "").strip()
        return captions
    return None


def probe_video(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a video, decoding it (some containers do not store a frame count)."""
    frames = read_frames(path)
    return frames.shape[0], frames.shape[1], frames.shape[2]


def read_frames(path: Path) -> np.ndarray:
    """All frames of a video as (F, H, W, 3) uint8; DataError naming the file when it cannot be decoded.

    ``.npz``: a numpy archive whose ``frames`` array is (F, H, W, 3) uint8 (lossless, no codec; pickles refused).
    """
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    import imageio.v3 as iio

    try:
        frames = iio.imread(path, index=None)
    except Exception as err:  # imageio raises many types for corrupt files
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(path, f"cannot read video ({type(err).__name__}: {first})") from None
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single greyscale or RGB image
        frames = frames[None] if frames.shape[-1] in (3, 4) else frames[..., None]
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise DataError(path, f"not a video (decoded shape {tuple(frames.shape)})")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "frames" not in archive.files:
                raise DataError(path, f"npz video has no 'frames' array (arrays: {', '.join(archive.files) or 'none'})")
            frames = archive["frames"]
    except DataError:
        raise
    except Exception as err:  # zipfile/numpy raise many types for corrupt files
        raise DataError(path, f"cannot read npz video ({type(err).__name__}: {err})") from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise DataError(path, f"npz 'frames' must be (F, H, W, 3) uint8, got {frames.dtype} {tuple(frames.shape)}")
    return np.ascontiguousarray(frames)


def choose_bucket(buckets: tuple[Bucket, ...], frames: int, height: int, width: int, stride: int = 1) -> Bucket | None:
    """The bucket with the most frames this clip can fill, then the closest aspect ratio; None if none fits."""
    usable = [b for b in buckets if (b.frames - 1) * stride + 1 <= frames]
    if not usable:
        return None
    most = max(b.frames for b in usable)
    aspect = width / height
    return min((b for b in usable if b.frames == most), key=lambda b: abs(np.log(b.width / b.height / aspect)))


def scan(config: DatasetConfig, *, probe=probe_video) -> DataReport:
    """Every usable clip of `config.root` with its caption and bucket; bad files reported or raised."""
    root = config.root
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    manifest = read_captions(root)
    videos = sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if manifest is not None:
        listed = {p.name for p in videos}
        for name in manifest:
            if name not in listed:
                videos.append(root / name)  # reported as missing below
    report = DataReport()
    for path in videos:
        try:
            report.items.append(_item(path, manifest, config, probe))
        except DataError as err:
            if config.on_error == "error":
                raise
            logger.warning("skipping %s", err)
            report.skipped.append(err)
    return report


def _item(path: Path, manifest: dict[str, str] | None, config: DatasetConfig, probe) -> VideoItem:
    if not path.exists():
        raise DataError(path, "listed in the manifest but the file does not exist")
    if manifest is not None:
        caption = manifest.get(path.name)
        if caption is None:
            raise DataError(path, "missing caption (not in the manifest)")
    else:
        txt = path.with_suffix(".txt")
        if not txt.exists():
            raise DataError(path, f"missing caption (no {txt.name})")
        caption = txt.read_text().strip()
    if not caption:
        raise DataError(path, "empty caption")
    frames, height, width = probe(path)
    bucket = choose_bucket(config.buckets, frames, height, width, config.frame_stride)
    if bucket is None:
        need = min((b.frames - 1) * config.frame_stride + 1 for b in config.buckets)
        raise DataError(path, f"too few frames: {frames}, the smallest bucket needs {need}")
    return VideoItem(path, caption, bucket)


def load_clip(item: VideoItem, frame_stride: int = 1) -> torch.Tensor:
    """(3, F, H, W) float32 in [-1, 1]: the first frames at `frame_stride`, resized to cover and centre-cropped."""
    frames = read_frames(item.path)
    b = item.bucket
    need = (b.frames - 1) * frame_stride + 1
    if frames.shape[0] < need:
        raise DataError(item.path, f"too few frames: {frames.shape[0]}, bucket {b} needs {need}")
    clip = torch.from_numpy(frames[:need:frame_stride]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # F, 3, H, W
    clip = resize_crop(clip, b.height, b.width)
    return clip.permute(1, 0, 2, 3).contiguous()


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F, C, h, w) -> (F, C, height, width): scale so both sides cover the target, then centre-crop."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        frames = torch.nn.functional.interpolate(frames, size=(nh, nw), mode="bilinear", antialias=scale < 1,
                                                 align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[..., top:top + height, left:left + width].clamp(-1.0, 1.0)


__all__ = ["Bucket", "DataError", "DataReport", "DatasetConfig", "VideoItem", "choose_bucket", "load_clip",
           "parse_buckets", "read_captions", "read_frames", "resize_crop", "scan"]
