"""run_generation: cancel within a step (no decode), phases, per-model limits, request checks, safetensors-only LoRA."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from accel.pipelines.generate import (
    Cancelled,
    GenerationRequest,
    check_lora_path,
    load_lora,
    resolve_settings,
    run_generation,
)
from accel.pipelines.tiny import GENERIC_LIMITS, TINY_MODELS, build_tiny, size_limits, valid_size


@pytest.fixture(scope="module")
def wan():
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _spy_decode(pipe, monkeypatch) -> list:
    calls: list = []
    original = pipe.vae.decode

    def decode(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", decode)
    return calls


# ------------------------------------------------------------------------------ cancel
def test_cancel_after_step_one_stops_at_once_and_never_decodes(wan, monkeypatch) -> None:
    decodes = _spy_decode(wan, monkeypatch)
    start = time.perf_counter()
    run_generation(wan, GenerationRequest(model="tiny-wan", steps=4, frames=5))
    four_steps = time.perf_counter() - start  # a whole 4-step run, decode included
    assert decodes == [1]

    stop = {"flag": False}
    steps: list[tuple[int, int]] = []

    def on_step(i: int, total: int) -> None:
        steps.append((i, total))
        if i == 1:
            stop["flag"] = True

    start = time.perf_counter()
    with pytest.raises(Cancelled, match=r"after step 1 \(after 1/300 steps; nothing decoded\)"):
        run_generation(wan, GenerationRequest(model="tiny-wan", steps=300, frames=5), on_step=on_step,
                       should_stop=lambda: stop["flag"])
    elapsed = time.perf_counter() - start
    assert steps == [(0, 300), (1, 300)]
    assert decodes == [1]  # the cancelled run decoded nothing
    assert elapsed < 2 * four_steps  # 300 steps would take ~75x a 4-step run
    assert not wan.transformer._forward_pre_hooks  # the stop hook is removed again


def test_stop_lands_between_transformer_forwards(wan, monkeypatch) -> None:
    decodes = _spy_decode(wan, monkeypatch)
    forwards: list = []
    hook = wan.transformer.register_forward_hook(lambda m, a, out: forwards.append(1))  # completed forwards
    stop = {"flag": False}
    try:
        with pytest.raises(Cancelled, match="before a transformer forward"):
            # set during the first transformer forward: the CFG pass after it must not run
            run_generation(
                wan, GenerationRequest(model="tiny-wan", steps=50, frames=5),
                on_phase=lambda phase: stop.update(flag=phase == "denoising"), should_stop=lambda: stop["flag"],
            )
    finally:
        hook.remove()
    assert len(forwards) == 1 and not decodes


# ------------------------------------------------------------------------------ phases
def test_phases_and_the_total_come_first(wan) -> None:
    events: list = []
    run_generation(
        wan, GenerationRequest(model="tiny-wan", steps=3, frames=5),
        on_step=lambda i, n: events.append(("step", i, n)), on_phase=lambda p: events.append(("phase", p)),
    )
    assert events == [
        ("phase", "encoding"), ("phase", "denoising"), ("step", 0, 3), ("step", 1, 3), ("step", 2, 3),
        ("step", 3, 3), ("phase", "decoding"),
    ]


# ------------------------------------------------------------------------------ limits per model
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=2048), r"width: 2048 exceeds the maximum 1024 for tiny-wan \(its rotary embedding table "
                           r"covers 1024 px\)"),
        (dict(height=10**9), r"height: 1000000000 exceeds the maximum 1024 for tiny-wan"),
        (dict(frames=1001), r"num_frames: 1001 exceeds the maximum 253 for tiny-wan \(its rotary embedding table "
                            r"covers 64 latent frames\)"),
        (dict(steps=5000), r"num_inference_steps: 5000 exceeds the maximum 1000 for tiny-wan \(its scheduler "
                           r"has 1000 training timesteps\)"),
        (dict(height=50), r"height=50 must be a positive multiple of 16"),
    ],
)
def test_resolve_settings_refuses_sizes_beyond_the_model(wan, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_settings(wan, "tiny-wan", GenerationRequest(model="tiny-wan", **kwargs))


def test_limits_of_tiny_models_match_their_configs() -> None:
    for name in ("tiny-wan", "tiny-sd3", "tiny-flux"):
        assert size_limits(build_tiny(name)) == TINY_MODELS[name].limits
    assert TINY_MODELS["tiny-sd3"].limits["width"][0] == 512
    valid_size("tiny-wan", 1024, 1024, 253, steps=1000)
    with pytest.raises(ValueError, match="num_inference_steps: 1001 exceeds the maximum 1000"):
        valid_size("tiny-wan", 64, 64, 17, steps=1001)
    with pytest.raises(ValueError, match="num_inference_steps=0 must be a whole number >= 1"):
        valid_size("tiny-wan", 64, 64, 17, steps=0)


def test_limits_of_a_full_size_config_are_read_from_it() -> None:
    from types import SimpleNamespace

    class StableDiffusion3Pipeline:  # only the attributes size_limits reads
        transformer = SimpleNamespace(config=SimpleNamespace(pos_embed_max_size=192, patch_size=2))
        vae_scale_factor = 8
        scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))

    limits = size_limits(StableDiffusion3Pipeline())
    assert limits["height"] == (3072, "its positional embedding covers 3072 px")
    assert limits["num_frames"] == GENERIC_LIMITS["num_frames"]


@pytest.mark.parametrize("field", ["steps", "frames", "height", "width"])
@pytest.mark.parametrize("value", [0, -16])
def test_request_refuses_zero_and_negative_sizes(field, value) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be a whole number >= 1"):
        GenerationRequest(**{field: value})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_request_refuses_non_finite_guidance(value) -> None:
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        GenerationRequest(guidance_scale=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, 101.0, -1e9])
def test_request_refuses_bad_lora_scale(value) -> None:
    with pytest.raises(ValueError, match="lora_scale must be a finite number between -100 and 100"):
        GenerationRequest(lora_scale=value)
    GenerationRequest(lora_scale=-100.0)


# ------------------------------------------------------------------------------ LoRA: safetensors only
class _FakePipe:
    def __init__(self) -> None:
        self.calls: list = []

    def load_lora_weights(self, source, **kwargs) -> None:
        self.calls.append((Path(source), kwargs))

    def set_adapters(self, names, weights) -> None:
        pass


@pytest.mark.parametrize("name", ["pytorch_lora_weights.bin", "lora.pt", "lora.pth", "lora.ckpt"])
def test_pickled_lora_files_are_refused(tmp_path, name) -> None:
    path = tmp_path / name
    path.write_bytes(b"not loaded")
    pipe = _FakePipe()
    with pytest.raises(ValueError, match="pickled weights"):
        load_lora(pipe, str(path), 1.0)
    assert pipe.calls == []


def test_lora_folder_without_safetensors_is_refused(tmp_path) -> None:
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"not loaded")
    pipe = _FakePipe()
    with pytest.raises(ValueError, match=r"holds no \.safetensors file \(found pickled weights: "
                                         r"pytorch_lora_weights\.bin"):
        load_lora(pipe, str(tmp_path), 1.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .safetensors file"):
        check_lora_path(empty)
    assert pipe.calls == []


def test_safetensors_lora_is_loaded_with_use_safetensors(tmp_path) -> None:
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"ignored")
    (tmp_path / "lora.safetensors").write_bytes(b"")
    pipe = _FakePipe()
    load_lora(pipe, str(tmp_path), 0.5)
    load_lora(pipe, str(tmp_path / "lora.safetensors"), 0.5)
    assert pipe.calls == [
        (tmp_path, {"adapter_name": "accel", "use_safetensors": True}),
        (tmp_path, {"adapter_name": "accel", "use_safetensors": True, "weight_name": "lora.safetensors"}),
    ]
