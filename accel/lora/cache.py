"""VAE latents and text embeddings computed once per clip and cached on disk as safetensors.

The key of a clip is the sha256 of its file bytes, its caption and every setting the tensors depend on (bucket,
frame stride, the VAE and text encoder configs, the text length), so editing a video, its caption or the settings
gives a new entry and never a stale one. Entries are written atomically (temp file + rename). Once a dataset is
cached, training holds only the transformer (`encoders_needed` says whether any entry is missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accel.lora.dataset import DataError, VideoItem, load_clip

CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheSettings:
    """What a cached entry depends on besides the file and its caption."""

    encoder_fingerprint: str
    max_sequence_length: int
    frame_stride: int = 1


BATCH_PIXELS = 8 * 17 * 128 * 128  # video pixels per VAE call while caching (8 demo-size clips; 480p clips go alone)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry_key(item: VideoItem, settings: CacheSettings) -> str:
    """The cache key of a clip: sha256 over its bytes, caption, bucket and `settings`."""
    blob = json.dumps({"v": CACHE_VERSION, "file": file_digest(item.path), "caption": item.caption,
                       "bucket": [item.bucket.frames, item.bucket.height, item.bucket.width],
                       "settings": settings.__dict__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def encoder_fingerprint(pipe: Any) -> str:
    """A hash of the VAE and text encoder configs and a checksum of their weights (which encoders made a latent)."""
    parts = []
    for name in ("vae", "text_encoder"):
        module = getattr(pipe, name)
        config = getattr(module, "config", None)
        cfg = {} if config is None else config.to_dict() if hasattr(config, "to_dict") else dict(config)
        parts.append(json.dumps(cfg, sort_keys=True, default=str))
        with torch.no_grad():
            parts.append(repr([float(p.double().sum()) for p in list(module.parameters())[:8]]))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file to a temp file in the same folder, fsync, then rename over `path`."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LatentCache:
    """A folder of `<key>.safetensors` entries: `latents` (C, F', H', W') and the caption's conditioning tensors."""

    def __init__(self, root: str | Path, settings: CacheSettings) -> None:
        self.root = Path(root)
        self.settings = settings

    def path(self, item: VideoItem) -> Path:
        return self.root / f"{entry_key(item, self.settings)}.safetensors"

    def missing(self, items: list[VideoItem]) -> list[VideoItem]:
        return [it for it in items if not self.path(it).exists()]

    def load(self, item: VideoItem) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.path(item)
        try:
            return load_file(path)
        except Exception as err:
            raise DataError(item.path, f"cache entry {path.name} is unreadable ({err}); delete it to re-encode"
                            ) from None

    def fill(self, items: list[VideoItem], encode_video, encode_text, *, progress: bool = True,
             batch_pixels: int = BATCH_PIXELS) -> list[DataError]:
        """Encode and store every item without an entry; returns the items that failed to decode.

        `encode_video` maps (B, 3, F, H, W) to (B, C, F', H', W'); `encode_text` a caption to a dict of tensors.
        Clips of one bucket are encoded together, up to `batch_pixels` video pixels per call (small clips:
        one VAE call per batch instead of per clip; a large clip still goes alone), and each distinct caption is
        encoded once per call.
        """
        from tqdm import tqdm

        failed = []
        todo = self.missing(items)
        texts: dict[str, dict[str, torch.Tensor]] = {}
        bar = tqdm(total=len(todo), desc="caching latents", disable=not progress or not todo)
        for group in _bucket_batches(todo, batch_pixels):
            clips, kept = [], []
            for item in group:
                try:
                    clips.append(load_clip(item, self.settings.frame_stride))
                    kept.append(item)
                except DataError as err:
                    failed.append(err)
            if kept:
                with torch.no_grad():
                    latents = encode_video(torch.stack(clips))
                    for item in kept:
                        if item.caption not in texts:
                            texts[item.caption] = encode_text(item.caption)
                for item, latent in zip(kept, latents, strict=True):
                    tensors = {"latents": latent, **texts[item.caption]}
                    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
                    save_atomic(tensors, self.path(item),
                                {"file": item.path.name, "caption": item.caption, "bucket": str(item.bucket)})
            bar.update(len(group))
        bar.close()
        return failed


def _bucket_batches(items: list[VideoItem], batch_pixels: int) -> list[list[VideoItem]]:
    """Items grouped by bucket (first-seen order), each group at most `batch_pixels` pixels (at least one item)."""
    by_bucket: dict[Any, list[VideoItem]] = {}
    for item in items:
        by_bucket.setdefault(item.bucket, []).append(item)
    groups = []
    for bucket, members in by_bucket.items():
        per = max(1, batch_pixels // max(1, bucket.frames * bucket.height * bucket.width))
        groups += [members[i:i + per] for i in range(0, len(members), per)]
    return groups


__all__ = ["CACHE_VERSION", "CacheSettings", "LatentCache", "encoder_fingerprint", "entry_key", "file_digest",
           "save_atomic"]
