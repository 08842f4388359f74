"""The demo experiments of issue #17 end to end at toy size (micro model with 2 layers, random weights, 2 steps,
1 pair), their JSON and PNG, the task scorer, the spec choices for the demo grid, batched generation, the report
written after each variant and resuming from it, and the command line's errors.

The sparse methods run their torch paths here (TRITON_INTERPRET unset for this module), as the command line does on
a CPU: the Triton interpreter takes several times longer for the same numbers' checks.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from accel.demo import experiments as E
from accel.demo.config import DEMO, MICRO
from accel.demo.evaluate import EVAL_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
GENERATE_VIDEOS = E.generate_videos  # the real one, under the tests' spies
PNG = b"\x89PNG\r\n\x1a\n"
TOY = dataclasses.replace(MICRO, height=64, width=64,
                          transformer=dataclasses.replace(MICRO.transformer, num_layers=2),  # caches need >= 2
                          generation=dataclasses.replace(MICRO.generation, height=64, width=64))
FAST = E.RunSettings(pairs=1, steps=2, progress=False)
REPORT_KEYS = {"experiment", "settings", "model", "environment", "git_commit", "weights", "finished", "variants",
               "table", "pairs", "call", "notes"}
ROW_KEYS = {"prompt", "seed", "matches", "colour_ok", "direction_ok", "speed_ok", "task_score", "seconds", "density",
            "forwards", "computed_forwards", "skipped_forwards"}


def _script():
    spec = importlib.util.spec_from_file_location("demo_experiments_cli", ROOT / "recipes" / "demo" / "experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Seeded random weights of the toy model, exported and loaded back the way the committed ones are."""
    from accel.demo.model import build_pipeline, export_weights

    root = tmp_path_factory.mktemp("demo-exp") / "w"
    export_weights(build_pipeline(TOY, seed=0), TOY, root)
    return root


@pytest.fixture(scope="module")
def pipe(weights):
    from accel.demo.model import load_demo_pipeline

    return load_demo_pipeline(weights)


def _check(report, out: Path, variants: list[str]):
    path = E.write_report(report, out, E.PLOTS[report["experiment"]])
    data = json.loads(path.read_text())
    assert REPORT_KEYS <= set(data)
    assert [v["label"] for v in data["variants"]] == variants
    assert path.with_suffix(".png").read_bytes()[:8] == PNG
    for v in data["variants"]:
        assert v["summary"]["count"] == len(v["rows"]) == FAST.pairs
        assert ROW_KEYS <= set(v["rows"][0])
        assert v["rows"][0]["seconds"] > 0 and 0 <= v["summary"]["match_rate"] <= 1
        if v["reference"] is not None:
            row = v["rows"][0]
            assert 0 < row["ssim"] <= 1 and (row["psnr"] is None) == row["identical"]
    assert data["environment"]["diffusers"] and data["settings"]["pairs"] == 1
    assert all(v["label"] in data["table"] for v in data["variants"])
    return data


def test_fidelity_end_to_end(pipe, weights, tmp_path):
    report = E.run_fidelity(pipe, TOY, FAST, methods=("pyramid",), weights=weights)
    specs = E.fidelity_specs(tuple(report["grid"]), ("pyramid",))["pyramid"]
    data = _check(report, tmp_path, ["dense", *specs, *(s + ",dense_steps=1" for s in specs)])
    by = {v["label"]: v["summary"] for v in data["variants"]}
    assert by["dense"]["mean_density"] is None  # unpatched reference
    for spec in specs:
        sparse, scheduled = by[spec]["mean_density"], by[spec + ",dense_steps=1"]["mean_density"]
        assert 0 < sparse < scheduled <= 1  # one of two steps dense raises the mean density
    assert data["weights"]["model"] == TOY.name


def test_fidelity_specs_for_the_demo_grid_differ_in_density():
    from accel.geometry import TokenLayout
    from accel.methods.registry import parse_method_spec

    grid = E.latent_grid(DEMO, DEMO.generation.num_frames)
    assert grid == (5, 16, 16)
    specs = E.fidelity_specs(grid)
    assert set(specs) == {"radial", "pyramid", "neighborhood"} and all(len(s) == 3 for s in specs.values())
    layout = TokenLayout(1, *grid)
    for name in ("radial", "neighborhood"):  # pyramid's density is chosen per call: measured in the run
        methods = [parse_method_spec(s).method for s in specs[name]]
        densities = [m.plan_density(m.build_plan(layout, 4, torch.device("cpu"))) for m in methods]
        assert len(set(densities)) == 3, (name, densities)
    variants = E.fidelity_variants(DEMO, E.RunSettings())
    assert len(variants) == 19 and variants[5].spec == "radial:decay=0.5,block_size=16,dense_steps=5"
    with pytest.raises(ValueError, match="fidelity methods"):
        E.fidelity_specs(grid, ("radial", "sparse-magic"))
    binary = E.fidelity_specs(grid, ("binary",))["binary"]  # block top-k: every selected pair at level 1
    for spec in binary:
        method = parse_method_spec(spec).method
        assert E._method_label(spec) == "binary top-k" and len(set(method.thresholds)) == 1
    assert E._method_label(specs["pyramid"][1]) == "pyramid"


