"""Block-sparse attention kernels vs the reference (CPU: Triton interpreter; GPU tests need CUDA)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import requires_cuda

from accel.kernels import BlockLayout, block_sparse_attention, default_block_size, reference_block_sparse_attention
from accel.kernels import block_sparse as bs

# Relative L2 tolerances vs a float64 reference. fp32 runs IEEE dots (no tf32): ~1e-7 seen, 1e-5 allowed.
# fp16/bf16: one rounding of P and of the output, as plain PyTorch attention at that dtype (~3e-4 / 2e-3).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_OK = INTERPRET or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def random_layout(L, sq, sk, bm, bn, p=0.4, device=DEV, empty_row=True, full_row=True):
    nq, nk = math.ceil(sq / bm), math.ceil(sk / bn)
    mask = torch.rand(L, nq, nk) < p
    if empty_row and nq > 1:
        mask[:, 0] = False
    if full_row:
        mask[:, -1] = True
    return BlockLayout.from_mask(mask.to(device), bm, bn)


def make_inputs(B, sq, sk, H, D, T, dtype, device=DEV, grad=True):
    q, k, v = (torch.randn(B, s, H, D, dtype=dtype, device=device) for s in (sq, sk, sk))
    ek = ev = None
    if T:
        ek, ev = (torch.randn(B, T, H, D, dtype=dtype, device=device) for _ in range(2))
    ts = [q, k, v, ek, ev]
    if grad:
        ts = [t.requires_grad_() if t is not None else None for t in ts]
    return ts


def run_and_compare(B, sq, sk, H, D, T, bm, bn, dtype, L=1, padded="some", grads=True, backend="auto",
                    scale=None):
    q, k, v, ek, ev = make_inputs(B, sq, sk, H, D, T, dtype, grad=grads)
    lay = random_layout(L, sq, sk, bm, bn)
    em = None
    if T and padded == "some":
        em = torch.rand(B, T, device=DEV) < 0.6
    elif T and padded == "all":
        em = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    elif T and padded == "trailing":  # as text encoders pad: each batch keeps a prefix
        em = torch.arange(T, device=DEV)[None, :] < torch.randint(0, T + 1, (B, 1), device=DEV)
    out, lse = block_sparse_attention(q, k, v, lay, extra_k=ek, extra_v=ev, extra_mask=em, scale=scale,
                                      return_lse=True, backend=backend)
    d64 = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, ek, ev)]
    ref, ref_lse = reference_block_sparse_attention(d64[0], d64[1], d64[2], lay, extra_k=d64[3], extra_v=d64[4],
                                                    extra_mask=em, scale=scale, return_lse=True)
    fin = torch.isfinite(ref_lse)
    err = rel(out, ref)
    lse_err = float((lse.detach().double()[fin] - ref_lse.detach()[fin]).abs().max()) if fin.any() else 0.0
    print(f"out rel {err:.2e}, lse max abs {lse_err:.2e}")
    assert err <= TOL[dtype]
    assert torch.equal(lse.isinf(), ~fin) and bool((lse[~fin] == float("-inf")).all())
    assert lse_err <= (1e-5 if dtype == torch.float32 else 2e-2)
    if grads:
        g = torch.randn_like(out)
        names = ["q", "k", "v", "extra_k", "extra_v"]
        leaves = [t for t in (q, k, v, ek, ev) if t is not None]
        rleaves = [t for t in d64 if t is not None]
        got = torch.autograd.grad((out * g).sum(), leaves)
        exp = torch.autograd.grad((ref * g.double()).sum(), rleaves)
        for n, a, b in zip(names, got, exp, strict=False):
            e = rel(a, b) if b.norm() > 0 else float(a.abs().max())
            print(f"d{n} rel {e:.2e} (max abs diff {float((a.double() - b).abs().max()):.2e})")
            assert e <= TOL[dtype], n
    return out, lse, lay


pytestmark = pytest.mark.skipif(not CPU_OK, reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest)")


# ------------------------------------------------------------------------------------------ layout
def test_transpose_matches_mask():
    for L in (1, 3):
        mask = torch.rand(L, 7, 5) < 0.4
        mask[:, 2] = False
        t = BlockLayout.from_mask(mask, 16, 32).transpose()
        assert torch.equal(t.to_mask(), mask.transpose(1, 2))
        assert (t.block_m, t.block_n, t.num_q_blocks, t.num_k_blocks) == (32, 16, 5, 7)
        assert t.transpose().to_mask().equal(mask)


def test_default_block_size():
    assert default_block_size("cpu") == 64
    if torch.cuda.is_available():
        assert default_block_size(torch.device("cuda")) in (64, 128)


# ------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize(
    "B,sq,sk,H,D,T,bm,bn,L",
    [
        (2, 37, 37, 2, 16, 0, 16, 16, 1),   # tails, batch 2
        (1, 1, 50, 1, 32, 0, 16, 32, 1),    # one query, bm != bn
        (2, 100, 45, 2, 16, 7, 32, 16, 2),  # Sq != Sk, per-head layout, extra keys with padding
        (1, 40, 64, 2, 24, 3, 16, 16, 1),   # D not a power of two (padded to 32)
    ],
)
def test_fp32_forward_backward(B, sq, sk, H, D, T, bm, bn, L):
    run_and_compare(B, sq, sk, H, D, T, bm, bn, torch.float32, L=L)


def test_fp16_forward_backward():
    run_and_compare(2, 37, 50, 2, 32, 5, 16, 16, torch.float16, L=2)


def test_all_extra_keys_padded_and_empty_rows():
    out, lse, lay = run_and_compare(1, 48, 48, 2, 16, 4, 16, 16, torch.float32, padded="all")
    empty = (lay.offsets[0, 1:] == lay.offsets[0, :-1]).repeat_interleave(16)[:48]
    assert empty.any()
    assert bool((out[:, empty] == 0).all()) and bool((lse[:, :, empty] == float("-inf")).all())


def test_empty_layout_no_extras():
    q, k, v, _, _ = make_inputs(1, 20, 20, 1, 16, 0, torch.float32, grad=True)
    lay = BlockLayout.from_mask(torch.zeros(2, 2, dtype=torch.bool, device=DEV), 16)
    out, lse = block_sparse_attention(q, k, v, lay, return_lse=True)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    out.sum().backward()
    for t in (q, k, v):
        assert bool((t.grad == 0).all())


def test_compute_tile_smaller_than_block():
    """Logical 32x32 blocks processed as 16x16 compute tiles (the GPU's sub-tiling path)."""
    old = list(bs._CONFIG_OVERRIDE)
    bs._CONFIG_OVERRIDE[:] = [bs.KernelConfig(16, 16), bs.KernelConfig(16, 16), bs.KernelConfig(16, 16)]
    try:
        run_and_compare(1, 70, 90, 2, 16, 3, 32, 32, torch.float32, L=2)
    finally:
        bs._CONFIG_OVERRIDE[:] = old


@pytest.mark.skipif(not INTERPRET, reason="calls the Hopper kernel directly: interpreter only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, sq, sk, H, D, L, T, text", [
    (2, 100, 90, 2, 32, 1, 0, "none"), (1, 64, 128, 3, 16, 3, 0, "none"), (1, 33, 47, 1, 24, 1, 0, "none"),
    (2, 70, 70, 2, 16, 1, 45, "after"), (2, 70, 64, 2, 16, 2, 32, "before"), (1, 50, 40, 2, 16, 1, 7, "apart"),
])
def test_warp_specialized_forward(dtype, B, sq, sk, H, D, L, T, text):
    """The warp-specialised Hopper forward (auto-picked on sm_90) against the reference.

    Covers tails on both sides (TMA zero fill + the -inf key bias), empty rows, per-head layouts, a head
    dim below its padding, the padded LSE rows its 1-D descriptor store needs, and text keys after or
    before the video in one buffer (read in place) or in a separate tensor (concatenated), with trailing
    padding; other padding is refused (the caller then runs the pipelined kernel).
    """
    lay = random_layout(L, sq, sk, 32, 32)
    q = torch.randn(B, sq, H, D, dtype=dtype)
    ek = ev = em = None
    if text == "none":
        k, v = (torch.randn(B, sk, H, D, dtype=dtype) for _ in range(2))
    elif text == "apart":
        k, v, ek, ev = (torch.randn(B, n, H, D, dtype=dtype) for n in (sk, sk, T, T))
    else:
        kv = torch.randn(2, B, sk + T, H, D, dtype=dtype)
        video, txt = (slice(0, sk), slice(sk, None)) if text == "after" else (slice(T, None), slice(0, T))
        k, v, ek, ev = kv[0][:, video], kv[1][:, video], kv[0][:, txt], kv[1][:, txt]
        assert bs._joint_keys(k, ek)[1:] == ((0, sk) if text == "after" else (T, 0))
    if T:  # trailing padding (what the kernel takes); the first batch's text is all padding
        em = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1))
        em[0] = False
        scattered = em.clone()
        scattered[-1, 0] = False
        scattered[-1, -1] = True
        assert not bs._fwd_ws(q, k, v, lay, 1.0, q.clone(), None, bs.KernelConfig(32, 32), ek, ev,
                              scattered.to(torch.int8), require_tma=False), "scattered padding must fall back"
    out = torch.full_like(q, float("nan"))
    lse = bs._alloc_lse(B, H, sq, q.device)
    assert lse.stride(1) % 4 == 0 and bs._lse_tma_ok(lse)
    bs._ensure_allocator()
    assert bs._fwd_ws(q, k, v, lay, D ** -0.5, out, lse, bs.KernelConfig(32, 32, 4, 2, warp_specialize=True),
                      ek, ev, em.to(torch.int8) if em is not None else None, require_tma=False)
    d64 = [t.double() if t is not None else None for t in (q, k, v, ek, ev)]
    ref, ref_lse = reference_block_sparse_attention(*d64[:3], lay, extra_k=d64[3], extra_v=d64[4], extra_mask=em,
                                                    return_lse=True)
    fin = torch.isfinite(ref_lse)
    assert rel(out, ref) <= TOL[dtype]
    assert bool((lse[~fin] == float("-inf")).all())
    assert float((lse.double()[fin] - ref_lse[fin]).abs().max()) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not INTERPRET, reason="calls the Hopper kernels directly: interpreter only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, sq, sk, H, D, L, sub", [(2, 100, 90, 2, 32, 1, 16), (1, 64, 128, 3, 16, 3, 32),
                                                     (1, 33, 47, 1, 24, 1, 16)])
