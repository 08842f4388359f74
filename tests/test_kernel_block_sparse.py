"""Block-sparse attention kernels vs the reference (CPU: Triton interpreter; GPU tests need CUDA)."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from conftest import requires_cuda

from accel.kernels import (
    BlockLayout,
    KernelConfig,
    KernelConfigs,
    block_sparse_attention,
    default_block_size,
    reference_block_sparse_attention,
    select_backward,
    select_forward,
)
from accel.kernels import configs as kc

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


def make_joint(B, sq, sk, H, D, T, dtype, text="after", device=DEV, grad=True):
    """q and joint k, v buffers with the video and text rows placed as ``text`` says.

    "after"/"before": diffusers' joint buffer; "gap": text after the video with 3 unused rows between
    and 2 after (their gradient must be zero).
    """
    gap, tail = (3, 2) if text == "gap" else (0, 0)
    rows = sk + T + gap + tail
    q = torch.randn(B, sq, H, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, rows, H, D, dtype=dtype, device=device) for _ in range(2))
    if text == "before":
        video, txt = (T, sk), (0, T)
    else:
        video, txt = (0, sk), (sk + gap, T)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, video, (txt if T else None)


def text_visibility(B, T, padded):
    """(text_lengths, text_mask) for a padding style."""
    if not T or padded == "none":
        return None, None
    if padded == "some":
        return None, torch.rand(B, T, device=DEV) < 0.6
    if padded == "all":
        return None, torch.zeros(B, T, dtype=torch.bool, device=DEV)
    if padded == "trailing":  # as text encoders pad: each batch keeps a prefix
        return None, torch.arange(T, device=DEV)[None, :] < torch.randint(0, T + 1, (B, 1), device=DEV)
    if padded == "lengths":  # the same facts as lengths: batch 0 all padding, the last one none
        lengths = torch.randint(0, T + 1, (B,), device=DEV, dtype=torch.int32)
        lengths[0] = 0
        if B > 1:
            lengths[-1] = T
        return lengths, None
    raise ValueError(padded)


def check_lse(lse, ref_lse, dtype):
    fin = torch.isfinite(ref_lse)
    lse_err = float((lse.detach().double()[fin] - ref_lse.detach()[fin]).abs().max()) if fin.any() else 0.0
    assert torch.equal(lse.isinf(), ~fin) and bool((lse[~fin] == float("-inf")).all())
    assert lse_err <= (1e-5 if dtype == torch.float32 else 2e-2)
    return lse_err


def run_and_compare(B, sq, sk, H, D, T, bm, bn, dtype, L=1, padded="some", grads=True, backend="auto",
                    scale=None, text="after", configs=None):
    """The new API on a joint buffer vs the float64 reference: out, LSE, grads of q and the whole joint k, v."""
    q, k, v, video, txt = make_joint(B, sq, sk, H, D, T, dtype, text=text, grad=grads)
    lay = random_layout(L, sq, sk, bm, bn)
    lengths, tmask = text_visibility(B, T, padded)
    kw = dict(video_keys=video, text_keys=txt, text_lengths=lengths, text_mask=tmask, scale=scale)
    out, lse = block_sparse_attention(q, k, v, lay, return_lse=True, backend=backend, configs=configs, **kw)
    d64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference_block_sparse_attention(*d64, lay, return_lse=True, **kw)
    err = rel(out, ref)
    lse_err = check_lse(lse, ref_lse, dtype)
    print(f"out rel {err:.2e}, lse max abs {lse_err:.2e}")
    assert err <= TOL[dtype]
    if grads:
        g = torch.randn_like(out)
        got = torch.autograd.grad((out * g).sum(), (q, k, v))
        exp = torch.autograd.grad((ref * g.double()).sum(), d64)
        for n, a, b in zip("qkv", got, exp, strict=True):
            e = rel(a, b) if b.norm() > 0 else float(a.abs().max())
            print(f"d{n} rel {e:.2e} (max abs diff {float((a.double() - b).abs().max()):.2e})")
            assert e <= TOL[dtype], n
        if text == "gap":  # rows that are neither video nor text get no gradient
            assert bool((got[1][:, sk:sk + 3] == 0).all()) and bool((got[2][:, -2:] == 0).all())
    return out, lse, lay


def run_and_compare_old_api(B, sq, sk, H, D, T, bm, bn, dtype, L=1, padded="some", grads=True, backend="auto"):
    """The deprecated extra_k/extra_v/extra_mask API (separate tensors) vs the reference."""
    q, k, v = (torch.randn(B, s, H, D, dtype=dtype, device=DEV) for s in (sq, sk, sk))
    ek, ev = (torch.randn(B, T, H, D, dtype=dtype, device=DEV) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v, ek, ev)] if grads else [q, k, v, ek, ev]
    lay = random_layout(L, sq, sk, bm, bn)
    em = text_visibility(B, T, padded)[1]
    out, lse = block_sparse_attention(q, k, v, lay, extra_k=ek, extra_v=ev, extra_mask=em, return_lse=True,
                                      backend=backend)
    d64 = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_lse = reference_block_sparse_attention(*d64[:3], lay, extra_k=d64[3], extra_v=d64[4], extra_mask=em,
                                                    return_lse=True)
    assert rel(out, ref) <= TOL[dtype]
    check_lse(lse, ref_lse, dtype)
    if grads:
        g = torch.randn_like(out)
        got = torch.autograd.grad((out * g).sum(), leaves)
        exp = torch.autograd.grad((ref * g.double()).sum(), d64)
        for n, a, b in zip(["q", "k", "v", "extra_k", "extra_v"], got, exp, strict=True):
            e = rel(a, b) if b.norm() > 0 else float(a.abs().max())
            assert e <= TOL[dtype], n


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
    "B,sq,sk,H,D,T,bm,bn,L,text",
    [
        (2, 37, 37, 2, 16, 0, 16, 16, 1, "after"),    # tails, batch 2
        (1, 1, 50, 1, 32, 0, 16, 32, 1, "after"),     # one query, bm != bn
        (2, 100, 45, 2, 16, 7, 32, 16, 2, "after"),   # Sq != Sk, per-head layout, text keys with padding
        (1, 40, 64, 2, 24, 3, 16, 16, 1, "before"),   # D not a power of two (padded to 32), text first
        (2, 50, 45, 2, 16, 9, 16, 16, 1, "gap"),      # unused rows in the joint buffer
    ],
)
def test_fp32_forward_backward(B, sq, sk, H, D, T, bm, bn, L, text):
    run_and_compare(B, sq, sk, H, D, T, bm, bn, torch.float32, L=L, text=text)


def test_fp16_forward_backward():
    run_and_compare(2, 37, 50, 2, 32, 5, 16, 16, torch.float16, L=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("text", ["after", "before"])
def test_text_lengths(dtype, text):
    """Trailing padding as lengths (batch 0 sees no text, the last all of it); token counts off the block."""
    run_and_compare(3, 45, 39, 2, 16, 21, 16, 16, dtype, L=2, padded="lengths", text=text)


@pytest.mark.parametrize("text", ["after", "before"])
def test_text_mask_joint(text):
    run_and_compare(2, 33, 40, 2, 16, 11, 16, 16, torch.float32, padded="some", text=text)
    run_and_compare(2, 33, 40, 2, 16, 11, 16, 16, torch.float32, padded="trailing", text=text, grads=False)


def test_text_lengths_match_text_mask():
    """text_lengths and the equivalent trailing text_mask give the same result (one is the other's spec)."""
    q, k, v, video, txt = make_joint(2, 40, 32, 2, 16, 13, torch.float32, grad=False)
    lay = random_layout(1, 40, 32, 16, 16)
    lengths = torch.tensor([13, 5], dtype=torch.int32, device=DEV)
    mask = torch.arange(13, device=DEV)[None, :] < lengths[:, None]
    a = block_sparse_attention(q, k, v, lay, text_keys=txt, text_lengths=lengths)
    b = block_sparse_attention(q, k, v, lay, text_keys=txt, text_mask=mask)
    assert rel(a, b) <= 1e-6


def test_old_extra_api():
    """The deprecated extra_k/extra_v/extra_mask keywords still work (through a joint buffer)."""
    run_and_compare_old_api(2, 37, 50, 2, 16, 5, 16, 16, torch.float32, L=2)
    run_and_compare_old_api(1, 33, 33, 1, 16, 4, 16, 16, torch.float16, padded="none")
    run_and_compare_old_api(1, 20, 20, 1, 16, 3, 16, 16, torch.float32, padded="all", backend="torch")


def test_all_text_keys_padded_and_empty_rows():
    out, lse, lay = run_and_compare(1, 48, 48, 2, 16, 4, 16, 16, torch.float32, padded="all")
    empty = (lay.offsets[0, 1:] == lay.offsets[0, :-1]).repeat_interleave(16)[:48]
    assert empty.any()
    assert bool((out[:, empty] == 0).all()) and bool((lse[:, :, empty] == float("-inf")).all())


def test_empty_layout_no_text():
    q, k, v, _, _ = make_joint(1, 20, 20, 1, 16, 0, torch.float32)
    lay = BlockLayout.from_mask(torch.zeros(2, 2, dtype=torch.bool, device=DEV), 16)
    out, lse = block_sparse_attention(q, k, v, lay, return_lse=True)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    out.sum().backward()
    for t in (q, k, v):
        assert bool((t.grad == 0).all())


def test_compute_tile_smaller_than_block():
    """Logical 32x32 blocks processed as 16x16 compute tiles (the GPU's sub-tiling path)."""
    cfgs = KernelConfigs(KernelConfig(16, 16), KernelConfig(16, 16), KernelConfig(16, 16))
    run_and_compare(1, 70, 90, 2, 16, 3, 32, 32, torch.float32, L=2, configs=cfgs)


def test_configs_are_used(monkeypatch):
    """configs= reaches the forward launcher and, carried by the call, the backward's launchers."""
    from accel.kernels import bwd_pipelined, fwd_pipelined

    seen = {}
    for mod, name, key in ((fwd_pipelined, "launch", "fwd"), (bwd_pipelined, "launch_dkdv", "dkdv"),
                           (bwd_pipelined, "launch_dq", "dq")):
        real = getattr(mod, name)

        def spy(*args, _real=real, _key=key, **kwargs):
            seen[_key] = args[-1]
            return _real(*args, **kwargs)
        monkeypatch.setattr(mod, name, spy)
    cfgs = KernelConfigs(fwd=KernelConfig(16, 16), dkdv=KernelConfig(16, 32, 2), dq=KernelConfig(32, 16, 2))
    run_and_compare(1, 64, 64, 2, 16, 5, 32, 32, torch.float32, configs=cfgs)
    assert seen["fwd"] == KernelConfig(16, 16)
    assert (seen["dkdv"].block_m, seen["dkdv"].block_n, seen["dkdv"].num_warps) == (16, 32, 2)
    assert (seen["dq"].block_m, seen["dq"].block_n, seen["dq"].num_warps) == (32, 16, 2)
    q, k, v, _, txt = make_joint(1, 64, 64, 2, 16, 5, torch.float32, grad=False)
    lay = random_layout(1, 64, 64, 32, 32)
    assert select_forward(q, k, lay, text_keys=txt, configs=cfgs).config == KernelConfig(16, 16)
    if not q.is_cuda:
        assert select_forward(q, k, lay, text_keys=txt).config == KernelConfig(32, 32, 1, 1)  # interpreter default
    assert select_backward(q, k, lay, text_keys=txt, configs=cfgs).dq.config.block_m == 32
    assert KernelConfigs(fwd=KernelConfig(16, 16)).encode() and kc.decode_configs(cfgs.encode()) == cfgs
    ws = kc.FWD_CONFIGS[(9, 128)]
    assert kc.decode_configs(KernelConfigs(fwd=ws).encode()).fwd == ws


def test_selection_reasons(caplog):
    """One place decides pipelined vs warp-specialised and logs (DEBUG, logger "accel") why."""
    q, k, v, _, txt = make_joint(1, 64, 64, 2, 16, 5, torch.float32, grad=False, device="cpu")
    lay = random_layout(1, 64, 64, 64, 64, device="cpu")  # CPU tensors: the reasons include "not CUDA"
    cfgs = KernelConfigs(fwd=KernelConfig(64, 64, 4, 2, warp_specialize=True))
    with caplog.at_level(logging.DEBUG, logger="accel"):
        choice = select_forward(q, k, lay, text_keys=txt, text_mask=torch.ones(1, 5, dtype=torch.bool),
                                configs=cfgs)
    assert choice.variant == "pipelined"
    text = "\n".join(choice.reasons)
    for part in ("warp-specialised forward skipped: block_m=64 != 128", "not CUDA",
                 "text mask not trailing padding"):
        assert part in text
        assert part in caplog.text
    assert "config not warp-specialised" not in text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="accel"):
        choice = select_forward(q, k, lay, text_keys=txt, text_lengths=torch.tensor([3], dtype=torch.int32))
    assert "config not warp-specialised" in caplog.text and "text mask" not in caplog.text
    b = select_backward(q, k, lay, text_keys=txt)
    assert b.dkdv.variant == b.dq.variant == "pipelined"
    assert any("text keys" in r for r in b.dkdv.reasons) and any("dQ skipped" in r for r in b.dq.reasons)


