"""Device probe (H100): warp-specialised dK/dV and dQ kernels vs the pipelined ones.

Checks every candidate's gradients against the reference, then times fwd+bwd at 25% tiles with one kernel
swapped at a time, then the best pair. Produced `benchmarks/results/ws_bwd_probe.json` (NOTES.md round 3).
"""

# ruff: noqa: B023  (closures are timed immediately, inside their loop iteration)
import json
import os

import torch
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
CANDIDATES = {  # head_dim_pad -> kind -> [pipelined baseline, warp-specialised candidates...]
    128: {"dkdv": [KC(32, 64, 4, 3)] + [KC(m, 128, 4, s, warp_specialize=True)
                                        for m, s in ((64, 2), (32, 2), (64, 3), (128, 2))],
          "dq": [KC(128, 64, 8, 2)] + [KC(128, n, 4, s, warp_specialize=True)
                                       for n, s in ((64, 2), (128, 2), (64, 3))]},
    64: {"dkdv": [KC(64, 64, 4, 3)] + [KC(m, 128, 4, s, warp_specialize=True)
                                       for m, s in ((64, 2), (32, 2), (64, 3), (128, 2))],
         "dq": [KC(64, 64, 4, 3)] + [KC(128, n, 4, s, warp_specialize=True)
                                     for n, s in ((64, 2), (128, 2), (64, 3))]},
}
CASES = [(2, 1000, 1000, 2, 128, torch.bfloat16, False), (1, 777, 1001, 2, 64, torch.float16, True),
         (1, 2048, 2048, 2, 128, torch.float16, False), (2, 500, 500, 2, 80, torch.bfloat16, False)]


def grads(cfgs, q, k, v, lay, g):
    configs = KernelConfigs(dkdv=cfgs[0], dq=cfgs[1])
    return torch.autograd.grad(block_sparse_attention(q, k, v, lay, configs=configs), (q, k, v), g)


def main() -> None:
    torch.manual_seed(0)
    res = {"checks": [], "times": []}
    for B, Sq, Sk, H, D, dt, per_head in CASES:
        mask = torch.rand(H if per_head else 1, -(-Sq // 128), -(-Sk // 128), device="cuda") < 0.4
        mask[:, 0] = False
        mask[:, -1, -1] = True
        lay = BlockLayout.from_mask(mask, 128)
        q = torch.randn(B, Sq, H, D, device="cuda", dtype=dt, requires_grad=True)
        k, v = (torch.randn(B, Sk, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        g = torch.randn(B, Sq, H, D, device="cuda", dtype=dt)
        d64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        exp = torch.autograd.grad((reference_block_sparse_attention(*d64, lay) * g.double()).sum(), d64)
        for kind, i in (("dkdv", 0), ("dq", 1)):
            for c in CANDIDATES[128 if D > 64 else 64][kind]:
                got = grads([c, None] if i == 0 else [None, c], q, k, v, lay, g)
                row = dict(case=[B, Sq, Sk, H, D, str(dt), per_head], kind=kind, cfg=str(c),
                           errs=[rel(a, b) for a, b in zip(got, exp, strict=True)])
                print(row, flush=True)
                res["checks"].append(row)
    for name, H, S, D in (("wan1.3b", 12, 32760, 128), ("d64", 24, 32768, 64)):
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
        lay = make_layout(-(-S // 128), -(-S // 128), 0.25, 128, "cuda")
        cands = CANDIDATES[D]

        def fwd_bwd_ms(cfgs):
            return do_bench(lambda: grads(cfgs, q, k, v, lay, g), rep=100, return_mode="median")

        base = [cands["dkdv"][0], cands["dq"][0]]
        t0 = fwd_bwd_ms(base)
        best = {}
        for kind, i in (("dkdv", 0), ("dq", 1)):
            times = []
            for c in cands[kind][1:]:
                cfgs = list(base)
                cfgs[i] = c
                t = fwd_bwd_ms(cfgs)
                times.append((t, c))
                print(name, kind, c, f"{t:.2f} ms (baseline {t0:.2f})", flush=True)
                res["times"].append(dict(shape=name, kind=kind, cfg=str(c), fwd_bwd=t, baseline=t0))
            best[kind] = min(times, key=lambda x: x[0])[1]
        both = fwd_bwd_ms([best["dkdv"], best["dq"]])
        print(name, "best pair", best, f"{both:.2f} ms (baseline {t0:.2f})", flush=True)
        res["times"].append(dict(shape=name, kind="combo", cfg=[str(best["dkdv"]), str(best["dq"])], fwd_bwd=both,
                                 baseline=t0))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_bwd_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
