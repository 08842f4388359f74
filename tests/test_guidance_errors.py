"""Head-perturbation guidance: bad input gives one clear error each (config, heads, model, presets, CLI)."""

from __future__ import annotations

import json

import pytest
import torch

import accel
from accel.cli import main
from accel.guidance.perturbation import HeadPerturbation, LayerSite, parse_heads, resolve_heads
from accel.guidance.preset import GuidancePreset, PresetError, load_preset, save_preset
from accel.pipelines.patching import UnsupportedModelError
from accel.pipelines.tiny import build_tiny


@pytest.fixture(scope="module")
def sd3():
    pipe = build_tiny("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(heads=[(0, 0)], strength=1.5), ValueError, "HeadPerturbation.strength"),
    (dict(heads=[(0, 0)], scale=-1.0), ValueError, "HeadPerturbation.scale"),
    (dict(heads=[(0, 0)], target="blur"), ValueError, "HeadPerturbation.target"),
    (dict(heads=[(0, 0)], scope="text"), ValueError, "HeadPerturbation.scope"),
    (dict(heads=[(0, 0)], cfg_scale=1.0), ValueError, "HeadPerturbation.cfg_scale"),
    (dict(heads=[(0, 0)], steps=(0, 0.5)), TypeError, "not a mix"),
    (dict(heads=[(0, 0)], steps=(4, 2)), ValueError, "end > start"),
    (dict(heads=[(0, 0)], steps=(0.0, 1.5)), ValueError, r"\[0, 1\]"),
    (dict(heads=[]), ValueError, "at least one"),
    (dict(heads="11:15"), TypeError, "list of \\(layer, head\\) pairs"),
    (dict(heads=[(0, -1)]), ValueError, "heads\\[0\\] indices must be >= 0"),
    (dict(heads=[(0, 1.5)]), TypeError, "heads\\[0\\] head must be an int"),
    (dict(heads=[(0,)]), TypeError, "heads\\[0\\]"),
])
def test_bad_config_values(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        HeadPerturbation(**kwargs)


def test_layer_paths_match_exactly() -> None:
    sites = [LayerSite(i, f"blocks.{i}.attn1", 4) for i in range(12)]
    assert resolve_heads((("blocks.1", 2),), sites) == {1: (2,)}
    assert resolve_heads((("blocks.10.attn1", 0), (1, 3)), sites) == {1: (3,), 10: (0,)}
    with pytest.raises(ValueError, match="'blocks' matches no"):
        resolve_heads((("blocks", 0),), sites)
    with pytest.raises(ValueError, match="layer 12 is out of range: this model has 12"):
        resolve_heads(((12, 0),), sites)
    with pytest.raises(ValueError, match=r"head 4 is out of range: layer 3 \(blocks.3.attn1\) has 4 heads"):
        resolve_heads(((3, 4),), sites)
    assert parse_heads("11:15, single_transformer_blocks.3:5") == ((11, 15), ("single_transformer_blocks.3", 5))
    with pytest.raises(ValueError, match="layer:head"):
        parse_heads("11-15")


def test_flux_stacks_by_exact_block_path() -> None:
    pipe = build_tiny("tiny-flux")
    handle = accel.patch(pipe, guidance=HeadPerturbation(heads=[("single_transformer_blocks", 1, 0),
                                                                ("transformer_blocks.1", 1)]))
    edit = handle.runtime.branches[0].edit
    assert edit.heads == {1: (1,), 3: (0,)}
    accel.unpatch(pipe)
    with pytest.raises(ValueError, match="transformer_blocks.\\*.attn = 0-1, single_transformer_blocks.\\*.attn = 2-3"):
        accel.patch(pipe, guidance=HeadPerturbation(heads=[(4, 0)]))
    assert accel.patch_handle(pipe) is None  # a refused patch leaves nothing behind


def test_heads_out_of_range_on_a_pipeline(sd3) -> None:
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        accel.patch(sd3, guidance=HeadPerturbation(heads=[(2, 0)]))
    with pytest.raises(ValueError, match="head 2 is out of range"):
        accel.patch(sd3, guidance=HeadPerturbation(heads=[(1, 2)]))
    assert accel.patch_handle(sd3) is None


def test_unknown_and_unsupported_models() -> None:
    with pytest.raises(UnsupportedModelError, match="not a supported model family"):
        accel.patch(torch.nn.Linear(2, 2), guidance=HeadPerturbation(heads=[(0, 0)]), on_unsupported="dense")
    cog = build_tiny("tiny-cogvideox")
    with pytest.raises(NotImplementedError, match="supports sd3, wan, flux, hunyuan_video"):
        accel.patch(cog, guidance=HeadPerturbation(heads=[(0, 0)]))
    with pytest.raises(TypeError, match="guidance must be"):
        accel.patch(cog, guidance={"heads": [(0, 0)]})


def test_flux_true_cfg_needs_its_scale() -> None:
    from test_patching import _call_kwargs

    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    accel.patch(pipe, guidance=HeadPerturbation(heads=[(0, 0)]))
    with pytest.raises(ValueError, match="cfg_scale=<the true_cfg_scale you use>"):
        pipe(prompt="a red car", negative_prompt="blurry", true_cfg_scale=2.0, **_call_kwargs("tiny-flux"))
    accel.unpatch(pipe)


def _preset(tmp_path, name="p.json", **over):
    data = {"format": "accel-guidance-preset", "version": 1, "model_class": "SD3Transformer2DModel",
            "heads": [[0, 1]], "strength": 0.5, "scale": 3.0, "steps": None, "target": "identity", "scope": "joint"}
    data.update(over)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_preset_for_another_model_class(sd3, tmp_path) -> None:
    path = _preset(tmp_path, model_class="FluxTransformer2DModel")
    with pytest.raises(PresetError, match="made for FluxTransformer2DModel, not for SD3Transformer2DModel"):
        accel.patch(sd3, guidance=str(path))
    assert accel.patch_handle(sd3) is None
    handle = accel.patch(sd3, guidance=str(_preset(tmp_path)))  # the right class loads
    assert handle.runtime.branches[0].edit.heads == {0: (1,)}
    accel.unpatch(sd3)


@pytest.mark.parametrize("over,match", [
    ({"format": "other"}, "'format' must be"),
    ({"version": 2}, "'version' must be 1"),
    ({"model_class": ""}, "'model_class'"),
    ({"heads": "0:1"}, "heads must be a list"),
    ({"heads": [[0]]}, r"heads\[0\]"),
    ({"strength": "half"}, "HeadPerturbation.strength"),
    ({"steps": [3, 1]}, "end > start"),
    ({"extra": 1}, "unknown fields \\['extra'\\]"),
    ({"search": []}, "'search' must be an object"),
])
def test_malformed_presets(tmp_path, over, match) -> None:
    with pytest.raises(PresetError, match=match):
        load_preset(_preset(tmp_path, **over))


def test_unreadable_presets(tmp_path) -> None:
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PresetError, match="not valid JSON"):
        load_preset(bad)
    missing = _preset(tmp_path, "m.json")
    data = json.loads(missing.read_text())
    del data["heads"]
    missing.write_text(json.dumps(data))
    with pytest.raises(PresetError, match="'heads' is missing"):
        load_preset(missing)