def test_prompt_pairs_are_held_out_and_distinct():
    pairs = E.prompt_pairs(32)
    assert len(pairs) == 32 and len(set(pairs)) == 32
    unique = list(dict.fromkeys(EVAL_PROMPTS))  # EVAL_PROMPTS repeats two captions
    assert [p for p, s in pairs if s == 0][:len(unique)] == unique
    more = E.prompt_pairs(40)
    assert more[:32] == pairs and len({p for p, _ in more}) == 20
    search = E.prompt_pairs(4, 1, caption_seed=E.SEARCH_SEED, exclude=[p for p, _ in more])
    assert len(search) == 4 and not {p for p, _ in search} & {p for p, _ in more}
    assert E.extended_frames(17) == 65 and E.extended_frames(5) == 17
    with pytest.raises(ValueError, match="4k \\+ 1"):
        E.extended_frames(16)
    with pytest.raises(ValueError, match="RunSettings.pairs"):
        E.RunSettings(pairs=0)


def test_task_scorer_grades_the_caption_checks():
    from accel.lora.synthetic import clip_spec, render_clip

    spec = clip_spec(3, 0)
    clip = render_clip(spec, 17, 64, 64)
    blank = np.zeros_like(clip)
    scores = E.task_scorer([clip.astype(np.float32) / 255, blank], [spec.caption, spec.caption])
    assert scores[0] == 1.0 and scores[1] == 0.0  # the caption names colour, direction and speed
    with pytest.raises(ValueError, match="one prompt per video"):
        E.task_scorer([clip], [])


def test_length_with_a_trained_lora(pipe, weights, tmp_path):
    config = E.LengthLoRAConfig(clips=2, steps=2, batch_size=1, warmup=0, rank=2, alpha=2.0, save_every=0)
    lora = E.train_length_lora(weights, tmp_path / "run", config, progress=False)
    assert (lora / "pytorch_lora_weights.safetensors").is_file() and (lora / "accel_lora.json").is_file()
    meta = json.loads((lora / "accel_lora.json").read_text())
    assert "radial" in json.dumps(meta)
    report = E.run_length(pipe, TOY, FAST, lora=lora, weights=weights)
    data = _check(report, tmp_path, ["dense@5", "dense@17", "radial@17", "radial@17+lora"])
    assert data["lora"]["metadata"]["rank"] == 2
    assert data["variants"][3]["rows"][0]["density"] < 1
    assert not hasattr(pipe.transformer, "peft_config") or not pipe.transformer.peft_config  # unloaded again
    variants, notes = E.length_variants(TOY, FAST)
    assert [v.label for v in variants] == ["dense@5", "dense@17", "radial@17"]
    assert any("LoRA skipped" in n for n in notes)


def test_caches_end_to_end(pipe, weights, tmp_path):
    report = E.run_caches(pipe, TOY, FAST, weights=weights)
    data = _check(report, tmp_path, ["dense", "radial", "FirstBlockCache", "FirstBlockCache+radial", "MagCache",
                                     "MagCache+radial"])
    calibration = data["mag_calibration"]
    assert len(calibration["mag_ratios"]) == 2 and len(calibration["per_context"]) == 2  # cond and uncond
    by = {v["label"]: v["summary"] for v in data["variants"]}
    assert all(s["mean_forwards"] == 4 for s in by.values())  # 2 steps x (cond + uncond)
    assert by["dense"]["mean_skipped_forwards"] == 0 and by["MagCache"]["mean_skipped_forwards"] > 0


def test_heads_end_to_end(pipe, weights, tmp_path):
    search = E.HeadSearchSettings(pairs=1, candidates=((0, 0), (0, 1), (1, 0)), top_k=1, eval_strengths=(1.0,))
    report = E.run_heads(pipe, TOY, FAST, search, out=tmp_path, weights=weights)
    data = _check(report, tmp_path, ["cfg", "cfg+heads u=1", "cfg+random heads u=1"])
    s = data["search"]
    assert len(s["selected"]) == 1 and len(s["candidates"]) == 3 and s["control_heads"] != s["selected"]
    best = max(c["score"] for c in s["candidates"])
    assert [c["score"] for c in s["candidates"] if c["head"] == s["selected"][0]] == [best]
    assert (tmp_path / "demo_heads_search.jsonl").is_file()


