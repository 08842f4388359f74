"""Pyramid sparse attention on a GPU: bf16 correctness (forward and backward) and fwd / fwd+bwd time vs dense cuDNN.

1. Correctness at a small shape (the reference builds V x V): bf16 kernel output, LSE and dq/dk/dv against
   autograd of `reference_pyramid_attention` in float32 on the same bf16 inputs, with random level maps (every
   level, per head), a partial last block and padded text keys, at each block size. The yardstick is what dense
   bf16 attention achieves: |cuDNN SDPA bf16 - float32 math| on the same inputs (levels all 1 is dense attention).
   A row passes when our error is at most 4x that (plus 1e-3).
2. Timing (triton.testing.do_bench medians) at S = 21x30x52 = 32,760 video tokens (Wan 480p, 81 frames), H=12,
   D=128, B=1: dense cuDNN SDPA fwd and fwd+bwd; ours for level maps with fixed rank quotas per row (the
   reference's topk rule on random importance, diagonal full): "psa3" 15/10/20/55 % (FLOP-equivalent density
   0.25, the paper's default split), "psaconfig" 10/5/0/20/65 % (0.15), "binary25" 25 % full, rest skipped (0.25);
   forward, fwd+bwd, and the per-call planning (importance + levels) alone. Efficiency = density x dense / ours.
   Peak memory of one fwd+bwd (no S x S tensor: a few x S x H x D).

    python benchmarks/bench_pyramid.py [--out outputs/bench] [--blocks 64,128] [--skip-timing]
    TRITON_INTERPRET=1 python benchmarks/bench_pyramid.py --cpu-smoke --blocks 16 --out /tmp/b   (script check)

Writes <out>/pyramid_<gpu>.json (default outputs/bench).
"""

# ruff: noqa: B023  (closures are timed immediately, inside their loop iteration)
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from accel.geometry import TokenLayout  # noqa: E402
from accel.kernels.pyramid import pyramid_attention  # noqa: E402
from accel.kernels.pyramid_reference import level_density, reference_pyramid_attention, topk_levels  # noqa: E402
from accel.methods.base import AttentionCall  # noqa: E402
from accel.methods.pyramid import Pyramid  # noqa: E402

QUOTAS = {  # cumulative rank fractions of levels 1, 2, 4, 8 (the rest skipped)
    "psa3": (0.15, 0.25, 0.45, 0.45),
    "psaconfig": (0.10, 0.15, 0.15, 0.35),
    "binary25": (0.25, 0.25, 0.25, 0.25),
}