def test_warp_specialized_backward(dtype, B, sq, sk, H, D, L, sub):
    """The warp-specialised dK/dV and dQ kernels (no masks: TMA zero fill does it) against autograd."""
    q, k, v, _, _ = make_inputs(B, sq, sk, H, D, 0, dtype, grad=False)
    lay = random_layout(L, sq, sk, 32, 32)
    out, lse = block_sparse_attention(q, k, v, lay, return_lse=True)
    do = torch.randn_like(out)
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32)
    delta.copy_((out.float() * do.float()).sum(-1).transpose(1, 2))
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    bs._ensure_allocator()
    bs._bwd_dkdv_ws(q, k, v, do, lse, delta, dk, dv, lay.transpose(), D ** -0.5,
                    bs.KernelConfig(sub, 32, 4, 2, warp_specialize=True))
    bs._bwd_dq_ws(q, k, v, do, lse, delta, dq, lay, D ** -0.5, bs.KernelConfig(32, sub, 4, 2, warp_specialize=True))
    d64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_block_sparse_attention(*d64, lay)
    exp = torch.autograd.grad((ref * do.double()).sum(), d64)
    for name, got, want in zip("qkv", (dq, dk, dv), exp, strict=True):
        print(f"d{name} rel {rel(got, want):.2e}")
        assert rel(got, want) <= TOL[dtype], name


