"""Probe: where the time of one `Pyramid.run` call goes on a GPU, stage by stage, at a Wan shape.

    python benchmarks/probes/pyramid_profile.py [--shape wan14b-720p] [--spec pyramid:mode=topk,...]
        [--estimate-configs] [--out DIR] [--tag T]   (GPU only; writes pyramid_profile_<shape><tag>.json/.txt)

Times (``do_bench`` medians) the whole call, its stages as the call runs them (sampled-token gathers and the fused
estimate, level assignment, density, pooled levels, level lists, the kernel) and the token permutation in and out,
then writes a torch.profiler table of the CUDA kernels of five calls. ``--estimate-configs`` also times the
estimate kernel at other launch shapes (sampled query rows per program, KV blocks per dot, warps) and checks that
each gives the default's importance, and the level assignment and lists at other launches (rows per program,
warps; the same levels and lists) against a stable `torch.sort` of the importance rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

SHAPES = {"wan1.3b-480p": ((21, 30, 52), 12), "wan14b-720p": ((21, 45, 80), 40)}
# (rows, blocks per dot, warps, stages, programs per SM) of the estimate kernel; the first is the default
ESTIMATE_CONFIGS = ((128, 2, 8, 3, 2), (128, 2, 8, 3, 1), (128, 2, 8, 3, 3), (128, 4, 8, 3, 2), (128, 2, 4, 3, 2),
                    (128, 2, 8, 4, 2), (256, 2, 8, 3, 1), (256, 4, 8, 3, 1), (64, 2, 4, 3, 4))
# (rows per program, warps) of the level assignment and the level lists; None: the default
LEVEL_CONFIGS = ((None, None), (1, 1), (1, 2), (1, 4), (2, 1), (2, 4), (4, 4), (8, 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="wan1.3b-480p")
    parser.add_argument("--spec", default="pyramid")
    parser.add_argument("--estimate-configs", action="store_true")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    from triton.testing import do_bench

    from accel.bench.methods import _bench, local_qkv
    from accel.geometry import TokenLayout
    from accel.kernels.pyramid import pyramid_attention
    from accel.kernels.pyramid_estimate import estimate_block_importance_triton
    from accel.kernels.pyramid_levels import assign_levels, level_lists
    from accel.kernels.pyramid_pool import pool_kv_levels
    from accel.kernels.pyramid_reference import level_density
    from accel.methods.base import AttentionCall
    from accel.methods.registry import parse_method_spec

    def bench(fn) -> float:
        return _bench(fn, rep=50)

    def bench_one_rep(fn) -> float:  # the old protocol: do_bench sizes its repetitions by time (1 at 14B)
        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))

    grid, H = SHAPES[args.shape]
    layout = TokenLayout(1, *grid)
    method = parse_method_spec(args.spec).method
    dev = torch.device("cuda")
    plan = method.build_plan(layout, H, dev)
    q, k, v = local_qkv(layout, H, 128, torch.bfloat16, torch.Generator(device="cuda").manual_seed(0))
    perm = method.token_order(layout, dev)
    inverse = torch.argsort(perm) if perm is not None else None
    if perm is not None:
        q, k, v = (t.index_select(1, perm) for t in (q, k, v))
    call = AttentionCall()
    block = method.block_size
    res: dict = {"shape": args.shape, "grid": list(grid), "heads": H, "spec": args.spec, "block": block,
                 "device": torch.cuda.get_device_name()}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        res["dense_cudnn_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v))))
    res["call_ms"] = bench(lambda: method.run(q, k, v, layout, plan, call))
    res["call_ms_do_bench_by_time"] = bench_one_rep(lambda: method.run(q, k, v, layout, plan, call))
    if perm is not None:
        res["permute_ms"] = bench(lambda: ((q.index_select(1, perm), k.index_select(1, perm),
                                            v.index_select(1, perm)), q.index_select(1, inverse)))
    importance = estimate_block_importance_triton(q, k, block, seed=call.seed)
    res["estimate_ms"] = bench(lambda: estimate_block_importance_triton(q, k, block, seed=call.seed))
    res["assign_levels_ms"] = bench(lambda: assign_levels(importance, method.mode, method.thresholds,
                                                          method.min_full_ratio, None, with_density=True))
    levels = assign_levels(importance, method.mode, method.thresholds, method.min_full_ratio, None)
    res["density"] = float(level_density(levels))
    res["level_density_ms"] = bench(lambda: level_density(levels))
    res["plan_call_ms"] = bench(lambda: method.plan_call(q, k, layout, call))
    res["pool_ms"] = bench(lambda: pool_kv_levels(k, v, block))
    res["level_lists_ms"] = bench(lambda: level_lists(levels))
    res["attention_ms"] = bench(lambda: pyramid_attention(q, k, v, levels, block))
    res["efficiency_attention"] = res["density"] * res["dense_cudnn_ms"] / res["attention_ms"]
    res["speedup_call"] = res["dense_cudnn_ms"] / res["call_ms"]
    if "permute_ms" in res:
        res["speedup_call_with_permutation"] = res["dense_cudnn_ms"] / (res["call_ms"] + res["permute_ms"])
    print(json.dumps(res, indent=1), flush=True)
    if args.estimate_configs:
        configs: dict = {}
        for rows, kb, warps, stages, per_sm in ESTIMATE_CONFIGS:
            name = f"rows{rows}_kb{kb}_w{warps}_s{stages}_p{per_sm}"

            def est(rows=rows, kb=kb, warps=warps, stages=stages, per_sm=per_sm):
                return estimate_block_importance_triton(q, k, block, seed=call.seed, rows=rows, blocks_per_dot=kb,
                                                        num_warps=warps, num_stages=stages, programs_per_sm=per_sm)
            try:
                diff = float((est() - importance).abs().max())
                configs[name] = {"ms": bench(est), "max_abs_diff": diff}
            except Exception as exc:  # noqa: BLE001 - a probe: report what failed and go on
                configs[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(name, configs[name], flush=True)
        res["estimate_configs"] = configs
        want_idx, want_ends = level_lists(levels)
        level_configs: dict = {}
        for rows, warps in LEVEL_CONFIGS:
            name = f"rows{rows}_w{warps}"
            got = assign_levels(importance, method.mode, method.thresholds, method.min_full_ratio, None, rows=rows,
                                num_warps=warps)
            idx, ends = level_lists(levels, rows=rows, num_warps=warps)
            level_configs[name] = {
                "assign_ms": bench(lambda rows=rows, warps=warps: assign_levels(
                    importance, method.mode, method.thresholds, method.min_full_ratio, None, rows=rows,
                    num_warps=warps)),
                "lists_ms": bench(lambda rows=rows, warps=warps: level_lists(levels, rows=rows, num_warps=warps)),
                "equal": bool(torch.equal(got, levels) and torch.equal(idx, want_idx) and torch.equal(ends, want_ends))}
            print(name, level_configs[name], flush=True)
        flat = importance.reshape(-1, importance.shape[-1])
        level_configs["torch_sort_stable_ms"] = bench(lambda: torch.sort(flat, dim=-1, descending=True, stable=True))
        res["level_configs"] = level_configs
    for _ in range(3):
        method.run(q, k, v, layout, plan, call)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            method.run(q, k, v, layout, plan, call)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pyramid_profile_{args.shape}{args.tag}"
    (out / f"{stem}.txt").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(table)
    return 0 if math.isfinite(res["call_ms"]) else 1


if __name__ == "__main__":
    sys.exit(main())
