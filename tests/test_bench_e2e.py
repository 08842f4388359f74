"""`accel bench e2e` on CPU: extrapolation, the `--compile` rows, table, JSON and plot from fake timings.

The timings themselves need a GPU; everything that turns timings into rows is checked here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from accel.bench import e2e
from accel.bench.e2e import CONFIGS, _extrapolate, _extrapolate_compiled, format_table, table_rows
from accel.presets import radial_preset

ROOT = Path(__file__).resolve().parents[1]
COMPILED_LABELS = ["dense cuDNN + torch.compile", "radial + torch.compile"]


def _fake_timings(name: str, compiled_scale: float | None = None) -> list[dict]:
    """Linear-in-depth fake timings (per layer: dense 20, sparse 12, dense FA 30 ms, double and single alike)."""
    timings = []
    for depth in e2e._depths(CONFIGS[name]):
        layers = sum(depth.values())
        t = {"depth": depth, "dense_ms": 5 + 20 * layers, "sparse_ms": 5 + 12 * layers,
             "dense_fa_ms": 5 + 30 * layers, "peak_gib": 1.0}
        if compiled_scale is not None:
            t.update(dense_compiled_ms=compiled_scale * t["dense_ms"],
                     sparse_compiled_ms=compiled_scale * t["sparse_ms"],
                     dense_compile_s=30.0 + layers, sparse_compile_s=40.0 + layers, compiled_peak_gib=1.5)
        timings.append(t)
    return timings


def _fake_row(name: str, compiled_scale: float | None = None) -> dict:
    cfg = CONFIGS[name]
    _, schedule = radial_preset(cfg.preset)
    timings = _fake_timings(name, compiled_scale)
    row = {"config": name, "reference_speedup": cfg.reference_speedup, "reduced_depth_timings": timings,
           "attention": {"dense_cudnn_ms": 150.0, "radial_ms": 50.0, "density": 0.287, "flex_ms": 66.0}}
    row.update(_extrapolate(cfg, timings, schedule))
    if compiled_scale is not None:
        row["compiled"] = _extrapolate_compiled(cfg, timings, schedule, row)
    return row


def test_extrapolation_reproduces_the_committed_e2e_results() -> None:
    """The committed e2e.json was computed by `_extrapolate` from its own reduced-depth timings."""
    data = json.loads((ROOT / "benchmarks" / "results" / "e2e.json").read_text())
    checked = 0
    for row in data["configs"]:
        if row["config"] not in CONFIGS:
            continue
        cfg = CONFIGS[row["config"]]
        out = _extrapolate(cfg, row["reduced_depth_timings"], radial_preset(cfg.preset)[1])
        assert out == {k: row[k] for k in out}  # same arithmetic, same floats
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name", ["wan14b-768p-69f", "hunyuan-768p-117f"])
def test_compiled_rows_from_fake_timings(name: str) -> None:
    row = _fake_row(name, compiled_scale=0.8)
    c = row["compiled"]
    # Compiled timings are the eager ones x 0.8 at every depth: the fit scales exactly.
    assert c["forward_dense_ms"] == pytest.approx(0.8 * row["forward_dense_ms"])
    assert c["forward_sparse_phase_ms"] == pytest.approx(0.8 * row["forward_sparse_phase_ms"])
    assert c["total_dense_s"] == pytest.approx(0.8 * row["total_dense_s"])
    assert c["total_radial_s"] == pytest.approx(0.8 * row["total_radial_s"])
    assert c["total_speedup"] == pytest.approx(row["total_speedup"])
    assert c["dense_speedup_vs_eager"] == pytest.approx(1.25)
    assert c["total_speedup_vs_eager_dense"] == pytest.approx(1.25 * row["total_speedup"])
    depths = e2e._depths(CONFIGS[name])
    assert c["compile_s"]["depths"] == depths and len(c["compile_s"]["dense"]) == len(depths)
    assert [r["label"] for r in c["rows"]] == COMPILED_LABELS
    assert not any("dense_fa" in k for k in c["per_layer"])
    # The eager numbers do not depend on whether compiled timings are present.
    eager_only = _fake_row(name)
    assert {k: row[k] for k in eager_only if k != "reduced_depth_timings"} == {
        k: v for k, v in eager_only.items() if k != "reduced_depth_timings"}
    json.dumps(row)  # JSON-ready


def test_table_rows_and_printed_table() -> None:
    plain, compiled = _fake_row("wan1.3b-480p-81f"), _fake_row("wan14b-768p-69f", compiled_scale=0.8)
    assert [r["label"] for r in table_rows(plain)] == ["dense cuDNN", "dense FA SDPA", "radial"]
    rows = table_rows(compiled)
    assert [r["label"] for r in rows] == ["dense cuDNN", "dense FA SDPA", "radial", *COMPILED_LABELS]
    assert rows[0]["speedup_vs_dense_cudnn"] == 1.0
    assert rows[3]["speedup_vs_dense_cudnn"] == pytest.approx(1.25)
    assert rows[4]["speedup_vs_dense_cudnn"] == pytest.approx(1.25 * compiled["total_speedup"])
    assert rows[4]["compile_s"] == [42.0, 44.0]
    text = format_table({"configs": [plain, compiled]})
    print(text)
    lines = text.splitlines()
    assert len(lines) == 2 + 3 + 5 + 1
    assert "wan14b-768p-69f      radial + torch.compile" in text and "42 / 44" in text
    assert not any("torch.compile" in line for line in lines if line.startswith("wan1.3b"))


def _plotted(monkeypatch, results: dict) -> tuple[list[str], list]:
    captured = {}
    monkeypatch.setattr(e2e, "save_figure", lambda fig, path, dpi=None: captured.setdefault("fig", fig))
    e2e.plot(results, Path("unused.png"))
    ax = captured["fig"].axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()], ax.containers


def test_plot_has_the_compiled_bars_only_with_compile(monkeypatch, tmp_path) -> None:
    env = {"environment": {"device": "fake GPU"}}
    labels, bars = _plotted(monkeypatch, {**env, "configs": [_fake_row("wan1.3b-480p-81f")]})
    assert len(labels) == 5 and not any("compile" in label for label in labels)
    assert [round(b.get_width(), 6) for b in bars[0]] == [0.16]  # the layout of the plot without --compile
    results = {**env, "configs": [_fake_row("wan1.3b-480p-81f"), _fake_row("hunyuan-768p-117f", compiled_scale=0.8)]}
    labels, bars = _plotted(monkeypatch, results)
    assert len(labels) == 7
    assert labels[-2:] == ["50 steps, dense cuDNN + torch.compile, vs cuDNN",
                           "50 steps, radial + torch.compile, vs cuDNN"]
    radial_compiled = [b.get_height() for b in bars[-1]]
    assert math.isnan(radial_compiled[0])  # the config measured without --compile
    assert radial_compiled[1] == pytest.approx(results["configs"][1]["compiled"]["total_speedup_vs_eager_dense"])
    monkeypatch.undo()
    e2e.plot(results, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 0


def test_main_assembles_json_table_and_plot(tmp_path, monkeypatch, capsys, committed_results_unchanged) -> None:
    """`main` with the GPU work faked: output under outputs/bench/ of the cwd, compiled rows with --compile only."""
    calls = []

    def fake_run_config(cfg, compile=False, spec=None):
        calls.append((cfg.name, compile))
        return _fake_row(cfg.name, compiled_scale=0.8 if compile else None)

    monkeypatch.setattr(e2e.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(e2e, "run_config", fake_run_config)
    monkeypatch.setattr(e2e, "_environment", lambda: {"device": "fake GPU"})
    monkeypatch.chdir(tmp_path)
    configs = "wan14b-768p-69f,hunyuan-768p-117f"
    assert e2e.main(["--configs", configs, "--compile"]) == 0
    printed = capsys.readouterr().out
    assert calls == [("wan14b-768p-69f", True), ("hunyuan-768p-117f", True)]
    data = json.loads((tmp_path / "outputs/bench/e2e.json").read_text())
    assert [[r["label"] for r in row["compiled"]["rows"]] for row in data["configs"]] == [COMPILED_LABELS] * 2
    assert (tmp_path / "outputs/bench/e2e.png").stat().st_size > 0
    assert "hunyuan-768p-117f + torch.compile" in printed and "radial + torch.compile" in printed
    calls.clear()
    assert e2e.main(["--configs", configs, "--out", "plain"]) == 0
    assert calls == [("wan14b-768p-69f", False), ("hunyuan-768p-117f", False)]
    data = json.loads((tmp_path / "plain/e2e.json").read_text())
    assert not any("compiled" in row for row in data["configs"])
    assert "torch.compile" not in capsys.readouterr().out
    # a config without a radial preset (LTX) is left out of the default list and refused by name without --method
    calls.clear()
    assert e2e.main(["--out", "default"]) == 0
    assert [c for c, _ in calls] == [n for n, c in CONFIGS.items() if c.preset is not None]
    assert "ltx-704p-257f" not in [c for c, _ in calls]
    calls.clear()
    assert e2e.main(["--configs", "ltx-704p-257f", "--out", "ltx"]) == 2
    assert "no radial preset" in capsys.readouterr().err and not calls
    committed_results_unchanged()


def test_main_without_a_gpu_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(e2e.torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert e2e.main(["--compile"]) == 3
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        e2e.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--compile" in help_text and "default: outputs/bench" in help_text


def test_other_benchmarks_default_outside_the_source_tree() -> None:
    import inspect

    from accel.bench import multigpu

    assert 'default="outputs/bench"' in inspect.getsource(multigpu.main)
    script = (ROOT / "benchmarks" / "bench_radial_mask.py").read_text()
    assert 'default=os.path.join("outputs", "bench")' in script


def test_a_method_spec_replaces_the_radial_preset() -> None:
    from accel.methods.neighborhood import Neighborhood
    from accel.methods.pyramid import Pyramid

    cfg = CONFIGS["wan1.3b-768p-69f"]
    method, schedule = e2e.method_and_schedule(cfg, "preset:psa-wan2.1-1.3b")
    assert isinstance(method, Pyramid) and schedule.dense_steps > 0
    method, schedule = e2e.method_and_schedule(cfg, "neighborhood:kernel_size=7x15x26,dense_steps=3")
    assert isinstance(method, Neighborhood) and schedule.dense_steps == 3
    assert e2e.method_and_schedule(cfg) == radial_preset(cfg.preset)
    row = _fake_row("wan14b-768p-69f")
    row["method_name"] = "neighborhood"
    assert [r["label"] for r in table_rows(row)][2] == "neighborhood"
    assert e2e.sparse_attention_ms({"radial_ms": 3.0}) == 3.0 and e2e.sparse_attention_ms({"sparse_ms": 2.0}) == 2.0


def test_the_json_says_whether_the_token_order_runs_once_per_forward() -> None:
    """`token_stream` in the e2e JSON: a family with a token stream and a method with a token order (pyramid on
    Wan) reorders once per forward; a method without one (radial) does not."""
    import accel
    from accel.geometry import TokenLayout
    from accel.pipelines.tiny import build_tiny

    model = build_tiny("tiny-wan").transformer
    layout = TokenLayout(1, 3, 8, 8)
    assert e2e._has_token_stream(model, accel.Pyramid(), layout)
    assert not e2e._has_token_stream(model, radial_preset("wan2.1-1.3b")[0], layout)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # unpatched again


def test_every_config_s_latents_match_its_token_layout() -> None:
    """The inputs `accel bench e2e` builds hold as many tokens as the layout the methods plan for."""
    from accel.pipelines.models import layout_for_model

    for cfg in CONFIGS.values():
        layout = layout_for_model(cfg.family, cfg.frames, cfg.height, cfg.width)
        f, h, w = e2e.latent_grid(cfg)
        patch = cfg.model["patch_size"]
        p_t, p_h, p_w = patch if isinstance(patch, tuple) else (cfg.model.get("patch_size_t", 1), patch, patch)
        assert layout.grid == (f // p_t, h // p_h, w // p_w), cfg.name
    assert layout_for_model("ltx", 257, 704, 1216).video_tokens == 33 * 22 * 38


def test_ltx_runs_through_the_e2e_inputs_and_needs_a_method() -> None:
    """A shrunk LTX config (the e2e's own input builder, on the CPU): its forward takes the inputs, patched with
    pyramid it reorders once per forward (its token stream), and without --method it is refused, naming why."""
    import dataclasses

    import torch

    import accel
    from accel.methods.dense import Dense
    from accel.pipelines.models import layout_for_model

    full = CONFIGS["ltx-704p-257f"]
    cfg = dataclasses.replace(full, frames=9, height=64, width=96, text_tokens=5, model=dict(
        full.model, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16))
    model = e2e._build(cfg, {"num_layers": 1}, device="cpu")
    inputs = e2e._inputs(cfg, device="cpu")
    layout = layout_for_model(cfg.family, cfg.frames, cfg.height, cfg.width)
    assert inputs["hidden_states"].shape == (1, layout.video_tokens, 128)
    accel.patch(model, Dense())
    try:
        with torch.inference_mode():
            out = model(**inputs)[0]
    finally:
        accel.unpatch(model)
    assert out.shape == inputs["hidden_states"].shape and bool(torch.isfinite(out).all())
    assert e2e._has_token_stream(model, accel.Pyramid(block_size=32), layout)
    with pytest.raises(ValueError, match="no radial preset ships for ltx"):
        e2e.method_and_schedule(full)