def test_warp_specialized_config_falls_back():
    """On CPU a warp-specialised config runs the pipelined kernel, with and without extra keys."""
    old = list(bs._CONFIG_OVERRIDE)
    bs._CONFIG_OVERRIDE[0] = bs.KernelConfig(16, 16, 4, 2, warp_specialize=True)
    try:
        run_and_compare(2, 40, 50, 2, 16, 3, 16, 16, torch.float32)
        run_and_compare(1, 40, 50, 2, 16, 0, 16, 16, torch.float32)
    finally:
        bs._CONFIG_OVERRIDE[:] = old


def test_lse_gradient():
    q, k, v, ek, ev = make_inputs(1, 33, 33, 2, 16, 2, torch.float32)
    lay = random_layout(1, 33, 33, 16, 16)
    out, lse = block_sparse_attention(q, k, v, lay, extra_k=ek, extra_v=ev, return_lse=True)
    d64 = [t.detach().double().requires_grad_() for t in (q, k, v, ek, ev)]
    rout, rlse = reference_block_sparse_attention(*d64[:3], lay, extra_k=d64[3], extra_v=d64[4], return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(rlse)
    got = torch.autograd.grad((out * go).sum() + (lse[fin] * gl[fin]).sum(), (q, k, v, ek, ev))
    exp = torch.autograd.grad((rout * go.double()).sum() + (rlse[fin] * gl.double()[fin]).sum(), d64)
    for a, b in zip(got, exp, strict=True):
        print(f"rel {rel(a, b):.2e}")
        assert rel(a, b) <= 1e-5


def test_torch_backend():
    run_and_compare(2, 37, 50, 2, 16, 5, 16, 16, torch.float32, L=2, backend="torch")
    run_and_compare(1, 20, 20, 1, 16, 3, 16, 16, torch.float32, padded="all", backend="torch")


def test_scale():
    run_and_compare(1, 32, 32, 1, 16, 0, 16, 16, torch.float32, grads=False, scale=0.3)


def test_nan_propagates():
    q, k, v, _, _ = make_inputs(1, 32, 32, 1, 16, 0, torch.float32, grad=False)
    lay = BlockLayout.dense(32, 32, 16, device=DEV)
    k[0, 3, 0, 0] = float("nan")
    out = block_sparse_attention(q, k, v, lay)
    print(f"nan count {int(out.isnan().sum())}")
    assert bool(out.isnan().all())  # every query sees key 3
    v2 = v.clone()
    v2[0, 20, 0, 1] = float("inf")
    out = block_sparse_attention(q, k.nan_to_num(), v2, lay)
    assert not bool(torch.isfinite(out).all())


def test_strided_inputs_and_out_view():
    B, S, H, D = 2, 40, 2, 16
    base = torch.randn(B, S + 5, 3, H, D + 4, device=DEV)
    q, k, v = base[:, 2:S + 2, 0, :, :D], base[:, :S, 1, :, 2:D + 2], base[:, 5:, 2, :, :D]
    assert not q.is_contiguous()
    lay = random_layout(1, S, S, 16, 16)
    big = torch.full((B, S, 2 * H, D), float("nan"), device=DEV)
    out_view = big[:, :, H:]
    res = block_sparse_attention(q, k, v, lay, out=out_view)
    assert res.data_ptr() == out_view.data_ptr()
    ref = reference_block_sparse_attention(q.double(), k.double(), v.double(), lay)
    print(f"rel {rel(out_view, ref):.2e}")
    assert rel(out_view, ref) <= 1e-5
    assert bool(big[:, :, :H].isnan().all())  # nothing written outside the view
    assert not bool(out_view.isnan().any())


def test_determinism():
    q, k, v, ek, ev = make_inputs(1, 37, 37, 2, 16, 3, torch.float32)
    lay = random_layout(2, 37, 37, 16, 16)
    outs, grads = [], []
    for _ in range(3):
        o = block_sparse_attention(q, k, v, lay, extra_k=ek, extra_v=ev)
        grads.append(torch.autograd.grad(o.sum(), (q, k, v, ek, ev)))
        outs.append(o.detach())
    for o, g in zip(outs[1:], grads[1:], strict=True):
        assert torch.equal(o, outs[0])
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0], strict=True))