@pytest.mark.skipif(not INTERPRET, reason="calls the Hopper kernel directly: interpreter only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, sq, sk, H, D, L, T, text", [
    (2, 100, 90, 2, 32, 1, 0, "none"), (1, 64, 128, 3, 16, 3, 0, "none"), (1, 33, 47, 1, 24, 1, 0, "none"),
    (2, 70, 70, 2, 16, 1, 45, "after"), (2, 70, 64, 2, 16, 2, 32, "before"), (1, 50, 40, 2, 16, 1, 7, "gap"),
])
def test_warp_specialized_forward(dtype, B, sq, sk, H, D, L, T, text):
    """The warp-specialised Hopper forward (auto-picked on sm_90) against the reference.

    Covers tails on both sides (TMA zero fill + the -inf key bias), empty rows, per-head layouts, a head
    dim below its padding, the padded LSE rows its 1-D descriptor store needs, and text keys after, before
    or apart from the video in one joint buffer (read in place), with trailing padding as text_lengths
    (the first batch sees no text, the last all of it).
    """
    from accel.kernels import fwd_ws
    from accel.kernels._common import alloc_lse
    from accel.kernels.select import lse_tma_problem

    lay = random_layout(L, sq, sk, 32, 32)
    q, k, v, video, txt = make_joint(B, sq, sk, H, D, T, dtype, text="after" if text == "none" else text,
                                     grad=False)
    lengths = None
    if T:
        lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32)
        lengths[0] = 0
        lengths[-1] = T
    out = torch.full_like(q, float("nan"))
    lse = alloc_lse(B, H, sq, q.device)
    assert lse.stride(1) % 4 == 0 and lse_tma_problem(lse) is None
    t0, tl = txt if txt else (0, 0)
    fwd_ws.launch(q, k, v, lay, D ** -0.5, out, lse, KernelConfig(32, 32, 4, 2, warp_specialize=True),
                  video_row=video[0], video_len=sk, text_row=t0, text_len=tl, text_lengths=lengths)
    d64 = [t.double() for t in (q, k, v)]
    ref, ref_lse = reference_block_sparse_attention(*d64, lay, video_keys=video, text_keys=txt, text_lengths=lengths,
                                                    return_lse=True)
    assert rel(out, ref) <= TOL[dtype]
    check_lse(lse, ref_lse, dtype)


