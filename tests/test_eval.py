"""Video metrics on known inputs, method specs, and `accel eval` end to end on the tiny Wan pipeline."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from accel.bench import method_label, parse_method_spec
from accel.bench.metrics import (
    infer_data_range,
    lpips_distance,
    lpips_status,
    mse,
    psnr,
    psnr_per_frame,
    relative_l2,
    ssim,
    ssim_map,
)
from accel.methods import Dense, Radial


def _video(frames: int = 3, height: int = 37, width: int = 29, lo: int = 0, hi: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi, size=(frames, height, width, 3)).astype(np.uint8)


def _smooth_video(frames: int = 2, height: int = 48, width: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([np.sin(x / 5.0), np.cos(y / 7.0), np.sin((x + y) / 9.0)], -1) * 0.4 + 0.5
    return np.stack([base] * frames)


# ------------------------------------------------------------------------------------------- PSNR
def test_identical_videos_give_inf_psnr_and_unit_ssim() -> None:
    a = _video()
    assert psnr(a, a.copy()) == math.inf
    assert ssim(a, a.copy()) == 1.0
    f = a.astype(np.float32) / 255
    assert psnr(f, f) == math.inf
    assert ssim(f, f) == 1.0
    assert all(p == math.inf for p in psnr_per_frame(a, a))


@pytest.mark.parametrize("d", [1, 4, 17, 60])
def test_psnr_of_exact_uniform_error_is_analytical(d: int) -> None:
    a = _video(lo=d, hi=256 - d)  # room for +/- d without clipping
    signs = np.where(np.random.default_rng(1).random(a.shape) < 0.5, -1, 1)
    b = (a.astype(np.int64) + d * signs).astype(np.uint8)
    assert mse(a, b) == d * d
    expected = 20 * math.log10(255 / d)
    print(f"d={d}: psnr={psnr(a, b):.6f}, expected {expected:.6f}")
    assert psnr(a, b) == pytest.approx(expected, abs=1e-9)
    # Float videos in [0, 1] with the same relative error give the same PSNR.
    assert psnr(a / 255.0, b / 255.0) == pytest.approx(expected, abs=1e-9)
    assert psnr(a.astype(np.float64), b.astype(np.float64), data_range=255) == pytest.approx(expected, abs=1e-9)
    assert psnr_per_frame(a, b) == pytest.approx([expected] * a.shape[0], abs=1e-9)


def test_single_frame_is_accepted_as_one_frame_video() -> None:
    a = _video(frames=1)
    b = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)
    assert psnr(a[0], b[0]) == pytest.approx(psnr(a, b))
    assert ssim(a[0], b[0]) == pytest.approx(ssim(a, b))


# ------------------------------------------------------------------------------------------- SSIM
def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Direct transcription of Wang et al.'s ssim_index.m: 11x11 Gaussian (1.5), 'valid' filtering."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()

    def filt(z: np.ndarray) -> np.ndarray:
        # MATLAB's filter2(w, z, 'valid'): the 2-D correlation of z with the full 11x11 window, written out
        # over every 11x11 patch (numpy only; independent of the separable torch conv2d under test).
        patches = np.lib.stride_tricks.sliding_window_view(z, w.shape)
        return np.einsum("ijkl,kl->ij", patches, w)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(smap.mean())


def test_ssim_matches_the_papers_formula_per_frame_and_channel() -> None:
    a = _video(frames=2, height=33, width=41)
    noise = np.random.default_rng(2).integers(-25, 26, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    per = ssim_map(a, b)
    assert per.shape == (2, 3)
    for f in range(2):
        for c in range(3):
            ref = _ssim_reference(a[f, :, :, c], b[f, :, :, c], 255.0)
            assert per[f, c] == pytest.approx(ref, abs=1e-10)
    assert ssim(a, b) == pytest.approx(per.mean(), abs=1e-12)


def test_ssim_decreases_with_noise() -> None:
    clean = _smooth_video()
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(clean.shape)
    values = [ssim(np.clip(clean + s * noise, 0, 1), clean, data_range=1.0) for s in (0.0, 0.01, 0.03, 0.1, 0.3)]
    print("ssim by noise level:", values)
    assert values[0] == 1.0
    assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False))
    psnrs = [psnr(np.clip(clean + s * noise, 0, 1), clean) for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(later < earlier for earlier, later in zip(psnrs, psnrs[1:], strict=False))


def test_ssim_handles_frames_smaller_than_the_window() -> None:
    a = _video(frames=1, height=6, width=9)
    assert ssim(a, a) == 1.0
    b = np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8)
    assert 0.0 < ssim(a, b) < 1.0


# ------------------------------------------------------------------------------------------- errors
def test_shape_and_type_errors() -> None:
    a = _video()
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:, :-1])
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[:2])
    with pytest.raises(ValueError, match=r"\(F, H, W, C\)"):
        psnr(a[..., 0], a[..., 0])
    with pytest.raises(ValueError, match=r"\(F, H, W, C\)"):
        ssim(a[None], a[None])
    with pytest.raises(ValueError, match=r"C in"):
        psnr(np.zeros((2, 4, 4, 5), np.uint8), np.zeros((2, 4, 4, 5), np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        psnr([[1, 2]], [[1, 2]])
    with pytest.raises(ValueError, match="uint8 or floating"):
        psnr(a.astype(np.int32), a.astype(np.int32))
    with pytest.raises(ValueError, match="data range"):
        psnr(a.astype(np.float32) * 4, a.astype(np.float32))
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, a, data_range=0)
    with pytest.raises(ValueError, match="equal shapes"):
        relative_l2(torch.zeros(3), torch.zeros(4))


def test_infer_data_range() -> None:
    assert infer_data_range(np.zeros(3, np.uint8), np.zeros(3, np.uint8)) == 255.0
    assert infer_data_range(np.full(3, 0.5), np.ones(3)) == 1.0
    assert infer_data_range(np.full(3, 7.0), np.ones(3)) == 255.0


def test_relative_l2() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert relative_l2(ref, ref) == 0.0
    assert relative_l2(torch.tensor([3.0, 0.0]), ref) == pytest.approx(4 / 5)
    assert relative_l2(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_l2(np.ones(2), np.zeros(2)) == math.inf


def test_lpips_is_none_with_a_reason_when_unavailable() -> None:
    ok, reason = lpips_status()
    a = _video(frames=1)
    if ok:
        assert lpips_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    else:
        print("LPIPS unavailable:", reason)
        assert reason
        assert lpips_distance(a, a) is None


# ------------------------------------------------------------------------------------------- specs
def test_parse_method_spec() -> None:
    spec = parse_method_spec("dense")
    assert isinstance(spec.method, Dense) and spec.label == "dense" and spec.schedule == {}
    spec = parse_method_spec("radial:decay=0.5,spatial=disk,decay_near=true,block_size=16,dense_steps=2")
    assert spec.method == Radial(decay=0.5, spatial="disk", decay_near=True, block_size=16)
    assert spec.schedule == {"dense_steps": 2}
    assert spec.label.startswith("radial:decay=0.5") and spec.label.endswith("|dense_steps=2")
    assert parse_method_spec(method_label(spec.method)).method == spec.method
    with pytest.raises(ValueError, match="unknown method"):
        parse_method_spec("pyramid-xyz")
    with pytest.raises(ValueError, match="has no option"):
        parse_method_spec("radial:window=3")
    with pytest.raises(ValueError, match="has no option"):
        parse_method_spec("radial:dense_steps=1", allow_schedule=False)
    with pytest.raises(ValueError, match="key=value"):
        parse_method_spec("radial:decay")
    with pytest.raises(ValueError, match="decay"):
        parse_method_spec("radial:decay=-1")
    with pytest.raises(TypeError):
        parse_method_spec(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- accel eval
def test_accel_eval_end_to_end_on_tiny_wan(tmp_path, capsys) -> None:
    from accel.bench.eval import add_eval_command

    parser = argparse.ArgumentParser(prog="accel")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "eval", "--steps", "2", "--seeds", "0", "1", "--warmup", "0", "--out", str(tmp_path), "--tag", "t",
        "--methods", "dense", "radial:decay=0.5,block_size=16",
        # every step dense: must reproduce the dense video exactly (PSNR inf)
        "radial:decay=0.5,block_size=16,dense_steps=2",
    ])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "PSNR" in printed and "radial:decay=0.5,block_size=16" in printed
    data = json.loads((tmp_path / "eval_t.json").read_text())
    assert (tmp_path / "eval_t.png").stat().st_size > 0
    assert data["benchmark"] == "eval" and data["model"] == "tiny-wan" and data["seeds"] == [0, 1]
    assert data["settings"]["num_inference_steps"] == 2
    assert data["metrics"]["lpips"]["available"] in (True, False)
    assert data["environment"]["torch"] == torch.__version__
    by = {m["method"]: m for m in data["methods"]}
    assert list(by) == ["dense", "radial:decay=0.5,block_size=16", "radial:decay=0.5,block_size=16|dense_steps=2"]
    dense, sparse, all_dense = by.values()
    assert dense["reference"] and dense["psnr"] is None and dense["density"] == 1.0
    assert sparse["density"] < 1.0 and sparse["seconds_median"] > 0 and sparse["speedup_vs_dense"] > 0
    assert 5.0 < sparse["psnr"]["mean"] < math.inf
    assert 0.0 < sparse["ssim"]["mean"] < 1.0
    assert all_dense["psnr"]["mean"] == math.inf and all_dense["ssim"]["mean"] == 1.0
    assert all_dense["schedule"]["dense_steps"] == 2 and all_dense["density"] == 1.0
    assert len(data["samples"]) == 6
    for row in data["samples"]:
        assert {"method", "seed", "seconds", "density", "psnr", "ssim", "lpips"} <= set(row)


def test_run_eval_rejects_bad_arguments() -> None:
    from accel.bench.eval import run_eval

    with pytest.raises(ValueError, match="at least one"):
        run_eval(["dense"], seeds=(), out_dir=None)
    with pytest.raises(ValueError, match="unique"):
        run_eval(["radial:decay=0.5", "radial:decay=0.5"], out_dir=None)
    with pytest.raises(TypeError):
        run_eval([3.0], out_dir=None)  # type: ignore[list-item]


def test_accel_eval_writes_under_outputs_by_default(tmp_path, monkeypatch, capsys, committed_results_unchanged) -> None:
    """Without --out, `accel eval` writes to outputs/eval/ of the current directory, never benchmarks/results/."""
    from accel.bench.eval import DEFAULT_OUT
    from accel.cli import main

    assert DEFAULT_OUT == Path("outputs/eval") and not DEFAULT_OUT.is_absolute()
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "default: outputs/eval" in " ".join(capsys.readouterr().out.split())
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--steps", "1", "--seeds", "0", "--warmup", "0", "--methods", "dense"]) == 0
    assert "outputs/eval/eval.json" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["outputs/eval/eval.json", "outputs/eval/eval.png"]
    assert json.loads((tmp_path / "outputs/eval/eval.json").read_text())["benchmark"] == "eval"
    committed_results_unchanged()
