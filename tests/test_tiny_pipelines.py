"""The offline tiny pipelines: build without the Hub, generate at their defaults, reproducible, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accel.pipelines.tiny import (
    _TINY_RULES,
    TINY_MODELS,
    build_tiny,
    example_image,
    size_rules,
    valid_size,
)

NAMES = sorted(n for n, spec in TINY_MODELS.items() if not spec.learned)  # random test models only
VIDEO_NAMES = [n for n in NAMES if TINY_MODELS[n].is_video]

# First self-attention module of each family; at its input ``hidden_states`` holds the video/image tokens
# only (text is concatenated inside the processor, or attended by a separate cross-attention).
FIRST_SELF_ATTN = {
    "wan": "blocks.0.attn1",
    "hunyuan_video": "transformer_blocks.0.attn",
    "cogvideox": "transformer_blocks.0.attn1",
    "ltx": "transformer_blocks.0.attn1",
    "flux": "transformer_blocks.0.attn",
    "sd3": "transformer_blocks.0.attn",
}


def _call_kwargs(name: str, seed: int = 0) -> dict:
    spec = TINY_MODELS[name]
    kw = dict(spec.call_defaults)
    kw.update(
        prompt="a monkey dancing in the city",
        height=spec.height,
        width=spec.width,
        num_inference_steps=spec.num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    if spec.is_video:
        kw["num_frames"] = spec.num_frames
    if spec.needs_image:
        kw["image"] = example_image(spec.height, spec.width)
    return kw


def _generate(pipe, name: str) -> np.ndarray:
    out = pipe(**_call_kwargs(name))
    return np.asarray(out.frames if TINY_MODELS[name].is_video else out.images)


def _grid(pipe, name: str) -> tuple[int, int, int]:
    """(latent frames, token rows, token cols) the transformer sees at the spec's default size."""
    spec = TINY_MODELS[name]
    cfg = pipe.transformer.config
    patch = cfg.patch_size[-1] if isinstance(cfg.patch_size, (tuple, list)) else cfg.patch_size
    fam = spec.family
    if fam in ("flux", "sd3"):
        f = 1
        s = pipe.vae_scale_factor * (2 if fam == "flux" else patch)
    elif fam == "ltx":
        f = (spec.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
        s = pipe.vae_spatial_compression_ratio * patch
    else:
        f = (spec.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        s = pipe.vae_scale_factor_spatial * patch
    return f, spec.height // s, spec.width // s


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    """(name, pipeline, output at the defaults, self-attention input lengths seen during the run)."""
    name = request.param
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    seen: list[int] = []
    module = pipe.transformer.get_submodule(FIRST_SELF_ATTN[TINY_MODELS[name].family])

    def hook(_mod, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(hs.shape[1])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = _generate(pipe, name)
    finally:
        handle.remove()
    return name, pipe, out, seen


def test_generates_at_defaults(built):
    name, _pipe, out, _ = built
    spec = TINY_MODELS[name]
    if spec.is_video:
        assert out.shape == (1, spec.num_frames, spec.height, spec.width, 3), out.shape
    else:
        assert out.shape == (1, spec.height, spec.width, 3), out.shape
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0


def test_reproducible_across_builds(built):
    name, _pipe, out, _ = built
    pipe2 = build_tiny(name)
    pipe2.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(pipe2, name), out)


def test_self_attention_token_grid(built):
    name, pipe, _out, seen = built
    spec = TINY_MODELS[name]
    f, h, w = _grid(pipe, name)
    assert seen and set(seen) == {f * h * w}, (seen, (f, h, w))
    if spec.is_video:
        assert f >= 4 and h >= 4 and w >= 4, (f, h, w)
    else:
        assert f == 1 and h >= 8 and w >= 8, (f, h, w)


def test_size_rules_match_static_table(built):
    name, pipe, _out, _ = built
    assert size_rules(pipe) == _TINY_RULES[TINY_MODELS[name].family]


@pytest.mark.parametrize("name", NAMES)
def test_valid_size(name):
    spec = TINY_MODELS[name]
    valid_size(name, spec.height, spec.width, spec.num_frames)
    spatial, tmul, toff = _TINY_RULES[spec.family]
    with pytest.raises(
        ValueError, match=rf"{name}.*height={spec.height + spatial // 2}.*multiple of {spatial}"
    ):
        valid_size(name, spec.height + spatial // 2, spec.width, spec.num_frames)
    with pytest.raises(ValueError, match=r"width=0"):
        valid_size(name, spec.height, 0, spec.num_frames)
    if spec.is_video:
        valid_size(name, spec.height, spec.width, spec.num_frames + tmul)
        with pytest.raises(ValueError, match=rf"num_frames={spec.num_frames + 1}.*% {tmul} == {toff}"):
            valid_size(name, spec.height, spec.width, spec.num_frames + 1)
    else:
        with pytest.raises(ValueError, match="must be 1 for an image model"):
            valid_size(name, spec.height, spec.width, 5)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="tiny-wan.*tiny-wan22|tiny-wan22.*tiny-wan"):
        build_tiny("tiny-nope")
    with pytest.raises(ValueError, match="Unknown tiny model"):
        valid_size("tiny-nope", 64, 64, 17)


def test_registry_contents():
    assert set(NAMES) == {
        "tiny-wan",
        "tiny-wan-i2v",
        "tiny-wan22",
        "tiny-hunyuan-video",
        "tiny-cogvideox",
        "tiny-ltx",
        "tiny-flux",
        "tiny-sd3",
    }
    for name, spec in TINY_MODELS.items():
        assert spec.name == name
        assert (spec.num_frames > 1) == spec.is_video


def test_build_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny("tiny-wan")
    assert torch.equal(torch.rand(4), expected)


def test_wan22_runs_both_experts():
    pipe = build_tiny("tiny-wan22")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio is not None
    calls = {"transformer": 0, "transformer_2": 0}
    handles = [
        getattr(pipe, key).register_forward_pre_hook(
            lambda *_a, key=key: calls.__setitem__(key, calls[key] + 1)
        )
        for key in calls
    ]
    try:
        _generate(pipe, "tiny-wan22")
    finally:
        for h in handles:
            h.remove()
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0, calls


def test_saves_and_reloads_offline(tmp_path):
    from diffusers import WanPipeline

    pipe = build_tiny("tiny-wan")
    pipe.save_pretrained(tmp_path)
    again = WanPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_generate(again, "tiny-wan"), _generate(pipe, "tiny-wan"), atol=1e-6)
