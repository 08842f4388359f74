"""Device probe (H100): text keys in the warp-specialised forward vs the pipelined kernel.

Text after the video in one buffer (as diffusers' joint attention builds it), none / unpadded / trailing
padding, 25% of the video tiles; kernel launches alone and through the public function (which adds the
host-side work and, for padded text, one sync). Produced `benchmarks/results/ws_text_probe.json`.
"""

# ruff: noqa: B023  (closures are timed immediately, inside their loop iteration)
import json
import os

import torch
from triton.testing import do_bench

from accel.bench.kernels import make_layout, rel
from accel.kernels import block_sparse as bs
from accel.kernels import block_sparse_attention

KC = bs.KernelConfig
WS = KC(128, 128, 4, 2, warp_specialize=True)
PIPELINED = KC(128, 128, 8, 3, tma=True)
CASES = [("s32k-t0", 12, 32760, 0, 0), ("s32k-t256", 12, 32760, 256, 256), ("s32k-t256-pad", 12, 32760, 256, 200),
         ("s8k-t0", 4, 8000, 0, 0), ("s8k-t77", 4, 8000, 77, 77), ("s8k-t77-pad", 4, 8000, 77, 30),
         ("s8k-t0-h24", 24, 8000, 0, 0)]


def main() -> None:
    torch.manual_seed(0)
    res = []
    scale = 128 ** -0.5
    for name, H, S, T, visible in CASES:
        qkv = torch.randn(3, 1, S + T, H, 128, device="cuda", dtype=torch.bfloat16)
        q, k, v = (x[:, :S] for x in qkv)
        ek, ev = (qkv[1][:, S:], qkv[2][:, S:]) if T else (None, None)
        em = None
        if T and visible < T:
            em = torch.zeros(1, T, dtype=torch.int8, device="cuda")
            em[:, :visible] = 1
        lay = make_layout(-(-S // 128), -(-S // 128), 0.25, 128, "cuda")
        out = torch.empty_like(q)
        lse = bs._alloc_lse(1, H, S, q.device)
        row = dict(shape=name)
        bs._CONFIG_OVERRIDE[0] = PIPELINED
        row["pipelined"] = do_bench(lambda: bs._fwd(q, k, v, lay, ek, ev, em, scale, out, lse), rep=100,
                                    return_mode="median")
        bs._CONFIG_OVERRIDE[0] = None
        ref = out.clone()
        bs._ensure_allocator()
        row["ws"] = do_bench(lambda: bs._fwd_ws(q, k, v, lay, scale, out, lse, WS, ek, ev, em), rep=100,
                             return_mode="median")
        row["err_ws"] = rel(out, ref)
        mask = em.bool() if em is not None else None
        row["api_default"] = do_bench(lambda: block_sparse_attention(q, k, v, lay, extra_k=ek, extra_v=ev,
                                                                     extra_mask=mask), rep=100, return_mode="median")
        print(row, flush=True)
        res.append(row)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_text_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
