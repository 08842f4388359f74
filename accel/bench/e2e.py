"""Whole-transformer timing of full-size configs with random bf16 weights: dense (cuDNN SDPA) vs a sparse method.

For each configuration this measures, on one GPU and in one run:
- attention alone at the model's shape: dense cuDNN SDPA, our sparse kernel, and compiled
  `flex_attention` over the same block mask;
- the transformer forward with every layer dense and with every layer sparse, at two reduced layer
  counts of the full-width model. Layers of one kind cost the same, so the two counts give the per-layer
  time and the fixed overhead exactly (a straight line), and the full-depth forward and a 50-step
  schedule (dense first steps and dense layers as the preset says) follow from them. This is stated in
  the JSON as `extrapolated_from_layers`; configs small enough run at full depth as a check;
- with `--compile`, also the same forwards after `transformer.compile()` (diffusers' documented way; the
  default `torch.compile` settings), dense (cuDNN SDPA) and radial, at the same reduced depths and
  extrapolated the same way: rows "dense cuDNN + torch.compile" and "radial + torch.compile". Dynamo's caches
  are reset before each compiled variant; the first calls (compilation) are excluded from the timings and
  reported separately as `compile_s` (per measured depth).

Configs without a shipped radial preset (LTX) run only with a method and are left out of the default list.
Any registered method instead of the radial presets: `--method SPEC` (e.g. `--method
neighborhood:kernel_size=10x16x26,dense_steps=12` or `--method preset:psa-wan2.1-1.3b`), with `--tag` naming
the files. Flex uses the method's mask (`flex_mask_mod`) where it has one; dynamic methods report the density
of one call on random inputs.

Run on a GPU: `accel bench e2e` writes outputs/bench/e2e.json and e2e.png (relative to the current directory);
`--out benchmarks/results` updates the committed results. `accel bench e2e --configs
wan14b-768p-69f,hunyuan-768p-117f --compile` adds the torch.compile rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
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
# LTX-Video 2B (0.9.x; diffusers' defaults for LTXVideoTransformer3DModel): 32 heads of 64, 28 layers, no patching
# of its 128-channel latents (the VAE compresses 32x in space and 8x in time)
LTX_2B = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
    cross_attention_dim=2048, num_layers=28, caption_channels=4096, qk_norm="rms_norm_across_heads",
)


@dataclass(frozen=True)
class E2EConfig:
    name: str
    family: str  # "wan" | "hunyuan_video" | "ltx"
    model: dict
    frames: int
    height: int
    width: int
    preset: str | None  # its radial preset; None: none ships, so the config runs only with --method
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
        E2EConfig("wan1.3b-768p-69f", "wan", WAN_1_3B, 69, 768, 1280, "wan2.1-1.3b", 2, 512),
        E2EConfig("wan14b-720p-81f", "wan", WAN_14B, 81, 720, 1280, "wan2.1-14b", 2, 512),
        E2EConfig("wan14b-720p-161f", "wan", WAN_14B, 161, 720, 1280, "wan2.1-2x", 2, 512),
        E2EConfig("wan14b-720p-321f", "wan", WAN_14B, 321, 720, 1280, "wan2.1-4x", 2, 512, reference_speedup=3.7),
        E2EConfig("hunyuan-768p-117f", "hunyuan_video", HUNYUAN, 117, 768, 1280, "hunyuan-video", 1, 256,
                  reference_speedup=1.9),
        E2EConfig("hunyuan-720p-129f", "hunyuan_video", HUNYUAN, 129, 720, 1280, "hunyuan-video", 1, 256),
        # LTX-Video's longest documented clip (1216x704, 257 frames; 128 text tokens; guidance as two passes)
        E2EConfig("ltx-704p-257f", "ltx", LTX_2B, 257, 704, 1216, None, 2, 128),
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


def _build(cfg: E2EConfig, depth: dict[str, int], device: str = "cuda") -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel, WanTransformer3DModel

    cls = {"wan": WanTransformer3DModel, "hunyuan_video": HunyuanVideoTransformer3DModel,
           "ltx": LTXVideoTransformer3DModel}[cfg.family]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # create weights in bf16 directly (a 14B model in fp32 would not fit)
    try:
        with torch.device(device):
            model = cls(**{**cfg.model, **depth})
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def latent_grid(cfg: E2EConfig) -> tuple[int, int, int]:
    """(frames, height, width) of the config's VAE latents (Wan, HunyuanVideo: 4x in time, 8x in space; LTX: 8x
    and 32x)."""
    t, s = (8, 32) if cfg.family == "ltx" else (4, 8)
    return (cfg.frames - 1) // t + 1, cfg.height // s, cfg.width // s


def _inputs(cfg: E2EConfig, device: str = "cuda") -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    grid = latent_grid(cfg)
    text_dim = cfg.model.get("caption_channels", 4096)
    kw: dict[str, Any] = dict(
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(
            1, cfg.text_tokens, text_dim, device=device, dtype=torch.bfloat16, generator=gen
        ),
        return_dict=False,
    )
    if cfg.family == "ltx":  # packed latents (B, F*H*W, C) and their grid, as LTXPipeline passes them
        channels = cfg.model["in_channels"]
        kw["hidden_states"] = torch.randn(1, math.prod(grid), channels, device=device, dtype=torch.bfloat16,
                                          generator=gen)
        kw["encoder_attention_mask"] = torch.ones(1, cfg.text_tokens, device=device, dtype=torch.long)
        kw.update(num_frames=grid[0], height=grid[1], width=grid[2], rope_interpolation_scale=(8 / 25, 32, 32))
        return kw
    kw["hidden_states"] = torch.randn((1, 16, *grid), device=device, dtype=torch.bfloat16, generator=gen)
    if cfg.family == "hunyuan_video":
        kw["encoder_attention_mask"] = torch.ones(1, cfg.text_tokens, device=device, dtype=torch.bool)
        kw["pooled_projections"] = torch.randn(1, 768, device=device, dtype=torch.bfloat16, generator=gen)
        kw["guidance"] = torch.tensor([6000.0], device=device, dtype=torch.bfloat16)
    return kw


def _depths(cfg: E2EConfig) -> list[dict[str, int]]:
    if cfg.family != "hunyuan_video":  # one stack of blocks
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


def _has_token_stream(model: torch.nn.Module, method, layout) -> bool:
    """Whether ``model`` patched with ``method`` reorders its tokens once per forward (a family token stream and
    a method with a token order at this layout), not around each layer."""
    import accel

    handle = accel.patch(model, method)
    try:
        return bool(handle.stream_hooks) and method.token_order(layout, torch.device("cpu")) is not None
    finally:
        accel.unpatch(model)


COMPILE_WARMUP = 2  # untimed calls of a compiled model: the first compiles, the second catches a recompile


def _time_compiled_forward(model: torch.nn.Module, inputs: dict, method, schedule,
                           sdpa_backend=None) -> tuple[float, float]:
    """(median ms, compile s) of the forward after `model.compile()`, patched with `method`.

    Dynamo's caches are reset first, so each variant compiles from scratch. Compile seconds = wall time of
    the `COMPILE_WARMUP` untimed calls minus that many steady forwards. The model is eager again afterwards.
    """
    from contextlib import nullcontext

    import torch._dynamo
    from torch.nn.attention import sdpa_kernel

    import accel

    accel.patch(model, method, schedule=schedule)
    torch._dynamo.reset()
    model.compile()
    try:
        with torch.inference_mode(), (sdpa_kernel(sdpa_backend) if sdpa_backend else nullcontext()):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(COMPILE_WARMUP):
                model(**inputs)
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - start
            ms = _median_ms(lambda: model(**inputs), warmup=0)
        return ms, max(0.0, warm_s - COMPILE_WARMUP * ms / 1000)
    finally:
        model._compiled_call_impl = None  # where nn.Module.compile keeps the compiled call: back to eager
        accel.unpatch(model)
        torch._dynamo.reset()


def _attention_only(cfg: E2EConfig, method, layout, heads: int, head_dim: int = 128) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from accel.methods.base import AttentionCall
    from accel.methods.dense import sdpa_bshd

    S = layout.total_tokens
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, S, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    v_ = v
    plan = method.build_plan(layout, heads, q.device)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.inference_mode():
        dense_ms = _median_ms(lambda: sdpa_bshd(q, k, v), reps=5)
    with torch.inference_mode():
        ours_ms = _median_ms(lambda: method.attend(q, k, v, layout, plan), reps=5)
        density = float(method.run(q, k, v, layout, plan, AttentionCall()).density)  # dynamic methods: this call's
    result = {"dense_cudnn_ms": dense_ms, "sparse_ms": ours_ms, "density": density, "method": method.name}
    if method.name == "radial":
        result["radial_ms"] = ours_ms  # the key of the committed radial results
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
        result["flex_ms"] = _flex_ms(q, k, v, plan, layout, method)
    except Exception as err:  # flex is a comparison point only; record why it could not run
        result["flex_error"] = f"{type(err).__name__}: {err}"[:300]
    return result


def sparse_attention_ms(attention: dict[str, Any]) -> float:
    """The sparse method's attention time of a result row (older radial results call it ``radial_ms``)."""
    return attention.get("sparse_ms", attention.get("radial_ms", math.nan))


