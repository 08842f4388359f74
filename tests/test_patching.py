"""accel.patch / accel.unpatch on every registered family's tiny pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import accel
from accel.pipelines.families import adapter_for, adapters
from accel.pipelines.patching import UnsupportedModelError, patch_handle
from accel.pipelines.tiny import TINY_MODELS, build_tiny

MODELS = sorted(n for n, spec in TINY_MODELS.items() if not spec.learned)  # random test models


def _call_kwargs(name: str, copies: int = 1) -> dict:
    spec = TINY_MODELS[name]
    kwargs = dict(
        height=spec.height, width=spec.width, num_inference_steps=spec.num_inference_steps, output_type="np",
        **spec.call_defaults,
    )
    if spec.is_video:
        kwargs["num_frames"] = spec.num_frames
        kwargs["num_videos_per_prompt"] = copies
    else:
        kwargs["num_images_per_prompt"] = copies
    if spec.needs_image:
        from accel.pipelines.tiny import example_image

        kwargs["image"] = example_image(spec.height, spec.width)
    return kwargs


def _run(pipe, name: str, copies: int = 1) -> np.ndarray:
    out = pipe(prompt="a red car in the city", generator=torch.Generator().manual_seed(0), **_call_kwargs(name, copies))
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


@pytest.fixture(scope="module")
def pipes() -> dict:
    built = {}
    for name in MODELS:
        pipe = build_tiny(name)
        pipe.set_progress_bar_config(disable=True)
        built[name] = pipe
    return built


def test_every_family_has_a_tiny_model() -> None:
    families = {spec.family for spec in TINY_MODELS.values()}
    assert set(adapters()) <= families, f"families without a tiny model: {set(adapters()) - families}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("copies", [1, 2])
def test_dense_patch_is_transparent(pipes, name: str, copies: int) -> None:
    if copies == 2 and TINY_MODELS[name].needs_image:
        pytest.skip("diffusers 0.42 WanImageToVideoPipeline cannot repeat one image for 2 videos per prompt")
    pipe = pipes[name]
    reference = _run(pipe, name, copies)
    handle = accel.patch(pipe, accel.Dense())
    originals = list(handle.originals)
    try:
        patched = _run(pipe, name, copies)
        assert handle.stats.calls > 0, "no self-attention call went through accel"
    finally:
        accel.unpatch(pipe)
    diff = float(np.abs(patched - reference).max())
    print(f"{name} copies={copies}: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    for module, original in originals:
        assert module.processor is original
    assert patch_handle(pipe) is None
    assert not pipe.transformer._forward_pre_hooks


@pytest.mark.parametrize("name", MODELS)
def test_only_self_attention_is_replaced(pipes, name: str) -> None:
    pipe = pipes[name]
    before = dict(pipe.transformer.attn_processors) if hasattr(pipe.transformer, "attn_processors") else {}
    handle = accel.patch(pipe)
    try:
        replaced = {m for m, _ in handle.originals}
        own = set(pipe.transformer.modules())
        layers = [m.processor.layer for m, _ in handle.originals if m in own]
        assert layers == list(range(len(layers))), "layer indices must be 0..N-1 per transformer"
        for path, processor in pipe.transformer.attn_processors.items():
            module = pipe.transformer.get_submodule(path.removesuffix(".processor"))
            if module not in replaced:
                assert processor is before[path], f"{path} is not self-attention but was replaced"
    finally:
        accel.unpatch(pipe)
    site_names = [s.name for s in adapter_for(pipe.transformer).self_attention_sites(pipe.transformer)]
    assert all("attn2" not in n for n in site_names) or TINY_MODELS[name].family == "sd3"


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan22", "tiny-cogvideox", "tiny-flux"])
def test_step_index_matches_scheduler(pipes, name: str) -> None:
    pipe = pipes[name]
    seen: list[int] = []

    def on_step_end(p, i, t, kwargs):
        seen.append(i)
        return kwargs

    handle = accel.patch(pipe)
    try:
        kwargs = _call_kwargs(name)
        pipe(prompt="a dog", generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end, **kwargs)
        steps = handle.stats.steps
    finally:
        accel.unpatch(pipe)
    total = TINY_MODELS[name].num_inference_steps
    assert seen == list(range(total))
    assert sorted(steps) == list(range(total)), f"steps seen by processors: {sorted(steps, key=str)}"
    layers_per_step = {len(v) for v in steps.values()}
    assert len(layers_per_step) == 1


def test_patch_rejects_unsupported_pipeline(caplog) -> None:
    class NotAPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="not a supported model family"):
        accel.patch(NotAPipeline())
    with caplog.at_level(logging.WARNING, logger="accel"):
        handle = accel.patch(NotAPipeline(), on_unsupported="dense")
    assert handle.runtime is None
    assert sum("not a supported model family" in r.message for r in caplog.records) == 1


def test_patch_argument_errors(pipes) -> None:
    pipe = pipes["tiny-wan"]
    with pytest.raises(TypeError, match="accel attention method"):
        accel.patch(pipe, "radial")
    with pytest.raises(ValueError, match="on_unsupported"):
        accel.patch(pipe, on_unsupported="ignore")
    with pytest.raises(TypeError, match="guidance must be an accel.HeadPerturbation"):
        accel.patch(pipe, guidance=object())
    accel.patch(pipe)
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            accel.patch(pipe)
    finally:
        accel.unpatch(pipe)
    assert patch_handle(pipe) is None


def test_schedule_decisions() -> None:
    schedule = accel.Schedule(dense_steps=2, dense_last_steps=1, dense_layers=1)
    assert schedule.is_dense(0, 10, 5) and schedule.is_dense(1, 10, 5)
    assert not schedule.is_dense(2, 10, 5) and not schedule.is_dense(8, 10, 5)
    assert schedule.is_dense(9, 10, 5)
    assert schedule.is_dense(5, 10, 0)
    assert accel.Schedule(dense_layers=(3, 7)).is_dense(5, 10, 7)
    assert not accel.Schedule().is_dense(None, None, 0)
    with pytest.raises(ValueError):
        accel.Schedule(dense_steps=-1)
