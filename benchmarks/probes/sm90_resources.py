"""Probe without a GPU: compile the pyramid kernels for sm_90 and print registers, spills and shared memory.

    python benchmarks/probes/sm90_resources.py

Triton compiles for a target without a driver; the bundled cuobjdump reads the cubin's resource usage. This is
how the forms below were screened before spending device time (on the H200 the forms that spilled most ran
slowest: benchmarks/NOTES.md, "Pyramid kernel"). The numbers come from the installed Triton, not necessarily the
one the GPU machine runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton

from accel.kernels import pyramid as pk
from accel.kernels import pyramid_estimate as pe
from accel.kernels import pyramid_pool as pp
from accel.kernels.sm90_compile import compile_sm90


def _resources(fn, constexprs: dict, pointers: dict[str, str], floats: tuple[str, ...], **options) -> str:
    kernel = compile_sm90(fn, constexprs, pointers, floats, **options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line for item in line.split()
                  if ":" in item)
    return (f"registers {fields.get('REG', '?')}, stack {fields.get('STACK', '?')} bytes (spills), "
            f"shared memory {kernel.metadata.shared} bytes")


def main() -> int:
    bf16 = "*bf16"
    fwd_ptrs = {n: bf16 for n in ("Q", "K", "V", "KP", "VP", "EK", "EV", "Out")}
    fwd_ptrs.update(EMask="*i32", Lse="*fp32", Idx="*i32", Ends="*i32")
    for block, warps, stages, tma, pack in ((128, 8, 3, False, 0), (128, 8, 3, True, 0), (128, 8, 3, True, 32),
                                            (128, 8, 3, True, 64), (128, 8, 2, True, 128), (64, 4, 3, True, 0),
                                            (64, 4, 2, True, 64)):
        c = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BS=block, R1_=block, R2_=max(16, block // 2),
                 R4_=max(16, block // 4), R8_=max(16, block // 8), USE_TMA=tma, PACK=pack, HAS_TEXT=False,
                 HAS_TEXT_MASK=False, TEXT_BLOCK=32, DOT_PRECISION="tf32")
        print(f"pyramid forward block {block}, {warps} warps, {stages} stages, tma={tma}, pack={pack}: "
              + _resources(pk._pyramid_fwd_kernel, c, fwd_ptrs, ("qk_scale",), num_warps=warps, num_stages=stages))
    for kb in (1, 4):
        c = dict(SQ=32, SK=32, SQP=32, SKP=32, BI=4, KB=kb, BJ=32, D=128, BD=128, DOT_PRECISION="tf32")
        print(f"estimate block 128, {kb} KV blocks per dot: " + _resources(
            pe._estimate_kernel, c, {"QS": bf16, "KS": bf16, "Scratch": "*fp32", "S": "*fp32"}, ("qk_scale",),
            num_warps=8, num_stages=3))
    for chunk, warps in ((32, 2), (64, 4)):
        print(f"pooling, {chunk} tokens, {warps} warps: " + _resources(
            pp._pool_kernel, dict(D=128, DP=128, CHUNK=chunk), {n: bf16 for n in ("K", "V_", "KP", "VP")}, (),
            num_warps=warps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
