"""Probe: what a bench case's level maps ask of the Gluon kernel, and one call of it (for ``ncu``).

    python benchmarks/probes/pyramid_map_stats.py [--cases pyramid-wan1.3b-480p-81f,...] [--out DIR] [--tag T]
    ncu --clock-control none -k regex:_pyramid_fwd_gluon_ws_kernel -c 1 python benchmarks/probes/pyramid_map_stats.py

For each case (the `accel bench methods` inputs, `prepare_case`) it plans one call and reports, per level, the
share of blocks, the tiles the kernel runs (a level-p tile packs p blocks) and how many of them are partial (a
level's last tile) or need p separate TMA boxes (their blocks are not consecutive: `pyramid_gluon._issue_pooled`
loads a run of consecutive pooled blocks as one box). Then it runs the call once, so ``ncu`` can profile it.
Writes ``pyramid_map_stats<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

LEVELS = (1, 2, 4, 8)


def tile_stats(levels: torch.Tensor) -> dict:
    """Per level of a (B, H, n, n) map: block share, tiles, partial tiles and tiles needing one box per block."""
    rows = levels.reshape(-1, levels.shape[-1])
    R, n = rows.shape
    block = torch.arange(n, device=rows.device).expand(R, n)
    row_id = torch.arange(R, device=rows.device)[:, None].expand(R, n)
    out: dict = {"rows": R, "blocks_per_row": n}
    for p in LEVELS:
        mask = rows == p
        count = int(mask.sum())
        rank = mask.cumsum(-1) - 1  # position of each block among the row's level-p blocks
        chunk = torch.where(mask, rank // p, 0)
        per_row = mask.sum(-1)
        tiles = int(((per_row + p - 1) // p).sum())
        full_tiles = int((per_row // p).sum())
        runs = 0
        if p > 1 and count:
            key = (block - rank)[mask]  # constant inside a chunk of consecutive blocks
            slot = (row_id[mask] * n + chunk[mask])
            lo = torch.full((R * n,), n + 1, device=rows.device, dtype=key.dtype).scatter_reduce(0, slot, key, "amin")
            hi = torch.full((R * n,), -n - 1, device=rows.device, dtype=key.dtype).scatter_reduce(0, slot, key, "amax")
            size = torch.zeros(R * n, device=rows.device, dtype=torch.long).scatter_add(0, slot, torch.ones_like(slot))
            runs = int(((lo == hi) & (size == p)).sum())
        out[f"level_{p}"] = {"block_share": count / (R * n), "tiles": tiles, "tiles_per_row": tiles / R,
                             "partial_tiles": tiles - full_tiles,
                             "one_box_tiles": runs if p > 1 else tiles, "box_per_block_tiles": (full_tiles - runs)
                             if p > 1 else 0}
    out["level_0_share"] = float((rows == 0).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="pyramid-wan1.3b-480p-81f")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    from accel.bench.methods import CASES, prepare_case

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(), "cases": {}}
    for name in [n.strip() for n in args.cases.split(",") if n.strip()]:
        setup = prepare_case(CASES[name], torch.bfloat16, torch.Generator(device="cuda").manual_seed(0))
        qo, ko, _ = setup.ordered
        levels = setup.method.plan_call(qo, ko, setup.layout, setup.call)
        stats = tile_stats(levels)
        setup.kernel()
        torch.cuda.synchronize()
        result["cases"][name] = stats
        print(name, json.dumps(stats), flush=True)
        del setup, qo, ko, levels
        torch.cuda.empty_cache()
    (out / f"pyramid_map_stats{args.tag}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
