"""Neighborhood attention inside real (tiny) diffusers pipelines: a video model and an image model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accel
from accel.methods.neighborhood import Neighborhood
from accel.pipelines.tiny import TINY_MODELS, build_tiny


def _generate(pipe, name: str) -> np.ndarray:
    spec = TINY_MODELS[name]
    kwargs = dict(prompt="a dog running on the beach", generator=torch.Generator().manual_seed(0),
                  height=spec.height, width=spec.width, num_inference_steps=spec.num_inference_steps,
                  output_type="np", **spec.call_defaults)
    if spec.is_video:
        kwargs["num_frames"] = spec.num_frames
    out = pipe(**kwargs)
    return np.asarray(out.frames if spec.is_video else out.images)


@pytest.mark.parametrize(("name", "method"), [
    # 64-token tiles keep the interpreter fast (5x4x4 latent grid: 2 query tiles, one partial)
    ("tiny-wan", Neighborhood(kernel_size="3x3x3", stride="1x1x2", is_causal=True, tile="4x4x4")),
    # 8x8 image grid with text before; 2x8 tiles so that the window skips whole tiles
    ("tiny-flux", Neighborhood(kernel_size="3x5", tile="2x8")),
])
def test_neighborhood_generates(name: str, method: Neighborhood) -> None:
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    handle = accel.patch(pipe, method)
    try:
        result = _generate(pipe, name)
    finally:
        accel.unpatch(pipe)
    assert np.isfinite(result).all()
    stats = handle.stats
    assert not stats.fallbacks, stats.fallbacks
    assert stats.sparse_calls == stats.calls > 0
    assert 0 < stats.mean_density() < 1.0


def test_whole_grid_window_reproduces_dense() -> None:
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    dense = _generate(pipe, "tiny-wan")
    handle = accel.patch(pipe, Neighborhood(kernel_size="5x4x4"))  # the 5x4x4 latent grid: NATTEN's fast path
    try:
        ours = _generate(pipe, "tiny-wan")
    finally:
        accel.unpatch(pipe)
    assert handle.stats.sparse_calls == handle.stats.calls > 0 and handle.stats.mean_density() == 1.0
    assert np.linalg.norm(ours - dense) / np.linalg.norm(dense) <= 1e-5
