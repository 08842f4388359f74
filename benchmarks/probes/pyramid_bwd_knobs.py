"""Probe: the pyramid backward's launch knobs (`pyramid_bwd.bwd_knobs`) on a GPU, against dense cuDNN.

    python benchmarks/probes/pyramid_bwd_knobs.py --block 128 [--out DIR]   (writes pyramid_bwd_knobs_b<block>.json)

At the Wan2.1-1.3B 480p 81-frame shape with rank quotas at 15% FLOP density (local inputs, tile order as in a
model): the backward alone (dQ and dK/dV passes, un-pooling) for each knob set, its largest difference from the
default knobs' gradients, and dense cuDNN's forward and forward+backward for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

TRIALS = {  # name: (dq warps, stages, key rows; dk/dv warps, stages, key rows, query rows)
    "dq8s1k64_dkdv4s3k64q32": (8, 1, 64, 4, 3, 64, 32),
    "dq8s2k64_dkdv4s3k64q32": (8, 2, 64, 4, 3, 64, 32),
    "dq8s2k32_dkdv4s3k64q32": (8, 2, 32, 4, 3, 64, 32),
    "dq8s2k64_dkdv8s3k128q32": (8, 2, 64, 8, 3, 128, 32),
    "dq8s2k64_dkdv8s3k64q64": (8, 2, 64, 8, 3, 64, 64),
    "dq8s2k64_dkdv4s2k32q32": (8, 2, 64, 4, 2, 32, 32),
    "dq4s2k64_dkdv4s3k64q32": (4, 2, 64, 4, 3, 64, 32),
    "dq4s3k64_dkdv4s3k64q64": (4, 3, 64, 4, 3, 64, 64),
}
KEYS = ("dq_warps", "dq_stages", "dq_key_rows", "dkdv_warps", "dkdv_stages", "dkdv_key_rows", "dkdv_query_rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--block", type=int, default=128, choices=(64, 128))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    from triton.testing import do_bench

    from accel.bench.methods import local_qkv
    from accel.geometry import TokenLayout
    from accel.kernels.neighborhood_reference import tile_major_order
    from accel.kernels.pyramid_bwd import bwd_knobs, pyramid_backward
    from accel.kernels.pyramid_estimate import estimate_block_importance_triton
    from accel.kernels.pyramid_levels import assign_levels
    from accel.methods.pyramid import block_tile

    def bench(fn) -> float:
        return float(do_bench(fn, warmup=5, rep=30, return_mode="median"))

    grid, H, D, block = (21, 30, 52), 12, 128, args.block
    layout = TokenLayout(1, *grid)
    q, k, v = local_qkv(layout, H, D, torch.bfloat16, torch.Generator(device="cuda").manual_seed(0))
    perm = tile_major_order(grid, block_tile(grid, block), "cuda")
    q, k, v = (t[:, perm].contiguous() for t in (q, k, v))
    levels = assign_levels(estimate_block_importance_triton(q, k, block), "topk", (0.09, 0.14, 0.22, 0.30), 0.06,
                           None)
    scale = 1 / math.sqrt(D)
    parts = [0, q.shape[1], 0, 0]
    out, lse = torch.ops.accel.pyramid_fwd(q, k, v, levels, None, parts, block, scale)
    dout = torch.randn_like(out)
    res: dict = {"grid": list(grid), "heads": H, "block": block, "device": torch.cuda.get_device_name(),
                 "density": float((torch.where(levels > 0, 1.0 / levels.clamp(min=1).float(), 0.0)).mean()),
                 "default_knobs": bwd_knobs(block)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        g = torch.randn_like(o)
        res["dense_cudnn_fwd_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        res["dense_cudnn_fwdbwd_ms"] = bench(
            lambda: torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), (qt, kt, vt), g))
    res["pyramid_fwd_ms"] = bench(lambda: torch.ops.accel.pyramid_fwd(q, k, v, levels, None, parts, block, scale))
    base = pyramid_backward(dout, None, q, k, v, out, lse, levels, None, parts, block, scale)
    trials = {}
    for name, values in TRIALS.items():
        knobs = dict(zip(KEYS, values, strict=True))
        try:
            grads = pyramid_backward(dout, None, q, k, v, out, lse, levels, None, parts, block, scale, knobs)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, base, strict=True))
            trials[name] = {"bwd_ms": bench(lambda kn=knobs: pyramid_backward(dout, None, q, k, v, out, lse, levels,
                                                                              None, parts, block, scale, kn)),
                            "max_abs_diff_vs_default": diff}
        except Exception as err:  # a config that does not fit (shared memory)
            trials[name] = {"error": repr(err)[:160]}
        print(name, trials[name], flush=True)
    res["trials"] = trials
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"pyramid_bwd_knobs_b{block}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k_: v_ for k_, v_ in res.items() if k_ != "trials"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