def _flex_ms(q, k, v, plan, layout, method=None) -> float:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    if layout.text_tokens:
        raise NotImplementedError("flex comparison only for video-only self-attention")
    S = q.shape[1]
    block_layout = getattr(plan, "block_layout", None)
    if block_layout is None:  # a method that states its mask as a mask_mod (over its own token order)
        mask_mod = method.flex_mask_mod(layout, plan, q.device) if method is not None else None
        if mask_mod is None:
            raise NotImplementedError(f"{getattr(method, 'name', '?')} has no flex mask")
        mask = create_block_mask(mask_mod, None, None, S, S, device=q.device, BLOCK_SIZE=128, _compile=True)
        compiled = torch.compile(flex_attention)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with torch.inference_mode():
            return _median_ms(lambda: compiled(qt, kt, vt, block_mask=mask), warmup=2, reps=5)
    dense_blocks = block_layout.to_mask()  # (1, nq, nk) at block granularity
    counts = dense_blocks.sum(-1, dtype=torch.int32)
    # Listed blocks first, in ascending order (a stable sort of "not listed").
    indices = torch.argsort((~dense_blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    mask = BlockMask.from_kv_blocks(counts[None], indices[None], BLOCK_SIZE=block_layout.block_m, seq_lengths=(S, S))
    compiled = torch.compile(flex_attention)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with torch.inference_mode():
        return _median_ms(lambda: compiled(qt, kt, vt, block_mask=mask), warmup=2, reps=5)


def method_and_schedule(cfg: E2EConfig, spec: str | None = None):
    """The config's radial preset, or the method and schedule of a spec (``neighborhood:kernel_size=...``,
    ``preset:psa-wan2.1-1.3b``, with ``dense_steps=...`` and the other schedule keys)."""
    from accel.presets import radial_preset

    if spec is None:
        if cfg.preset is None:
            raise ValueError(f"config {cfg.name}: no radial preset ships for {cfg.family}; pass a method "
                             "(--method SPEC)")
        return radial_preset(cfg.preset)
    from accel.methods.registry import parse_method_spec
    from accel.schedule import Schedule

    parsed = parse_method_spec(spec)
    return parsed.method, Schedule(**parsed.schedule)


def run_config(cfg: E2EConfig, compile: bool = False, spec: str | None = None) -> dict[str, Any]:
    """Time one config (see the module docstring); ``compile`` adds the `transformer.compile()` timings;
    ``spec`` replaces the config's radial preset by any registered method (and schedule)."""
    from torch.nn.attention import SDPBackend

    from accel.methods.dense import Dense
    from accel.pipelines.models import layout_for_model

    method, schedule = method_and_schedule(cfg, spec)
    all_sparse = type(schedule)()  # per-layer timing: every layer sparse
    layout = layout_for_model(cfg.family, cfg.frames, cfg.height, cfg.width)
    heads = cfg.model["num_attention_heads"]
    out: dict[str, Any] = {
        "config": cfg.name, "family": cfg.family, "frames": cfg.frames, "height": cfg.height, "width": cfg.width,
        "grid": list(layout.grid), "video_tokens": layout.video_tokens, "text_tokens": layout.text_tokens,
        "method": repr(method), "method_name": method.name, "schedule": repr(schedule),
        "reference_speedup": cfg.reference_speedup if spec is None else None,
    }
    out["attention"] = _attention_only(cfg, method, layout, heads, cfg.model["attention_head_dim"])
    inputs = _inputs(cfg)
    timings = []
    for depth in _depths(cfg):
        model = _build(cfg, depth)
        if "token_stream" not in out:  # whether the method's token order is applied once per forward
            out["token_stream"] = _has_token_stream(model, method, layout)
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
        if compile and "compile_error" not in out:
            try:
                torch.cuda.reset_peak_memory_stats()
                dense_c_ms, dense_c_s = _time_compiled_forward(model, inputs, Dense(), None)
                sparse_c_ms, sparse_c_s = _time_compiled_forward(model, inputs, method, all_sparse)
                timings[-1].update(dense_compiled_ms=dense_c_ms, sparse_compiled_ms=sparse_c_ms,
                                   dense_compile_s=dense_c_s, sparse_compile_s=sparse_c_s,
                                   compiled_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except Exception as err:  # keep the eager rows; record why the compiled ones are missing
                out["compile_error"] = f"{type(err).__name__}: {err}"[:500]
        del model
        torch.cuda.empty_cache()
    out["reduced_depth_timings"] = timings
    out.update(_extrapolate(cfg, timings, schedule))
    if compile and "compile_error" not in out:
        out["compiled"] = _extrapolate_compiled(cfg, timings, schedule, out, method.name)
    if cfg.full_depth:
        model = _build(cfg, {})
        out["full_depth_dense_ms"] = _time_forward(model, inputs, Dense(), None)
        out["full_depth_sparse_phase_ms"] = _time_forward(model, inputs, method, type(schedule)(
            dense_layers=schedule.dense_layers))
        out["full_depth_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if "compiled" in out:
            try:
                check = out["compiled"]
                check["full_depth_dense_ms"], check["full_depth_dense_compile_s"] = _time_compiled_forward(
                    model, inputs, Dense(), None)
                check["full_depth_sparse_phase_ms"], check["full_depth_sparse_compile_s"] = _time_compiled_forward(
                    model, inputs, method, type(schedule)(dense_layers=schedule.dense_layers))
            except Exception as err:
                out["compiled"]["full_depth_error"] = f"{type(err).__name__}: {err}"[:500]
        del model
        torch.cuda.empty_cache()
    return out


def _dense_layers(schedule) -> int:
    return schedule.dense_layers if isinstance(schedule.dense_layers, int) else len(schedule.dense_layers)


def _extrapolate_compiled(cfg: E2EConfig, timings: list[dict], schedule, eager: dict[str, Any],
                          method_name: str = "radial") -> dict[str, Any]:
    """Full-depth forwards and 50-step totals of the compiled model, as `_extrapolate` does for eager.

    Rows: "dense cuDNN + torch.compile" (every step dense) and "radial + torch.compile" (the preset's
    dense steps compiled dense, the rest compiled sparse). ``eager`` is `_extrapolate`'s result, for the
    speedups against the eager dense cuDNN baseline.
    """
    renamed = [{**t, "dense_ms": t["dense_compiled_ms"], "sparse_ms": t["sparse_compiled_ms"],
                "dense_fa_ms": t["dense_compiled_ms"]} for t in timings]
    fit = _extrapolate(cfg, renamed, schedule)
    per_layer = {k: v for k, v in fit["per_layer"].items() if "dense_fa" not in k}
    return {
        "how": "transformer.compile() (torch.compile defaults), dynamo reset per variant, "
               f"{COMPILE_WARMUP} warm-up calls excluded from the timings",
        "extrapolated_from_layers": True,
        "overhead_ms": fit["overhead_ms"],
        "per_layer": per_layer,
        "forward_dense_ms": fit["forward_dense_ms"],
        "forward_sparse_phase_ms": fit["forward_sparse_phase_ms"],
        "forward_speedup": fit["forward_speedup"],
        "total_dense_s": fit["total_dense_s"],
        "total_radial_s": fit["total_radial_s"],
        "total_speedup": fit["total_speedup"],
        "dense_speedup_vs_eager": eager["total_dense_s"] / fit["total_dense_s"],
        "total_speedup_vs_eager_dense": eager["total_dense_s"] / fit["total_radial_s"],
        "compile_s": {
            "dense": [t["dense_compile_s"] for t in timings],
            "radial": [t["sparse_compile_s"] for t in timings],
            "depths": [t["depth"] for t in timings],
        },
        "rows": [
            {"label": "dense cuDNN + torch.compile", "forward_ms": fit["forward_dense_ms"],
             "total_s": fit["total_dense_s"], "speedup_vs_dense_cudnn": eager["total_dense_s"] / fit["total_dense_s"],
             "compile_s": [t["dense_compile_s"] for t in timings]},
            {"label": f"{method_name} + torch.compile", "forward_ms": fit["forward_sparse_phase_ms"],
             "total_s": fit["total_radial_s"], "speedup_vs_dense_cudnn": eager["total_dense_s"] / fit["total_radial_s"],
             "compile_s": [t["sparse_compile_s"] for t in timings]},
        ],
    }


def table_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One config's rows for the table: forward (sparse phase for radial), 50-step total, speedup vs dense cuDNN.

    "dense cuDNN", "dense FA SDPA", "radial", then, when the config ran with ``--compile``,
    "dense cuDNN + torch.compile" and "radial + torch.compile" (with their compile seconds per measured depth).
    """
    base = row["total_dense_s"]
    rows = [
        {"label": "dense cuDNN", "forward_ms": row["forward_dense_ms"], "total_s": base, "compile_s": None},
        {"label": "dense FA SDPA", "forward_ms": row["forward_dense_fa_ms"], "total_s": row["total_dense_fa_s"],
         "compile_s": None},
        {"label": row.get("method_name", "radial"), "forward_ms": row["forward_sparse_phase_ms"],
         "total_s": row["total_radial_s"],
         "compile_s": None},
    ]
    for r in rows:
        r["speedup_vs_dense_cudnn"] = base / r["total_s"]
    rows += [dict(r) for r in row.get("compiled", {}).get("rows", [])]
    return rows


def format_table(results: dict[str, Any]) -> str:
    """The printed table: one line per (config, row of `table_rows`)."""
    head = (f"{'config':<20} {'attention':<28} {'forward ms':>11} {'50 steps s':>11} {'vs dense cuDNN':>15}"
            f"  compile s (per measured depth)")
    lines = [head, "-" * len(head)]
    for row in results["configs"]:
        for r in table_rows(row):
            compile_s = " / ".join(f"{c:.0f}" for c in r["compile_s"]) if r.get("compile_s") else "-"
            lines.append(f"{row['config']:<20} {r['label']:<28} {r['forward_ms']:>11.0f} {r['total_s']:>11.1f} "
                         f"{r['speedup_vs_dense_cudnn']:>14.2f}x  {compile_s}")
        if row.get("compile_error"):
            lines.append(f"{row['config']:<20} torch.compile failed: {row['compile_error']}")
    lines.append("forward: full-depth forward (radial: its sparse phase); 50 steps: incl. the preset's dense steps")
    return "\n".join(lines)


def _extrapolate(cfg: E2EConfig, timings: list[dict], schedule) -> dict[str, Any]:
    """Per-layer costs from the reduced depths, then the full-depth forwards and the 50-step total."""
    dense_layers = _dense_layers(schedule)
    if cfg.family != "hunyuan_video":  # one stack of blocks
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

    from accel.bench import git_commit

    commit = git_commit() or ""
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
    attn = [r["attention"]["dense_cudnn_ms"] / sparse_attention_ms(r["attention"]) for r in rows]
    flex = [r["attention"]["dense_cudnn_ms"] / r["attention"].get("flex_ms", math.nan) for r in rows]
    fwd = [r["forward_speedup"] for r in rows]
    total = [r["total_speedup"] for r in rows]
    total_fa = [r.get("total_speedup_vs_fa", math.nan) for r in rows]
    bars = [
        (attn, "attention: sparse (ours) vs cuDNN"),
        (flex, "attention: flex, same mask, vs cuDNN"),
        (fwd, "forward, sparse phase, vs cuDNN"),
        (total, "50 steps incl. dense steps, vs cuDNN"),
        (total_fa, "50 steps vs FlashAttention SDPA dense"),
    ]
    if any("compiled" in r for r in rows):  # the --compile rows, against the same eager cuDNN baseline
        bars += [
            ([r["compiled"]["dense_speedup_vs_eager"] if "compiled" in r else math.nan for r in rows],
             "50 steps, dense cuDNN + torch.compile, vs cuDNN"),
            ([r["compiled"]["total_speedup_vs_eager_dense"] if "compiled" in r else math.nan for r in rows],
             "50 steps, radial + torch.compile, vs cuDNN"),
        ]
    fig, ax = plt.subplots(figsize=(12 if len(bars) == 5 else 14, 4.8))
    x = range(len(rows))
    w = 0.8 / len(bars)
    for j, (values, label) in enumerate(bars):
        ax.bar([i + (j - (len(bars) - 1) / 2) * w for i in x], values, w, label=label)
    for i, r in enumerate(rows):
        if r.get("reference_speedup"):
            ax.plot([i - len(bars) / 2 * w, i + len(bars) / 2 * w], [r["reference_speedup"]] * 2, "k--", lw=1)
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("speedup over dense cuDNN SDPA")
    methods = sorted({r.get("method_name", "radial") for r in rows})
    device = results["environment"]["device"]
    ax.set_title(f"{', '.join(methods).capitalize()} attention, full-size configs, random bf16 weights ({device})\n"
                 "dashed: speedup the reference reported on that shape (vs its own, slower dense baseline)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None,
                        help="comma-separated names (default: every config with a radial preset, or with --method "
                             "every config): " + ", ".join(CONFIGS))
    parser.add_argument("--out", default="outputs/bench",
                        help="output folder for e2e.json / e2e.png (default: %(default)s, relative to the current "
                             "directory; the committed results are updated only with --out benchmarks/results)")
    parser.add_argument("--method", default=None, metavar="SPEC",
                        help="time this method instead of each config's radial preset: a spec such as "
                             "'neighborhood:kernel_size=10x16x26' or 'preset:psa-wan2.1-1.3b' (schedule keys "
                             "dense_steps=... allowed)")
    parser.add_argument("--tag", default="e2e", help="file name stem of the JSON and PNG (default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="also time dense cuDNN and radial after transformer.compile() (compile time excluded "
                             "from the timings, reported separately)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("accel bench e2e needs a CUDA GPU; none is visible (timings on a CPU mean nothing here).",
              file=sys.stderr)
        return 3
    if args.configs is None:
        names = [n for n, c in CONFIGS.items() if args.method is not None or c.preset is not None]
    else:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
    without = [n for n in names if n in CONFIGS and CONFIGS[n].preset is None and args.method is None]
    if without:
        print(f"configs {without} have no radial preset: pass --method SPEC", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": _environment(), "configs": []}
    for name in names:
        start = time.perf_counter()
        row = run_config(CONFIGS[name], compile=args.compile, spec=args.method)
        results["configs"].append(row)
        a = row["attention"]
        label = row.get("method_name", "radial")
        print(f"{name}: density {a['density']:.3f} | attention cuDNN {a['dense_cudnn_ms']:.1f} ms, "
              f"{label} {sparse_attention_ms(a):.1f} ms, flex {a.get('flex_ms', float('nan')):.1f} ms"
              " | forward dense "
              f"{row['forward_dense_ms']:.0f} ms, sparse {row['forward_sparse_phase_ms']:.0f} ms "
              f"({row['forward_speedup']:.2f}x), dense FA {row['forward_dense_fa_ms']:.0f} ms | 50 steps "
              f"{row['total_speedup']:.2f}x vs cuDNN, {row['total_speedup_vs_fa']:.2f}x vs FA "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
        if "compiled" in row:
            c = row["compiled"]
            print(f"{name} + torch.compile: forward dense {c['forward_dense_ms']:.0f} ms, sparse "
                  f"{c['forward_sparse_phase_ms']:.0f} ms ({c['forward_speedup']:.2f}x) | 50 steps "
                  f"{c['total_speedup']:.2f}x vs compiled cuDNN, {c['total_speedup_vs_eager_dense']:.2f}x vs cuDNN "
                  f"| compile s per depth: dense {' / '.join(f'{v:.0f}' for v in c['compile_s']['dense'])}, radial "
                  f"{' / '.join(f'{v:.0f}' for v in c['compile_s']['radial'])}", flush=True)
        elif "compile_error" in row:
            print(f"{name}: torch.compile failed ({row['compile_error']})", flush=True)
        (out_dir / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
    print(format_table(results))
    try:
        plot(results, out_dir / f"{args.tag}.png")
    except ImportError as err:
        print(f"no plot: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
