"""Radial attention inside real (tiny) diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accel
from accel.pipelines.tiny import TINY_MODELS, build_tiny


def _generate(pipe, name: str, copies: int = 1) -> np.ndarray:
    spec = TINY_MODELS[name]
    out = pipe(
        prompt="a dog running on the beach", generator=torch.Generator().manual_seed(0), height=spec.height,
        width=spec.width, num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps,
        num_videos_per_prompt=copies, output_type="np", **spec.call_defaults,
    )
    return np.asarray(out.frames)


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-hunyuan-video", "tiny-cogvideox"])
def test_dense_equivalent_radial_matches_dense(name: str) -> None:
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    dense = _generate(pipe, name, copies=2)
    handle = accel.patch(pipe, accel.Radial(decay=1e6, block_size=16, thinning=False))
    try:
        radial = _generate(pipe, name, copies=2)
    finally:
        accel.unpatch(pipe)
    assert handle.stats.sparse_calls == handle.stats.calls > 0
    assert handle.stats.mean_density() == 1.0
    rel = np.linalg.norm(radial - dense) / np.linalg.norm(dense)
    print(f"{name}: relative L2 radial(dense mask) vs dense {rel:.2e}")
    assert rel <= 1e-3


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-hunyuan-video"])
def test_sparse_radial_generates_with_schedule(name: str) -> None:
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    schedule = accel.Schedule(dense_steps=1, dense_layers=1)
    handle = accel.patch(pipe, accel.Radial(decay=0.2, block_size=16), schedule=schedule)
    try:
        video = _generate(pipe, name)
    finally:
        accel.unpatch(pipe)
    assert np.isfinite(video).all()
    stats = handle.stats
    assert 0 < stats.sparse_calls < stats.calls
    # Step 0 and layer 0 run dense; the rest of step 1 is sparse.
    per_layer = stats.per_layer_density()
    assert per_layer[0] == 1.0 and per_layer[1] < 1.0
    assert stats.mean_density() < 1.0


def test_plans_are_cached_per_geometry() -> None:
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    handle = accel.patch(pipe, accel.Radial(decay=0.2, block_size=16))
    try:
        _generate(pipe, "tiny-wan")
        _generate(pipe, "tiny-wan")
    finally:
        accel.unpatch(pipe)
    assert len(handle.runtime._plans) == 1
