"""The attention fidelity benchmark on tiny shapes: inputs, errors, band-vs-disk analysis, JSON, CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from accel.bench.fidelity import (
    DEFAULT_FAMILIES,
    FAMILIES,
    InputFamily,
    apply_rope,
    attention_profile,
    compare_spatial,
    default_methods,
    make_inputs,
    parse_family_spec,
    rope_angles,
    run_fidelity,
    smooth_field,
    spatial_verdict,
    wan_rope_split,
)
from accel.methods import Dense, Radial

GRID = (5, 16, 16)  # 256 tokens per frame: the smallest frame where radial windows are not all thinned away
FAMILY = FAMILIES["wan-rope"]
CONTROL = FAMILIES["iid-gaussian"]


# ------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("head_dim", [32, 128])
def test_rope_matches_diffusers_wan_rotary_embedding(head_dim: int) -> None:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    grid = (3, 4, 6)
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)
    cos, sin = rope(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))
    x = torch.randn(1, math.prod(grid), 2, head_dim, dtype=torch.float64)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2].double(), sin[..., 1::2].double()
    expected = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    got = apply_rope(x, rope_angles(grid, head_dim))
    print("max |diff| vs diffusers:", (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # diffusers stores cos/sin in float32
    t, h, w = wan_rope_split(head_dim)
    assert (t, h, w) == (rope.t_dim, rope.h_dim, rope.w_dim)


def test_make_inputs_shapes_determinism_and_temperature() -> None:
    q, k, v = make_inputs(FAMILY, GRID, 2, 32, seed=3)
    assert q.shape == k.shape == v.shape == (1, math.prod(GRID), 2, 32)
    assert q.dtype == torch.float32
    q2, k2, v2 = make_inputs(FAMILY, GRID, 2, 32, seed=3)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    q3, _, _ = make_inputs(FAMILY, GRID, 2, 32, seed=4)
    assert not torch.equal(q, q3)
    # RoPE is a rotation: k keeps unit RMS per (token, head); q carries sqrt(128 / D) / temperature.
    torch.testing.assert_close(k.pow(2).mean(-1), torch.ones(k.shape[:3]), rtol=1e-5, atol=1e-5)
    scale = math.sqrt(128 / 32) / FAMILY.temperature
    torch.testing.assert_close(q.pow(2).mean(-1).sqrt(), torch.full(q.shape[:3], scale), rtol=1e-5, atol=1e-5)


def test_smooth_field_is_unit_variance_local_and_does_not_wrap() -> None:
    gen = torch.Generator().manual_seed(0)
    grid = (12, 10, 10)
    f = smooth_field(grid, 512, (1.0, 2.0, 2.0), gen).view(*grid, 512)
    assert f.std(dim=(0, 1, 2)).mean().item() == pytest.approx(1.0, abs=1e-3)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).mean() / (a.std() * b.std()))

    near, far, wrap = corr(f[5], f[6]), corr(f[2], f[9]), corr(f[0], f[-1])
    print(f"frame correlation: adjacent {near:.3f}, 7 apart {far:.3f}, first-last {wrap:.3f}")
    assert near > 0.5 and abs(far) < 0.1 and abs(wrap) < 0.1


def test_structured_attention_is_local_and_controls_are_not() -> None:
    profiles = {}
    for fam in (FAMILY, CONTROL):
        q, k, _ = make_inputs(fam, GRID, 2, 32, seed=0)
        profiles[fam.name] = p = attention_profile(q, k, GRID, queries=128)
        assert sum(p["mass_by_frame_distance"]) == pytest.approx(1.0, abs=1e-5)
        assert p["mass_within_radius"]["32"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < p["mean_entropy_ratio"] <= 1.0
    near = {n: p["mass_by_frame_distance"][0] + p["mass_by_frame_distance"][1] for n, p in profiles.items()}
    print("mass within one frame:", near)
    uniform = (GRID[0] + 2 * (GRID[0] - 1)) / GRID[0] ** 2  # mass within one frame under uniform attention
    assert near[FAMILY.name] > 0.8 and near[CONTROL.name] < uniform + 0.05
    assert profiles[FAMILY.name]["mass_within_radius"]["2"] > 3 * profiles[CONTROL.name]["mass_within_radius"]["2"]


def test_family_specs_and_validation() -> None:
    assert parse_family_spec("wan-rope") == FAMILY
    fam = parse_family_spec("wan-rope:temperature=0.3")
    assert fam.temperature == 0.3 and fam.rope_theta == FAMILY.rope_theta and fam.name == "wan-rope:temperature=0.3"
    fam = parse_family_spec("rope:rope_theta=1000,noise=0.5")
    assert fam.kind == "rope" and fam.rope_theta == 1000.0 and fam.noise == 0.5
    assert parse_family_spec("gaussian:temperature=2").kind == "gaussian"
    with pytest.raises(ValueError, match="unknown input family"):
        parse_family_spec("sinusoid")
    with pytest.raises(ValueError, match="key=value"):
        parse_family_spec("rope:colour=1")
    with pytest.raises(ValueError, match="temperature"):
        InputFamily("x", temperature=0)
    with pytest.raises(ValueError, match="kind"):
        InputFamily("x", kind="uniform")  # type: ignore[arg-type]
    assert len({f.name for f in DEFAULT_FAMILIES}) == len(DEFAULT_FAMILIES)
    assert any(not f.structured for f in DEFAULT_FAMILIES) and any(f.structured for f in DEFAULT_FAMILIES)


# ------------------------------------------------------------------------------------------- benchmark
def test_fidelity_end_to_end_tiny(tmp_path) -> None:
    methods = [Dense()] + [Radial(decay=d, block_size=16, decay_near=True, spatial=s)
                           for s in ("band", "disk") for d in (0.05, 0.2, 0.5, 1.0, 4.0)]
    result = run_fidelity(methods, [FAMILY, CONTROL], grid=GRID, heads=2, head_dim=32, seeds=(0, 1),
                          device="cpu", out_dir=tmp_path, tag="tiny", profile_queries=64)
    data = json.loads((tmp_path / "fidelity_tiny.json").read_text())
    assert (tmp_path / "fidelity_tiny.png").stat().st_size > 0
    assert data["benchmark"] == "fidelity" and data["config"]["grid"] == list(GRID)
    assert {"environment", "device", "config", "families", "results", "band_vs_disk"} <= set(data)
    assert [f["name"] for f in data["families"]] == [FAMILY.name, CONTROL.name]
    assert data["families"][0]["attention_profile"]["queries"] == 64
    rows = data["results"]
    assert len(rows) == 2 * len(methods)
    for row in rows:
        assert {"family", "method", "series", "density", "rel_l2", "rel_l2_std", "rel_l2_per_seed",
                "evaluated_by", "config"} <= set(row)
        assert len(row["rel_l2_per_seed"]) == 2
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(r["rel_l2"] == 0.0 and r["density"] == 1.0 for r in dense)
    # Error falls as the radial mask gets denser (decay grows), on structured inputs, in each series.
    for series in ("radial:block_size=16,decay_near=True", "radial:block_size=16,spatial=disk,decay_near=True"):
        pts = sorted((r["density"], r["rel_l2"]) for r in rows if r["series"] == series and r["structured"])
        print(series, pts)
        assert pts[0][0] < pts[-1][0]
        for (d0, e0), (d1, e1) in zip(pts, pts[1:], strict=False):
            assert e1 <= e0 * (1 + 1e-6), f"error rose from {e0} to {e1} as density went {d0} -> {d1}"
    # Sparse masks are much more accurate on local inputs than on iid controls; a full one is exact.
    by = {(r["family"], r["method"]): r for r in rows}
    for (family, label), row in by.items():
        if family == FAMILY.name and row["density"] < 1.0:
            assert row["rel_l2"] < 0.5 * by[(CONTROL.name, label)]["rel_l2"]
        elif row["density"] == 1.0:
            assert row["rel_l2"] < 1e-6
    # Identical masks are evaluated once and say so.
    assert result["band_vs_disk"] and {c["decay_near"] for c in result["band_vs_disk"]} == {True}


def test_dense_equivalent_radial_gives_zero_error_through_the_kernel() -> None:
    # Two frames of 256 tokens: every pair is at distance <= 1 and unthinned, so the mask is full.
    result = run_fidelity([Radial(decay=0.2, block_size=16)], [FAMILY], grid=(2, 16, 16), heads=1, head_dim=16,
                          seeds=(0,), device="cpu", evaluate="attend", out_dir=None, profile_queries=0)
    radial = next(r for r in result["results"] if r["method_name"] == "radial")
    print("dense-equivalent radial:", radial["density"], radial["rel_l2"])
    assert radial["density"] == 1.0 and radial["evaluated_by"] == "attend"
    assert radial["rel_l2"] < 1e-5


def test_mask_evaluation_matches_the_kernel() -> None:
    method = Radial(decay=0.5, block_size=16, decay_near=True, spatial="disk")
    kwargs = dict(grid=(4, 8, 16), heads=1, head_dim=16, seeds=(0,), device="cpu", out_dir=None, profile_queries=0)
    by_mask = run_fidelity([method], [FAMILY], evaluate="mask", **kwargs)["results"][1]
    by_kernel = run_fidelity([method], [FAMILY], evaluate="attend", **kwargs)["results"][1]
    print("mask vs kernel:", by_mask["rel_l2"], by_kernel["rel_l2"], by_mask["density"])
    assert by_mask["evaluated_by"] == "mask" and by_kernel["evaluated_by"] == "attend"
    assert 0.0 < by_mask["density"] < 1.0
    assert by_kernel["rel_l2"] == pytest.approx(by_mask["rel_l2"], rel=1e-4, abs=1e-6)


def test_run_fidelity_validates_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        run_fidelity([Dense()], [FAMILY], grid=(2, 4, 4), dtype=torch.int8, out_dir=None)
    with pytest.raises(ValueError, match="evaluate"):
        run_fidelity([Dense()], [FAMILY], grid=(2, 4, 4), evaluate="fast", out_dir=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        run_fidelity([Dense()], [FAMILY], grid=(2, 4, 4), labels=["a", "b"], out_dir=None)
    with pytest.raises(TypeError, match="AttentionMethod"):
        run_fidelity([Dense(), "radial"], [FAMILY], grid=(2, 4, 4), out_dir=None)  # type: ignore[list-item]


def test_default_methods_cover_band_disk_and_decay_near() -> None:
    methods = default_methods((0.2, 1.0), block_size=16)
    assert isinstance(methods[0], Dense) and len(methods) == 1 + 2 * 2 * 2
    radial = methods[1:]
    assert {(m.spatial, m.decay_near) for m in radial} == {("band", False), ("band", True), ("disk", False),
                                                            ("disk", True)}


# ------------------------------------------------------------------------------------------- analysis
def _row(family: str, spatial: str, density: float, err: float, structured: bool = True) -> dict:
    return {"family": family, "structured": structured, "method_name": "radial", "density": density,
            "rel_l2": err, "config": {"spatial": spatial, "decay_near": False, "sink": True, "block_size": 16}}


def test_compare_spatial_at_matched_density() -> None:
    rows = [_row("f", "band", d, e) for d, e in ((0.2, 0.4), (0.4, 0.2), (0.8, 0.05))]
    rows += [_row("f", "disk", d, e) for d, e in ((0.3, 0.14), (0.6, 0.05))]
    rows += [_row("g", "band", d, e, False) for d, e in ((0.2, 1.0), (0.8, 0.5))]
    rows += [_row("g", "disk", d, e, False) for d, e in ((0.2, 1.0), (0.8, 0.5))]
    out = {c["family"]: c for c in compare_spatial(rows)}
    f = out["f"]
    # band at 0.3 is the geometric mean of 0.4 and 0.2; disk beats band there and at 0.6.
    band_at_03 = next(p["band"] for p in f["points"] if p["measured"] == "disk" and p["density"] == 0.3)
    assert band_at_03 == pytest.approx(math.sqrt(0.4 * 0.2))
    assert f["better"] == "disk" and f["ratio_disk_over_band"] < 1 and f["disk_lower_fraction"] == 1.0
    assert out["g"]["better"] == "tie" and out["g"]["ratio_disk_over_band"] == pytest.approx(1.0)
    verdict = spatial_verdict(list(out.values()))
    assert verdict["better"] == "disk" and verdict["comparisons"] == 1


# ------------------------------------------------------------------------------------------- CLI
def test_fidelity_cli(tmp_path, capsys) -> None:
    from accel.bench.fidelity import add_fidelity_command

    parser = argparse.ArgumentParser(prog="accel bench")
    add_fidelity_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "fidelity", "--device", "cpu", "--grid", "3", "16", "16", "--heads", "1", "--head-dim", "16",
        "--seeds", "1", "--families", "wan-rope", "gaussian:temperature=0.5", "--decays", "0.5", "2",
        "--profile-queries", "32", "--out", str(tmp_path), "--no-plot",
    ])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "band vs disk" in printed and "wan-rope" in printed
    data = json.loads((tmp_path / "fidelity.json").read_text())
    assert not (tmp_path / "fidelity.png").exists()
    assert data["config"]["head_dim"] == 16 and len(data["results"]) == 2 * (1 + 8)
    args = parser.parse_args(["fidelity", "--device", "cpu", "--grid", "2", "8", "8", "--seeds", "1",
                              "--methods", "dense", "radial:decay=0.5,block_size=16", "--families", "wan-rope",
                              "--out", str(tmp_path), "--tag", "m"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "fidelity_m.json").read_text())
    assert [r["method"] for r in data["results"]] == ["dense", "radial:decay=0.5,block_size=16"]
    assert (tmp_path / "fidelity_m.png").exists()


def test_fidelity_cli_writes_under_outputs_by_default(tmp_path, monkeypatch, capsys,
                                                      committed_results_unchanged) -> None:
    """Without --out, `accel bench fidelity` writes to outputs/bench/ of the current directory."""
    from accel.bench.fidelity import DEFAULT_OUT
    from accel.cli import main

    assert DEFAULT_OUT == Path("outputs/bench") and not DEFAULT_OUT.is_absolute()
    with pytest.raises(SystemExit):
        main(["bench", "fidelity", "--help"])
    assert "default: outputs/bench" in " ".join(capsys.readouterr().out.split())
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "fidelity", "--device", "cpu", "--grid", "2", "8", "8", "--heads", "1", "--head-dim", "16",
                 "--seeds", "1", "--methods", "dense", "radial:decay=0.5,block_size=16", "--families", "wan-rope",
                 "--profile-queries", "16"]) == 0
    assert "outputs/bench/fidelity.json" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["outputs/bench/fidelity.json", "outputs/bench/fidelity.png"]
    committed_results_unchanged()


def test_named_series_group_specs_on_one_plot_line() -> None:
    from accel.bench.fidelity import split_series

    assert split_series("binary=pyramid:mode=topk,t1=0.2") == ("binary", "pyramid:mode=topk,t1=0.2")
    assert split_series("radial:decay=0.2") == (None, "radial:decay=0.2")
    assert split_series("dense") == (None, "dense")
    with pytest.raises(ValueError, match="empty series name"):
        split_series("=radial")
