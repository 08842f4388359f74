"""Cost of head-perturbation guidance per denoising step vs CFG alone, on full-width Wan2.1-14B and FLUX.1-dev.

Random bf16 weights at reduced depth (two depths; per-layer cost is linear, so the full-depth step time is
extrapolated from them and marked `extrapolated_from_layers`). One "step" is what the pipeline runs per
denoising step: Wan = cond + uncond forwards (CFG), Flux-dev = one forward (distilled guidance). Variants:
CFG only, + guidance as a separate pass, + guidance batched with the cond pass, each with dense and with
radial attention. The transformer is patched with `accel.patch(transformer, method, guidance=...)`, called
inside `cache_context("cond" | "uncond")` as diffusers' pipelines do.

GPU: `python benchmarks/bench_guidance.py` writes outputs/bench/guidance.json (never benchmarks/results unless
`--out` says so). CPU smoke run: `python benchmarks/bench_guidance.py --tiny --out /tmp/x`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import accel
from accel.guidance.perturbation import HeadPerturbation

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


@dataclass(frozen=True)
class Config:
    name: str
    family: str  # "wan" | "flux"
    model: dict
    frames: int
    height: int
    width: int
    text_tokens: int
    depths: tuple[int, int]  # reduced depths measured (Flux: double blocks; single = 2x)
    full_depth: int
    forwards_per_step: int  # CFG forwards per step without guidance


CONFIGS = {c.name: c for c in (
    Config("wan14b-720p-81f", "wan", WAN_14B, 81, 720, 1280, 512, (2, 4), 40, 2),
    Config("wan14b-480p-81f", "wan", WAN_14B, 81, 480, 832, 512, (2, 4), 40, 2),
    Config("flux-dev-1024px", "flux", FLUX_DEV, 1, 1024, 1024, 512, (1, 2), 19, 1),
)}
TINY = {
    "wan": Config("tiny-wan", "wan", dict(WAN_14B, num_attention_heads=2, attention_head_dim=16, text_dim=32,
                                          ffn_dim=32, rope_max_seq_len=64), 9, 64, 64, 8, (1, 2), 4, 2),
    "flux": Config("tiny-flux", "flux", dict(FLUX_DEV, num_attention_heads=2, attention_head_dim=16,
                                             joint_attention_dim=32, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)),
                   1, 64, 64, 8, (1, 2), 4, 1),
}


def build(config: Config, depth: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if config.family == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(**dict(config.model, num_layers=depth))
    else:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(**dict(config.model, num_layers=depth, num_single_layers=2 * depth))
    return model.to(device=device, dtype=dtype).eval()


def inputs(config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    text = torch.randn(1, config.text_tokens, config.model.get("text_dim", config.model.get("joint_attention_dim")),
                       device=device, dtype=dtype)
    if config.family == "wan":
        latent_frames = (config.frames - 1) // 4 + 1
        latents = torch.randn(1, 16, latent_frames, config.height // 8, config.width // 8, device=device, dtype=dtype)
        return dict(hidden_states=latents, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text,
                    return_dict=False)
    h, w = config.height // 16, config.width // 16  # 8x VAE, 2x2 packing
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None, :]
    return dict(hidden_states=torch.randn(1, h * w, config.model["in_channels"], device=device, dtype=dtype),
                encoder_hidden_states=text,
                pooled_projections=torch.randn(1, config.model["pooled_projection_dim"], device=device, dtype=dtype),
                timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(config.text_tokens, 3, device=device),
                return_dict=False)


def step(model: torch.nn.Module, kwargs: dict, cfg_forwards: int) -> None:
    with torch.no_grad():
        with model.cache_context("cond"):
            model(**kwargs)
        if cfg_forwards > 1:
            with model.cache_context("uncond"):
                model(**kwargs)


def time_step(model, kwargs, cfg_forwards, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step(model, kwargs, cfg_forwards)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        step(model, kwargs, cfg_forwards)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps


def method_for(name: str, config: Config):
    if name == "dense":
        return accel.Dense()
    return accel.preset("wan2.1-14b").method if config.family == "wan" else accel.Radial(decay=0.2)


def measure(config: Config, device: torch.device, dtype: torch.dtype, warmup: int, reps: int,
            heads: list[tuple[int, int]], methods: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[int, float]] = {}
    memory: dict[str, dict[int, int]] = {}
    counts: dict[str, dict[int, dict[str, int]]] = {}
    for depth in config.depths:
        model = build(config, depth, device, dtype)
        kwargs = inputs(config, device, dtype)
        for method_name in methods:
            for variant in ("cfg only", "guidance separate", "guidance batched"):
                guidance = None
                if variant != "cfg only":
                    guidance = HeadPerturbation(heads=heads, strength=0.5, scale=3.0,
                                                batched=variant == "guidance batched")
                handle = accel.patch(model, method_for(method_name, config), guidance=guidance,
                                     on_unsupported="dense")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = time_step(model, kwargs, config.forwards_per_step, device, warmup, reps)
                accel.unpatch(model)
                key = f"{method_name}: {variant}"
                if (guidance is not None) != (handle.stats.branch_calls > 0):
                    raise RuntimeError(f"{key}: the perturbed branch {'did not run' if guidance else 'ran'}")
                counts.setdefault(key, {})[depth] = {"sparse_calls": handle.stats.sparse_calls,
                                                     "calls": handle.stats.calls,
                                                     "branch_calls": handle.stats.branch_calls}
                rows.setdefault(key, {})[depth] = seconds
                if device.type == "cuda":
                    memory.setdefault(key, {})[depth] = int(torch.cuda.max_memory_allocated(device))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (d1, d2) = config.depths
    result: dict[str, Any] = {}
    for key, times in rows.items():
        per_layer = (times[d2] - times[d1]) / (d2 - d1)
        fixed = times[d1] - per_layer * d1
        result[key] = {"measured_s": {str(d): t for d, t in times.items()},
                       "step_s_full_depth": fixed + per_layer * config.full_depth,
                       "peak_memory_bytes": memory.get(key),
                       "attention_calls": {str(d): c for d, c in counts[key].items()}}
    for method_name in methods:
        base = result[f"{method_name}: cfg only"]["step_s_full_depth"]
        for variant in ("guidance separate", "guidance batched"):
            entry = result[f"{method_name}: {variant}"]
            entry["extra_s_per_step"] = entry["step_s_full_depth"] - base
            entry["ratio_vs_cfg_only"] = entry["step_s_full_depth"] / base
    return {"config": config.name, "family": config.family, "frames": config.frames, "height": config.height,
            "width": config.width, "cfg_forwards_per_step": config.forwards_per_step,
            "extrapolated_from_layers": list(config.depths), "full_depth": config.full_depth,
            "perturbed_heads": [list(h) for h in heads], "rows": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="wan14b-720p-81f,flux-dev-1024px", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--methods", default="dense,radial", help="dense and/or radial")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and depth")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per variant and depth")
    parser.add_argument("--tiny", action="store_true", help="tiny CPU configs (a smoke run of this script)")
    parser.add_argument("--out", default=None, help="output folder (default outputs/bench)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA GPU: the full-size configs need one (use --tiny for a CPU smoke run)")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    configs = list(TINY.values()) if args.tiny else [CONFIGS[name] for name in args.configs.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = []
    for config in configs:
        heads = [(0, 1), (0, 0), (config.depths[0] - 1, 1)]
        results.append(measure(config, device, dtype, args.warmup if not args.tiny else 1,
                               args.reps if not args.tiny else 1, heads, methods))
        print(json.dumps(results[-1]["rows"], indent=1))
    out_dir = Path(args.out or "outputs/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "guidance.json"
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "dtype": str(dtype)}
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