def _spy(monkeypatch, calls: list[int], fail_at: int | None = None, fail=None):
    """Replace `E.generate_videos` by a wrapper recording each call's batch size; call `fail_at` runs `fail`."""
    real = GENERATE_VIDEOS

    def spy(pipe, prompts, seeds, kwargs, **kw):
        calls.append(len(prompts))
        if fail_at is not None and len(calls) == fail_at:
            (fail or _raise)()
        return real(pipe, prompts, seeds, kwargs, **kw)

    monkeypatch.setattr(E, "generate_videos", spy)


def _raise():
    raise RuntimeError("killed")


def test_batch_of_two_matches_batch_one(pipe):
    kwargs = E.call_kwargs(TOY, FAST)
    prompts = E.held_out_captions(2)
    seeds = [0, 1]
    batch = E.generate_videos(pipe, prompts, seeds, kwargs)
    for gen, prompt, seed in zip(batch, prompts, seeds, strict=True):
        one = E.generate_video(pipe, prompt, seed, kwargs)
        assert np.abs(gen.video.astype(int) - one.video.astype(int)).max() <= 2  # each video keeps its seed's noise
        assert (gen.batch, one.batch, gen.forwards, one.forwards) == (2, 1, 4, 4)  # forwards: per video
        assert gen.seconds == pytest.approx(gen.call_seconds / 2)
    assert not np.array_equal(batch[0].video, batch[1].video)
    with pytest.raises(ValueError, match="one seed per prompt"):
        E.generate_videos(pipe, prompts, [0], kwargs)
    assert E._negative_prompts({"negative_prompt": ["x"]}, 3)["negative_prompt"] == ["x"] * 3
    assert E._negative_prompts({"negative_prompt": "x"}, 3)["negative_prompt"] == "x"  # diffusers repeats a str


def test_run_settings_batch_is_validated():
    assert E.RunSettings().batch == 1 and E.RunSettings(batch=16).batch == 16
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="RunSettings.batch must be a whole number >= 1"):
            E.RunSettings(batch=bad)


def test_batched_variants_and_cache_variants_at_batch_one(pipe, monkeypatch):
    from diffusers import FirstBlockCacheConfig

    settings = dataclasses.replace(FAST, pairs=3, batch=2)
    pairs = E.prompt_pairs(3, 2)
    grid = E.latent_grid(TOY, E.call_kwargs(TOY, settings)["num_frames"])
    pyramid = E.fidelity_specs(grid, ("pyramid",))["pyramid"][-1]  # radial is dense on the toy grid
    variants = [E.Variant("dense"), E.Variant("pyramid", pyramid, reference="dense"),
                E.Variant("FirstBlockCache", cache="first_block", reference="dense")]
    calls: list[int] = []
    _spy(monkeypatch, calls)
    rows = E.run_variants(pipe, TOY, settings, variants, pairs,
                          cache_configs={"first_block": FirstBlockCacheConfig(threshold=0.05)})
    assert calls == [2, 1, 2, 1, 1, 1, 1]  # chunks of 2 (the last one short); the cache variant one by one
    assert [r["batch"] for r in rows["dense"]] == [2, 2, 1] and [r["batch"] for r in rows["FirstBlockCache"]] == [1] * 3
    first, second = rows["pyramid"][:2]
    assert first["seconds"] == second["seconds"] == pytest.approx(first["call_seconds"] / 2)
    assert first["density"] == second["density"] < 1  # the patch's stats are per call
    assert all(r["forwards"] == 4 and r["ssim"] > 0 for r in rows["pyramid"])
    assert [(r["prompt"], r["seed"]) for r in rows["pyramid"]] == pairs


