"""Offline scorers for `accel heads search`: higher is better, one score per generated image (or video).

A scorer takes the generated images as float arrays in [0, 1] ((H, W, 3), or (F, H, W, 3) for video) with
their prompts and pair index, and returns one float each. Built in: a user's Python callable
(``module:function``), similarity to reference images, and CLIP / PickScore-style scores from local
`transformers` weights (never downloaded).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class Scorer:
    """Base class: `score(images, prompts, pairs)` -> one float per image, higher is better."""

    name: str = "scorer"

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str], pairs: Sequence[int]) -> list[float]:
        raise NotImplementedError


class CallableScorer(Scorer):
    """A user function ``fn(images, prompts) -> sequence of floats``, given as ``module:function`` or
    ``path/to/file.py:function``."""

    def __init__(self, spec: str | Callable[..., Any]) -> None:
        self.fn = load_callable(spec) if isinstance(spec, str) else spec
        if not callable(self.fn):
            raise TypeError(f"scorer {spec!r} is not callable")
        self.name = spec if isinstance(spec, str) else getattr(spec, "__name__", "callable")

    def score(self, images, prompts, pairs) -> list[float]:
        values = [float(x) for x in self.fn(list(images), list(prompts))]
        if len(values) != len(images) or not all(np.isfinite(values)):
            raise ValueError(f"scorer {self.name} must return one finite number per image ({len(images)}), "
                             f"got {values!r}")
        return values


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:function`` or ``file.py:function`` -> the function (ValueError naming what is missing)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"a callable scorer is 'module:function' or 'path/file.py:function', got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"scorer file {target!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"cannot import scorer module {target!r}: {err}") from None
    if not hasattr(module, attr):
        raise ValueError(f"scorer module {target!r} has no attribute {attr!r}")
    return getattr(module, attr)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as float32 (H, W, 3) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


class ReferenceScorer(Scorer):
    """Similarity to one reference image per prompt/seed pair: minus the mean squared error (0 is identical).

    ``references`` is a directory of images (sorted by name, one per pair) or a list of arrays/paths.
    """

    name = "reference"

    def __init__(self, references: str | os.PathLike | Sequence[Any]) -> None:
        if isinstance(references, (str, os.PathLike)):
            folder = Path(references)
            if not folder.is_dir():
                raise ValueError(f"reference images: {str(folder)!r} is not a directory")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if not files:
                raise ValueError(f"reference images: no .png/.jpg/.webp files in {str(folder)!r}")
            references = files
        self.references = [r if isinstance(r, np.ndarray) else load_image(r) for r in references]

    def score(self, images, prompts, pairs) -> list[float]:
        out = []
        for image, pair in zip(images, pairs, strict=True):
            if pair >= len(self.references):
                raise ValueError(f"reference images: pair {pair} has no reference ({len(self.references)} given)")
            ref = self.references[pair]
            frame = image if image.ndim == ref.ndim else image[image.shape[0] // 2]
            if frame.shape != ref.shape:
                raise ValueError(f"reference image {pair} has shape {ref.shape}, the generated one {frame.shape}")
            out.append(-float(np.mean((frame.astype(np.float64) - ref.astype(np.float64)) ** 2)))
        return out


class ClipScorer(Scorer):
    """CLIP similarity ``logit_scale * cos(image, text)`` from a local CLIP model directory (transformers).

    PickScore (``yuvalkirstain/PickScore_v1``) is a CLIP model scored this way; give its local directory.
    Videos are scored on their middle frame.
    """

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "cpu", name: str = "clip") -> None:
        from transformers import AutoProcessor, CLIPModel

        folder = Path(model_dir)
        if not folder.is_dir():
            raise ValueError(f"CLIP scorer: {str(folder)!r} is not a local model directory (weights are never "
                             "downloaded here)")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.name = name

    def score(self, images, prompts, pairs) -> list[float]:
        import torch

        frames = [img if img.ndim == 3 else img[img.shape[0] // 2] for img in images]
        pixels = [(np.clip(f, 0, 1) * 255).round().astype(np.uint8) for f in frames]
        inputs = self.processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs.get("attention_mask"))
            image = getattr(image, "pooler_output", image)
            text = getattr(text, "pooler_output", text)
            image = image / image.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
            scores = self.model.logit_scale.exp() * (image * text).sum(-1)
        return [float(s) for s in scores.cpu()]


def make_scorer(kind: str, value: str | None = None, *, device: str = "cpu") -> Scorer:
    """A built-in scorer by kind: ``callable`` (module:function), ``reference`` (a directory), ``clip`` or
    ``pickscore`` (a local model directory)."""
    if kind == "callable":
        return CallableScorer(_needs(kind, value))
    if kind == "reference":
        return ReferenceScorer(_needs(kind, value))
    if kind in ("clip", "pickscore"):
        return ClipScorer(_needs(kind, value), device=device, name=kind)
    raise ValueError(f"unknown scorer {kind!r}; scorers: callable, reference, clip, pickscore")


def _needs(kind: str, value: str | None) -> str:
    if not value:
        what = {"callable": "module:function", "reference": "a directory of reference images"}.get(
            kind, "a local model directory")
        raise ValueError(f"the {kind} scorer needs {what}")
    return value


__all__ = ["CallableScorer", "ClipScorer", "ReferenceScorer", "Scorer", "load_callable", "load_image", "make_scorer"]
