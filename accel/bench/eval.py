"""`accel eval`: generation quality and time of sparse-attention configs against dense attention.

For one pipeline (the built-in ``tiny-wan`` by default, or any model `load_pipeline` accepts), every
(prompt, seed) sample is generated with dense attention and with each method config, at the same
seed and settings. Each sparse video is scored against the dense video of its sample: PSNR (whole
video), SSIM (Wang et al. 2004) and LPIPS when the ``lpips`` package and its weights are present
locally (never downloaded). Time per video and mean tile density come from `run_generation`.

Timing: ``warmup`` untimed generations per method run first (plan building, kernel compilation,
lazy imports), then the samples run method after method for each sample, so drift hits every method
alike. Times are per whole generation (text encoding, denoising, VAE decode). CPU times are not
benchmarks (see BENCHMARKS.md); they are recorded for completeness.

Results: ``<out>/eval[_<tag>].json`` (every per-sample number, settings, versions, git commit) and
``.png`` (PSNR and SSIM vs time and vs tile density). ``<out>`` defaults to ``outputs/eval`` in the current
directory; the committed results in ``benchmarks/results/`` are written only with ``--out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from accel.bench import MethodSpec, environment, method_label, parse_method_spec
from accel.bench.metrics import lpips_distance, lpips_status, psnr, ssim
from accel.bench.plotting import save_figure
from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.schedule import Schedule

logger = logging.getLogger("accel")

DEFAULT_OUT = Path("outputs/eval")
"""Default output folder, relative to the current directory (outside the source tree). The committed results in
``benchmarks/results/`` are only written with an explicit ``--out benchmarks/results``."""
DEFAULT_PROMPTS = ("a dog running on the beach at sunset",)
DEFAULT_METHODS = ("dense", "radial:decay=0.2", "radial:decay=0.2,spatial=disk")


def _as_spec(item: str | AttentionMethod | MethodSpec, schedule: Schedule | None) -> tuple[str, AttentionMethod,
                                                                                         Schedule | None]:
    if isinstance(item, str):
        item = parse_method_spec(item)
    if isinstance(item, MethodSpec):
        base = schedule or Schedule()
        sched = dataclasses.replace(base, **item.schedule) if item.schedule else schedule
        return item.label, item.method, None if isinstance(item.method, Dense) else sched
    if isinstance(item, AttentionMethod):
        return method_label(item), item, None if isinstance(item, Dense) else schedule
    raise TypeError(f"methods must be spec strings, MethodSpec or AttentionMethod configs, got {type(item).__name__}")


def _stats(values: list[float | None]) -> dict[str, float | None]:
    """mean/std/min/max over samples; a PSNR of +inf (identical videos) makes the mean +inf, std None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None}
    if any(math.isinf(v) for v in vals):
        return {"mean": math.inf, "std": None, "min": min(vals), "max": max(vals)}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.pstdev(vals),
        "min": min(vals),
        "max": max(vals),
    }