@pytest.mark.skipif(not INTERPRET, reason="calls the Hopper kernels directly: interpreter only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, sq, sk, H, D, L, sub", [(2, 100, 90, 2, 32, 1, 16), (1, 64, 128, 3, 16, 3, 32),
                                                     (1, 33, 47, 1, 24, 1, 16)])
def test_warp_specialized_backward(dtype, B, sq, sk, H, D, L, sub):
    """The warp-specialised dK/dV and dQ kernels (no masks: TMA zero fill does it) against autograd."""
    from accel.kernels import bwd_ws

    q, k, v, _, _ = make_joint(B, sq, sk, H, D, 0, dtype, grad=False)
    lay = random_layout(L, sq, sk, 32, 32)
    out, lse = block_sparse_attention(q, k, v, lay, return_lse=True)
    do = torch.randn_like(out)
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32)
    delta.copy_((out.float() * do.float()).sum(-1).transpose(1, 2))
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    bwd_ws.launch_dkdv(q, k, v, do, lse, delta, dk, dv, lay.transpose(), D ** -0.5,
                       KernelConfig(sub, 32, 4, 2, warp_specialize=True))
    bwd_ws.launch_dq(q, k, v, do, lse, delta, dq, lay, D ** -0.5, KernelConfig(32, sub, 4, 2, warp_specialize=True))
    d64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_block_sparse_attention(*d64, lay)
    exp = torch.autograd.grad((ref * do.double()).sum(), d64)
    for name, got, want in zip("qkv", (dq, dk, dv), exp, strict=True):
        print(f"d{name} rel {rel(got, want):.2e}")
        assert rel(got, want) <= TOL[dtype], name


