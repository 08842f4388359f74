"""The pyramid kernel's Triton backward and LSE against autograd of the dense-equivalent reference (interpreter)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import requires_cuda

from accel.geometry import TokenLayout
from accel.kernels.pyramid import pyramid_attention
from accel.kernels.pyramid_reference import reference_pyramid_attention
from accel.methods.base import call_from_padding_mask
from accel.methods.dense import sdpa_bshd
from accel.methods.pyramid import Pyramid

# Max |got - reference| allowed per dtype, with gradients of order 1 (fp16: P and dS are rounded to fp16 before
# their matmuls, as in every flash-attention backward).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _levels_with_every_level(B: int, H: int, n: int) -> torch.Tensor:
    """Random per-(batch, head) level maps in which each of 0, 1, 2, 4, 8 occurs in every (b, h) map."""
    choice = torch.tensor([0, 1, 2, 4, 8])
    lv = choice[torch.randint(0, 5, (B, H, n, n))]
    lv[..., torch.arange(n), torch.arange(n)] = 1
    off_diagonal = [i * n + j for i in range(n) for j in range(n) if i != j]
    flat = lv.view(B, H, n * n)
    for b in range(B):
        for h in range(H):  # plant each level once off the diagonal, in random places
            spots = torch.tensor(off_diagonal)[torch.randperm(len(off_diagonal))[:5]]
            flat[b, h, spots] = choice
    assert all(set(lv[b, h].unique().tolist()) == {0, 1, 2, 4, 8} for b in range(B) for h in range(H))
    return lv.to(torch.int32)


def _grads(fn, tensors, dout, dlse_weight=0.0):
    out, lse = fn(*tensors)
    loss = (out.to(dout.dtype) * dout).sum()
    if dlse_weight:
        finite = torch.isfinite(lse)
        loss = loss + dlse_weight * (lse[finite] * torch.linspace(-1, 1, int(finite.sum()), dtype=lse.dtype)).sum()
    return out, lse, torch.autograd.grad(loss, tensors)


def _compare(block: int, dtype: torch.dtype, *, B: int = 2, H: int = 2, D: int = 16, T: int = 7,
             text_position: str = "before", padding: str = "lengths", dlse_weight: float = 0.0,
             extra_rows: int = 0, blocks: int = 2, device: str = "cpu") -> tuple:
    V = blocks * block + 5  # the last block is partial
    n = -(-V // block)
    levels = _levels_with_every_level(B, H, n).to(device)
    S = T + V + extra_rows
    q, k, v = (torch.randn(B, S, H, D, device=device).to(dtype).requires_grad_(True) for _ in range(3))
    v0, t0 = (T, 0) if text_position == "before" else (0, V + extra_rows)
    args = dict(video_keys=(v0, V), text_keys=(t0, T))
    if padding == "lengths":
        args["text_lengths"] = torch.tensor([T, 3][:B], dtype=torch.int32, device=device)
    else:
        mask = torch.rand(B, T) < 0.6
        mask[:, 0] = False
        args["text_mask"] = mask.to(device)
    dout = torch.randn(B, V, H, D, dtype=torch.float64, device=device)

    def ours(q_, k_, v_):
        return pyramid_attention(q_[:, v0:v0 + V], k_, v_, levels, block, return_lse=True, **args)

    def ref(q_, k_, v_):
        return reference_pyramid_attention(q_[:, v0:v0 + V], k_, v_, levels, block, return_lse=True, **args)

    out, lse, got = _grads(ours, (q, k, v), dout.to(dtype), dlse_weight)
    exact = tuple(t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_lse, want = _grads(ref, exact, dout, dlse_weight)
    tol = TOL[dtype]
    diffs = [(out.double() - ref_out).abs().max().item(), (lse.double() - ref_lse).abs().max().item()]
    diffs += [(g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True)]
    print(f"block={block} {dtype}: max |diff| out, lse, dq, dk, dv = {diffs}")
    assert lse.dtype == torch.float32 and lse.shape == (B, H, V)
    assert max(diffs) <= tol
    return got, (v0, t0, V, T)


@pytest.mark.parametrize(("block", "dtype"), [(16, torch.float32), (32, torch.float32), (64, torch.float32),
                                              (128, torch.float32), (16, torch.float16), (64, torch.float16)])
def test_backward_matches_reference(block: int, dtype: torch.dtype) -> None:
    (dq, dk, dv), (v0, t0, V, T) = _compare(block, dtype)
    # batch 1 sees only its first 3 text keys: the hidden ones get no gradient, the visible ones do
    assert dk[1, t0 + 3:t0 + T].abs().max() == 0 and dv[1, t0 + 3:t0 + T].abs().max() == 0
    assert dk[1, t0:t0 + 3].abs().max() > 0 and dv[:, v0:v0 + V].abs().min(1).values.max() > 0


def test_backward_with_text_mask_text_after_video_and_lse_gradient() -> None:
    # scattered text padding, text after the video, rows in the joint buffer that are neither (zero gradient),
    # and a loss that uses the LSE too (dLse folds into Delta)
    (dq, dk, dv), (v0, t0, V, T) = _compare(32, torch.float32, text_position="after", padding="mask",
                                            dlse_weight=0.5, extra_rows=3)
    assert dk[:, V:V + 3].abs().max() == 0 and dv[:, V:V + 3].abs().max() == 0


def test_backward_of_video_only_attention_batch_one_head_dim_not_a_power_of_two() -> None:
    block, V, D = 32, 70, 24
    levels = _levels_with_every_level(1, 3, 3)
    q, k, v = (torch.randn(1, V, 3, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, V, 3, D)
    got = torch.autograd.grad(pyramid_attention(q, k, v, levels, block), (q, k, v), dout)
    want = torch.autograd.grad(reference_pyramid_attention(q, k, v, levels, block), (q, k, v), dout)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_row_that_sees_nothing_has_zero_output_and_gradients() -> None:
    block, V = 16, 40
    levels = torch.ones(1, 1, 3, 3, dtype=torch.int32)
    levels[0, 0, 1] = 0  # query block 1 sees no key at all (no text keys)
    q, k, v = (torch.randn(1, V, 1, 16, requires_grad=True) for _ in range(3))
    out, lse = pyramid_attention(q, k, v, levels, block, return_lse=True)
    assert torch.isinf(lse[0, 0, 16:32]).all() and (lse[0, 0, 16:32] < 0).all() and torch.isfinite(lse[0, 0, :16]).all()
    assert out[0, 16:32].abs().max() == 0
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv)) and dq[0, 16:32].abs().max() == 0
    want = torch.autograd.grad(reference_pyramid_attention(q, k, v, levels, block).sum(), (q, k, v))
    for g, w in zip((dq, dk, dv), want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_backward_is_deterministic_and_needs_no_output_gradient() -> None:
    levels = _levels_with_every_level(1, 2, 3)
    q, k, v = (torch.randn(1, 45, 2, 16, requires_grad=True) for _ in range(3))
    runs = [torch.autograd.grad(pyramid_attention(q, k, v, levels, 16).square().sum(), (q, k, v)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    # only the LSE is used: the output's gradient is None inside the op
    _, lse = pyramid_attention(q, k, v, levels, 16, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k))
    _, ref_lse = reference_pyramid_attention(q, k, v, levels, 16, return_lse=True)
    want = torch.autograd.grad(ref_lse.sum(), (q, k))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_backward_op_passes_opcheck() -> None:
    q, k, v = (torch.randn(1, 23, 1, 16) for _ in range(3))
    kt, vt = (torch.cat([x, torch.randn(1, 3, 1, 16)], 1) for x in (k, v))
    levels = torch.tensor([[[[1, 2], [8, 4]]]], dtype=torch.int32)
    vis = torch.tensor([[1, 0, 1]], dtype=torch.int8)
    out, lse = torch.ops.accel.pyramid_fwd(q, kt, vt, levels, vis, [0, 23, 23, 3], 16, 0.25)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.accel.pyramid_bwd,
                          (dout, dlse, q, kt, vt, out, lse, levels, vis, [0, 23, 23, 3], 16, 0.25))
    torch.library.opcheck(torch.ops.accel.pyramid_fwd,
                          (q.requires_grad_(), kt.requires_grad_(), vt.requires_grad_(), levels, None,
                           [0, 23, 23, 3], 16, 0.25))


def test_compiles_without_graph_break_and_matches_eager() -> None:
    levels = _levels_with_every_level(2, 2, 3)
    lengths = torch.tensor([5, 2], dtype=torch.int32)

    def fn(q, k, v):
        out, lse = pyramid_attention(q[:, 5:], k, v, levels, 16, video_keys=(5, 40), text_keys=(0, 5),
                                     text_lengths=lengths, return_lse=True)
        return out * 2 + 1, lse

    q, k, v = (torch.randn(2, 45, 2, 16, requires_grad=True) for _ in range(3))
    o, lse = fn(q, k, v)
    g = torch.randn_like(o)
    want = torch.autograd.grad((o * g).sum() + lse.sum(), (q, k, v))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    co, clse = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
    got = torch.autograd.grad((co * g).sum() + clse.sum(), (q, k, v))
    assert torch.allclose(co, o, atol=1e-6) and torch.allclose(clse, lse, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_method_run_is_differentiable_through_the_kernel() -> None:
    # what a length-extension LoRA step does: levels from this call (no grad), gradients to q, k, v
    layout = TokenLayout(2, 2, 4, 5, text_tokens=3, text_position="before")  # 40 video tokens, 3 blocks of 16
    q, k, v = (torch.randn(2, layout.total_tokens, 2, 16, requires_grad=True) for _ in range(3))
    method = Pyramid(block_size=16, t1=0.3, t2=0.5, t3=0.6, t4=0.7)
    mask = torch.ones(2, layout.total_tokens, dtype=torch.bool)
    mask[1, 1:3] = False  # batch 1 sees 1 of its 3 text tokens
    call = dataclasses.replace(call_from_padding_mask(mask, layout), seed=4)
    res = method.run(q, k, v, layout, method.build_plan(layout, 2, torch.device("cpu")), call)
    dout = torch.randn_like(res.out)
    got = torch.autograd.grad(res.out, (q, k, v), dout)
    levels = method.plan_call(q.detach(), k.detach(), layout, call)
    video = reference_pyramid_attention(q[:, 3:], k, v, levels, 16, video_keys=(3, 40), text_keys=(0, 3),
                                        text_lengths=call.text_lengths)
    want = torch.autograd.grad(torch.cat([sdpa_bshd(q[:, :3], k, v, key_padding_mask=mask), video], 1), (q, k, v),
                               dout)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


@requires_cuda
@pytest.mark.parametrize("block", [64, 128])
def test_bfloat16_backward_on_the_gpu(block: int) -> None:
    _compare(block, torch.bfloat16, D=128, T=77, blocks=6, device="cuda")
