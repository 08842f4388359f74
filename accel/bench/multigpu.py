"""Ulysses context parallelism with accel's sparse attention: equality with one GPU, and timing.

Run under torchrun on N GPUs: `python -m torch.distributed.run --standalone --nproc_per_node=N
-m accel.bench.multigpu --out DIR`. Every rank builds the same seeded transformer (a full-width Wan
config with few layers, random bf16 weights), computes the single-GPU result, then enables diffusers'
Ulysses context parallelism, patches with the same method and compares.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _median_ms(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/bench",
                        help="output folder for multigpu_N.json (default: %(default)s, relative to the current "
                             "directory; the committed results are updated only with --out benchmarks/results)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args(argv)

    import accel
    from accel.bench.e2e import WAN_1_3B

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    from diffusers import ContextParallelConfig, WanTransformer3DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": args.layers}).eval().requires_grad_(False)
    torch.set_default_dtype(previous)
    gen = torch.Generator(device="cuda").manual_seed(0)
    latent_frames = (args.frames - 1) // 4 + 1
    inputs = dict(
        hidden_states=torch.randn(1, 16, latent_frames, args.height // 8, args.width // 8, device="cuda",
                                  dtype=torch.bfloat16, generator=gen),
        timestep=torch.tensor([500], device="cuda"),
        encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=gen),
        return_dict=False,
    )
    methods = {"dense": accel.Dense(), "radial": accel.Radial(decay=0.2, block_size=128)}
    single, single_ms = {}, {}
    with torch.inference_mode():
        for name, method in methods.items():
            accel.patch(model, method)
            single[name] = model(**inputs)[0].float()
            single_ms[name] = _median_ms(lambda: model(**inputs))
            accel.unpatch(model)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        result = {"world_size": world, "device": torch.cuda.get_device_name(), "layers": args.layers,
                  "grid": [latent_frames, args.height // 16, args.width // 16], "methods": {}}
        for name, method in methods.items():
            handle = accel.patch(model, method)
            out = model(**inputs)[0].float()
            cp_ms = _median_ms(lambda: model(**inputs))
            accel.unpatch(model)
            rel = ((out - single[name]).norm() / single[name].norm()).item()
            result["methods"][name] = {
                "rel_l2_vs_single_gpu": rel, "single_gpu_ms": single_ms[name], "ulysses_ms": cp_ms,
                "sparse_calls": handle.stats.sparse_calls, "fallbacks": dict(handle.stats.fallbacks),
            }
    if rank == 0:
        print(json.dumps(result, indent=1), flush=True)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"multigpu_{world}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
