"""Probe: the Gluon pyramid forward against the Triton one on a GPU (sm_90): errors, then kernel times.

    python benchmarks/probes/pyramid_gluon_ab.py [--out DIR] [--tag TAG]   (writes pyramid_gluon_ab<tag>.json)

Errors: both kernels against `reference_pyramid_attention` (fp32) on random level maps at small shapes (token
counts not a multiple of the block, batch 2, per-head maps, text keys with a mask, blocks 64/128, head dims
64/128, fp16/bf16). Times: the kernel alone at Wan2.1-1.3B 480p 81f (12 heads, D=128, bf16) for rank quotas at
15% and the default thresholds, blocks 128 and 64, each level alone, and a launch without tiles; the
warp-specialised form also with one program per item (``_grid``) instead of its default (persistent, one
program per SM taking the next item from an atomic counter), with the items dealt out statically in a snake
(``_static``), and by decreasing cost (``_cost``) or by cost inside each batch x head (``_head``) instead of in
index order.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--tag", default="")
    parser.add_argument("--skip-errors", action="store_true")
    parser.add_argument("--shape", choices=("wan1.3b-480p", "wan14b-720p"), default="wan1.3b-480p")
    parser.add_argument("--kinds", default="", help="comma-separated warp-specialised variants to run (default all)")
    parser.add_argument("--blocks", default="128,64", help="block sizes to time at 1.3B 480p")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    from triton.testing import do_bench

    from accel.bench.methods import local_qkv
    from accel.geometry import TokenLayout
    from accel.kernels import pyramid as pk
    from accel.kernels._common import text_visibility
    from accel.kernels.pyramid_gluon import launch_fwd_gluon, work_order
    from accel.kernels.pyramid_levels import level_lists
    from accel.kernels.pyramid_pool import pool_kv_levels
    from accel.kernels.pyramid_reference import (
        estimate_block_importance,
        level_density,
        reference_pyramid_attention,
        threshold_levels,
        topk_levels,
    )

    def bench(fn) -> float:
        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))

    def prepared(q, k, v, levels, block, T, emask):
        NV = q.shape[1]
        kv, vv = k[:, :NV], v[:, :NV]
        ek, ev = (k[:, NV:], v[:, NV:]) if T else (None, None)
        kp, vp, r4, r8 = pool_kv_levels(kv, vv, block)
        idx, ends = level_lists(levels)
        return kv, vv, kp, vp, ek, ev, emask, idx, ends, r4, r8

    # the warp-specialised form's scheduling variants: (programs, order, dynamic); programs "sm" = one per SM (the
    # default), "item" = one per item; orders: None the rows' own, "cost" by decreasing cost, "head" by cost inside
    # each batch x head; dynamic: programs take the next item from an atomic counter, else a static snake
    ws_kinds = {"gluon_ws": ("sm", None, True), "gluon_ws_grid": ("item", None, False),
                "gluon_ws_static": ("sm", None, False), "gluon_ws_static_cost": ("sm", "cost", False),
                "gluon_ws_cost": ("sm", "cost", True), "gluon_ws_head": ("sm", "head", True)}
    if args.kinds:
        unknown = sorted(set(args.kinds.split(",")) - set(ws_kinds))
        if unknown:
            parser.error(f"--kinds: unknown {', '.join(unknown)} (known: {', '.join(ws_kinds)})")
        ws_kinds = {k: ws_kinds[k] for k in args.kinds.split(",")}
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def run(kind, q, k, v, levels, block, T=0, emask=None):
        ws = kind in ws_kinds
        B, NV, H, D = q.shape
        kv, vv, kp, vp, ek, ev, em, idx, ends, r4, r8 = prepared(q, k, v, levels, block, T, emask)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, NV, device=q.device, dtype=torch.float32)
        scale = 1 / math.sqrt(D)
        if kind == "triton":
            knobs = pk.fwd_knobs(block, D, pk.fwd_uses_tma(kv, vv, kp, vp))
            fn = lambda: pk.launch_fwd(q, kv, vv, kp, vp, ek, ev, em, out, lse, idx, ends, r4, r8, block,  # noqa: E731
                                       scale, knobs)
        else:
            programs, order, dynamic = ws_kinds.get(kind, ("sm", None, True))
            group = {"cost": 0, "head": ends.shape[-2]}.get(order)

            def fn():  # an order is made per call, as a caller would, so its cost is timed with the kernel
                launch_fwd_gluon(q, kv, vv, kp, vp, ek, ev, em, out, lse, idx, ends, r4, r8, block, scale, ws,
                                 sms if programs == "sm" else 2**31,
                                 None if group is None else work_order(ends, group=group), dynamic)
        return fn, out, lse

    res: dict = {"device": torch.cuda.get_device_name(), "errors": [], "times": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    if not args.skip_errors:
        cases = [  # (B, NV, H, D, T, masked, block, dtype)
            (1, 1000, 2, 128, 0, False, 128, torch.bfloat16),
            (2, 1500, 3, 128, 77, True, 128, torch.bfloat16),
            (1, 2048, 2, 64, 0, False, 128, torch.float16),
            (2, 777, 2, 128, 40, False, 64, torch.bfloat16),
            (1, 1300, 2, 64, 130, True, 64, torch.float16),
            (1, 4096, 2, 128, 0, False, 128, torch.bfloat16),
        ]
        for B, NV, H, D, T, masked, block, dtype in cases:
            n = -(-NV // block)
            q = torch.randn(B, NV, H, D, device="cuda", dtype=dtype, generator=gen)
            k = torch.randn(B, NV + T, H, D, device="cuda", dtype=dtype, generator=gen)
            v = torch.randn(B, NV + T, H, D, device="cuda", dtype=dtype, generator=gen)
            choice = torch.tensor([0, 1, 2, 4, 8], device="cuda")
            levels = choice[torch.randint(0, 5, (B, H, n, n), device="cuda", generator=gen)].to(torch.int32)
            eye = torch.eye(n, dtype=torch.bool, device="cuda")
            levels = torch.where(eye, 1, levels).to(torch.int32)
            lengths = mask = None
            emask = None
            if T:
                if masked:
                    mask = torch.rand(B, T, device="cuda", generator=gen) > 0.3
                else:
                    lengths = torch.tensor([T, max(1, T // 2)][:B], device="cuda")
                emask = text_visibility(T, lengths, mask, torch.int8)
            ref, ref_lse = reference_pyramid_attention(
                q, k, v, levels, block, video_keys=(0, NV), text_keys=(NV, T) if T else None,
                text_lengths=lengths, text_mask=mask, return_lse=True)
            row = {"case": [B, NV, H, D, T, masked, block, str(dtype)]}
            for name in ("triton", "gluon") + (tuple(ws_kinds) if block == 128 else ()):
                try:
                    fn, out, lse = run(name, q, k, v, levels, block, T, emask)
                    fn()
                    torch.cuda.synchronize()
                    row[name] = float((out.float() - ref.float()).abs().max())
                    row[name + "_lse"] = float((lse - ref_lse.float()).abs().max())
                except Exception as err:
                    row[name] = repr(err)[:300]
            print(row, flush=True)
            res["errors"].append(row)

    layout, H, D = (TokenLayout(1, 21, 30, 52), 12, 128) if args.shape == "wan1.3b-480p" else (
        TokenLayout(1, 21, 45, 80), 40, 128)
    res["shape"] = args.shape
    q, k, v = local_qkv(layout, H, D, torch.bfloat16, gen)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        res["dense_cudnn_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v))))
    for block in tuple(int(b) for b in args.blocks.split(",")) if args.shape == "wan1.3b-480p" else (128,):
        imp = estimate_block_importance(q, k, block)
        n = imp.shape[-1]
        eye = torch.eye(n, dtype=torch.bool, device="cuda")
        maps = {"topk15": topk_levels(imp, (0.09, 0.14, 0.22, 0.30)),
                "threshold": threshold_levels(imp, (0.5, 0.6, 0.7, 0.8))}
        for name, levels in maps.items():
            levels = torch.where(eye, 1, levels).to(torch.int32)
            key = f"b{block}_{name}"
            t: dict = {"density": float(level_density(levels))}
            fn_t, out_t, _ = run("triton", q, k, v, levels, block)
            t["triton_ms"] = bench(fn_t)
            for kind in ("gluon", *ws_kinds) if block == 128 else ("gluon",):
                try:
                    fn_g, out_g, _ = run(kind, q, k, v, levels, block)
                    t[kind + "_ms"] = bench(fn_g)
                    t[kind + "_max_abs_diff_vs_triton"] = float((out_g.float() - out_t.float()).abs().max())
                except Exception as err:
                    t[kind + "_ms"] = repr(err)[:300]
            if name == "topk15" and args.shape == "wan1.3b-480p":
                for p in (1, 2, 4, 8):
                    only = torch.where(levels == p, p, 0).to(torch.int32)
                    t[f"p{p}_blocks"] = int((levels == p).sum())
                    t[f"p{p}_triton_ms"] = bench(run("triton", q, k, v, only, block)[0])
                    for kind in ("gluon", *(k for k in ws_kinds if k == "gluon_ws")) if block == 128 else ("gluon",):
                        try:
                            t[f"p{p}_{kind}_ms"] = bench(run(kind, q, k, v, only, block)[0])
                        except Exception as err:
                            t[f"p{p}_{kind}_ms"] = repr(err)[:200]
                none = torch.zeros_like(levels)
                t["no_tiles_triton_ms"] = bench(run("triton", q, k, v, none, block)[0])
                t["no_tiles_gluon_ms"] = bench(run("gluon", q, k, v, none, block)[0])
                if block == 128:
                    for kind in ws_kinds:
                        t[f"no_tiles_{kind}_ms"] = bench(run(kind, q, k, v, none, block)[0])
                    ends = level_lists(levels)[1]
                    t["work_order_ms"] = bench(lambda e=ends: work_order(e))
            print(key, t, flush=True)
            res["times"][key] = t
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"pyramid_gluon_ab{args.tag}.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
