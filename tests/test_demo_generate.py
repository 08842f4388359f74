"""`accel generate --model accel-demo`: the learned demo model through the CLI (smoke weights stand in for the
committed ones), and one clear error when its weights are missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import imageio.v3 as iio
import pytest

import accel.demo.model as demo_model
from accel.cli import main
from accel.pipelines.tiny import TINY_MODELS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_weights(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "recipes" / "demo" / "train_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = tmp_path_factory.mktemp("demo")
    assert script.main(["--smoke", "--run", str(root / "run"), "--weights", str(root / "w"), "--no-progress"]) == 0
    return root / "w"


def test_demo_is_a_built_in_wan_model_with_its_generation_defaults() -> None:
    spec = TINY_MODELS["accel-demo"]
    assert spec.learned and spec.family == "wan"
    assert (spec.height, spec.width, spec.num_frames, spec.num_inference_steps) == (128, 128, 17, 20)
    assert spec.call_defaults["max_sequence_length"] == 16  # the demo's text length, not WanPipeline's 512
    assert spec.geometry.patch == (1, 1, 1) and (spec.geometry.vae_spatial, spec.geometry.vae_temporal) == (8, 4)


def test_demo_pipeline_geometry_matches_its_spec(smoke_weights, monkeypatch) -> None:
    from accel.pipelines.families import family_for_pipeline
    from accel.pipelines.tiny import build_tiny, size_rules

    monkeypatch.setattr(demo_model, "DEFAULT_WEIGHTS", smoke_weights)
    spec = TINY_MODELS["accel-demo"]
    pipe = build_tiny("accel-demo")
    assert family_for_pipeline(pipe).name == "wan"
    assert family_for_pipeline(pipe).facts.geometry(pipe) == spec.geometry and size_rules(pipe) == spec.rules


def test_generate_with_the_demo_model(smoke_weights, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(demo_model, "DEFAULT_WEIGHTS", smoke_weights)
    out = tmp_path / "demo.mp4"
    argv = ["generate", "--model", "accel-demo", "--prompt", "a red square moving right", "--steps", "2",
            "--frames", "5", "--height", "32", "--width", "32", "--out", str(out)]
    assert main(argv) == 0
    assert iio.imread(out, index=None).shape[:3] == (5, 32, 32)
    assert main([*argv[:-1], str(tmp_path / "radial.mp4"), "--attention", "radial"]) == 0


def test_missing_demo_weights_give_one_clear_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo_model, "DEFAULT_WEIGHTS", tmp_path / "absent")
    assert main(["generate", "--model", "accel-demo", "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "absent" in err and "train_demo.py" in err and len(err.splitlines()) == 1