def run_eval(
    methods: Sequence[str | AttentionMethod | MethodSpec] = DEFAULT_METHODS,
    *,
    model: str = "tiny-wan",
    pipe: Any = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    seeds: Sequence[int] = (0, 1),
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    schedule: Schedule | None = None,
    on_unsupported: str = "error",
    warmup: int = 1,
    device: torch.device | str | None = None,
    out_dir: str | Path | None = DEFAULT_OUT,
    tag: str | None = None,
    plot: bool = True,
    save_videos: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Generate each (prompt, seed) sample dense and with each method; score against dense.

    Args:
        methods: spec strings (``"radial:decay=0.5,spatial=disk,dense_steps=1"``), `MethodSpec`s or
            method configs. The dense reference always runs; listing ``"dense"`` only adds its row.
        model: tiny model name, local diffusers folder or Hub id (`load_pipeline`); also used to fill
            defaults (frames, size, steps) for tiny models.
        pipe: an already loaded pipeline for ``model`` (skips loading).
        prompts, seeds: the samples are every (prompt, seed) pair.
        steps, frames, height, width, guidance_scale, negative_prompt: generation settings (None =
            the model's default).
        schedule: default `Schedule` of sparse methods (a spec's dense_steps/... override it).
        on_unsupported: "error" or "dense" (see `accel.patch`).
        warmup: untimed generations per method before the timed ones (0 for big models).
        device: where to load the model (default CUDA when available); ignored with ``pipe``.
        out_dir: folder for ``eval[_tag].json``/``.png`` (and mp4s with ``save_videos``); None: no files.

    Returns:
        The JSON-ready dict: ``methods`` (aggregates per method) and ``samples`` (per-sample rows).
    """
    from accel.pipelines.generate import GenerationRequest, load_pipeline, run_generation, write_video

    if not prompts or not seeds:
        raise ValueError(f"need at least one prompt and one seed, got prompts={list(prompts)}, seeds={list(seeds)}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    configs = [_as_spec(m, schedule) for m in methods]
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}")
    dense_index = next((i for i, c in enumerate(configs) if isinstance(c[1], Dense) and c[2] is None), None)
    if dense_index is None:
        configs.insert(0, ("dense", Dense(), None))
        dense_index = 0
    else:
        configs.insert(0, configs.pop(dense_index))
    started = time.perf_counter()
    if pipe is None:
        pipe = load_pipeline(model, device=torch.device(device) if device is not None else None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    lpips_ok, lpips_reason = lpips_status()
    out = Path(out_dir) if out_dir is not None else None
    stem = "eval" + (f"_{tag}" if tag else "")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def request(prompt: str, seed: int) -> GenerationRequest:
        return GenerationRequest(
            model=model, prompt=prompt, negative_prompt=negative_prompt, frames=frames, height=height,
            width=width, steps=steps, seed=seed, guidance_scale=guidance_scale,
        )

    def generate(method: AttentionMethod, sched: Schedule | None, req: GenerationRequest):
        return run_generation(pipe, req, method=method, schedule=sched, on_unsupported=on_unsupported)

    for label, method, sched in configs:
        for _ in range(warmup):
            generate(method, sched, request(prompts[0], seeds[0]))
        if warmup and verbose:
            print(f"warmed up {label}", flush=True)

    samples: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    for p_index, prompt in enumerate(prompts):
        for seed in seeds:
            reference = None
            for label, method, sched in configs:
                result = generate(method, sched, request(prompt, seed))
                settings = settings or result.settings
                row: dict[str, Any] = {
                    "method": label, "prompt_index": p_index, "seed": seed, "seconds": result.seconds,
                    "density": result.stats.mean_density(), "attention_calls": result.stats.calls,
                    "sparse_calls": result.stats.sparse_calls, "fallbacks": dict(result.stats.fallbacks),
                    "peak_memory_bytes": result.peak_memory_bytes, "frames_shape": list(result.frames.shape),
                }
                if reference is None:
                    reference = result.frames
                    row.update(psnr=None, ssim=None, lpips=None, reference=True)
                else:
                    if result.frames.shape != reference.shape:
                        raise ValueError(f"{label} produced frames {result.frames.shape}, dense {reference.shape}")
                    row.update(
                        psnr=psnr(result.frames, reference), ssim=ssim(result.frames, reference),
                        lpips=lpips_distance(result.frames, reference) if lpips_ok else None, reference=False,
                    )
                if save_videos and out is not None:
                    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)
                    write_video(result.frames, out / f"{stem}_{safe}_p{p_index}_s{seed}.mp4", result.fps)
                samples.append(row)
                if verbose:
                    quality = "" if row["reference"] else f", PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}"
                    print(f"  prompt {p_index} seed {seed} {label}: {result.seconds:.2f} s, density "
                          f"{row['density']:.3f}{quality}", flush=True)

    dense_label = configs[0][0]
    dense_times = [s["seconds"] for s in samples if s["method"] == dense_label]
    dense_median = statistics.median(dense_times)
    summary = []
    for label, method, sched in configs:
        rows = [s for s in samples if s["method"] == label]
        secs = [s["seconds"] for s in rows]
        median = statistics.median(secs)
        entry = {
            "method": label,
            "method_name": method.name,
            "config": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                       for k, v in dataclasses.asdict(method).items()},
            "schedule": dataclasses.asdict(sched) if sched is not None else None,
            "reference": label == dense_label,
            "seconds_median": median,
            "seconds": _stats(secs),
            "speedup_vs_dense": dense_median / median if median > 0 else None,
            "density": statistics.fmean(s["density"] for s in rows),
            "fallbacks": sum(sum(s["fallbacks"].values()) for s in rows),
            "psnr": _stats([s["psnr"] for s in rows]) if label != dense_label else None,
            "ssim": _stats([s["ssim"] for s in rows]) if label != dense_label else None,
            "lpips": _stats([s["lpips"] for s in rows]) if label != dense_label and lpips_ok else None,
        }
        summary.append(entry)

    result: dict[str, Any] = {
        "benchmark": "eval",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(),
        "device": str(getattr(pipe, "device", "cpu")),
        "model": model,
        "prompts": list(prompts),
        "seeds": list(seeds),
        "settings": settings,
        "warmup": warmup,
        "on_unsupported": on_unsupported,
        "metrics": {
            "psnr": "dB over the whole video (MSE pooled over frames, pixels, channels), vs the dense video",
            "ssim": "Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), per frame and channel, averaged",
            "lpips": {"available": lpips_ok, "reason": lpips_reason},
            "seconds": "wall time of one whole generation (run_generation), after warmup",
        },
        "methods": summary,
        "samples": samples,
        "seconds": time.perf_counter() - started,
    }
    if out is not None:
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        result["json_path"] = str(out / f"{stem}.json")
        if plot:
            result["png_path"] = str(plot_eval(result, out / f"{stem}.png"))
    return result


def format_table(result: dict[str, Any]) -> str:
    """One line per method: density, median time, speedup, PSNR, SSIM (mean +- std over samples)."""
    def cell(stats: dict | None, fmt: str) -> str:
        if not stats or stats["mean"] is None:
            return "-"
        if math.isinf(stats["mean"]):
            return "inf"
        if stats["std"] is None:
            return f"{stats['mean']:{fmt}}"
        return f"{stats['mean']:{fmt}} +- {stats['std']:{fmt}}"

    width = max(len(m["method"]) for m in result["methods"]) + 2
    head = f"{'method':<{width}}{'density':>8} {'time s':>9} {'speedup':>8} {'PSNR dB':>16} {'SSIM':>18} {'LPIPS':>16}"
    lines = [head, "-" * len(head)]
    for m in result["methods"]:
        ref = " (reference)" if m["reference"] else ""
        lines.append(
            f"{m['method']:<{width}}{m['density']:>8.3f} {m['seconds_median']:>9.3f} {m['speedup_vs_dense']:>7.2f}x "
            f"{cell(m['psnr'], '.2f'):>16} {cell(m['ssim'], '.4f'):>18} {cell(m['lpips'], '.4f'):>16}{ref}"
        )
    lp = result["metrics"]["lpips"]
    if not lp["available"]:
        lines.append(f"LPIPS not computed: {lp['reason']}")
    return "\n".join(lines)


def plot_eval(result: dict[str, Any], path: str | Path) -> Path:
    """PSNR and SSIM against time per video and against tile density (mean +- std over samples)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), dpi=120)
    methods = [m for m in result["methods"] if not m["reference"]]
    dense = next(m for m in result["methods"] if m["reference"])
    panels = [("psnr", "PSNR vs dense (dB)"), ("ssim", "SSIM vs dense")]
    for row, (metric, ylabel) in enumerate(panels):
        for col, (xkey, xlabel) in enumerate((("seconds_median", "seconds per video (median)"),
                                              ("density", "mean tile density"))):
            ax = fig.add_subplot(2, 2, 2 * row + col + 1)
            for i, m in enumerate(methods):
                stats = m[metric]
                if not stats or stats["mean"] is None or math.isinf(stats["mean"]):
                    continue
                ax.errorbar(m[xkey], stats["mean"], yerr=stats["std"] or 0.0, fmt="o", color=f"C{i % 10}",
                            label=m["method"], capsize=3)
                ax.annotate(m["method"], (m[xkey], stats["mean"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
            ax.axvline(dense[xkey], color="k", ls="--", lw=0.8, label="dense")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    s = result["settings"]
    fig.suptitle(
        f"{result['model']} on {result['device']}: {s.get('num_frames', 1)} frames {s.get('height')}x{s.get('width')}, "
        f"{s.get('num_inference_steps')} steps, {len(result['prompts'])} prompt(s) x {len(result['seeds'])} seed(s)",
        fontsize=9,
    )
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------- CLI
def add_eval_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` (``accel eval``) on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="quality (PSNR/SSIM/LPIPS vs dense) and time of sparse-attention configs",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="tiny-wan", help="tiny-* built-in model, local diffusers folder or Hub id")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="SPEC",
                   help="method specs: dense, radial:decay=0.2, radial:decay=0.5,spatial=disk,dense_steps=2 ... "
                        "(dense always runs as the reference)")
    p.add_argument("--prompt", dest="prompts", action="append", help="prompt (repeat for several)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (each prompt runs at each seed)")
    p.add_argument("--steps", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--negative-prompt")
    p.add_argument("--dense-steps", type=int, default=0, help="first N steps dense (sparse methods; spec overrides)")
    p.add_argument("--dense-last-steps", type=int, default=0, help="last M steps dense")
    p.add_argument("--dense-layers", type=int, default=0, help="first N layers dense")
    p.add_argument("--on-unsupported", choices=("error", "dense"), default="error")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per method first (0 for big models)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder for eval[_TAG].json/.png (default: %(default)s, relative to the current "
                        "directory; the committed results are updated only with --out benchmarks/results)")
    p.add_argument("--tag", help="suffix of the output file names")
    p.add_argument("--save-videos", action="store_true", help="also write every video as mp4")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    schedule = Schedule(dense_steps=args.dense_steps, dense_last_steps=args.dense_last_steps,
                        dense_layers=args.dense_layers)
    specs = [parse_method_spec(s) for s in args.methods]
    result = run_eval(
        specs, model=args.model, prompts=tuple(args.prompts or DEFAULT_PROMPTS), seeds=tuple(args.seeds),
        steps=args.steps, frames=args.frames, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, schedule=schedule,
        on_unsupported=args.on_unsupported, warmup=args.warmup, device=args.device, out_dir=args.out,
        tag=args.tag, plot=not args.no_plot, save_videos=args.save_videos,
    )
    print(format_table(result))
    print(f"wrote {result['json_path']}" + (f" and {result['png_path']}" if "png_path" in result else ""))
    return 0


__all__ = ["DEFAULT_METHODS", "add_eval_command", "cmd_eval", "format_table", "plot_eval", "run_eval"]
