"""Device probe (H100): warp-specialised forward vs the pipelined kernel, correctness then speed.

Produced `benchmarks/results/ws_fwd_probe.json` (NOTES.md round 3). Run on a GPU from the repo root:
`python benchmarks/probes/ws_fwd_probe.py` (writes to $OUT or /tmp).
"""

# ruff: noqa: B023  (closures are timed immediately, inside their loop iteration)
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from accel.bench.kernels import make_layout, rel
from accel.kernels import (
    BlockLayout,
    KernelConfig,
    KernelConfigs,
    block_sparse_attention,
    reference_block_sparse_attention,
)

KC = KernelConfig
PIPELINED = KC(128, 128, 8, 3, tma=True)
WS = KC(128, 128, 4, 2, warp_specialize=True)
CASES = [  # B, Sq, Sk, H, D, dtype, per-head layout
    (2, 1000, 1000, 4, 128, torch.bfloat16, False), (1, 1001, 777, 2, 64, torch.float16, True),
    (2, 1024, 1024, 3, 128, torch.float16, False), (1, 4096, 4096, 2, 128, torch.bfloat16, False),
    (1, 333, 2048, 2, 80, torch.bfloat16, False), (2, 2047, 2047, 2, 64, torch.bfloat16, False),
]
SHAPES = [("wan1.3b", 12, 32760, 128), ("s32768-d128", 12, 32768, 128), ("d64", 24, 32768, 64),
          ("wan14b", 40, 75600, 128)]


def run(cfg, *args, **kw):
    return block_sparse_attention(*args, configs=KernelConfigs(fwd=cfg), **kw)


def main() -> None:
    torch.manual_seed(0)
    res = {"checks": [], "times": []}
    for B, Sq, Sk, H, D, dt, per_head in CASES:
        mask = torch.rand(H if per_head else 1, -(-Sq // 128), -(-Sk // 128), device="cuda") < 0.4
        mask[:, 0] = False
        mask[:, -1, -1] = True
        lay = BlockLayout.from_mask(mask, 128)
        q = torch.randn(B, Sq, H, D, device="cuda", dtype=dt)
        k, v = (torch.randn(B, Sk, H, D, device="cuda", dtype=dt) for _ in range(2))
        o_ref, l_ref = reference_block_sparse_attention(q, k, v, lay, return_lse=True)
        o_ws, l_ws = run(WS, q, k, v, lay, return_lse=True)
        fin = torch.isfinite(l_ref)
        row = dict(case=[B, Sq, Sk, H, D, str(dt), per_head], err_ws=rel(o_ws, o_ref),
                   err_pipelined=rel(run(PIPELINED, q, k, v, lay), o_ref),
                   lse_ws=float((l_ws[fin] - l_ref[fin]).abs().max()),
                   lse_inf_ok=bool((l_ws[~fin] == float("-inf")).all()))
        print(row, flush=True)
        res["checks"].append(row)
    for name, H, S, D in SHAPES:
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t_cudnn = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), rep=100, return_mode="median")
        nb = -(-S // 128)
        for dens in (0.10, 0.25, 0.50, 0.75):
            lay = make_layout(nb, nb, dens, 128, "cuda")
            d = lay.density()
            ref = run(PIPELINED, q, k, v, lay)
            row = dict(shape=name, density=d, cudnn=t_cudnn)
            for tag, cfg in (("pipelined", PIPELINED), ("ws", WS)):
                err = rel(run(cfg, q, k, v, lay), ref)
                t = do_bench(lambda: run(cfg, q, k, v, lay), rep=100, return_mode="median")
                row[tag] = [t, d * t_cudnn / t, err]
            print(row, flush=True)
            res["times"].append(row)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_fwd_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
