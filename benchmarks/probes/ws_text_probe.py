"""Device probe (H100): text keys in the warp-specialised forward vs the pipelined kernel.

Text after the video in one joint buffer (as diffusers' joint attention builds it), none / unpadded /
trailing padding (as ``text_lengths``: no host sync), 25% of the video tiles; kernel launches alone and
through the public function (which adds the host-side work). Produced `benchmarks/results/ws_text_probe.json`
(measured with the old API, whose padded calls paid a host sync for the trailing-padding check).
"""

# ruff: noqa: B023  (closures are timed immediately, inside their loop iteration)
import json
import os

import torch
from triton.testing import do_bench

from accel.bench.kernels import make_layout, rel
from accel.kernels import KernelConfig, KernelConfigs, block_sparse_attention, fwd_ws, triton_impl
from accel.kernels._common import KeyParts, alloc_lse

KC = KernelConfig
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
        q, k, v = qkv[0][:, :S], qkv[1], qkv[2]
        parts = KeyParts(0, S, S, T)
        lengths = None
        if T and visible < T:
            lengths = torch.full((1,), visible, dtype=torch.int32, device="cuda")
        lay = make_layout(-(-S // 128), -(-S // 128), 0.25, 128, "cuda")
        out = torch.empty_like(q)
        lse = alloc_lse(1, H, S, q.device)
        row = dict(shape=name)
        pipelined = KernelConfigs(fwd=PIPELINED)
        row["pipelined"] = do_bench(lambda: triton_impl.forward(q, k, v, lay, parts, lengths, None, scale, out, lse,
                                                                pipelined), rep=100, return_mode="median")
        ref = out.clone()
        row["ws"] = do_bench(lambda: fwd_ws.launch(q, k, v, lay, scale, out, lse, WS, video_row=0, video_len=S,
                                                   text_row=S, text_len=T, text_lengths=lengths),
                             rep=100, return_mode="median")
        row["err_ws"] = rel(out, ref)
        text = dict(text_keys=(S, T), text_lengths=lengths) if T else {}
        row["api_default"] = do_bench(lambda: block_sparse_attention(q, k, v, lay, **text), rep=100,
                                      return_mode="median")
        print(row, flush=True)
        res.append(row)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_text_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
