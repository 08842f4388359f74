"""torch.compile and diffusers' caches with a patched pipeline (tiny Wan, radial, CPU)."""

from __future__ import annotations

import pytest
import torch
from test_patching import _call_kwargs

import accel
from accel.pipelines.tiny import build_tiny

METHOD = accel.Radial(decay=0.5, block_size=16)


def _pipe():
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, steps: int = 3) -> torch.Tensor:
    kwargs = _call_kwargs("tiny-wan")
    kwargs["num_inference_steps"] = steps
    out = pipe(prompt="a red car", generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.as_tensor(out.frames)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_transformer_runs_radial_without_recompiling_across_steps() -> None:
    pipe = _pipe()
    handle = accel.patch(pipe, METHOD, schedule=accel.Schedule(dense_steps=1))
    eager = _generate(pipe)
    pipe.transformer.compile(backend="eager")  # the diffusers-documented way (ModelMixin.compile)
    _generate(pipe)  # warm-up: one graph for the dense step, one for the sparse steps
    handle.stats.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _generate(pipe)
    accel.unpatch(pipe)
    print(f"max abs diff compiled vs eager: {float((compiled.float() - eager.float()).abs().max()):.3g}")
    assert torch.allclose(compiled.float(), eager.float(), atol=2e-3)
    assert handle.stats.sparse_calls > 0


def test_patched_transformer_traces_its_layers_in_one_graph() -> None:
    pipe = _pipe()
    accel.patch(pipe.transformer, METHOD)
    tr = pipe.transformer
    cfg = tr.config
    latents = torch.randn(1, cfg.in_channels, 3, 8, 8)
    text = torch.randn(1, 8, cfg.text_dim)
    inputs = dict(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)
    tr(**inputs)  # plans are built once per geometry, on the host, before anything is traced
    explanation = torch._dynamo.explain(tr)(**inputs)
    accel.unpatch(pipe.transformer)
    reasons = [str(b.reason) for b in explanation.break_reasons]
    print(f"graphs {explanation.graph_count}, breaks {explanation.graph_break_count}: {reasons}")
    # accel's host-side context builder and bookkeeping run as torch.compiler.disable'd calls around the
    # traced body; the whole transformer, every attention layer included, is one graph.
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("cache", ["first_block", "mag"])
def test_diffusers_caches_run_with_radial(cache: str) -> None:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    steps = 4
    pipe = _pipe()
    handle = accel.patch(pipe, METHOD)
    if cache == "first_block":
        config = FirstBlockCacheConfig(threshold=0.5)
    else:
        config = MagCacheConfig(num_inference_steps=steps, mag_ratios=[1.0] * steps, threshold=0.5)
    pipe.transformer.enable_cache(config)
    try:
        out = _generate(pipe, steps)
    finally:
        pipe.transformer.disable_cache()
        accel.unpatch(pipe)
    assert torch.isfinite(out.float()).all()
    assert handle.stats.sparse_calls > 0
