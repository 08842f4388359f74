"""Radial mask build time, density and peak memory at the reference's geometries (CPU or CUDA).

For each geometry: median build time of `radial_block_layout` (after one warm-up), video x video tile
density next to the reference implementation's published table, tiles kept, and peak memory of
one build: `torch.cuda.max_memory_allocated` on CUDA, tensor-size accounting (peak bytes of live
tensors created by the build, via a TorchDispatchMode) on CPU. An (S x S) bool mask would need
S^2 bytes (97 GB at 311 040 tokens).

    python benchmarks/bench_radial_mask.py [--device cuda] [--out outputs/bench] [--reference]

Writes outputs/bench/radial_mask_<device>.json by default; --out benchmarks/results updates the committed file.

--reference also times a port of the reference's per-frame-pair loop (token masks of tpf x tpf) at
the smallest geometry, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from accel.methods.radial_mask import radial_block_layout  # noqa: E402

# name, frames, height, width, decay, block, sink, spatial, decay_near, reference density (%) or None
GEOMETRIES = [
    ("wan2.1 768x1280 69f", 18, 48, 80, 0.2, 128, True, "band", False, 28.7),
    ("wan2.1 768x1280 69f df1", 18, 48, 80, 1.0, 128, True, "band", False, 43.1),
    ("wan2.1 768x1280 81f", 21, 48, 80, 0.2, 128, True, "band", False, 26.1),
    ("wan2.1 768x1280 161f", 41, 48, 80, 0.2, 128, True, "band", False, 18.2),
    ("wan2.1 768x1280 321f", 81, 48, 80, 0.2, 128, True, "band", False, 12.3),
    ("wan2.1 768x1280 321f df1", 81, 48, 80, 1.0, 128, True, "band", False, 16.9),
    ("wan2.1 480x832 81f", 21, 30, 52, 0.2, 128, True, "band", False, 33.9),
    ("wan2.2 768x1280 77f b64", 20, 48, 80, 0.8, 64, True, "band", False, 34.9),
    ("hunyuan 768x1280 117f", 30, 48, 80, 0.95, 128, False, "band", False, 27.5),
    ("hunyuan 768x1280 509f", 128, 48, 80, 0.95, 128, False, "band", False, 11.0),
    ("hunyuan 720x1280 509f", 128, 45, 80, 0.95, 128, False, "band", False, 10.7),
    ("wan2.1 321f b64", 81, 48, 80, 0.2, 64, True, "band", False, None),
    ("wan2.1 321f decay_near", 81, 48, 80, 0.2, 128, True, "band", True, None),
    ("wan2.1 321f disk", 81, 48, 80, 0.2, 128, True, "disk", False, None),
    ("wan2.1 321f disk df1", 81, 48, 80, 1.0, 128, True, "disk", False, None),
]


def _build(g, device):
    _, f, h, w, decay, block, sink, spatial, near, _ = g
    return radial_block_layout(
        f, h, w, block_size=block, decay=decay, sink=sink, spatial=spatial, decay_near=near, device=device
    )


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(g, device, repeats: int) -> dict:
    lay = _build(g, device)  # warm-up (CUDA context, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        lay = _build(g, device)
        _sync(device)
        times.append(time.perf_counter() - t)
    tokens = g[1] * g[2] * g[3]
    row = {
        "name": g[0], "frames": g[1], "height": g[2], "width": g[3], "tokens": tokens, "decay": g[4],
        "block": g[5], "sink": g[6], "spatial": g[7], "decay_near": g[8], "reference_density": g[9],
        "density": lay.density(), "tiles": int(lay.offsets[0, -1]), "blocks": lay.num_q_blocks,
        "build_ms_median": 1e3 * statistics.median(times), "build_ms_min": 1e3 * min(times),
        "layout_bytes": lay.offsets.numel() * 4 + lay.indices.numel() * 4, "dense_mask_bytes": tokens * tokens,
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _build(g, device)
        _sync(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return row


class PeakTensorBytes(TorchDispatchMode):
    """Tensor-size accounting: peak bytes of live storages created by the ops run inside the mode
    (views are not counted twice; a storage is freed when the tensor that created it dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._ptrs: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if ptr in self._ptrs or nbytes == 0:
                    continue
                self._ptrs.add(ptr)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr, nbytes)
        return out


def cpu_peak_bytes(g) -> int:
    with PeakTensorBytes() as mode:
        _build(g, torch.device("cpu"))
    return mode.peak


