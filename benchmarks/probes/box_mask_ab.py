"""Probe: the neighborhood box path's two mask forms (SWAR per element vs one small MMA per tile) on a GPU.

    python benchmarks/probes/box_mask_ab.py [--out DIR] [--cases natten-hunyuan,nbhd-hunyuan-third]
        (writes box_mask_ab.json; GPU only, exit 3 without CUDA)

For each case (`accel.bench.methods.CASES`: bf16, 24 heads, D=128, random q/k/v as the methods bench builds
them), with `do_bench` medians: dense cuDNN SDPA, the neighborhood forward over the box path with
``box_mask_form="swar"`` and ``"mma"``, the speed-ups and per-tile efficiencies (density x dense / time), and
the largest absolute difference between the two forms' outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_CASES = "natten-hunyuan,nbhd-hunyuan-third"
FORMS = ("swar", "mma")


def run_case(name: str, rep: int, log) -> dict[str, Any]:
    """Time one `CASES` entry's box path in both forms against dense cuDNN; returns the JSON row."""
    from accel.bench.methods import CASES, _bench, _dense_ms
    from accel.geometry import TokenLayout
    from accel.kernels.neighborhood import box_path_runs, neighborhood_attention
    from accel.methods.registry import parse_method_spec

    case = CASES[name]
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    method = parse_method_spec(case.spec).method
    layout = TokenLayout(1, *case.grid)
    H, D, S = case.heads, case.head_dim, layout.total_tokens
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    plan = method.build_plan(layout, H, dev).tiles
    row: dict[str, Any] = {"case": name, "spec": case.spec, "grid": list(case.grid), "heads": H, "head_dim": D,
                           "dtype": "bfloat16", "tile": list(plan.tile), "block": plan.block,
                           "ragged": plan.ragged, "pairs": plan.pairs, "density": plan.density,
                           "box_path_runs": box_path_runs(q, plan)}
    row["dense_cudnn_ms"] = _dense_ms(q, k, v, False, None)["cudnn_fwd"]
    outs = {}
    for form in FORMS:
        try:
            outs[form] = neighborhood_attention(q, k, v, plan, box=True, box_mask_form=form)
            torch.cuda.synchronize()
            ms = _bench(lambda f=form: neighborhood_attention(q, k, v, plan, box=True, box_mask_form=f), rep=rep)
        except Exception as err:  # one form failing (e.g. a Triton build error) must not lose the other
            log(f"{name} {form}: FAILED {type(err).__name__}: {str(err)[:300]}")
            row[f"{form}_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
            continue
        row[f"{form}_ms"] = ms
        row[f"{form}_speedup"] = row["dense_cudnn_ms"] / ms
        row[f"{form}_efficiency"] = plan.density * row["dense_cudnn_ms"] / ms
    if len(outs) == 2:
        a, b = (outs[f].float() for f in FORMS)
        row["max_abs_diff"] = float((a - b).abs().max())
        row["outputs_finite"] = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    if "swar_ms" in row and "mma_ms" in row:
        row["mma_vs_swar"] = row["swar_ms"] / row["mma_ms"]
    log(f"{name}: tile {plan.tile}, density {plan.density:.3f} | cuDNN {row['dense_cudnn_ms']:.2f} ms"
        + "".join(f", {f} {row[f + '_ms']:.2f} ms (eff {row[f + '_efficiency']:.2f})" for f in FORMS
                  if f + "_ms" in row)
        + (f" | mma {row['mma_vs_swar']:.2f}x swar" if "mma_vs_swar" in row else "")
        + (f", max |diff| {row['max_abs_diff']:.3g}" if "max_abs_diff" in row else ""))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench", help="output folder (default: %(default)s)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated accel.bench.methods CASES")
    parser.add_argument("--rep", type=int, default=100, help="do_bench rep in ms (default: %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("box_mask_ab needs a CUDA GPU; none is visible (CPU timings mean nothing here).", file=sys.stderr)
        return 3
    from accel.bench.e2e import _environment
    from accel.bench.methods import CASES

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    result: dict[str, Any] = {"environment": _environment(), "protocol": f"do_bench median (rep {args.rep} ms), B=1",
                              "rows": []}
    failed = False
    for name in names:
        try:
            row = run_case(name, args.rep, log)
        except Exception as err:  # one failing case must not lose the others' numbers
            log(f"{name}: FAILED {type(err).__name__}: {err}")
            row = {"case": name, "error": repr(err)}
        failed |= "error" in row or any(f"{f}_error" in row for f in FORMS)
        result["rows"].append(row)
        (out / "box_mask_ab.json").write_text(json.dumps(result, indent=1))
        torch.cuda.empty_cache()
    print(json.dumps(result["rows"], indent=1))
    log(f"wrote {out / 'box_mask_ab.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
