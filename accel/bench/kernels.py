"""Block-sparse attention benchmark: ours vs dense cuDNN / FlashAttention SDPA vs compiled flex_attention.

Protocol: correctness first (relative L2 vs the reference, poisoned output),
then triton.testing.do_bench medians at the standard shapes and tile densities, forward and fwd+bwd.
Efficiency = density x dense cuDNN time / our time.

    PYTHONUNBUFFERED=1 accel bench kernels --out $OUT [--sweep] [--shapes 0,1,2]
    (or python -m accel.bench.kernels ...)
"""

# ruff: noqa: B023  (closures are timed immediately, inside their loop iteration)
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

from accel.bench.plotting import save_figure
from accel.kernels import (
    BlockLayout,
    KernelConfig,
    KernelConfigs,
    block_sparse_attention,
    reference_block_sparse_attention,
)
from accel.kernels import configs as kc

SHAPES = [  # (name, heads, tokens, head_dim)
    ("wan1.3b-480p-81f", 12, 32760, 128),
    ("sd3-like-32k-d64", 24, 32768, 64),
    ("wan14b-720p-81f", 40, 75600, 128),
]
DENSITIES = [0.10, 0.25, 0.50, 0.75]


def make_layout(nq: int, nk: int, density: float, block: int, device, seed: int = 0) -> BlockLayout:
    """Band around the diagonal (2/3 of each row's tiles) plus random tiles, constant tiles per row."""
    g = torch.Generator().manual_seed(seed)
    per_row = max(1, round(density * nk))
    band = max(1, (2 * per_row) // 3)
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        c = (i * nk) // nq
        lo = min(max(0, c - band // 2), nk - band)
        mask[i, lo:lo + band] = True
        rest = per_row - band
        if rest > 0:
            free = (~mask[i]).nonzero().flatten()
            pick = free[torch.randperm(free.numel(), generator=g)[:rest]]
            mask[i, pick] = True
    return BlockLayout.from_mask(mask.to(device), block, block)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ correctness
def check_correctness(log) -> list[dict]:
    dev = "cuda"
    rows = []
    cases = [  # B, Sq, Sk, H, D, T, block, dtype, per_head
        (2, 1000, 1000, 4, 128, 0, 128, torch.bfloat16, False),
        (2, 1000, 777, 4, 64, 77, 128, torch.float16, True),
        (1, 2050, 2050, 2, 80, 33, 64, torch.bfloat16, False),
        (1, 4096, 4096, 2, 128, 512, 128, torch.bfloat16, False),
        (2, 999, 1500, 3, 64, 20, 64, torch.float32, False),
    ]
    for B, Sq, Sk, H, D, T, blk, dt, per_head in cases:
        L = H if per_head else 1
        nq, nk = -(-Sq // blk), -(-Sk // blk)
        mask = torch.rand(L, nq, nk, device=dev) < 0.4
        mask[:, 0] = False  # an empty row (extras still visible unless padded)
        lay = BlockLayout.from_mask(mask, blk)
        # Strided views of one joint buffer, text keys after the video keys (as diffusers builds them).
        base = torch.randn(B, max(Sq, Sk + T), 3, H, D, device=dev, dtype=dt)
        q, k, v = base[:, :Sq, 0], base[:, :Sk + T, 1], base[:, :Sk + T, 2]
        text = dict(text_keys=(Sk, T), text_mask=torch.rand(B, T, device=dev) < 0.7) if T else {}
        out = torch.full_like(q, float("nan"))
        o, lse = block_sparse_attention(q, k, v, lay, return_lse=True, **text)
        block_sparse_attention(q, k, v, lay, out=out, **text)
        ro, rl = reference_block_sparse_attention(q.float(), k.float(), v.float(), lay, return_lse=True, **text)
        fin = torch.isfinite(rl)
        r = dict(case=f"B{B} Sq{Sq} Sk{Sk} H{H} D{D} T{T} blk{blk} {dt} L{L}", fwd=rel(o, ro),
                 out_poison_nan=int(out.isnan().sum()), out_eq=bool(torch.equal(out, o)),
                 lse_max=float((lse[fin] - rl[fin]).abs().max()),
                 lse_inf_ok=bool(torch.equal(~fin, lse.isinf())))
        # gradients
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o2 = block_sparse_attention(qq, kk, vv, lay, **text)
        do = torch.randn_like(o2)
        o2.backward(do)
        rq, rk, rv = (t.detach().float().requires_grad_() for t in (q, k, v))
        ro2 = reference_block_sparse_attention(rq, rk, rv, lay, **text)
        ro2.backward(do.float())
        r["dq"] = rel(qq.grad, rq.grad)
        r["dk"], r["dv"] = rel(kk.grad[:, :Sk], rk.grad[:, :Sk]), rel(vv.grad[:, :Sk], rv.grad[:, :Sk])
        if T:  # the text rows of the joint buffer
            r["dek"], r["dev"] = rel(kk.grad[:, Sk:], rk.grad[:, Sk:]), rel(vv.grad[:, Sk:], rv.grad[:, Sk:])
        tol = 1e-5 if dt == torch.float32 else 1e-2
        errs = [r[x] for x in ("fwd", "dq", "dk", "dv", "dek", "dev") if x in r]
        r["ok"] = bool(max(errs) <= tol and r["out_poison_nan"] == 0 and r["lse_inf_ok"])
        log(f"  correctness {r}")
        rows.append(r)
        del base
    return rows


# -------------------------------------------------------------------------------------------- timing
def bench(fn, rep=200):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=50, rep=rep, return_mode="median"))


def flex_block_mask(lay: BlockLayout, S: int):
    from torch.nn.attention.flex_attention import BlockMask
    mask = lay.to_mask()[0]
    counts = mask.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    zero = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(
        zero[None, None], idx[None, None], counts[None, None], idx[None, None],
        BLOCK_SIZE=lay.block_m, seq_lengths=(S, S),
    )


def run_shape(name, H, S, D, densities, args, log, flex_fns, configs: KernelConfigs | None = None):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev, dt = "cuda", torch.bfloat16
    blk = args.block
    res = dict(shape=name, H=H, S=S, D=D, block=blk, dense={}, sparse=[])
    q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=dt) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views, as diffusers passes them
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            res["dense"][label + "_fwd"] = bench(lambda: sdpa(qt, kt, vt))
    try:  # optional extra baseline, only when the xformers extra is installed
        import xformers.ops as xops

        res["dense"]["xformers_fwd"] = bench(lambda: xops.memory_efficient_attention(q, k, v))
    except ImportError:
        res["dense"]["xformers_fwd"] = None
    log(f"{name}: dense cudnn fwd {res['dense']['cudnn_fwd']:.2f} ms, "
        f"flash fwd {res['dense']['flash_fwd']:.2f} ms, xformers fwd {res['dense']['xformers_fwd']}")
    if args.bwd:
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        dog = torch.randn_like(q)

        def cudnn_fb():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                sdpa(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)).transpose(1, 2).backward(dog)
        res["dense"]["cudnn_fwdbwd"] = bench(cudnn_fb)
        log(f"{name}: dense cudnn fwd+bwd {res['dense']['cudnn_fwdbwd']:.2f} ms")
    nb = -(-S // blk)
    for dens in densities:
        lay = make_layout(nb, nb, dens, blk, dev)
        d = lay.density()
        row = dict(target=dens, density=d)
        out = torch.empty_like(q)
        row["ours_fwd"] = bench(lambda: block_sparse_attention(q, k, v, lay, out=out, configs=configs))
        row["eff_fwd"] = d * res["dense"]["cudnn_fwd"] / row["ours_fwd"]
        if args.flex:
            bm = flex_block_mask(lay, S)
            f = flex_fns["fwd"]
            f(qt, kt, vt, block_mask=bm)  # compile
            row["flex_fwd"] = bench(lambda: f(qt, kt, vt, block_mask=bm))
            row["vs_flex_fwd"] = row["flex_fwd"] / row["ours_fwd"]
        if args.bwd:
            def ours_fb():
                block_sparse_attention(qg, kg, vg, lay, configs=configs).backward(dog)
            row["ours_fwdbwd"] = bench(ours_fb)
            row["eff_fwdbwd"] = d * res["dense"]["cudnn_fwdbwd"] / row["ours_fwdbwd"]
            if args.flex:
                def flex_fb():
                    f(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), block_mask=bm).transpose(
                        1, 2).backward(dog)
                row["flex_fwdbwd"] = bench(flex_fb)
                row["vs_flex_fwdbwd"] = row["flex_fwdbwd"] / row["ours_fwdbwd"]
        log(f"{name} density {d:.3f}: " + ", ".join(
            f"{kk}={vv:.3f}" for kk, vv in row.items() if kk not in ("target", "density")))
        res["sparse"].append(row)
    return res