def test_warp_specialized_config_falls_back():
    """On CPU a warp-specialised config runs the pipelined kernel, with and without text keys."""
    cfgs = KernelConfigs(fwd=KernelConfig(16, 16, 4, 2, warp_specialize=True))
    run_and_compare(2, 40, 50, 2, 16, 3, 16, 16, torch.float32, configs=cfgs)
    run_and_compare(1, 40, 50, 2, 16, 0, 16, 16, torch.float32, configs=cfgs)
    run_and_compare(2, 40, 50, 2, 16, 3, 16, 16, torch.float32, configs=cfgs, padded="lengths")


def test_lse_gradient():
    q, k, v, video, txt = make_joint(1, 33, 33, 2, 16, 2, torch.float32)
    lay = random_layout(1, 33, 33, 16, 16)
    out, lse = block_sparse_attention(q, k, v, lay, text_keys=txt, return_lse=True)
    d64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rout, rlse = reference_block_sparse_attention(*d64, lay, text_keys=txt, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(rlse)
    got = torch.autograd.grad((out * go).sum() + (lse[fin] * gl[fin]).sum(), (q, k, v))
    exp = torch.autograd.grad((rout * go.double()).sum() + (rlse[fin] * gl.double()[fin]).sum(), d64)
    for a, b in zip(got, exp, strict=True):
        print(f"rel {rel(a, b):.2e}")
        assert rel(a, b) <= 1e-5


def test_torch_backend():
    run_and_compare(2, 37, 50, 2, 16, 5, 16, 16, torch.float32, L=2, backend="torch")
    run_and_compare(1, 20, 20, 1, 16, 3, 16, 16, torch.float32, padded="all", backend="torch")
    run_and_compare(3, 20, 30, 1, 16, 6, 16, 16, torch.float32, padded="lengths", backend="torch", text="before")
    run_and_compare(2, 20, 30, 1, 16, 6, 16, 16, torch.float32, backend="torch", text="gap")


def test_torch_backend_analytic_backward():
    """The torch backend's chunked backward (what its custom op runs under torch.compile) vs autograd."""
    from accel.kernels._common import resolve_key_parts
    from accel.kernels.torch_impl import torch_block_sparse_attention, torch_block_sparse_backward

    q, k, v, video, txt = make_joint(2, 37, 40, 2, 16, 7, torch.float64, text="gap")
    lay = random_layout(2, 37, 40, 16, 16)
    parts = resolve_key_parts(k.shape[1], video, txt)
    lengths = torch.tensor([0, 5], dtype=torch.int32, device=q.device)
    out, lse = torch_block_sparse_attention(q, k, v, lay, parts, lengths, None, 0.3)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(lse)
    gl = torch.where(fin, gl, 0.0)
    exp = torch.autograd.grad((out * go).sum() + (lse[fin] * gl[fin]).sum(), (q, k, v))
    got = torch_block_sparse_backward(go, gl, q.detach(), k.detach(), v.detach(), lay, parts, lengths, None, 0.3)
    for a, b in zip(got, exp, strict=True):
        assert rel(a, b) <= 1e-10


def test_scale():
    run_and_compare(1, 32, 32, 1, 16, 0, 16, 16, torch.float32, grads=False, scale=0.3)


def test_nan_propagates():
    q, k, v, _, _ = make_joint(1, 32, 32, 1, 16, 0, torch.float32, grad=False)
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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_joint_qkv_out_view(backend):
    """Diffusers' joint attention: q, k, v and out all views of one (B, S + T, 3, H, D) buffer, text after."""
    B, S, T, H, D = 2, 40, 9, 2, 16
    qkv = torch.randn(B, S + T, 3, H, D, device=DEV)
    q, k, v = qkv[:, :S, 0], qkv[:, :, 1], qkv[:, :, 2]
    lay = random_layout(1, S, S, 16, 16)
    lengths = torch.tensor([9, 4], dtype=torch.int32, device=DEV)
    out = torch.full((B, S + T, H, D), float("nan"), device=DEV)
    block_sparse_attention(q, k, v, lay, text_keys=(S, T), text_lengths=lengths, out=out[:, :S], backend=backend)
    ref = reference_block_sparse_attention(q.double(), k.double(), v.double(), lay, text_keys=(S, T),
                                           text_lengths=lengths)
    assert rel(out[:, :S], ref) <= 1e-5
    assert bool(out[:, S:].isnan().all())


def test_determinism():
    q, k, v, _, txt = make_joint(1, 37, 37, 2, 16, 3, torch.float32)
    lay = random_layout(2, 37, 37, 16, 16)
    outs, grads = [], []
    for _ in range(3):
        o = block_sparse_attention(q, k, v, lay, text_keys=txt)
        grads.append(torch.autograd.grad(o.sum(), (q, k, v)))
        outs.append(o.detach())
    for o, g in zip(outs[1:], grads[1:], strict=True):
        assert torch.equal(o, outs[0])
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0], strict=True))


