"""The demo recipe end to end on CPU (--smoke: micro model, a handful of steps), the exported weights and manifest,
offline loading and generation, the clear errors for missing, truncated, corrupted or re-typed files, resume, and the
config checks."""

import dataclasses
import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from accel.demo.config import DEMO, MICRO, DemoModelConfig, TransformerConfig
from accel.demo.model import (
    RETRAIN,
    DemoWeightsError,
    MissingDemoWeightsError,
    call_defaults,
    load_demo_pipeline,
    sha256_file,
    verify_weights,
)
from accel.demo.recipe import BudgetExpired, RecipeConfig, _Budget, load_recipe

ROOT = Path(__file__).resolve().parents[1]
FILES = ("text_encoder.safetensors", "vae.safetensors", "transformer.safetensors")


def _script():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "recipes" / "demo" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    assert _script().main(["--smoke", "--run", str(root / "run"), "--weights", str(root / "w"), "--no-progress"]) == 0
    print(f"smoke recipe: {time.perf_counter() - t0:.1f} s")
    return root


@pytest.fixture
def weights(smoke, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(smoke / "w", out)
    return out


def test_smoke_recipe_writes_weights_manifest_and_curve(smoke):
    w = smoke / "w"
    assert sorted(p.name for p in w.iterdir()) == sorted([*FILES, "manifest.json", "training_curve.png", "eval.json"])
    report = json.loads((w / "eval.json").read_text())
    assert report["count"] == 1 and report["method"] == "dense" and 0 <= report["match_rate"] <= 1
    assert (w / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((w / "manifest.json").read_text())
    assert manifest["model"] == MICRO.to_dict() and manifest["retrain"] == RETRAIN
    for name in FILES:
        entry = manifest["files"][name]
        assert entry["bytes"] == (w / name).stat().st_size and entry["sha256"] == sha256_file(w / name)
        assert entry["dtype"] == "float16"
    assert manifest["total_bytes"] == sum((w / n).stat().st_size for n in FILES)
    training = manifest["training"]
    assert training["stage1"]["steps"] == 3 and training["stage2"]["step"] == 4
    assert training["recipe"] == RecipeConfig.smoke().to_dict() and "git_commit" in training
    assert len(manifest["latents_mean"]) == len(manifest["latents_std"]) == MICRO.vae.z_dim
    data = sorted(p.name for p in (smoke / "run" / "data").glob("*.npz"))
    assert len(data) == 5 and sum("_null_" in n for n in data) == 1  # 4 clips + 25% caption dropout
    rows = [json.loads(line) for line in (smoke / "run" / "dit" / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert sum(r["tag"] == "train/loss" for r in rows) == 4


def test_exported_transformer_is_the_last_checkpoint_in_float16(smoke):
    from safetensors.torch import load_file

    from accel.lora.checkpoint import load_latest

    ckpt = load_latest(smoke / "run" / "dit" / "checkpoints")
    exported = load_file(str(smoke / "w" / "transformer.safetensors"))
    assert ckpt.step == 4
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float16
        torch.testing.assert_close(tensor, ckpt.tensors[f"param.{name}"].half(), rtol=0, atol=0)


def test_rerun_reuses_finished_stages(smoke):
    before = (smoke / "w" / "manifest.json").read_text()
    t0 = time.perf_counter()
    _script().main(["--smoke", "--run", str(smoke / "run"), "--weights", str(smoke / "w2"), "--no-progress"])
    assert time.perf_counter() - t0 < 20
    after = json.loads((smoke / "w2" / "manifest.json").read_text())
    assert after["files"] == json.loads(before)["files"]  # same weights: nothing retrained


def test_deadline_pauses_without_export_and_rerun_finishes(tmp_path):
    from accel.demo.recipe import run_recipe

    config = RecipeConfig.smoke()
    paused = run_recipe(config, tmp_path / "run", tmp_path / "w", max_seconds=0.0, progress=False)
    assert "stage 1 paused" in paused["paused"] and not (tmp_path / "w").exists()
    tight = dataclasses.replace(config, dit=dataclasses.replace(config.dit, budget_s=1e-3))
    paused = run_recipe(tight, tmp_path / "run", tmp_path / "w", progress=False)
    assert "stage 2 has no checkpoint" in paused["paused"] and not (tmp_path / "w").exists()
    done = run_recipe(config, tmp_path / "run", tmp_path / "w", progress=False)  # the budget is summed: 420 s left
    assert done["stage2"]["step"] == 4 and (tmp_path / "w" / "manifest.json").is_file()


def test_loads_offline_and_generates(weights):
    pipe = load_demo_pipeline(weights)
    assert pipe.transformer.dtype == torch.float32 and not pipe.transformer.training
    kw = call_defaults(MICRO)
    frames = pipe(prompt="a red square moving right", generator=torch.Generator().manual_seed(0), output_type="np",
                  **kw).frames[0]
    assert frames.shape == (MICRO.generation.num_frames, MICRO.generation.height, MICRO.generation.width, 3)
    assert np.isfinite(frames).all()
    again = load_demo_pipeline(weights)(prompt="a red square moving right", output_type="np",
                                        generator=torch.Generator().manual_seed(0), **kw).frames[0]
    np.testing.assert_array_equal(frames, again)


def test_evaluate_scores_dense_and_a_method_against_dense(weights):
    from accel.demo.evaluate import EVAL_PROMPTS, evaluate, generate

    pipe = load_demo_pipeline(weights)
    dense = evaluate(pipe, MICRO, prompts=EVAL_PROMPTS[:2], seeds=(0, 1), progress=False)
    assert [(s.prompt, s.seed) for s in dense.scores] == [(p, s) for p in EVAL_PROMPTS[:2] for s in (0, 1)]
    assert dense.mean_psnr is None and dense.to_dict()["count"] == 4
    same = evaluate(pipe, MICRO, prompts=EVAL_PROMPTS[:1], method="dense", progress=False)
    assert same.mean_psnr == float("inf") and same.mean_ssim == 1.0  # dense vs dense: identical videos
    video = generate(pipe, EVAL_PROMPTS[0], 0, MICRO, num_frames=9)
    assert video.dtype == np.uint8 and video.shape == (9, 32, 32, 3)
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate(pipe, MICRO, prompts=(), progress=False)


def test_missing_file_names_it_and_the_retrain_command(weights):
    (weights / "vae.safetensors").unlink()
    with pytest.raises(MissingDemoWeightsError, match="vae.safetensors is missing") as err:
        load_demo_pipeline(weights)
    assert RETRAIN in str(err.value) and isinstance(err.value, FileNotFoundError)


def test_missing_folder_and_manifest(tmp_path, weights):
    with pytest.raises(MissingDemoWeightsError, match="folder does not exist"):
        verify_weights(tmp_path / "nowhere")
    (weights / "manifest.json").unlink()
    with pytest.raises(MissingDemoWeightsError, match="manifest.json is missing"):
        verify_weights(weights)


def test_corrupted_file_is_caught_by_its_hash(weights):
    path = weights / "transformer.safetensors"
    data = bytearray(path.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])  # flip bytes inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(DemoWeightsError, match=r"transformer.safetensors has sha256 .*corrupted") as err:
        load_demo_pipeline(weights)
    assert RETRAIN in str(err.value)


def test_truncated_file_is_caught_by_its_size(weights):
    path = weights / "text_encoder.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DemoWeightsError, match=r"text_encoder.safetensors has \d+ bytes, the manifest says"):
        verify_weights(weights)


def test_wrong_dtype_is_caught_even_with_a_matching_hash(weights):
    from safetensors.torch import load_file, save_file

    path = weights / "vae.safetensors"
    save_file({k: v.float() for k, v in load_file(str(path)).items()}, str(path))
    manifest = json.loads((weights / "manifest.json").read_text())
    manifest["files"]["vae.safetensors"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DemoWeightsError, match=r"vae.safetensors holds \['F32'\] tensors, the manifest says F16"):
        verify_weights(weights)


@pytest.mark.parametrize("change,match", [({"num_layers": 2}, "missing"), ({"ffn_dim": 24}, "size mismatch")])
def test_weights_that_do_not_fit_the_manifest_config_are_refused(weights, change, match):
    manifest = json.loads((weights / "manifest.json").read_text())
    manifest["model"]["transformer"].update(change)
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DemoWeightsError, match=f"transformer.safetensors does not fit the manifest's model config.*"
                                               f"{match}"):
        load_demo_pipeline(weights)


def test_bad_manifest_is_refused(weights):
    (weights / "manifest.json").write_text("{not json")
    with pytest.raises(DemoWeightsError, match="not valid JSON"):
        verify_weights(weights)
    (weights / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DemoWeightsError, match="format 'other'"):
        verify_weights(weights)


def test_demo_config_fits_the_budgets():
    """DEMO: <= 16 MB of float16 weights and thousands of video tokens at the training size (4x for length tests)."""
    from accel.demo.model import build_components

    with torch.device("meta"):
        parts = build_components(DEMO)
    params = sum(sum(p.numel() for p in parts[k].parameters()) for k in ("vae", "transformer"))
    params += parts["text_encoder"].num_parameters()  # tied input embedding counted once
    print(f"DEMO: {params / 1e6:.2f} M parameters, {params * 2 / 1e6:.2f} MB in float16")
    assert params * 2 <= 16e6 - 1e5  # room for safetensors headers
    assert DEMO.video_tokens == 5 * 16 * 16 == 1280
    long = DemoModelConfig(frames=4 * (DEMO.frames - 1) + 1)
    assert long.video_tokens == 17 * 256 and long.latent_shape[1] <= DEMO.transformer.rope_max_seq_len
    assert DEMO.generation.height == DEMO.height and DEMO.generation.num_frames == DEMO.frames


def test_config_round_trip_and_errors_name_the_field():
    assert DemoModelConfig.from_dict(DEMO.to_dict()) == DEMO
    assert DemoModelConfig.from_dict(json.loads(json.dumps(MICRO.to_dict()))) == MICRO
    with pytest.raises(ValueError, match="DemoModelConfig.transformer: unknown field.*heads"):
        DemoModelConfig.from_dict({**DEMO.to_dict(), "transformer": {"heads": 3}})
    with pytest.raises(ValueError, match="DemoModelConfig.frames must be 4k \\+ 1"):
        DemoModelConfig(frames=16)
    with pytest.raises(ValueError, match="DemoModelConfig.height must be a multiple of 16"):
        DemoModelConfig(height=120)
    with pytest.raises(ValueError, match="TransformerConfig.attention_head_dim must be even"):
        TransformerConfig(attention_head_dim=7)
    with pytest.raises(ValueError, match="storage_dtype"):
        DemoModelConfig(storage_dtype="int8")


def test_committed_recipe_parses_and_bad_recipes_name_the_field(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo" / "config.json")
    assert recipe.model == DEMO and recipe.dit.batch_size >= 1 and recipe.vae.budget_s + recipe.dit.budget_s <= 1200
    assert RecipeConfig.from_dict(recipe.to_dict()) == recipe
    bad = tmp_path / "bad.json"
    for body, match in (({"dit": {"stepz": 3}}, r"recipe.dit: unknown field\(s\) stepz"),
                        ({"vae": {"frames": 8}}, "VAETrainConfig.frames must be 4k"),
                        ({"model": "huge"}, "recipe.model must be one of"),
                        ({"data": {"null_fraction": 1.0}}, "DataConfig.null_fraction"),
                        ({"extra": 1}, r"unknown field\(s\) extra")):
        bad.write_text(json.dumps(body))
        with pytest.raises(ValueError, match=match):
            load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="recipe config not found"):
        load_recipe(tmp_path / "missing.json")


def test_budget_timer_raises_outside_the_trainer_loop():
    t0 = time.perf_counter()
    with pytest.raises(BudgetExpired), _Budget(0.2):
        while time.perf_counter() - t0 < 5:
            time.sleep(0.01)
    assert time.perf_counter() - t0 < 2
