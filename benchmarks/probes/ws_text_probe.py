"""Device probe (H100): joint text+video forward, warp-specialised (text read in place) vs pipelined.

HunyuanVideo-like call: video queries over 25% of the video tiles plus every unpadded text key, text after
the video in one buffer (as diffusers' joint attention builds it). Writes $OUT/ws_text_probe.json.
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
CONFIGS = {"pipelined": KC(128, 128, 8, 3, tma=True), "ws": KC(128, 128, 4, 2, warp_specialize=True)}


def main() -> None:
    torch.manual_seed(0)
    res = []
    for name, H, S, T, visible in (("hunyuan-117f", 24, 115200, 256, 200), ("small", 4, 8000, 77, 77),
                                   ("small-padded", 4, 8000, 77, 30)):
        qkv = torch.randn(3, 1, S + T, H, 128, device="cuda", dtype=torch.bfloat16)
        q, k, v = (x[:, :S] for x in qkv)
        ek, ev = qkv[1][:, S:], qkv[2][:, S:]
        mask = torch.zeros(1, T, dtype=torch.bool, device="cuda")
        mask[:, :visible] = True
        nb = -(-S // 128)
        lay = make_layout(nb, nb, 0.25, 128, "cuda")
        row = dict(shape=name, H=H, S=S, T=T, visible=visible, density=lay.density())
        outs = {}
        for tag, cfg in CONFIGS.items():
            def call():
                bs._CONFIG_OVERRIDE[0] = cfg
                try:
                    return block_sparse_attention(q, k, v, lay, extra_k=ek, extra_v=ev, extra_mask=mask)
                finally:
                    bs._CONFIG_OVERRIDE[0] = None
            outs[tag] = call()
            row[f"{tag}_ms"] = do_bench(call, rep=100, return_mode="median")
        row["rel_err_ws_vs_pipelined"] = rel(outs["ws"], outs["pipelined"])
        print(row, flush=True)
        res.append(row)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_text_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