# ------------------------------------------------------------------------------------------ errors
def test_errors():
    q, k, v, _, _ = make_joint(1, 32, 32, 2, 16, 0, torch.float32, grad=False)
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
    with pytest.raises(ValueError, match="mixed"):
        block_sparse_attention(q, k, v, lay, extra_k=q[:, :3], extra_v=q[:, :3], text_keys=(0, 3))
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, lay, backend="cuda")
    with pytest.raises(ValueError, match="out"):
        block_sparse_attention(q, k, v, lay, out=torch.empty(1, 31, 2, 16, device=DEV))
    with pytest.raises(ValueError, match="inference"):
        block_sparse_attention(q.clone().requires_grad_(), k, v, lay, out=torch.empty_like(q))
    odd = BlockLayout.dense(32, 32, 24, device=DEV)
    with pytest.raises(RuntimeError, match="triton"):
        block_sparse_attention(q, k, v, odd, backend="triton")
    block_sparse_attention(q.detach(), k, v, odd, backend="torch")  # the torch path takes any block size
    # the joint-buffer arguments
    kk = torch.randn(1, 40, 2, 16, device=DEV)
    lengths = torch.tensor([3], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="need text_keys"):
        block_sparse_attention(q, k, v, lay, text_lengths=lengths)
    with pytest.raises(ValueError, match="not both"):
        block_sparse_attention(q, kk, kk, lay, text_keys=(32, 8), text_lengths=lengths,
                               text_mask=torch.ones(1, 8, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="int32"):
        block_sparse_attention(q, kk, kk, lay, text_keys=(32, 8), text_lengths=lengths.float())
    with pytest.raises(ValueError, match="text_mask must be bool"):
        block_sparse_attention(q, kk, kk, lay, text_keys=(32, 8), text_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="overlap"):
        block_sparse_attention(q, kk, kk, lay, video_keys=(0, 32), text_keys=(30, 8))
    with pytest.raises(ValueError, match="pass video_keys"):
        block_sparse_attention(q, kk, kk, lay, text_keys=(4, 4))
    with pytest.raises(ValueError, match="within"):
        block_sparse_attention(q, kk, kk, lay, text_keys=(36, 8))
    with pytest.raises(TypeError, match="tuple"):
        block_sparse_attention(q, kk, kk, lay, text_keys=32)


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
    code = ("import sys, accel.kernels; bad = [m for m in ('diffusers', 'peft', 'gradio', 'triton') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_config_fallback_is_fitted():
    """A warp-specialised table entry carries the pipelined config that runs when it cannot, fitted alike."""
    ws = kc.FWD_CONFIGS[(9, 128)]
    assert ws.warp_specialize and ws.pipelined() == KernelConfig(128, 128, 8, 3, tma=True)
    fitted = kc.fit(ws, 64, 64, 128, True)  # a 64-block layout: both configs shrink to its blocks
    assert (fitted.block_m, fitted.block_n) == (64, 64)
    assert (fitted.pipelined().block_m, fitted.pipelined().block_n, fitted.pipelined().num_warps) == (64, 64, 8)
    q = torch.randn(1, 256, 1, 128)
    lay = BlockLayout.dense(256, 256, 128)
    choice = select_forward(q, q, lay, configs=KernelConfigs(fwd=ws))  # never outside CUDA
    assert choice.variant == "pipelined" and choice.config == KernelConfig(128, 128, 8, 3)
    plain = KernelConfig(64, 64, 4, 2)
    assert plain.pipelined() is plain


@pytest.mark.filterwarnings("ignore:divide by zero encountered in:RuntimeWarning")  # interpreter noise that
# pytest.warns re-emits from this file (the global filter matches it in triton's own module only)
def test_warp_specialized_build_failure_falls_back(monkeypatch):
    """A Triton that cannot build the warp-specialised kernels costs speed, not the call: warn, run pipelined."""
    from triton.runtime.errors import OutOfResources

    from accel.kernels import fwd_ws, triton_impl
    from accel.kernels import select as sel

    def fail_build(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    def oom(*args):
        raise OutOfResources(300000, 232448, "shared memory")

    def real_bug(*args, **kwargs):
        raise ValueError("a real bug")

    # As on an sm_90 GPU: the selection picks the warp-specialised kernel.
    def as_on_hopper(*args, **kwargs):
        cfg = KernelConfig(16, 16, 1, 1, warp_specialize=True)
        return sel.KernelChoice(sel.WARP_SPECIALIZED, cfg, (), sel.KernelChoice(sel.PIPELINED, KernelConfig(16, 16)))

    monkeypatch.setattr(sel, "select_forward", as_on_hopper)
    monkeypatch.setattr(fwd_ws, "launch", fail_build)
    with pytest.warns(RuntimeWarning, match="pipelined kernel"):
        run_and_compare(1, 40, 50, 2, 16, 3, 16, 16, torch.float32, grads=False, padded="lengths")
    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        assert not triton_impl._try_ws(oom)
    monkeypatch.setattr(fwd_ws, "launch", real_bug)
    with pytest.raises(ValueError, match="a real bug"):  # other errors are not swallowed
        run_and_compare(1, 40, 50, 2, 16, 0, 16, 16, torch.float32, grads=False)


# ------------------------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_real_sizes(dtype, D):
    blk = default_block_size("cuda")
    run_and_compare(1, 4100, 4000, 4, D, 77, blk, blk, dtype, L=4)


@requires_cuda
@pytest.mark.parametrize("dtype, B, sq, sk, D, L", [(torch.bfloat16, 2, 4101, 4000, 128, 2),
                                                    (torch.float16, 1, 1000, 1024, 128, 1),
                                                    (torch.bfloat16, 2, 777, 777, 80, 1),
                                                    (torch.float16, 1, 2047, 2047, 64, 1)])
def test_gpu_no_text_keys(dtype, B, sq, sk, D, L):
    """Without text keys the warp-specialised kernels run on sm_90: odd lengths, padded LSE, grads."""
    blk = default_block_size("cuda")
    run_and_compare(B, sq, sk, 2, D, 0, blk, blk, dtype, L=L)


@requires_cuda
@pytest.mark.parametrize("dtype, B, sq, T, padded, text", [(torch.bfloat16, 2, 4101, 77, "lengths", "after"),
                                                          (torch.bfloat16, 2, 4101, 77, "trailing", "after"),
                                                          (torch.float16, 1, 1000, 256, "none", "before"),
                                                          (torch.bfloat16, 3, 1000, 77, "lengths", "before")])
def test_gpu_text_keys(dtype, B, sq, T, padded, text):
    """Text keys: unpadded ones and text_lengths take the warp-specialised forward on sm_90, text_mask
    the pipelined one."""
    blk = default_block_size("cuda")
    run_and_compare(B, sq, sq, 2, 128, T, blk, blk, dtype, padded=padded, text=text)


@requires_cuda
def test_gpu_warp_specialized_text_lengths():
    """The warp-specialised forward with trailing-padded text as text_lengths (no host sync) on the GPU."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("Hopper only")
    B, S, T, H, D = 2, 3000, 77, 2, 128
    qkv = torch.randn(3, B, S + T, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[0][:, :S], qkv[1], qkv[2]
    lengths = torch.tensor([50, 0], dtype=torch.int32, device="cuda")
    lay = random_layout(1, S, S, 128, 128)
    out = torch.empty_like(q)
    choice = select_forward(q, k, lay, v=v, text_keys=(S, T), text_lengths=lengths, out=out)
    assert choice.variant == "warp_specialized", choice.reasons
    o, lse = block_sparse_attention(q, k, v, lay, text_keys=(S, T), text_lengths=lengths, return_lse=True)
    ref, ref_lse = reference_block_sparse_attention(q, k, v, lay, text_keys=(S, T), text_lengths=lengths,
                                                    return_lse=True)
    fin = torch.isfinite(ref_lse)
    assert rel(o, ref) <= 1e-2
    assert bool((lse[~fin] == float("-inf")).all()) and float((lse[fin] - ref_lse[fin]).abs().max()) <= 2e-2
    block_sparse_attention(q, k, v, lay, text_keys=(S, T), text_lengths=lengths, out=out)
    assert rel(out, ref) <= 1e-2


@requires_cuda
def test_gpu_odd_head_dim_bf16():
    run_and_compare(2, 1000, 1000, 2, 80, 16, 64, 64, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("D", [128, 256])
def test_gpu_fp32_fits_shared_memory(D):
    # fp32 with the 2-byte tile tables once asked for 393 KB of shared memory at D=128.
    blk = default_block_size("cuda")
    run_and_compare(1, 700, 700, 2, D, 16, blk, blk, torch.float32)