def test_partial_report_then_resume(pipe, weights, tmp_path, monkeypatch, capsys):
    run = functools.partial(E.run_fidelity, pipe, TOY, methods=("pyramid",), weights=weights, out=tmp_path)
    labels = [v.label for v in E.fidelity_variants(TOY, FAST, ("pyramid",))]
    path, videos = tmp_path / "demo_fidelity.json", tmp_path / "demo_fidelity_videos"
    calls: list[int] = []
    _spy(monkeypatch, calls, fail_at=2)  # the second variant fails: the first one is on disk
    with pytest.raises(RuntimeError, match="killed"):
        run(FAST)
    partial = json.loads(path.read_text())
    assert partial["complete"] is False and partial["remaining"] == labels[1:]
    assert [v["label"] for v in partial["variants"]] == ["dense"] and len(list(videos.glob("*.npz"))) == 1
    assert "1 of 7 variants done" in capsys.readouterr().out

    calls.clear()
    _spy(monkeypatch, calls)
    report = run(FAST, resume=True)
    assert len(calls) == len(labels) - 1 and report["resumed"] == ["dense"]  # dense's videos loaded, not made
    assert report["complete"] is True and report["remaining"] == []
    assert report["variants"][0]["rows"] == partial["variants"][0]["rows"]
    stored = json.loads(path.read_text())
    assert stored["complete"] is True and stored["variants"] == json.loads(json.dumps(report["variants"]))

    calls.clear()
    again = run(dataclasses.replace(FAST, progress=True), resume=True)  # bars do not change the numbers
    assert calls == [] and again["variants"] == stored["variants"] and again["resumed"] == labels

    for f in videos.glob("*.npz"):  # missing reference videos: dense runs again for the variant still to run
        f.unlink()
    stored["variants"].pop()
    path.write_text(json.dumps(stored))
    calls.clear()
    assert run(FAST, resume=True)["resumed"] == labels[1:-1] and len(calls) == 2
    capsys.readouterr()

    calls.clear()
    _spy(monkeypatch, calls, fail_at=1)
    with pytest.raises(RuntimeError, match="killed"):  # other settings (same pairs): nothing reused
        run(dataclasses.replace(FAST, seeds=1), resume=True)
    assert calls == [1] and "settings differ" in capsys.readouterr().out


def test_cli_refuses_bad_arguments(capsys):
    main = _script().main
    cases = [(["fidelity", "--pairs", "0"], "--pairs must be >= 1"),
             (["fidelity", "--lora", "x"], "belong to the length experiment"),
             (["length", "--run-train"], "--run-train needs --train-lora"),
             (["fidelity", "--methods", "radial,magic"], "fidelity methods must be among"),
             (["length", "--lora", "/nonexistent/lora"], "does not exist"),
             (["caches", "--radial", "pyramid"], "--radial must be a radial spec"),
             (["heads", "--candidates", "1-2"], "LAYER:HEAD"),
             (["fidelity", "--batch", "0"], "--batch must be >= 1"),
             (["fidelity", "--batch", "two"], "--batch must be a whole number"),
             (["sparsity"], "invalid choice")]
    if not torch.cuda.is_available():
        cases.append((["fidelity", "--device", "cuda"], "no CUDA GPU"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_cli_default_out_and_train_commands(capsys, weights, tmp_path):
    script = _script()
    args = script.build_parser().parse_args(["fidelity"])
    assert Path(args.out) == Path("outputs/bench") and "benchmarks" not in args.out
    assert args.batch is None and args.resume is False
    assert script.default_batch("cuda") == 16 and script.default_batch("cpu") == 1
    args = script.build_parser().parse_args(["caches", "--batch", "4", "--resume"])
    assert args.batch == 4 and args.resume is True
    assert script.main(["length", "--train-lora", "--weights", str(weights), "--lora-run", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "--train-lora --run-train" in out and f"--lora {tmp_path / 'r' / 'lora'}" in out
    assert not (tmp_path / "r").exists()  # printing trains nothing


def test_cli_runs_an_experiment_stops_on_sigterm_and_resumes(capsys, weights, tmp_path, monkeypatch):
    main = _script().main
    argv = ["length", "--weights", str(weights), "--out", str(tmp_path), "--pairs", "1", "--steps", "2",
            "--no-progress"]

    def sigterm():  # what `timeout` sends: the handler stops the run where it is
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the run")

    calls: list[int] = []
    _spy(monkeypatch, calls, fail_at=2, fail=sigterm)
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 143
    assert "rerun with --resume" in capsys.readouterr().err
    data = json.loads((tmp_path / "demo_length.json").read_text())
    assert [v["label"] for v in data["variants"]] == ["dense@5"] and data["remaining"] == ["dense@17", "radial@17"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the CLI's only while it runs

    calls.clear()
    _spy(monkeypatch, calls)
    assert main([*argv, "--resume"]) == 0 and len(calls) == 2
    out = capsys.readouterr().out
    assert "| radial@17 |" in out and "LoRA skipped" in out and "reusing 1 of 3" in out
    data = json.loads((tmp_path / "demo_length.json").read_text())
    assert data["weights"]["path"] == str(weights) and (tmp_path / "demo_length.png").is_file()
    assert data["complete"] is True and data["settings"]["batch"] == 1 and data["resumed"] == ["dense@5"]