def test_preset_round_trip(tmp_path) -> None:
    preset = GuidancePreset("WanTransformer3DModel", HeadPerturbation(heads=[(0, 1), ("blocks.1", 0)], strength=0.25,
                                                                     steps=(0.0, 0.4), target="uniform"))
    loaded = load_preset(save_preset(preset, tmp_path / "x" / "p.json"))
    assert loaded == preset


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    out = str(tmp_path / "o.mp4")
    cases = [
        (["generate", "--model", "tiny-sd3", "--guidance", str(tmp_path / "none.json"), "--out", out],
         "does not exist"),
        (["generate", "--model", "tiny-sd3", "--perturb-heads", "0:9", "--out", out], "head 9 is out of range"),
        (["generate", "--model", "tiny-sd3", "--perturb-heads", "0:0", "--perturb-strength", "2", "--out", out],
         "HeadPerturbation.strength"),
        (["generate", "--model", "tiny-sd3", "--perturb-scale", "2", "--out", out], "need --perturb-heads"),
        (["generate", "--model", "tiny-sd3", "--perturb-heads", "0:0", "--perturb-steps", "x", "--out", out],
         "start:end"),
        (["generate", "--model", "tiny-wan", "--guidance", str(_preset(tmp_path)), "--out", out],
         "made for SD3Transformer2DModel"),
    ]
    for argv, match in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and match in err, (argv, err)
        assert err.count("error:") == 1 and err.strip().splitlines()[-1].startswith("error:"), err


def test_sd3_skip_layer_guidance_together_is_refused(sd3) -> None:
    from test_patching import _call_kwargs

    accel.patch(sd3, guidance=HeadPerturbation(heads=[(0, 0)]))
    try:
        with pytest.raises(NotImplementedError, match="skip-layer guidance"):
            sd3(prompt="a red car", skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                skip_layer_guidance_stop=1.0, **{**_call_kwargs("tiny-sd3"), "num_inference_steps": 3})
    finally:
        accel.unpatch(sd3)
