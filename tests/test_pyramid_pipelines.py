"""Pyramid sparse attention inside a real (tiny) diffusers video pipeline."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch

import accel
from accel.geometry import TokenLayout
from accel.methods.base import Attended, AttentionCall, AttentionMethod, call_seed
from accel.methods.dense import sdpa_bshd
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


# ---------------------------------------------------------------------------------------- per-call seeds
@dataclasses.dataclass(frozen=True)
class _SeedSpy(AttentionMethod):
    """Dense attention that records the (layer-ordered) seed of every call it gets (test helper)."""

    name: ClassVar[str] = "seed-spy"
    registered: ClassVar[bool] = False
    seen: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def run(self, q, k, v, layout, plan, call: AttentionCall) -> Attended:
        self.seen.append(call.seed)
        return Attended(sdpa_bshd(q, k, v, key_padding_mask=call.key_padding_mask, scale=call.scale), 1.0)


def _seeds(pipe, seed: int) -> list[int]:
    spy = _SeedSpy()
    accel.patch(pipe, spy, seed=seed)
    try:
        _generate(pipe, "tiny-wan")
    finally:
        accel.unpatch(pipe)
    return spy.seen


def test_call_seeds_differ_per_step_and_layer_and_follow_the_generation_seed() -> None:
    pipe = build_tiny("tiny-wan")  # 2 layers, 2 steps, classifier-free guidance: 2 forwards per step
    pipe.set_progress_bar_config(disable=True)
    first, other = _seeds(pipe, 5), _seeds(pipe, 6)
    spec = TINY_MODELS["tiny-wan"]
    assert len(first) == spec.num_inference_steps * 2 * 2 and set(first).isdisjoint(other)
    # one seed per (step, layer): 4 distinct values; the guidance pass of a step repeats its step's seeds
    assert len(set(first)) == spec.num_inference_steps * 2
    assert first == [call_seed(5, step, layer) for step in range(2) for _ in range(2) for layer in range(2)]


def test_call_seed_is_deterministic_and_spread() -> None:
    seeds = {call_seed(s, step, layer) for s in (0, 1) for step in (None, *range(50)) for layer in range(40)}
    assert len(seeds) == 2 * 51 * 40 and all(0 <= x < 2**63 for x in seeds)
    assert call_seed(3, 7, 2) == 6972688722115201917  # pinned: the masks of a seed stay the same across versions


def test_pyramid_levels_follow_the_call_seed() -> None:
    # the runtime hands each (step, layer) its own seed; the sampled tokens, and so the levels, follow it
    layout = TokenLayout(2, 4, 4, 8)  # 256 tokens, 16 blocks of 16
    q, k = torch.randn(1, 256, 2, 8), torch.randn(1, 256, 2, 8)
    method = Pyramid(block_size=16, t1=0.2, t2=0.3, t3=0.4, t4=0.5)

    def levels(step: int, layer: int) -> torch.Tensor:
        return method.plan_call(q, k, layout, AttentionCall(seed=call_seed(1, step, layer)))

    assert torch.equal(levels(0, 0), levels(0, 0))
    assert not torch.equal(levels(0, 0), levels(1, 0)) and not torch.equal(levels(0, 0), levels(0, 1))


def test_patch_seed_must_be_an_int() -> None:
    pipe = build_tiny("tiny-wan")
    for bad in (1.5, "3", True):
        with pytest.raises(TypeError, match="seed must be an int"):
            accel.patch(pipe, Pyramid(), seed=bad)
