"""`accel bench train`: LoRA training step time and peak memory, dense cuDNN attention vs a sparse method (GPU).

One training step = forward + backward (gradient checkpointing on) + AdamW step on rank-r LoRA adapters of the
self-attention projections, of a `WanTransformer3DModel` with the Wan2.1-1.3B config and random bf16 weights, at
480x832 (latent 60x104, 1560 tokens per latent frame) for 81/161/321 frames (21/41/81 latent frames: 32,760 /
63,960 / 126,360 tokens). Text: 512 random bf16 embeddings. Reports the median step time of the timed steps, peak
allocated memory, tokens/s and the dense/sparse step-time ratio per length, as JSON (default
outputs/bench/train.json). `--layers` reduces the depth (recorded in the JSON) when time is short.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path("outputs/bench/train.json")
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel bench train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", default="81,161,321", help="comma-separated frame counts (4k+1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--layers", type=int, default=30, help="transformer layers (30 = the full 1.3B model)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank")
    p.add_argument("--methods", default="dense,radial",
                   help="comma-separated method specs; 'dense' runs under the cuDNN SDPA backend")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up step)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result path")
    return p


def build_model(layers: int, rank: int, checkpointing: bool, *, config: dict | None = None,
                device: str = "cuda") -> torch.nn.Module:
    """A bf16 Wan transformer (`config`, default Wan2.1-1.3B) with random weights and fp32 LoRA adapters."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from accel.lora.models import default_targets

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**{**(config or WAN_1_3B), "num_layers": layers}).to(torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=default_targets("wan")))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return model


def make_inputs(frames: int, height: int, width: int, *, channels: int = 16, text_dim: int = 4096,
                text_tokens: int = 512, device: str = "cuda") -> dict[str, Any]:
    """Random bf16 latents for `frames` x `height` x `width` pixels (Wan VAE: 4x time, 8x space) and text."""
    g = torch.Generator(device=device).manual_seed(0)
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
    x = torch.randn(1, channels, lat_f, lat_h, lat_w, device=device, dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, text_tokens, text_dim, device=device, dtype=torch.bfloat16, generator=g)
    return {"hidden_states": x, "timestep": torch.tensor([500.0], device=device), "encoder_hidden_states": text,
            "return_dict": False}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, inputs, optimizer, steps: int, sdpa_backend=None) -> tuple[list[float], int | None]:
    """Wall times of `steps` training steps after one warm-up step, and the peak allocated CUDA memory."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    device = inputs["hidden_states"].device
    target = torch.randn_like(inputs["hidden_states"])
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with sdpa_kernel(sdpa_backend) if sdpa_backend is not None else nullcontext():
        for i in range(steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            pred = model(**inputs)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if i > 0:  # the first step compiles kernels and builds plans
                times.append(time.perf_counter() - t0)
    return times, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    import accel
    from accel.methods.registry import parse_method_spec

    if not torch.cuda.is_available():
        raise RuntimeError("accel bench train needs a CUDA GPU")
    frames_list = [int(f) for f in args.frames.split(",")]
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    model = build_model(args.layers, args.rank, not args.no_gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for frames in frames_list:
        inputs = make_inputs(frames, args.height, args.width)
        lat = inputs["hidden_states"].shape
        tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
        for spec_text in specs:
            spec = parse_method_spec(spec_text)
            backend = SDPBackend.CUDNN_ATTENTION if spec.method.name == "dense" else None
            optimizer = torch.optim.AdamW(params, lr=1e-5)
            handle = accel.patch(model, spec.method, schedule=spec.schedule_over())
            try:
                times, peak = time_steps(model, inputs, optimizer, args.steps, backend)
                stats = handle.stats
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # one shape failing keeps the others
                print(f"{frames} frames {spec.label}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                rows.append({"frames": frames, "tokens": tokens, "method": spec.label,
                             "error": f"{type(err).__name__}: {str(err)[:500]}"})
                del optimizer
                torch.cuda.empty_cache()
                continue
            finally:
                accel.unpatch(model)
            step_s = statistics.median(times)
            row = {"frames": frames, "latent_frames": lat[2], "tokens": tokens, "method": spec.label,
                   "sdpa_backend": "cudnn" if backend is not None else None, "step_s": step_s, "step_times_s": times,
                   "peak_memory_gib": peak / 2**30, "tokens_per_s": tokens / step_s,
                   "mean_tile_density": stats.mean_density()}
            rows.append(row)
            print(f"{frames:4d} frames ({tokens} tokens) {spec.label:>24}: {step_s:7.2f} s/step, "
                  f"{peak / 2**30:6.1f} GiB peak, {tokens / step_s:8.0f} tokens/s, "
                  f"density {row['mean_tile_density']:.3f}",
                  flush=True)
            del optimizer
            torch.cuda.empty_cache()
    base = specs[0]
    label = {s: parse_method_spec(s).label for s in specs}
    ratios = []
    for frames in frames_list:
        ref = next((r for r in rows if r["frames"] == frames and r["method"] == label[base] and "error" not in r),
                   None)
        for r in rows:
            if ref is not None and r["frames"] == frames and r is not ref and "error" not in r:
                ratios.append({"frames": frames, "method": r["method"],
                               f"speedup_vs_{base}": ref["step_s"] / r["step_s"],
                               "memory_ratio": r["peak_memory_gib"] / ref["peak_memory_gib"]})
    return {
        "benchmark": "lora-train-step", "model": "Wan2.1-1.3B config, random bf16 weights",
        "num_layers": args.layers, "full_depth": args.layers == WAN_1_3B["num_layers"],
        "height": args.height, "width": args.width, "lora_rank": args.rank, "lora_targets": "self-attention q/k/v/out",
        "gradient_checkpointing": not args.no_gradient_checkpointing, "timed_steps": args.steps,
        "optimizer": "AdamW on LoRA params (fp32)", "rows": rows, "ratios": ratios,
        "environment": {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
                        "python": platform.python_version(), **_versions()},
    }


def _versions() -> dict[str, str]:
    out = {}
    for name in ("diffusers", "peft", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = ["| frames | tokens | method | step (s) | peak memory (GiB) | tokens/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['frames']} | {r['tokens']:,} | {r['method']} | {r['error'][:60]} | | |")
            continue
        lines.append(f"| {r['frames']} | {r['tokens']:,} | {r['method']} | {r['step_s']:.2f} | "
                     f"{r['peak_memory_gib']:.1f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0


__all__ = ["WAN_1_3B", "build_model", "format_table", "main", "make_inputs", "run", "time_steps"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
