"""Probe: A/B of copies of `accel/kernels/pyramid_gluon.py` (files given) on the default call's own maps, kernel alone.

    python benchmarks/probes/pyramid_gluon_variants.py SHAPE ROUNDS FILE...   (GPU only; env OUT, TAG, SPEC)

Each file is loaded as its own module; all run on the same level lists (the default `pyramid` call's estimate and
assignment at Wan2.1-1.3B 480p or 14B 720p, local inputs), timed in alternating order against cuDNN each round;
``max_abs_diff_vs_first`` compares every output with the first file's. Writes ab_<shape>_<tag>.json.
"""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import torch

from accel.bench.methods import _bench, local_qkv
from accel.geometry import TokenLayout
from accel.kernels.pyramid_estimate import estimate_block_importance_triton
from accel.kernels.pyramid_levels import assign_levels, level_lists
from accel.kernels.pyramid_pool import pool_kv_levels
from accel.kernels.pyramid_reference import level_density
from accel.methods.base import AttentionCall
from accel.methods.registry import parse_method_spec

SHAPES = {"wan1.3b-480p": ((21, 30, 52), 12), "wan14b-720p": ((21, 45, 80), 40)}
shape, rounds, *files = sys.argv[1:]
mods = {}
for f in files:
    name = Path(f).stem
    spec = importlib.util.spec_from_file_location(f"accel.kernels.{name}", f)
    m = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = m
    spec.loader.exec_module(m)
    mods[name] = m
grid, H = SHAPES[shape]
layout = TokenLayout(1, *grid)
method = parse_method_spec(os.environ.get("SPEC", "pyramid")).method
dev = torch.device("cuda")
q, k, v = local_qkv(layout, H, 128, torch.bfloat16, torch.Generator(device="cuda").manual_seed(0))
perm = method.token_order(layout, dev)
if perm is not None:
    q, k, v = (t.index_select(1, perm) for t in (q, k, v))
call = AttentionCall()
block = method.block_size
imp = estimate_block_importance_triton(q, k, block, seed=call.seed)
levels = assign_levels(imp, method.mode, method.thresholds, method.min_full_ratio, None)
density = float(level_density(levels))
kp, vp, r4, r8 = pool_kv_levels(k, v, block)
idx, ends = level_lists(levels)
B, NV, _, D = q.shape
scale = 1 / math.sqrt(D)
outs, fns = {}, {}
for name, m in mods.items():
    out = torch.empty_like(q)
    lse = torch.empty(B, H, NV, device=dev, dtype=torch.float32)
    fns[name] = (lambda m=m, out=out, lse=lse: m.launch_fwd_gluon(q, k, v, kp, vp, None, None, None, out, lse, idx,
                                                                  ends, r4, r8, block, scale, True))
    fns[name]()
    outs[name] = out
torch.cuda.synchronize()
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

res = {"shape": shape, "density": density, "device": torch.cuda.get_device_name(), "rounds": []}
base = next(iter(outs.values()))
res["max_abs_diff_vs_first"] = {n: float((o.float() - base.float()).abs().max()) for n, o in outs.items()}
print(res, flush=True)
for r in range(int(rounds)):
    row = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["cudnn"] = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v))), rep=50)
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for n in order:
        row[n] = _bench(fns[n], rep=50)
    row["eff"] = {n: density * row["cudnn"] / row[n] for n in fns}
    print(r, json.dumps(row), flush=True)
    res["rounds"].append(row)
out = Path(os.environ.get("OUT", "outputs")) / f"ab_{shape}_{os.environ.get('TAG', '')}.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=1))
