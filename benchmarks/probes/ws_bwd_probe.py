"""Device probe: warp-specialised backward kernels vs the pipelined ones (grads vs reference, fwd+bwd time)."""
import json, os
import torch
from triton.testing import do_bench
from accel.kernels import BlockLayout, block_sparse_attention, reference_block_sparse_attention
from accel.kernels import block_sparse as bs
from accel.bench.kernels import make_layout, rel

KC = bs.KernelConfig
res = {"checks": [], "times": []}
def log(*a): print(*a, flush=True)
torch.manual_seed(0)
CANDS = {
    128: {"dkdv": [KC(32, 64, 4, 3), KC(64, 128, 4, 2, warp_specialize=True), KC(32, 128, 4, 2, warp_specialize=True),
                   KC(64, 128, 4, 3, warp_specialize=True), KC(128, 128, 4, 2, warp_specialize=True)],
          "dq": [KC(128, 64, 8, 2), KC(128, 64, 4, 2, warp_specialize=True), KC(128, 128, 4, 2, warp_specialize=True),
                 KC(128, 64, 4, 3, warp_specialize=True)]},
    64: {"dkdv": [KC(64, 64, 4, 3), KC(64, 128, 4, 2, warp_specialize=True), KC(32, 128, 4, 2, warp_specialize=True),
                  KC(64, 128, 4, 3, warp_specialize=True), KC(128, 128, 4, 2, warp_specialize=True)],
         "dq": [KC(64, 64, 4, 3), KC(128, 64, 4, 2, warp_specialize=True), KC(128, 128, 4, 2, warp_specialize=True),
                KC(128, 64, 4, 3, warp_specialize=True)]},
}
def grads(cfgs, q, k, v, lay, g):
    bs._CONFIG_OVERRIDE[:] = [None, *cfgs]
    try:
        out = block_sparse_attention(q, k, v, lay)
        return torch.autograd.grad((out * g).sum(), (q, k, v))
    finally:
        bs._CONFIG_OVERRIDE[:] = [None, None, None]

# correctness of every candidate
for B, Sq, Sk, H, D, dt, ph in [(2, 1000, 1000, 2, 128, torch.bfloat16, False), (1, 777, 1001, 2, 64, torch.float16, True),
                                (1, 2048, 2048, 2, 128, torch.float16, False), (2, 500, 500, 2, 80, torch.bfloat16, False)]:
    L = H if ph else 1
    nq, nk = -(-Sq // 128), -(-Sk // 128)
    mask = torch.rand(L, nq, nk, device="cuda") < 0.4
    mask[:, 0] = False
    mask[:, -1, -1] = True
    lay = BlockLayout.from_mask(mask, 128)
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=dt, requires_grad=True)
    k, v = (torch.randn(B, Sk, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
    g = torch.randn(B, Sq, H, D, device="cuda", dtype=dt)
    d64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exp = torch.autograd.grad((reference_block_sparse_attention(*d64, lay) * g.double()).sum(), d64)
    hdp = 128 if D > 64 else 64
    for kind, i in (("dkdv", 0), ("dq", 1)):
        for c in CANDS[hdp][kind]:
            cfgs = [c, None] if i == 0 else [None, c]
            got = grads(cfgs, q, k, v, lay, g)
            errs = [rel(a, b) for a, b in zip(got, exp)]
            r = dict(case=[B, Sq, Sk, H, D, str(dt), ph], kind=kind, cfg=str(c), errs=errs)
            log(r); res["checks"].append(r)

def fb_time(cfgs, q, k, v, lay, g):
    def f():
        bs._CONFIG_OVERRIDE[:] = [None, *cfgs]
        try:
            out = block_sparse_attention(q, k, v, lay)
            torch.autograd.grad(out, (q, k, v), g)
        finally:
            bs._CONFIG_OVERRIDE[:] = [None, None, None]
    return do_bench(f, rep=100, return_mode="median")

for name, H, S, D in [("wan1.3b", 12, 32760, 128), ("d64", 24, 32768, 64)]:
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
    nb = -(-S // 128)
    lay = make_layout(nb, nb, 0.25, 128, "cuda")
    base = CANDS[D]
    t0 = fb_time([base["dkdv"][0], base["dq"][0]], q, k, v, lay, g)
    log(name, "baseline fwd+bwd", t0)
    best = {}
    for kind, i in (("dkdv", 0), ("dq", 1)):
        ts = []
        for c in base[kind][1:]:
            cfgs = [c, base["dq"][0]] if i == 0 else [base["dkdv"][0], c]
            try:
                t = fb_time(cfgs, q, k, v, lay, g)
            except Exception as e:
                t = float("inf"); log("fail", c, str(e)[:200])
            ts.append((t, c)); log(name, kind, c, t)
            res["times"].append(dict(shape=name, kind=kind, cfg=str(c), fwd_bwd=t, baseline=t0))
        best[kind] = min(ts, key=lambda x: x[0])
    both = fb_time([best["dkdv"][1], best["dq"][1]], q, k, v, lay, g)
    log(name, "best combo", best["dkdv"][1], best["dq"][1], both, "vs baseline", t0)
    res["times"].append(dict(shape=name, kind="combo", cfg=[str(best["dkdv"][1]), str(best["dq"][1])], fwd_bwd=both,
                             baseline=t0))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_bwd_probe.json"), "w"), indent=1)