def quota_levels(B: int, H: int, n: int, quotas, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lv = topk_levels(torch.rand(B, H, n, n, generator=g), quotas)
    lv[..., torch.arange(n), torch.arange(n)] = 1
    return lv.to(device)


def random_levels(B: int, H: int, n: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lv = torch.tensor([0, 1, 2, 4, 8])[torch.randint(0, 5, (B, H, n, n), generator=g)]
    lv[..., torch.arange(n), torch.arange(n)] = 1
    return lv.to(torch.int32).to(device)


def _grads(fn, tensors, dout):
    out, lse = fn(*tensors)
    return out, lse, torch.autograd.grad((out.float() * dout).sum() + lse.float().sum(), tensors)


def _dense_backends():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if torch.cuda.is_available() else [
        SDPBackend.MATH]


def check(block: int, log, dev: str = "cuda", blocks_per_side: int = 16, dt: torch.dtype = torch.bfloat16) -> dict:
    """bf16 forward + backward vs the float32 reference (with padded text), against dense bf16's own error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, D, T = 2, 2, 128, 77
    V = blocks_per_side * block + 37
    n = -(-V // block)
    torch.manual_seed(block)
    q, k, v = (torch.randn(B, T + V, H, D, device=dev).to(dt).requires_grad_() for _ in range(3))
    levels = random_levels(B, H, n, dev, seed=block)
    args = dict(video_keys=(T, V), text_keys=(0, T),
                text_lengths=torch.tensor([T, 20], dtype=torch.int32, device=dev))
    dout = torch.randn(B, V, H, D, device=dev)

    def ours(q_, k_, v_):
        return pyramid_attention(q_[:, T:], k_, v_, levels, block, return_lse=True, **args)

    def ref(q_, k_, v_):
        return reference_pyramid_attention(q_[:, T:], k_, v_, levels, block, return_lse=True, **args)

    out, lse, g = _grads(ours, (q, k, v), dout)
    exact = tuple(t.detach().float().requires_grad_() for t in (q, k, v))
    rout, rlse, rg = _grads(ref, exact, dout)
    errs = {"out": (out.float() - rout).abs().max().item(), "lse": (lse - rlse).abs().max().item()}
    errs.update({f"d{name}": (a.float() - b).abs().max().item() for name, a, b in zip("qkv", g, rg, strict=True)})

    # yardstick: dense attention (video keys only) in bf16 on cuDNN vs float32 math, same inputs
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qv, kv, vv = (t[:, T:].detach().transpose(1, 2) for t in (q, k, v))
    qb, kb, vb = (t.clone().requires_grad_() for t in (qv, kv, vv))
    with sdpa_kernel(_dense_backends()):
        ob = sdpa(qb, kb, vb)
        gb = torch.autograd.grad((ob.float() * dout.transpose(1, 2)).sum(), (qb, kb, vb))
    qf, kf, vf = (t.float().requires_grad_() for t in (qv, kv, vv))
    with sdpa_kernel(SDPBackend.MATH):
        of = sdpa(qf, kf, vf)
        gf = torch.autograd.grad((of * dout.transpose(1, 2)).sum(), (qf, kf, vf))
    yard = {"out": (ob.float() - of).abs().max().item()}
    yard.update({f"d{name}": (a.float() - b).abs().max().item() for name, a, b in zip("qkv", gb, gf, strict=True)})
    ok = all(errs[key] <= 4 * yard[key] + 1e-3 for key in yard) and errs["lse"] <= 2e-2
    row = {"block": block, "V": V, "T": T, "H": H, "D": D, "max_abs_err": errs, "dense_same_dtype_max_abs_err": yard,
           "pass": ok}
    log(f"check block {block}: {'PASS' if ok else 'FAIL'} ours {errs} dense same dtype {yard}")
    return row


def bench(fn, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (do_bench on CUDA; a few plain runs on CPU, for the smoke test only)."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[1]
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _peak_bytes() -> tuple:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated
    return 0, lambda: 0


def timing(blocks: list[int], log, dev: str = "cuda", grid: tuple[int, int, int] = (21, 30, 52), H: int = 12,
           dt: torch.dtype = torch.bfloat16) -> dict:
    from torch.nn.attention import sdpa_kernel

    D = 128
    S = grid[0] * grid[1] * grid[2]
    res = {"S": S, "H": H, "D": D, "grid": grid, "dense": {}, "pyramid": []}
    q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=dt) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel(_dense_backends()):
        res["dense"]["cudnn_fwd"] = bench(lambda: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))

        def dense_fb():
            sdpa(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)).transpose(1, 2).backward(dout)
        res["dense"]["cudnn_fwdbwd"] = bench(dense_fb)
    log(f"dense cuDNN S={S} H={H} D={D}: {res['dense']}")
    for block in blocks:
        n = -(-S // block)
        method = Pyramid(block_size=block)
        layout = TokenLayout(1, *grid)
        plan_ms = bench(lambda: method.plan_call(q, k, layout, AttentionCall(seed=0)))
        for name, quotas in QUOTAS.items():
            levels = quota_levels(1, H, n, quotas, dev)
            d = float(level_density(levels))
            row = {"block": block, "levels": name, "quotas": quotas, "density": d, "plan_ms": plan_ms}
            row["fwd_ms"] = bench(lambda: pyramid_attention(q, k, v, levels, block))

            def ours_fb():
                pyramid_attention(qg, kg, vg, levels, block).backward(dout)
            row["fwdbwd_ms"] = bench(ours_fb)
            row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
            row["eff_fwd"] = d * res["dense"]["cudnn_fwd"] / row["fwd_ms"]
            row["eff_fwdbwd"] = d * res["dense"]["cudnn_fwdbwd"] / row["fwdbwd_ms"]
            row["speedup_fwd"] = res["dense"]["cudnn_fwd"] / row["fwd_ms"]
            row["speedup_fwdbwd"] = res["dense"]["cudnn_fwdbwd"] / row["fwdbwd_ms"]
            base, peak = _peak_bytes()
            ours_fb()
            row["fwdbwd_peak_extra_mib"] = (peak() - base) / 2**20
            log(f"block {block} {name} (density {d:.3f}): " + ", ".join(
                f"{kk}={vv:.3f}" for kk, vv in row.items() if isinstance(vv, float) and kk != "density"))
            res["pyramid"].append(row)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench", help="folder for pyramid_<gpu>.json")
    parser.add_argument("--blocks", default="64,128", help="block sizes to time (correctness: 16,32,64,128)")
    parser.add_argument("--skip-timing", action="store_true", help="correctness only")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, measures nothing)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke with TRITON_INTERPRET=1)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu-smoke"
    result = {"gpu": gpu, "torch": torch.__version__, "dtype": "float16" if args.cpu_smoke else "bfloat16"}
    import triton

    result["triton"] = triton.__version__
    # the Triton interpreter has no bfloat16 (numpy): the smoke run uses float16
    small = {"blocks_per_side": 2, "dt": torch.float16} if args.cpu_smoke else {}
    result["check"] = [check(b, log, dev, **small) for b in ((16, 32) if args.cpu_smoke else (16, 32, 64, 128))]
    if not args.skip_timing:
        shape = {"grid": (2, 4, 8), "H": 2, "dt": torch.float16} if args.cpu_smoke else {}
        result["timing"] = timing([int(b) for b in args.blocks.split(",")], log, dev, **shape)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"pyramid_{gpu.replace(' ', '_').lower()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {path}")
    return 0 if all(row["pass"] for row in result["check"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