def sweep(args, log) -> tuple[list[dict], dict[int, KernelConfigs]]:
    """Time compute-tile / warps / stages variants at one shape per head dim; report the best.

    Returns the timings and, per head dim, the winners (passed as ``configs=`` to the timed runs).
    """
    KC = KernelConfig
    fwd_cfgs = [KC(128, 128, 8, 3), KC(128, 64, 8, 4), KC(128, 128, 8, 3, True), KC(128, 128, 8, 2, True),
                KC(128, 64, 8, 3, True), KC(128, 64, 8, 4, True), KC(128, 64, 4, 3, True)]
    dkdv_cfgs = [KC(32, 128, 8, 4), KC(64, 128, 8, 2), KC(64, 64, 4, 3), KC(32, 64, 4, 3)]
    dq_cfgs = [KC(128, 64, 8, 2), KC(64, 64, 4, 3), KC(128, 32, 4, 3)]
    out = []
    winners: dict[int, KernelConfigs] = {}
    for name, H, S, D in (SHAPES[0], SHAPES[1]):
        base = torch.randn(1, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
        q, k, v = base[:, :, 0], base[:, :, 1], base[:, :, 2]
        lay = make_layout(-(-S // 128), -(-S // 128), 0.25, 128, "cuda")
        o = torch.empty_like(q)
        ref = None
        for c in fwd_cfgs:
            cfgs = KernelConfigs(fwd=c)
            try:
                block_sparse_attention(q, k, v, lay, out=o, configs=cfgs)
                if ref is None:
                    ref = o.clone()
                err = rel(o, ref)
                t = bench(lambda: block_sparse_attention(q, k, v, lay, out=o, configs=cfgs), rep=100)
            except Exception as e:  # a config that does not compile (shared memory) is just skipped
                t, err = float("nan"), repr(e)[:200]
            log(f"  sweep fwd {name} {c}: {t:.3f} ms err={err}")
            out.append(dict(kind="fwd", shape=name, cfg=c.__dict__, ms=t, err=err))
        best = min((r for r in out if r["kind"] == "fwd" and r["shape"] == name and r["ms"] == r["ms"]
                    and isinstance(r["err"], float) and r["err"] < 1e-2), key=lambda r: r["ms"])
        won = KernelConfigs(fwd=KC(**best["cfg"]))
        log(f"  fwd winner D={D}: {best['cfg']}")
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        dog = torch.randn_like(q)
        for kname, cfgs in (("dkdv", dkdv_cfgs), ("dq", dq_cfgs)):
            for c in cfgs:
                trial = dataclasses.replace(won, **{kname: c})
                try:
                    t = bench(lambda: block_sparse_attention(qg, kg, vg, lay, configs=trial).backward(dog), rep=100)
                except Exception as e:
                    t = float("nan")
                    log(f"  sweep failed {e!r}"[:300])
                log(f"  sweep {kname} {name} {c}: fwd+bwd {t:.3f} ms")
                out.append(dict(kind=kname, shape=name, cfg=c.__dict__, ms=t))
            best = min((r for r in out if r["kind"] == kname and r["shape"] == name and r["ms"] == r["ms"]),
                       key=lambda r: r["ms"])
            won = dataclasses.replace(won, **{kname: KC(**best["cfg"])})
            log(f"  {kname} winner D={D}: {best['cfg']}")
        winners[D] = won
        del base
    return out, winners


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accel bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench",
                   help="result folder (default: %(default)s; --out benchmarks/results updates the committed ones)")
    p.add_argument("--shapes", default="0,1,2")
    p.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--no-bwd", dest="bwd", action="store_false")
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tag", default="kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("accel bench kernels needs a CUDA GPU; none is visible (CPU timings mean nothing here).",
              file=sys.stderr)
        return 3
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    from accel.bench import git_commit

    commit = git_commit() or "?"
    import triton
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=commit, block=args.block, protocol="do_bench median, bf16, B=1", shapes=[])
    path = os.path.join(args.out, f"{args.tag}.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    winners: dict[int, KernelConfigs] = {}
    if args.sweep:
        result["sweep"], winners = sweep(args, log)
        save()
    if args.check:
        result["correctness"] = check_correctness(log)
        save()
    result["configs"] = {n: {str(k): dataclasses.asdict(v) for k, v in t.items()} for n, t in (
        ("fwd", kc.FWD_CONFIGS), ("dkdv", kc.BWD_DKDV_CONFIGS), ("dq", kc.BWD_DQ_CONFIGS))}
    result["sweep_winners"] = {str(d): dataclasses.asdict(c) for d, c in winners.items()}
    flex_fns = {}
    if args.flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex_fns["fwd"] = torch.compile(flex_attention, dynamic=False)
    densities = [float(x) for x in args.densities.split(",") if x]
    for i in [int(x) for x in args.shapes.split(",") if x]:
        name, H, S, D = SHAPES[i]
        result["shapes"].append(run_shape(name, H, S, D, densities, args, log, flex_fns, winners.get(D)))
        save()
        torch.cuda.empty_cache()
    log("summary (ms; eff = density x cudnn / ours)")
    for r in result["shapes"]:
        dn = r["dense"]
        log(f"{r['shape']} H={r['H']} S={r['S']} D={r['D']}: cudnn fwd {dn['cudnn_fwd']:.2f} flash fwd "
            f"{dn['flash_fwd']:.2f} cudnn fwd+bwd {dn.get('cudnn_fwdbwd', math.nan):.2f}")
        for s in r["sparse"]:
            log(f"   dens {s['density']:.3f} ours fwd {s['ours_fwd']:.2f} eff {s['eff_fwd']:.2f} "
                f"flex {s.get('flex_fwd', math.nan):.2f} x{s.get('vs_flex_fwd', math.nan):.2f} | fwd+bwd "
                f"{s.get('ours_fwdbwd', math.nan):.2f} eff {s.get('eff_fwdbwd', math.nan):.2f} flex "
                f"{s.get('flex_fwdbwd', math.nan):.2f} x{s.get('vs_flex_fwdbwd', math.nan):.2f}")
    save()
    try:
        plot(result, os.path.join(args.out, f"{args.tag}.png"))
    except Exception as e:  # matplotlib missing: plot later from the JSON with --plot-only
        log(f"no plot: {e!r}")
    return 0


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = result["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, r in zip(axes[0], shapes, strict=True):
        d = [s["density"] for s in r["sparse"]]
        ax.plot(d, [s["eff_fwd"] for s in r["sparse"]], "o-", label="ours fwd")
        if "flex_fwd" in r["sparse"][0]:
            ax.plot(d, [s["density"] * r["dense"]["cudnn_fwd"] / s["flex_fwd"] for s in r["sparse"]], "s--",
                    label="flex fwd")
        if "eff_fwdbwd" in r["sparse"][0]:
            ax.plot(d, [s["eff_fwdbwd"] for s in r["sparse"]], "o-", label="ours fwd+bwd")
            if "flex_fwdbwd" in r["sparse"][0]:
                eff = [s["density"] * r["dense"]["cudnn_fwdbwd"] / s["flex_fwdbwd"] for s in r["sparse"]]
                ax.plot(d, eff, "s--", label="flex fwd+bwd")
        ax.axhline(0.85, color="gray", lw=0.5)
        ax.set_title(f"{r['shape']} (H={r['H']}, S={r['S']}, D={r['D']})", fontsize=9)
        ax.set_xlabel("tile density")
        ax.set_ylabel("efficiency vs dense cuDNN")
        ax.set_ylim(0, 1.2)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, torch {result['torch']}, triton {result['triton']}", fontsize=9)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-only":
        with open(sys.argv[2]) as f:
            plot(json.load(f), sys.argv[2].replace(".json", ".png"))
    else:
        sys.exit(main())
