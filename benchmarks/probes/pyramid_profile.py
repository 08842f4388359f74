"""Probe: the CUDA kernels of one `Pyramid.run` call at the Wan2.1-1.3B 480p 81-frame shape (torch.profiler table).

    python benchmarks/probes/pyramid_profile.py [--block 64] [--out DIR]   (GPU only; writes pyramid_profile.txt)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    from accel.bench.methods import local_qkv
    from accel.geometry import TokenLayout
    from accel.methods.base import AttentionCall
    from accel.methods.pyramid import Pyramid

    layout = TokenLayout(1, 21, 30, 52)
    method = Pyramid(block_size=args.block)
    plan = method.build_plan(layout, 12, torch.device("cuda"))
    q, k, v = local_qkv(layout, 12, 128, torch.bfloat16, torch.Generator(device="cuda").manual_seed(0))
    call = AttentionCall()
    for _ in range(3):
        method.run(q, k, v, layout, plan, call)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            method.run(q, k, v, layout, plan, call)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pyramid_profile_b{args.block}.txt").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