# ------------------------------------------------------------------------------------------ errors
def test_errors():
    q, k, v, _, _ = make_inputs(1, 32, 32, 2, 16, 0, torch.float32, grad=False)
    lay = BlockLayout.dense(32, 32, 16, device=DEV)
    with pytest.raises(ValueError, match="got"):
        block_sparse_attention(q[0], k, v, lay)
    with pytest.raises(ValueError, match="got"):
        block_sparse_attention(q, k[:, :, :1], v, lay)
    with pytest.raises(ValueError, match="does not fit"):
        block_sparse_attention(q, k, v, BlockLayout.dense(48, 32, 16, device=DEV))
    with pytest.raises(ValueError, match="head groups"):
        block_sparse_attention(q, k, v, BlockLayout.from_mask(torch.ones(3, 2, 2, dtype=torch.bool), 16))
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k.half(), v, lay)
    with pytest.raises(TypeError, match="BlockLayout"):
        block_sparse_attention(q, k, v, "dense")
    with pytest.raises(TypeError):
        block_sparse_attention([1.0], k, v, lay)
    with pytest.raises(NotImplementedError, match="256"):
        big = torch.randn(1, 32, 1, 264, device=DEV)
        block_sparse_attention(big, big, big, lay)
    with pytest.raises(ValueError, match="together"):
        block_sparse_attention(q, k, v, lay, extra_k=q)
    with pytest.raises(ValueError, match="extra_mask"):
        block_sparse_attention(q, k, v, lay, extra_k=q[:, :3], extra_v=q[:, :3],
                               extra_mask=torch.ones(1, 4, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, lay, backend="cuda")
    with pytest.raises(ValueError, match="out"):
        block_sparse_attention(q, k, v, lay, out=torch.empty(1, 31, 2, 16, device=DEV))
    with pytest.raises(ValueError, match="inference"):
        block_sparse_attention(q.requires_grad_(), k, v, lay, out=torch.empty_like(q))
    odd = BlockLayout.dense(32, 32, 24, device=DEV)
    with pytest.raises(RuntimeError, match="triton"):
        block_sparse_attention(q, k, v, odd, backend="triton")
    block_sparse_attention(q.detach(), k, v, odd, backend="torch")  # the torch path takes any block size


def test_triton_backend_needs_gpu_or_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the triton backend can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 16, 1, 16)
    lay = BlockLayout.dense(16, 16, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        block_sparse_attention(q, q, q, lay, backend="triton")
    out = block_sparse_attention(q, q, q, lay)  # auto falls back to torch
    assert rel(out, reference_block_sparse_attention(q, q, q, lay)) < 1e-5


def test_no_diffusers_import():
    import subprocess
    import sys
    code = ("import sys, accel.kernels; bad = [m for m in ('diffusers', 'peft', 'gradio') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# ------------------------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_real_sizes(dtype, D):
    blk = default_block_size("cuda")
    run_and_compare(1, 4100, 4000, 4, D, 77, blk, blk, dtype, L=4)


def test_config_fallback_is_fitted():
    """A warp-specialised table entry carries the pipelined config that runs when it cannot, fitted alike."""
    ws = bs._FWD_CONFIGS[(9, 128)]
    assert ws.warp_specialize and ws.pipelined() == bs.KernelConfig(128, 128, 8, 3, tma=True)
    fitted = bs._fit(ws, 64, 64, 128, True)  # a 64-block layout: both configs shrink to its blocks
    assert (fitted.block_m, fitted.block_n) == (64, 64)
    assert (fitted.pipelined().block_m, fitted.pipelined().block_n, fitted.pipelined().num_warps) == (64, 64, 8)
    assert not bs._fit(ws, 128, 128, 128, False).warp_specialize  # never outside CUDA
    plain = bs.KernelConfig(64, 64, 4, 2)
    assert plain.pipelined() is plain


def test_warp_specialized_build_failure_falls_back(monkeypatch):
    """A Triton that cannot build the warp-specialised kernels costs speed, not the call: warn, run pipelined."""
    from triton.runtime.errors import OutOfResources

    def fail_build(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    def oom(*args):
        raise OutOfResources(300000, 232448, "shared memory")

    def real_bug(*args, **kwargs):
        raise ValueError("a real bug")

    # As on an sm_90 GPU: the tables ask for the warp-specialised kernel and the call qualifies.
    monkeypatch.setattr(bs, "_pick", lambda *args: bs.KernelConfig(16, 16, 1, 1, warp_specialize=True))
    monkeypatch.setattr(bs, "_ws_ok", lambda *args: True)
    monkeypatch.setattr(bs, "_fwd_ws", fail_build)
    with pytest.warns(RuntimeWarning, match="pipelined kernel"):  # unpadded text: small padded calls skip WS
        run_and_compare(1, 40, 50, 2, 16, 3, 16, 16, torch.float32, grads=False, padded="none")
    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        assert not bs._try_ws(oom)
    monkeypatch.setattr(bs, "_fwd_ws", real_bug)
    with pytest.raises(ValueError, match="a real bug"):  # other errors are not swallowed
        run_and_compare(1, 40, 50, 2, 16, 0, 16, 16, torch.float32, grads=False)


@requires_cuda
@pytest.mark.parametrize("dtype, B, sq, sk, D, L", [(torch.bfloat16, 2, 4101, 4000, 128, 2),
                                                    (torch.float16, 1, 1000, 1024, 128, 1),
                                                    (torch.bfloat16, 2, 777, 777, 80, 1),
                                                    (torch.float16, 1, 2047, 2047, 64, 1)])
def test_gpu_no_extra_keys(dtype, B, sq, sk, D, L):
    """Without extra keys the warp-specialised kernels run on sm_90: odd lengths, padded LSE, grads."""
    blk = default_block_size("cuda")
    run_and_compare(B, sq, sk, 2, D, 0, blk, blk, dtype, L=L)


@requires_cuda
@pytest.mark.parametrize("dtype, B, sq, T, padded", [(torch.bfloat16, 2, 4101, 77, "trailing"),
                                                    (torch.float16, 1, 1000, 256, "none")])
def test_gpu_text_keys(dtype, B, sq, T, padded):
    """Extra (text) keys: unpadded ones take the warp-specialised forward on sm_90, small padded calls
    the pipelined one (the padding check's host sync would cost more than it saves)."""
    blk = default_block_size("cuda")
    run_and_compare(B, sq, sq, 2, 128, T, blk, blk, dtype, padded=padded)


@requires_cuda
def test_gpu_warp_specialized_trailing_padding():
    """The warp-specialised forward with trailing-padded text (big calls take it) on the GPU itself."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("Hopper only")
    B, S, T, H, D = 2, 3000, 77, 2, 128
    qkv = torch.randn(3, B, S + T, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v, ek, ev = qkv[0][:, :S], qkv[1][:, :S], qkv[2][:, :S], qkv[1][:, S:], qkv[2][:, S:]
    em = torch.arange(T, device="cuda")[None, :] < torch.tensor([[50], [0]], device="cuda")
    lay = random_layout(1, S, S, 128, 128)
    out = torch.empty_like(q)
    lse = bs._alloc_lse(B, H, S, q.device)
    assert bs._fwd_ws(q, k, v, lay, D ** -0.5, out, lse, bs.KernelConfig(128, 128, 4, 2, warp_specialize=True),
                      ek, ev, em.to(torch.int8))
    ref, ref_lse = reference_block_sparse_attention(q, k, v, lay, extra_k=ek, extra_v=ev, extra_mask=em,
                                                    return_lse=True)
    fin = torch.isfinite(ref_lse)
    assert rel(out, ref) <= 1e-2
    assert bool((lse[~fin] == float("-inf")).all()) and float((lse[fin] - ref_lse[fin]).abs().max()) <= 2e-2


@requires_cuda
def test_gpu_odd_head_dim_bf16():
    run_and_compare(2, 1000, 1000, 2, 80, 16, 64, 64, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("D", [128, 256])
def test_gpu_fp32_fits_shared_memory(D):
    # fp32 with the 2-byte tile tables once asked for 393 KB of shared memory at D=128.
    blk = default_block_size("cuda")
    run_and_compare(1, 700, 700, 2, D, 16, blk, blk, torch.float32)
