"""HeadHunter search: finds a planted head, resumes a killed search to the same result, presets and scorers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_patching import _call_kwargs

from accel.guidance.preset import load_preset, save_preset
from accel.guidance.scorers import CallableScorer, ReferenceScorer, make_scorer
from accel.guidance.search import SearchConfig, generate_images, read_log, search_heads
from accel.pipelines.tiny import build_tiny

PLANTED = (1, 0)
NAME = "tiny-sd3"


def _setup():
    pipe = build_tiny(NAME)
    pipe.set_progress_bar_config(disable=True)
    kwargs = _call_kwargs(NAME)
    kwargs.update(num_inference_steps=1, guidance_scale=1.0)
    config = SearchConfig(prompts=(("a red car", 0), ("a blue boat", 1)), rounds=2, top_k=1, strength=1.0, scale=3.0)
    return pipe, kwargs, config


def _references(pipe, kwargs, config):
    import accel

    handle = accel.patch(pipe)
    from accel.guidance.loop import layer_sites
    from accel.pipelines.families import adapter_for

    adapter = adapter_for(pipe.transformer)
    images = generate_images(pipe, handle, adapter.family, layer_sites(adapter, pipe.transformer), [PLANTED],
                             config, kwargs)
    accel.unpatch(pipe)
    return images


def mean_brightness(images, prompts):
    """A callable scorer for the tests (module:function form)."""
    return [float(np.mean(img)) for img in images]


def test_search_finds_the_planted_head(tmp_path) -> None:
    pipe, kwargs, config = _setup()
    scorer = ReferenceScorer(_references(pipe, kwargs, config))
    result = search_heads(pipe, config, scorer, log=tmp_path / "log.jsonl", call_kwargs=kwargs, progress=False)
    print("selected", result.selected, result.rounds)
    assert result.selected[0] == PLANTED
    assert result.rounds[0]["scores"][0] == pytest.approx(0.0, abs=1e-10)  # identical to the reference
    assert len(result.selected) == 2 and result.selected[1] != PLANTED
    records = read_log(tmp_path / "log.jsonl")
    assert records[0]["event"] == "start"
    assert sum(r["event"] == "candidate" for r in records) == 4 + 3  # 2 layers x 2 heads, then 3 left
    preset = result.preset("SD3Transformer2DModel", config, strength=0.5)
    path = save_preset(preset, tmp_path / "preset.json")
    loaded = load_preset(path)
    assert loaded.perturbation.heads == tuple(result.selected) and loaded.perturbation.strength == 0.5
    assert loaded.model_class == "SD3Transformer2DModel"


def test_killed_search_resumes_to_the_same_result(tmp_path) -> None:
    pipe, kwargs, config = _setup()
    scorer = ReferenceScorer(_references(pipe, kwargs, config))
    whole = search_heads(pipe, config, scorer, log=tmp_path / "whole.jsonl", call_kwargs=kwargs, progress=False)

    seen = []

    def kill_after_five(head, score):
        seen.append(head)
        if len(seen) == 5:  # mid round 2
            raise KeyboardInterrupt

    log = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        search_heads(pipe, config, scorer, log=log, call_kwargs=kwargs, progress=False, on_candidate=kill_after_five)
    with log.open("a") as fh:
        fh.write('{"event": "candidate", "round": 1, "he')  # a line cut off by the kill
    resumed_heads = []
    resumed = search_heads(pipe, config, scorer, log=log, call_kwargs=kwargs, progress=False,
                           on_candidate=lambda h, s: resumed_heads.append(h))
    assert resumed.selected == whole.selected and resumed.rounds == whole.rounds
    assert len(resumed_heads) == 7 - 5  # only what the killed run had not scored
    # a log of another search is refused, not mixed in
    other = SearchConfig(prompts=config.prompts, rounds=1, top_k=2)
    with pytest.raises(ValueError, match="another search"):
        search_heads(pipe, other, scorer, log=log, call_kwargs=kwargs, progress=False)


def test_callable_scorer_and_scorer_errors(tmp_path) -> None:
    scorer = make_scorer("callable", "test_guidance_search:mean_brightness")
    images = [np.full((4, 4, 3), 0.25, np.float32), np.ones((2, 4, 4, 3), np.float32)]
    assert scorer.score(images, ["a", "b"], [0, 1]) == [0.25, 1.0]
    with pytest.raises(ValueError, match="module:function"):
        make_scorer("callable", "no_colon")
    with pytest.raises(ValueError, match="has no attribute"):
        make_scorer("callable", "test_guidance_search:missing")
    with pytest.raises(ValueError, match="one finite number per image"):
        CallableScorer(lambda imgs, prompts: [1.0]).score(images, ["a", "b"], [0, 1])
    with pytest.raises(ValueError, match="not a directory"):
        make_scorer("reference", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="local model directory"):
        make_scorer("pickscore", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("fid", "x")


def test_reference_scorer_reads_a_folder(tmp_path) -> None:
    from PIL import Image

    for i, value in enumerate((0, 255)):
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / f"{i:03d}.png")
    scorer = make_scorer("reference", str(tmp_path))
    got = scorer.score([np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 3), np.float32)], ["a", "b"], [0, 1])
    assert got == [0.0, -1.0]


def test_clip_scorer_on_a_tiny_local_model(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from accel.pipelines.tiny import _clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=1000, max_position_embeddings=77),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path, safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=_clip_tokenizer())
    processor.save_pretrained(tmp_path)
    scorer = make_scorer("clip", str(tmp_path))
    images = [np.random.rand(40, 40, 3).astype(np.float32), np.zeros((40, 40, 3), np.float32)]
    scores = scorer.score(images, ["a red car", "a red car"], [0, 1])
    assert len(scores) == 2 and all(np.isfinite(scores)) and scores[0] != scores[1]
    again = scorer.score(images[:1], ["a red car"], [0])
    assert again[0] == pytest.approx(scores[0], rel=1e-5)


def test_search_config_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SearchConfig(prompts=())
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        SearchConfig(prompts=(("a", "zero"),))
    with pytest.raises(ValueError, match="top_k"):
        SearchConfig(prompts=(("a", 0),), top_k=0)
    with pytest.raises(ValueError, match="strength"):
        SearchConfig(prompts=(("a", 0),), strength=1.5)


def test_search_log_is_json_lines(tmp_path) -> None:
    pipe, kwargs, config = _setup()
    small = SearchConfig(prompts=config.prompts[:1], rounds=1, top_k=1, candidates=((0, 0), (1, 1)))
    search_heads(pipe, small, CallableScorer(mean_brightness), log=tmp_path / "l.jsonl", call_kwargs=kwargs,
                 progress=False)
    lines = (tmp_path / "l.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["start", "candidate", "candidate", "round"]


def _search_argv(log, out, rounds=2):
    return ["heads", "search", "--model", NAME, "--prompt", "a red car", "--prompt", "a blue car", "--rounds",
            str(rounds), "--top-k", "1", "--steps", "1", "--scorer", "callable", "--scorer-arg",
            "test_guidance_search:mean_brightness", "--search-log", str(log), "--out", str(out),
            "--preset-strength", "0.5"]


def test_cli_search_show_and_generate_with_the_preset(tmp_path, capsys) -> None:
    from accel.cli import main

    assert main(_search_argv(tmp_path / "log.jsonl", tmp_path / "preset.json")) == 0
    printed = capsys.readouterr().out
    assert "selected heads:" in printed
    preset = load_preset(tmp_path / "preset.json")
    assert len(preset.perturbation.heads) == 2 and preset.perturbation.strength == 0.5
    assert main(["heads", "show", str(tmp_path / "preset.json")]) == 0
    assert "SD3Transformer2DModel" in capsys.readouterr().out
    assert main(["generate", "--model", NAME, "--guidance", str(tmp_path / "preset.json"), "--perturb-scale", "2",
                 "--out", str(tmp_path / "x.mp4")]) == 0
    out = capsys.readouterr().out
    assert "guidance: SoftPAG identity/joint" in out and "w_p=2" in out and (tmp_path / "x.mp4").is_file()


def test_two_cpu_ranks_split_the_candidates_and_agree(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "accel.cli",
           *_search_argv(tmp_path / "log.jsonl", tmp_path / "two.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "log.rank1.jsonl").is_file()  # rank 1 scored its share in its own log
    rank0 = [r for r in read_log(tmp_path / "log.jsonl") if r["event"] == "candidate"]
    rank1 = [r for r in read_log(tmp_path / "log.rank1.jsonl") if r["event"] == "candidate"]
    assert rank0 and rank1 and len(rank0) + len(rank1) == 4 + 3
    from accel.cli import main

    assert main(_search_argv(tmp_path / "one.jsonl", tmp_path / "one.json")) == 0
    assert load_preset(tmp_path / "two.json").perturbation == load_preset(tmp_path / "one.json").perturbation
