"""Whole-transformer timing of full-size configs with random bf16 weights: dense (cuDNN SDPA) vs a sparse method.

For each configuration this measures, on one GPU and in one run:
- attention alone at the model's shape: dense cuDNN SDPA, our sparse kernel, and compiled
  `flex_attention` over the same block mask;
- the transformer forward with every layer dense and with every layer sparse, at two reduced layer
  counts of the full-width model. Layers of one kind cost the same, so the two counts give the per-layer
  time and the fixed overhead exactly (a straight line), and the full-depth forward and a 50-step
  schedule (dense first steps and dense layers as the preset says) follow from them. This is stated in
  the JSON as `extrapolated_from_layers`; configs small enough run at full depth as a check.

Run on a GPU: `python -m accel.bench.e2e --out benchmarks/results` (`accel bench e2e`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.bench.plotting import save_figure

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
HUNYUAN = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)


@dataclass(frozen=True)
class E2EConfig:
    name: str
    family: str  # "wan" | "hunyuan_video"
    model: dict
    frames: int
    height: int
    width: int
    preset: str
    forwards_per_step: int  # 2 with classifier-free guidance as two passes (Wan), 1 with embedded guidance
    text_tokens: int
    reference_speedup: float | None = None  # what the reference system reported on this shape, if anything
    full_depth: bool = False  # also run the real depth as a check of the extrapolation
    steps: int = 50
    extra: dict = field(default_factory=dict)


CONFIGS: dict[str, E2EConfig] = {
    c.name: c
    for c in (
        E2EConfig("wan1.3b-480p-81f", "wan", WAN_1_3B, 81, 480, 832, "wan2.1-1.3b", 2, 512, full_depth=True),
        E2EConfig("wan14b-768p-69f", "wan", WAN_14B, 69, 768, 1280, "wan2.1-14b", 2, 512, reference_speedup=1.8),
        E2EConfig("wan14b-720p-81f", "wan", WAN_14B, 81, 720, 1280, "wan2.1-14b", 2, 512),
        E2EConfig("wan14b-720p-161f", "wan", WAN_14B, 161, 720, 1280, "wan2.1-2x", 2, 512),
        E2EConfig("wan14b-720p-321f", "wan", WAN_14B, 321, 720, 1280, "wan2.1-4x", 2, 512, reference_speedup=3.7),
        E2EConfig("hunyuan-768p-117f", "hunyuan_video", HUNYUAN, 117, 768, 1280, "hunyuan-video", 1, 256,
                  reference_speedup=1.9),
        E2EConfig("hunyuan-720p-129f", "hunyuan_video", HUNYUAN, 129, 720, 1280, "hunyuan-video", 1, 256),
    )
}


def _median_ms(fn, warmup: int = 1, reps: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _build(cfg: E2EConfig, depth: dict[str, int]) -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if cfg.family == "wan" else HunyuanVideoTransformer3DModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # create weights in bf16 directly (a 14B model in fp32 would not fit)
    try:
        with torch.device("cuda"):
            model = cls(**{**cfg.model, **depth})
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _inputs(cfg: E2EConfig) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    latent_frames = (cfg.frames - 1) // 4 + 1
    shape = (1, 16, latent_frames, cfg.height // 8, cfg.width // 8)
    kw: dict[str, Any] = dict(
        hidden_states=torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen),
        timestep=torch.tensor([500], device="cuda"),
        encoder_hidden_states=torch.randn(
            1, cfg.text_tokens, 4096, device="cuda", dtype=torch.bfloat16, generator=gen
        ),
        return_dict=False,
    )
    if cfg.family == "hunyuan_video":
        kw["encoder_attention_mask"] = torch.ones(1, cfg.text_tokens, device="cuda", dtype=torch.bool)
        kw["pooled_projections"] = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
        kw["guidance"] = torch.tensor([6000.0], device="cuda", dtype=torch.bfloat16)
    return kw


def _depths(cfg: E2EConfig) -> list[dict[str, int]]:
    if cfg.family == "wan":
        return [{"num_layers": 2}, {"num_layers": 4}]
    return [{"num_layers": 2, "num_single_layers": 2}, {"num_layers": 4, "num_single_layers": 2},
            {"num_layers": 2, "num_single_layers": 4}]


def _time_forward(model: torch.nn.Module, inputs: dict, method, schedule, sdpa_backend=None) -> float:
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    import accel

    accel.patch(model, method, schedule=schedule)
    try:
        with torch.inference_mode(), (sdpa_kernel(sdpa_backend) if sdpa_backend else nullcontext()):
            return _median_ms(lambda: model(**inputs))
    finally:
        accel.unpatch(model)


def _attention_only(cfg: E2EConfig, method, layout, heads: int) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from accel.methods.dense import sdpa_bshd

    S = layout.total_tokens
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, S, heads, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    v_ = v
    plan = method.build_plan(layout, heads, q.device)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.inference_mode():
        dense_ms = _median_ms(lambda: sdpa_bshd(q, k, v), reps=5)
    with torch.inference_mode():
        ours_ms = _median_ms(lambda: method.attend(q, k, v, layout, plan), reps=5)
    result = {"dense_cudnn_ms": dense_ms, "radial_ms": ours_ms, "density": method.plan_density(plan)}
    variants = {}
    for label, changes in (("decay_near", {"decay_near": True}), ("disk", {"spatial": "disk"}),
                           ("disk_decay_near", {"spatial": "disk", "decay_near": True})):
        variant = dataclasses.replace(method, **changes)
        variant_plan = variant.build_plan(layout, heads, q.device)
        with torch.inference_mode():
            ms = _median_ms(lambda v=variant, p=variant_plan: v.attend(q, k, v_, layout, p), reps=5)
        variants[label] = {"density": variant.plan_density(variant_plan), "ms": ms}
    result["variants"] = variants
    try:
        result["flex_ms"] = _flex_ms(q, k, v, plan, layout)
    except Exception as err:  # flex is a comparison point only; record why it could not run
        result["flex_error"] = f"{type(err).__name__}: {err}"[:300]
    return result


def _flex_ms(q, k, v, plan, layout) -> float:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    block_layout = plan.block_layout
    if layout.text_tokens:
        raise NotImplementedError("flex comparison only for video-only self-attention")
    dense_blocks = block_layout.to_mask()  # (1, nq, nk) at block granularity
    counts = dense_blocks.sum(-1, dtype=torch.int32)
    # Listed blocks first, in ascending order (a stable sort of "not listed").
    indices = torch.argsort((~dense_blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    S = q.shape[1]
    mask = BlockMask.from_kv_blocks(counts[None], indices[None], BLOCK_SIZE=block_layout.block_m, seq_lengths=(S, S))
    compiled = torch.compile(flex_attention)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with torch.inference_mode():
        return _median_ms(lambda: compiled(qt, kt, vt, block_mask=mask), warmup=2, reps=5)


def run_config(cfg: E2EConfig) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    from accel.methods.dense import Dense
    from accel.pipelines.models import layout_for_model
    from accel.presets import radial_preset

    method, schedule = radial_preset(cfg.preset)
    all_sparse = type(schedule)()  # per-layer timing: every layer sparse
    layout = layout_for_model(cfg.family, cfg.frames, cfg.height, cfg.width)
    heads = cfg.model["num_attention_heads"]
    out: dict[str, Any] = {
        "config": cfg.name, "family": cfg.family, "frames": cfg.frames, "height": cfg.height, "width": cfg.width,
        "grid": list(layout.grid), "video_tokens": layout.video_tokens, "text_tokens": layout.text_tokens,
        "method": repr(method), "schedule": repr(schedule), "reference_speedup": cfg.reference_speedup,
    }
    out["attention"] = _attention_only(cfg, method, layout, heads)
    inputs = _inputs(cfg)
    timings = []
    for depth in _depths(cfg):
        model = _build(cfg, depth)
        torch.cuda.reset_peak_memory_stats()
        dense_ms = _time_forward(model, inputs, Dense(), None)
        sparse_ms = _time_forward(model, inputs, method, all_sparse)
        # The dense baseline the reference systems compared against (FlashAttention-2 class).
        # (Masked calls, e.g. HunyuanVideo's token refiner, cannot use it and take the efficient kernel.)
        dense_fa_ms = _time_forward(
            model, inputs, Dense(), None, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        )
        timings.append({"depth": depth, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "dense_fa_ms": dense_fa_ms,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        del model
        torch.cuda.empty_cache()
    out["reduced_depth_timings"] = timings
    out.update(_extrapolate(cfg, timings, schedule))
    if cfg.full_depth:
        model = _build(cfg, {})
        out["full_depth_dense_ms"] = _time_forward(model, inputs, Dense(), None)
        out["full_depth_sparse_phase_ms"] = _time_forward(model, inputs, method, type(schedule)(
            dense_layers=schedule.dense_layers))
        out["full_depth_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del model
        torch.cuda.empty_cache()
    return out


def _extrapolate(cfg: E2EConfig, timings: list[dict], schedule) -> dict[str, Any]:
    """Per-layer costs from the reduced depths, then the full-depth forwards and the 50-step total."""
    dense_layers = schedule.dense_layers if isinstance(schedule.dense_layers, int) else len(schedule.dense_layers)
    if cfg.family == "wan":
        (a, b) = timings
        per = {kind: (b[f"{kind}_ms"] - a[f"{kind}_ms"]) / 2 for kind in ("dense", "sparse", "dense_fa")}
        overhead = a["dense_ms"] - 2 * per["dense"]
        n = cfg.model["num_layers"]
        dense_fwd = overhead + n * per["dense"]
        dense_fa_fwd = overhead + n * per["dense_fa"]
        sparse_fwd = overhead + dense_layers * per["dense"] + (n - dense_layers) * per["sparse"]
        per_layer = {"dense_ms": per["dense"], "sparse_ms": per["sparse"], "dense_fa_ms": per["dense_fa"]}
    else:
        base, more_double, more_single = timings
        per_layer = {}
        for kind in ("dense", "sparse", "dense_fa"):
            per_layer[f"double_{kind}_ms"] = (more_double[f"{kind}_ms"] - base[f"{kind}_ms"]) / 2
            per_layer[f"single_{kind}_ms"] = (more_single[f"{kind}_ms"] - base[f"{kind}_ms"]) / 2
        overhead = base["dense_ms"] - 2 * per_layer["double_dense_ms"] - 2 * per_layer["single_dense_ms"]
        nd, ns = cfg.model["num_layers"], cfg.model["num_single_layers"]
        dense_fwd = overhead + nd * per_layer["double_dense_ms"] + ns * per_layer["single_dense_ms"]
        dense_fa_fwd = overhead + nd * per_layer["double_dense_fa_ms"] + ns * per_layer["single_dense_fa_ms"]
        # Dense layers are the first ones (dual-stream blocks come first in the layer numbering).
        dd = min(dense_layers, nd)
        ds = max(0, dense_layers - nd)
        sparse_fwd = (overhead + dd * per_layer["double_dense_ms"] + (nd - dd) * per_layer["double_sparse_ms"]
                      + ds * per_layer["single_dense_ms"] + (ns - ds) * per_layer["single_sparse_ms"])
    dense_steps = min(schedule.dense_steps + schedule.dense_last_steps, cfg.steps)
    total_dense = cfg.steps * cfg.forwards_per_step * dense_fwd
    total_radial = cfg.forwards_per_step * (dense_steps * dense_fwd + (cfg.steps - dense_steps) * sparse_fwd)
    total_dense_fa = cfg.steps * cfg.forwards_per_step * dense_fa_fwd
    return {
        "forward_dense_fa_ms": dense_fa_fwd,
        "total_dense_fa_s": total_dense_fa / 1000,
        "total_speedup_vs_fa": total_dense_fa / total_radial,
        "extrapolated_from_layers": True,
        "overhead_ms": overhead,
        "per_layer": per_layer,
        "forward_dense_ms": dense_fwd,
        "forward_sparse_phase_ms": sparse_fwd,
        "forward_speedup": dense_fwd / sparse_fwd,
        "total_dense_s": total_dense / 1000,
        "total_radial_s": total_radial / 1000,
        "total_speedup": total_dense / total_radial,
        "dense_steps": dense_steps,
    }


def _environment() -> dict[str, Any]:
    import triton

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        commit = git.stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["configs"]
    names = [r["config"] for r in rows]
    attn = [r["attention"]["dense_cudnn_ms"] / r["attention"]["radial_ms"] for r in rows]
    flex = [r["attention"]["dense_cudnn_ms"] / r["attention"].get("flex_ms", math.nan) for r in rows]
    fwd = [r["forward_speedup"] for r in rows]
    total = [r["total_speedup"] for r in rows]
    total_fa = [r.get("total_speedup_vs_fa", math.nan) for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    x = range(len(rows))
    w = 0.16
    ax.bar([i - 2 * w for i in x], attn, w, label="attention: radial (ours) vs cuDNN")
    ax.bar([i - w for i in x], flex, w, label="attention: flex radial vs cuDNN")
    ax.bar(list(x), fwd, w, label="forward, sparse phase, vs cuDNN")
    ax.bar([i + w for i in x], total, w, label="50 steps incl. dense steps, vs cuDNN")
    ax.bar([i + 2 * w for i in x], total_fa, w, label="50 steps vs FlashAttention SDPA dense")
    for i, r in enumerate(rows):
        if r.get("reference_speedup"):
            ax.plot([i - 2.5 * w, i + 2.5 * w], [r["reference_speedup"]] * 2, "k--", lw=1)
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("speedup over dense cuDNN SDPA")
    ax.set_title(f"Radial attention, full-size configs, random bf16 weights ({results['environment']['device']})\n"
                 "dashed: speedup the reference reported on that shape (vs its own, slower dense baseline)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names: " + ", ".join(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results", help="output folder for e2e.json / e2e.png")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("accel bench e2e needs a CUDA GPU; none is visible (timings on a CPU mean nothing here).",
              file=sys.stderr)
        return 3
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": _environment(), "configs": []}
    for name in names:
        start = time.perf_counter()
        row = run_config(CONFIGS[name])
        results["configs"].append(row)
        a = row["attention"]
        print(f"{name}: density {a['density']:.3f} | attention cuDNN {a['dense_cudnn_ms']:.1f} ms, radial "
              f"{a['radial_ms']:.1f} ms, flex {a.get('flex_ms', float('nan')):.1f} ms | forward dense "
              f"{row['forward_dense_ms']:.0f} ms, sparse {row['forward_sparse_phase_ms']:.0f} ms "
              f"({row['forward_speedup']:.2f}x), dense FA {row['forward_dense_fa_ms']:.0f} ms | 50 steps "
              f"{row['total_speedup']:.2f}x vs cuDNN, {row['total_speedup_vs_fa']:.2f}x vs FA "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
        (out_dir / "e2e.json").write_text(json.dumps(results, indent=1))
    try:
        plot(results, out_dir / "e2e.png")
    except ImportError as err:
        print(f"no plot: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
