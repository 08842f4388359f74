"""Probe: does the order of measurements change `accel bench methods`' figures? (clocks, power, allocator)

    python benchmarks/probes/bench_order.py [--cases pyramid-wan14b-720p-81f,...] [--rounds 2] [--out DIR] [--tag T]

At Wan2.1-14B 720p the bench's ``total_ms`` (permutation in, the call, permutation out) came out 1.2-2.4 ms above
``kernel_ms + permute_ms`` (`methods_pyramid_pingpong.json`), although ``total`` does exactly the work of the two.
This runs the bench's closures (`accel.bench.methods.prepare_case`) in rounds, forwards then backwards (dense
cuDNN, kernel, permutation, total, Wan's once-per-forward stream permutation), with the same `_bench` protocol,
and logs the SM clock, power and throttle reasons every 100 ms through ``nvidia-smi`` when it is there. Writes
``bench_order<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CLOCK_FIELDS = ("clocks.sm", "power.draw", "temperature.gpu", "clocks_throttle_reasons.active")


def _clock_log(path: Path) -> subprocess.Popen | None:
    """Start ``nvidia-smi`` sampling the clock fields every 100 ms into ``path`` (None without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, f"--query-gpu=timestamp,{','.join(CLOCK_FIELDS)}", "--format=csv,noheader,nounits", "-lms", "100"]
    return subprocess.Popen(cmd, stdout=path.open("w"), stderr=subprocess.DEVNULL)


def _read_clocks(path: Path) -> list[dict]:
    """The samples as dicts (``timestamp`` is nvidia-smi's wall clock; the result's ``t0`` is the probe's start)."""
    rows = []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 1 + len(CLOCK_FIELDS):
            continue
        rows.append({"timestamp": parts[0], **dict(zip(CLOCK_FIELDS, parts[1:], strict=True))})
    return rows


def _measure_case(name: str, rounds: int, t0: float) -> dict:
    """Every closure of one case, ``rounds`` times (forwards, then backwards): the records and a summary."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from accel.bench.methods import CASES, _bench, prepare_case

    gen = torch.Generator(device="cuda").manual_seed(0)
    setup = prepare_case(CASES[name], torch.bfloat16, gen)
    qt, kt, vt = (t.transpose(1, 2) for t in (setup.q, setup.k, setup.v))
    stream_tensors = setup.stream_tensors(gen)

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    closures = {"dense": dense, "kernel": setup.kernel, "permute": setup.permute, "total": setup.total,
                "stream": lambda: setup.stream(stream_tensors)}
    records = []
    for r in range(rounds):
        for key in list(closures) if r % 2 == 0 else list(reversed(closures)):
            start = time.time() - t0
            ms = _bench(closures[key])
            records.append({"round": r, "what": key, "ms": ms, "start_s": start, "end_s": time.time() - t0})
            print(f"[{time.time() - t0:6.1f}s] {name} round {r}: {key} {ms:.3f} ms", flush=True)
    summary = {key: [x["ms"] for x in records if x["what"] == key] for key in closures}
    summary["total_minus_parts"] = [t - k - p for t, k, p in
                                    zip(summary["total"], summary["kernel"], summary["permute"], strict=True)]
    print(name, json.dumps(summary), flush=True)
    return {"records": records, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="pyramid-wan14b-720p-81f")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    clock_path = Path(tempfile.mkdtemp()) / "clocks.csv"
    logger = _clock_log(clock_path)
    result: dict = {"device": torch.cuda.get_device_name(), "cases": {},
                    "t0": time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t0))}
    try:
        for name in [n.strip() for n in args.cases.split(",") if n.strip()]:
            result["cases"][name] = _measure_case(name, args.rounds, t0)
            torch.cuda.empty_cache()
    finally:
        if logger is not None:
            logger.terminate()
            logger.wait()
            result["clocks"] = _read_clocks(clock_path)
        (out / f"bench_order{args.tag}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
