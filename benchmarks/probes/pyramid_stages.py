"""Probe: where the time of one pyramid attention call goes on a GPU (estimate, levels, lists, pooling, kernel).

    python benchmarks/probes/pyramid_stages.py [--out DIR]   (writes pyramid_stages_b<block>.json; GPU only)

Times each stage at the Wan2.1-1.3B 480p 81-frame shape with `do_bench`, the kernel at several launch
configurations, each level alone, a launch without tiles (the fixed cost per program), the pooled levels alone,
the estimate's launch configurations, and the block-sparse kernel over the level-1 blocks alone for comparison.
``--kernel-only`` skips the stage timings before the kernel; ``--tag`` suffixes the file name.
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
    parser.add_argument("--grid", default="21x30x52")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--kernel-only", action="store_true", help="time only the kernel configurations")
    parser.add_argument("--tag", default="", help="suffix of the output file name")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    from triton.testing import do_bench

    from accel.bench.methods import local_qkv
    from accel.geometry import TokenLayout
    from accel.kernels import pyramid as pk
    from accel.kernels.pyramid_pool import pool_kv_levels
    from accel.kernels.pyramid_reference import (
        estimate_block_importance,
        level_density,
        threshold_levels,
        topk_levels,
    )

    def bench(fn) -> float:
        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))

    grid = tuple(int(x) for x in args.grid.split("x"))
    layout = TokenLayout(1, *grid)
    H, D, block = args.heads, 128, args.block
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = local_qkv(layout, H, D, torch.bfloat16, gen)
    res: dict = {"grid": list(grid), "heads": H, "block": block, "device": torch.cuda.get_device_name()}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        res["dense_cudnn_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v))))
    imp = estimate_block_importance(q, k, block)
    levels = topk_levels(imp, (0.09, 0.14, 0.22, 0.30))

    def time_stages() -> None:
        res["estimate_ms"] = bench(lambda: estimate_block_importance(q, k, block))

        def estimate_half(chunk=1 << 28):
            # the same estimate with the sampled logits from a bf16 matmul (tensor cores), larger chunks
            B, V, H_, D_ = q.shape
            n = -(-V // block)
            sq = block // 4
            g = torch.Generator(device="cuda").manual_seed(0)
            noise = torch.rand(2, B, H_, block, generator=g, device="cuda")
            pq = noise[0].topk(sq, -1).indices.sort(-1).values
            pkk_ = noise[1].topk(sq, -1).indices.sort(-1).values
            starts = torch.arange(n, device="cuda") * block
            length = torch.clamp(V - starts, max=block)[None, None, :, None]
            iq = starts[None, None, :, None] + pq[:, :, None, :] % length
            ik = starts[None, None, :, None] + pkk_[:, :, None, :] % length
            qh, kh = q.transpose(1, 2), k.transpose(1, 2)
            qs = torch.gather(qh, 2, iq.reshape(B, H_, -1, 1).expand(-1, -1, -1, D_)).view(B, H_, n, sq, D_)
            ks = torch.gather(kh, 2, ik.reshape(B, H_, -1, 1).expand(-1, -1, -1, D_))
            step = max(1, chunk // (B * H_ * sq * n * sq))
            rows = []
            for i0 in range(0, n, step):
                i1 = min(n, i0 + step)
                s_ = torch.matmul(qs[:, :, i0:i1], ks.transpose(-1, -2)[:, :, None])
                bm = s_.view(B, H_, i1 - i0, sq, n, sq).amax(-1).float() * (1 / math.sqrt(D_))
                rows.append(torch.exp(bm - bm.amax(-1, keepdim=True)).amax(3))
            S_ = torch.cat(rows, 2)
            return S_ / S_.sum(-1, keepdim=True)

        from accel.kernels.pyramid_estimate import estimate_block_importance_triton

        res["estimate_fused_ms"] = bench(lambda: estimate_block_importance_triton(q, k, block))
        per_dot = {}
        for kb in (1, 2, 4, 8):
            try:
                per_dot[f"kb{kb}"] = bench(
                    lambda kb=kb: estimate_block_importance_triton(q, k, block, blocks_per_dot=kb))
            except Exception as err:  # too wide for shared memory
                per_dot[f"kb{kb}"] = repr(err)[:120]
        res["estimate_fused_blocks_per_dot_ms"] = per_dot
        fused = estimate_block_importance_triton(q, k, block)
        res["estimate_fused_max_abs_diff"] = float((fused - imp).abs().max())
        res["estimate_fused_topk_agreement"] = float((topk_levels(fused, (0.09, 0.14, 0.22, 0.30))
                                                      == topk_levels(imp, (0.09, 0.14, 0.22, 0.30))).float().mean())
        res["estimate_half_ms"] = bench(estimate_half)
        res["estimate_half_max_abs_diff"] = float((estimate_half() - imp).abs().max())
        res["estimate_half_topk_agreement"] = float((topk_levels(estimate_half(), (0.09, 0.14, 0.22, 0.30))
                                                     == topk_levels(imp, (0.09, 0.14, 0.22, 0.30))).float().mean())
        res["threshold_levels_ms"] = bench(lambda: threshold_levels(imp, (0.5, 0.6, 0.7, 0.8)))
        levels_t = threshold_levels(imp, (0.5, 0.6, 0.7, 0.8))
        res["density_threshold"] = float(level_density(levels_t))
        res["density_topk"] = float(level_density(levels))
        res["level_lists_ms"] = bench(lambda: pk.level_lists(levels))
        from accel.kernels import pyramid_levels as pl

        res["level_lists_fused_ms"] = bench(lambda: pl.level_lists(levels))
        res["level_lists_fused_equal"] = all(torch.equal(a, b) for a, b in zip(pl.level_lists(levels),
                                                                              pk.level_lists(levels), strict=True))
        eye = torch.eye(levels.shape[-1], dtype=torch.bool, device="cuda")
        for mode, taus, want in (("threshold", (0.5, 0.6, 0.7, 0.8), levels_t),
                                 ("topk", (0.09, 0.14, 0.22, 0.30), levels)):
            res[f"{mode}_levels_fused_ms"] = bench(lambda mode=mode, taus=taus: pl.assign_levels(imp, mode, taus))
            got = pl.assign_levels(imp, mode, taus)
            res[f"{mode}_levels_fused_agreement"] = float((got == torch.where(eye, 1, want)).float().mean())
        res["pool_ms"] = bench(lambda: (pk.pooled_buffer(k, block), pk.pooled_buffer(v, block)))
        res["pool_fused_ms"] = bench(lambda: pool_kv_levels(k, v, block))
        res["pool_fused_configs_ms"] = {
            f"chunk{c}_w{w}": bench(lambda c=c, w=w: pool_kv_levels(k, v, block, chunk=c, num_warps=w))
            for c, w in ((16, 1), (32, 2), (32, 4), (64, 4), (64, 8)) if block % c == 0}
        kp_t, vp_t = pk.pooled_buffer(k, block)[0], pk.pooled_buffer(v, block)[0]
        kp_f, vp_f = pool_kv_levels(k, v, block)[:2]
        res["pool_fused_max_abs_diff"] = float(max((kp_t.float() - kp_f.float()).abs().max(),
                                                   (vp_t.float() - vp_f.float()).abs().max()))
        res["op_total_ms"] = bench(lambda: pk.pyramid_attention(q, k, v, levels, block))

    if not args.kernel_only:
        time_stages()
    # the kernel alone at several launch configs
    B, NV = 1, layout.video_tokens
    kp, vp, r4, r8 = pool_kv_levels(k, v, block)
    idx, ends = pk.level_lists(levels)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, NV, device="cuda", dtype=torch.float32)
    configs = {}

    def launch(nw, ns, tma, pack=0, o=out, lists=(idx, ends)):
        knobs = {"num_warps": nw, "num_stages": ns, "USE_TMA": tma, "PACK": pack}
        pk.launch_fwd(q, k, v, kp, vp, None, None, None, o, lse, *lists, r4, r8, block, 1 / math.sqrt(D), knobs)

    nw = 8 if block * D >= 128 * 128 else 4
    # PACK: lanes per packed tile of the pooled levels with fewer rows (0 = one block per tile)
    packs = (0, 32, 64)
    trials = [(False, 0, nw, 3)] + [(True, pack, nw, ns) for pack in packs for ns in (3, 2)]
    outs = {}
    for tma, pack, nw, ns in trials:
        name = f"{'tma' if tma else 'pointers'}{f'_pack{pack}' if pack else ''}_w{nw}s{ns}"
        try:
            configs[name] = bench(lambda a=(nw, ns, tma, pack): launch(*a))
            outs[name] = torch.empty_like(q)
            launch(nw, ns, tma, pack, o=outs[name])
        except Exception as err:  # a config that does not fit (shared memory)
            configs[name] = repr(err)[:120]
    base = next(iter(outs.values()))
    res["max_abs_diff_vs_pointers"] = {name: float((o.float() - base.float()).abs().max()) for name, o in outs.items()}
    res["kernel_configs_ms"] = configs
    # each level alone (the other blocks skipped), by the default knobs and each packing: the per-tile cost
    default = pk.fwd_knobs(block, D, True)
    res["default_knobs"] = default
    per_level: dict = {}
    for p in (1, 2, 4, 8):
        only = pk.level_lists(torch.where(levels == p, p, 0).to(levels.dtype))
        per_level[f"p{p}_blocks"] = int((levels == p).sum())
        for pack in packs:
            if pack and pack <= block // p:
                continue
            per_level[f"p{p}_pack{pack}_ms"] = bench(
                lambda pack=pack, only=only: launch(default["num_warps"], default["num_stages"], True, pack,
                                                    lists=only))
    res["level_alone_ms"] = per_level
    from accel.kernels.pyramid_estimate import estimate_block_importance_triton

    res["estimate_launch_ms"] = {
        f"w{w}s{st}": bench(lambda w=w, st=st: estimate_block_importance_triton(q, k, block, num_warps=w,
                                                                                 num_stages=st))
        for w, st in ((8, 3), (8, 2), (4, 2), (4, 3), (8, 1))}
    # what every program pays without tiles (Q load, empty level loops, store), and the pooled levels alone
    # beside the block-sparse kernel over the level-1 blocks (a split into two kernels)
    none = pk.level_lists(torch.zeros_like(levels))
    res["no_tiles_ms"] = bench(lambda: launch(default["num_warps"], default["num_stages"], True, default["PACK"],
                                              lists=none))
    pooled = pk.level_lists(torch.where(levels > 1, levels, 0).to(levels.dtype))
    res["pooled_only_ms"] = bench(lambda: launch(default["num_warps"], default["num_stages"], True,
                                                 default["PACK"], lists=pooled))
    # level-1-only blocks through the block-sparse kernel at the same block size
    from accel.kernels import BlockLayout, block_sparse_attention

    lay = BlockLayout.from_mask((levels > 0)[0], block)
    res["block_sparse_all_nonzero_ms"] = bench(lambda: block_sparse_attention(q, k, v, lay))
    res["block_sparse_density"] = lay.density()
    lay1 = BlockLayout.from_mask((levels == 1)[0], block)
    res["block_sparse_level1_ms"] = bench(lambda: block_sparse_attention(q, k, v, lay1))
    res["level1_density"] = lay1.density()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"pyramid_stages_b{block}{args.tag}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
