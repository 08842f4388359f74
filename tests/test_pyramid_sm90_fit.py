"""The pyramid kernels' default launch knobs fit an H100/H200 (sm_90) at every block size and head dim.

The Gluon forward (`pyramid_gluon`, head dims 64/128) is compiled too: it has no interpreter, so this is the
CI check that it still builds for sm_90 with the installed Triton.

Compiled for sm_90 without a GPU (Triton compiles for a target without a driver), so CI catches a knob change
that asks for more shared memory than the chip has: the forward at block 128 and head dim 256 once asked for
459 KB in three stages and only failed on the GPU (benchmarks/NOTES.md, "Pyramid, second round", item 18).
The compiles run in a subprocess without TRITON_INTERPRET (the test session interprets kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from accel.kernels.sm90_compile import SM90_SHARED_BYTES

CASES = [(64, 128), (128, 128), (64, 256), (128, 256)]


def measure(block: int, hdp: int) -> dict[str, int]:
    """Shared bytes of the forward, dQ and dK/dV kernels at their default knobs (run without the interpreter)."""
    from accel.kernels import pyramid as pk
    from accel.kernels import pyramid_bwd as pb
    from accel.kernels.sm90_compile import compile_sm90

    def shared(fn, consts, ptrs, warps, stages):
        return compile_sm90(fn, consts, ptrs, ("sm_scale", "qk_scale"), num_warps=warps,
                            num_stages=stages).metadata.shared

    bf = "*bf16"
    knobs = pk.fwd_knobs(block, hdp, True)
    ptrs = {n: bf for n in ("Q", "K", "V", "KP", "VP", "EK", "EV", "Out")}
    ptrs.update(EMask="*i8", Lse="*fp32", Idx="*i32", Ends="*i32")
    text = dict(HAS_TEXT_MASK=True, TEXT_BLOCK=pk._TEXT_BLOCK, DOT_PRECISION="tf32")
    fwd = shared(pk._pyramid_fwd_kernel, dict(
        HEAD_DIM=hdp, HEAD_DIM_PAD=hdp, BS=block, R1_=block, R2_=max(16, block // 2), R4_=max(16, block // 4),
        R8_=max(16, block // 8), USE_TMA=knobs["USE_TMA"], PACK=knobs["PACK"], HAS_TEXT=True, **text),
        ptrs, knobs["num_warps"], knobs["num_stages"])
    kn = pb.bwd_knobs(block, hdp)
    common = dict(HEAD_DIM=hdp, HEAD_DIM_PAD=hdp, BS=block, **text)
    dq_ptrs = {n: bf for n in ("Q", "K", "V", "KP", "VP", "EK", "EV", "DO", "DQ")}
    dq_ptrs.update(EMask="*i8", Lse="*fp32", Delta="*fp32", Idx="*i32", Ends="*i32")
    dq = shared(pb._pyramid_bwd_dq_kernel, dict(common, HAS_TEXT=True, **pb._tiles(block, kn["dq_key_rows"])),
                dq_ptrs, kn["dq_warps"], kn["dq_stages"])
    dk_ptrs = {n: bf for n in ("Q", "K", "V", "KP", "VP", "EK", "EV", "DO", "DEK", "DEV")}
    dk_ptrs.update({n: "*fp32" for n in ("Lse", "Delta", "DK1", "DV1", "DKP", "DVP")}, EMask="*i8", TIdx="*i32",
                   TEnds="*i32")
    dkdv = shared(pb._pyramid_bwd_dkdv_kernel,
                  dict(common, MT=min(block, kn["dkdv_query_rows"]), **pb._tiles(block, kn["dkdv_key_rows"])),
                  dk_ptrs, kn["dkdv_warps"], kn["dkdv_stages"])
    result = {"forward": fwd, "dq": dq, "dkdv": dkdv}
    from accel.kernels import pyramid_gluon as pg

    if pg.HAVE_GLUON and hdp in (64, 128):  # the Gluon forward serves head dims 64 and 128
        from triton.experimental.gluon import language as gl

        from accel.kernels.sm90_compile import desc_type

        def layout(rank: int):
            return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=rank)

        descs = {n: desc_type("bf16", [1, block, hdp], layout(3)) for n in ("q_desc", "o_desc", "k1", "kt", "v1", "vt")}
        descs.update({f"{s}{p}": desc_type("bf16", [block // p, hdp], layout(2)) for s in "kv" for p in (2, 4, 8)})
        descs.update({f"{s}pf": desc_type("bf16", [block, hdp], layout(2)) for s in "kv"})
        g_ptrs = dict(Out=bf, EMask="*i8", Lse="*fp32", Idx="*i32", Ends="*i32", Order="*i64", Counter="*i32")
        consts = dict(HEAD_DIM=hdp, BS=block, LOG_BS=block.bit_length() - 1, KS=pg.K_SLOTS, VS=pg.V_SLOTS,
                      HAS_TEXT=True, HAS_TEXT_MASK=True)
        result["forward_gluon"] = compile_sm90(pg._pyramid_fwd_gluon_kernel, dict(consts, num_warps=block // 16),
                                               g_ptrs, ("qk_scale",), descs, num_warps=block // 16).metadata.shared
        if block == 128:
            for dynamic in (False, True):  # items dealt out statically or taken from the counter
                result[f"forward_gluon_ws{'_dynamic' * dynamic}"] = compile_sm90(
                    pg._pyramid_fwd_gluon_ws_kernel, dict(
                        consts, HAS_ORDER=False, DYNAMIC=dynamic, CONSUMER_REGS=pg.WS_CONSUMER_REGS,
                        PRODUCER_REGS=pg.WS_PRODUCER_REGS, num_warps=4),
                    g_ptrs, ("qk_scale",), descs, num_warps=4, maxnreg=168).metadata.shared
    return result


@pytest.mark.slow
def test_default_knobs_fit_sm90_shared_memory() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    if run.returncode == 3:
        pytest.skip(f"cannot compile for sm_90 here: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(got) == len(CASES)
    for case, shared in got.items():
        assert all(0 < b <= SM90_SHARED_BYTES for b in shared.values()), (case, shared)


if __name__ == "__main__":
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as err:
        print(err, file=sys.stderr)
        sys.exit(3)
    try:
        result = {f"b{b}-d{d}": measure(b, d) for b, d in CASES}
    except (RuntimeError, FileNotFoundError) as err:  # no CUDA backend or ptxas in this Triton install
        print(repr(err), file=sys.stderr)
        sys.exit(3)
    print(json.dumps(result))
