"""Device probe: warp-specialised forward (_fwd_ws_kernel) vs the pipelined kernel: correctness, then speed."""
import json, os, sys
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from triton.testing import do_bench
from accel.kernels import BlockLayout, block_sparse_attention, reference_block_sparse_attention
from accel.kernels import block_sparse as bs
from accel.bench.kernels import make_layout, rel

KC = bs.KernelConfig
res = {"checks": [], "times": []}
def log(*a): print(*a, flush=True)
torch.manual_seed(0)
def run(cfg, *a, **kw):
    bs._CONFIG_OVERRIDE[0] = cfg
    try:
        return block_sparse_attention(*a, **kw)
    finally:
        bs._CONFIG_OVERRIDE[0] = None
WS128 = KC(128, 128, 4, 2, warp_specialize=True)
for B, Sq, Sk, H, D, dt, ph in [(2, 1000, 1000, 4, 128, torch.bfloat16, False), (1, 1001, 777, 2, 64, torch.float16, True),
                                (2, 1024, 1024, 3, 128, torch.float16, False), (1, 4096, 4096, 2, 128, torch.bfloat16, False),
                                (1, 333, 2048, 2, 80, torch.bfloat16, False), (2, 2047, 2047, 2, 64, torch.bfloat16, False)]:
    L = H if ph else 1
    nq, nk = -(-Sq // 128), -(-Sk // 128)
    mask = torch.rand(L, nq, nk, device="cuda") < 0.4
    mask[:, 0] = False
    mask[:, -1, -1] = True
    lay = BlockLayout.from_mask(mask, 128)
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=dt)
    k, v = (torch.randn(B, Sk, H, D, device="cuda", dtype=dt) for _ in range(2))
    o_ref, l_ref = reference_block_sparse_attention(q, k, v, lay, return_lse=True)
    o_old, l_old = run(KC(128, 128, 8, 3, tma=True), q, k, v, lay, return_lse=True)
    o_ws, l_ws = run(WS128, q, k, v, lay, return_lse=True)
    fin = torch.isfinite(l_ref)
    r = dict(case=[B, Sq, Sk, H, D, str(dt), ph], err_old=rel(o_old, o_ref), err_ws=rel(o_ws, o_ref),
             lse_ws=float((l_ws[fin] - l_ref[fin]).abs().max()), lse_inf_ok=bool((l_ws[~fin] == float("-inf")).all()),
             nan=bool(o_ws.isnan().any()))
    log(r); res["checks"].append(r)
    o_ws2 = run(WS128, q, k, v, lay)  # no LSE
    log("  no-lse err", rel(o_ws2, o_ref))

for name, H, S, D in [("wan1.3b", 12, 32760, 128), ("s32768-d128", 12, 32768, 128), ("d64", 24, 32768, 64),
                      ("wan14b", 40, 75600, 128)]:
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        t_cd = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), rep=100, return_mode="median")
    nb = -(-S // 128)
    for dens in (0.10, 0.25, 0.50, 0.75):
        if name == "wan14b" and dens in (0.10, 0.75):
            continue
        lay = make_layout(nb, nb, dens, 128, "cuda")
        d = lay.density()
        ref = run(None, q, k, v, lay)
        row = dict(shape=name, density=d, cudnn=t_cd)
        for tag, cfg in [("default", None), ("ws_s2", WS128), ("ws_s3", KC(128, 128, 4, 3, warp_specialize=True))]:
            if tag == "ws_s3" and D == 128:
                continue
            try:
                err = rel(run(cfg, q, k, v, lay), ref)
                t = do_bench(lambda: run(cfg, q, k, v, lay), rep=100, return_mode="median")
                row[tag] = [t, d * t_cd / t, err]
            except Exception as e:
                row[tag] = str(e)[:200]
        log(row); res["times"].append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_fwd_probe.json"), "w"), indent=1)