def time_reference_port(g) -> float:
    """Seconds for the reference's per-frame-pair token-mask loop (port of gen_log_mask_shrinked)."""
    _, frames, h, w, decay, block, sink, *_ = g
    tpf = h * w
    p = 2 ** tpf.bit_length()
    idx = torch.arange(tpf)
    dist_tok = (idx[None, :] - idx[:, None]).abs()
    out = torch.zeros(frames * tpf // block, frames * tpf // block, dtype=torch.bool)
    t = time.perf_counter()
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if j == 0 and sink:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                wd = tpf if d <= 1 else max(p / 2 ** d.bit_length() * decay, block)
                local = dist_tok <= wd
                span = p / 2 ** d.bit_length()
                if span < 128 and d % int(128 / span):
                    local = torch.zeros_like(local)
            nb = tpf // block
            c = local.view(nb, block, nb, block)
            dens = c.sum(1) / block
            keep = (dens > 1 / 3).sum(-1) / ((dens > 0).sum(-1) + 1e-9) > 0.6
            out[i * nb:(i + 1) * nb, j * nb:(j + 1) * nb] |= keep
    return time.perf_counter() - t


def check_attend(device) -> dict:
    """Radial.attend on the device: error vs the float64 masked reference at a small joint geometry,
    then time vs dense SDPA at Wan2.1-1.3B 480x832 81 frames (32 760 video + 512 text tokens)."""
    import math

    from accel.geometry import TokenLayout
    from accel.methods import Radial
    from accel.methods.dense import sdpa_bshd
    from accel.methods.radial import expand_plan_mask

    res = {}
    method = Radial(decay=0.5, block_size=64)
    layout = TokenLayout(2, 9, 14, 22, 77, "after")
    plan = method.build_plan(layout, 4, device)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(2, layout.total_tokens, 4, 128, device=device, dtype=dtype) for _ in range(3))
        kpm = torch.ones(2, layout.total_tokens, dtype=torch.bool, device=device)
        kpm[1, -20:] = False
        out = method.attend(q, k, v, layout, plan, key_padding_mask=kpm)
        mask = expand_plan_mask(plan, layout).to(device)[None] & kpm[:, None, :]
        qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
        logits = (qd @ kd.transpose(-1, -2)) / math.sqrt(128)
        ref = (logits.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ vd).transpose(1, 2)
        err = float((out.double() - ref).norm() / ref.norm())
        res[f"rel_l2_{str(dtype).split('.')[-1]}"] = err
        print(f"attend {dtype}: rel L2 vs float64 masked reference {err:.2e} (density {plan.density:.3f})")
    if device.type == "cuda":
        import triton.testing

        for name, m in (("wan2.1-1.3b", Radial(decay=0.2, block_size=128)),):
            layout = TokenLayout(1, 21, 30, 52, 512, "after")
            plan = m.build_plan(layout, 12, device)
            q, k, v = (torch.randn(1, layout.total_tokens, 12, 128, device=device, dtype=torch.bfloat16)
                       for _ in range(3))
            t_sparse = triton.testing.do_bench(lambda: m.attend(q, k, v, layout, plan))  # noqa: B023
            t_dense = triton.testing.do_bench(lambda: sdpa_bshd(q, k, v))  # noqa: B023
            res[f"attend_ms_{name}"] = {"radial": t_sparse, "dense_sdpa": t_dense, "density": plan.density}
            print(f"{name} 480x832 81f + 512 text, 12 heads, bf16: radial {t_sparse:.2f} ms "
                  f"(density {plan.density:.3f}), dense SDPA {t_dense:.2f} ms")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--out", default=os.path.join("outputs", "bench"),
                    help="output folder for radial_mask_DEVICE.json (default: %(default)s, relative to the current "
                         "directory; the committed results are updated only with --out benchmarks/results)")
    ap.add_argument("--reference", action="store_true", help="also time the reference's per-pair loop")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the tensor-size accounting pass")
    ap.add_argument("--attend", action="store_true", help="also check and time Radial.attend on the device")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"radial mask build on {label}, torch {torch.__version__}")
    print(f"{'geometry':28s} {'tokens':>7s} {'blk':>4s} {'density':>8s} {'ref':>6s} {'tiles':>9s} {'ms':>8s} "
          f"{'peak MB':>8s}")
    rows = []
    for g in GEOMETRIES:
        row = measure(g, device, args.repeats)
        if device.type == "cpu" and not args.no_memory:
            row["peak_bytes"] = cpu_peak_bytes(g)
        rows.append(row)
        ref = f"{row['reference_density']:.1f}" if row["reference_density"] is not None else "-"
        peak = f"{row['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in row else "-"
        print(
            f"{row['name']:28s} {row['tokens']:7d} {row['block']:4d} {100 * row['density']:7.2f}% {ref:>6s} "
            f"{row['tiles']:9d} {row['build_ms_median']:8.1f} {peak:>8s}"
        )
    result = {"device": label, "torch": torch.__version__, "rows": rows}
    if args.reference:
        sec = time_reference_port(GEOMETRIES[0])
        result["reference_port_seconds"] = {GEOMETRIES[0][0]: sec}
        print(f"reference per-pair loop at {GEOMETRIES[0][0]}: {sec:.2f} s")
    if args.attend:
        result["attend"] = check_attend(device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"radial_mask_{device.type}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
