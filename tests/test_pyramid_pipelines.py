"""Pyramid sparse attention inside a real (tiny) diffusers video pipeline."""

from __future__ import annotations

import numpy as np
import torch

import accel
from accel.methods.pyramid import Pyramid
from accel.methods.registry import methods
from accel.pipelines.tiny import TINY_MODELS, build_tiny


def _generate(pipe, name: str) -> np.ndarray:
    spec = TINY_MODELS[name]
    out = pipe(prompt="a dog running on the beach", generator=torch.Generator().manual_seed(0), height=spec.height,
               width=spec.width, num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps,
               output_type="np", **spec.call_defaults)
    return np.asarray(out.frames)


def test_pyramid_is_registered() -> None:
    info = methods()["pyramid"]
    assert info.cls is Pyramid and {o.name for o in info.options} >= {"block_size", "mode", "t1", "t4"}
    assert info.build({"block_size": 16, "t4": 0.9}) == Pyramid(block_size=16, t4=0.9)


def test_pyramid_generates_on_tiny_wan() -> None:
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    # 5x4x4 latent grid: 80 tokens, 5 blocks of 16 (one 1x4x4 tile each after the reorder)
    handle = accel.patch(pipe, Pyramid(block_size=16, t1=0.3, t2=0.4, t3=0.5, t4=0.6))
    try:
        result = _generate(pipe, "tiny-wan")
    finally:
        accel.unpatch(pipe)
    assert np.isfinite(result).all()
    stats = handle.stats
    assert not stats.fallbacks, stats.fallbacks
    assert stats.sparse_calls == stats.calls > 0
    assert 0 < stats.mean_density() < 1.0


def test_level_one_thresholds_reproduce_dense() -> None:
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    dense = _generate(pipe, "tiny-wan")
    handle = accel.patch(pipe, Pyramid(block_size=16, t1=1.0, t2=1.0, t3=1.0, t4=1.0))
    try:
        ours = _generate(pipe, "tiny-wan")
    finally:
        accel.unpatch(pipe)
    assert handle.stats.sparse_calls == handle.stats.calls > 0 and handle.stats.mean_density() == 1.0
    assert np.linalg.norm(ours - dense) / np.linalg.norm(dense) <= 1e-4
