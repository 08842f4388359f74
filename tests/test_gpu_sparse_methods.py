"""Neighborhood and pyramid kernels on a CUDA GPU: bf16/fp16 at model-like shapes vs the PyTorch references.

The CPU suite checks the same kernels under the Triton interpreter at tiny shapes in fp32/fp16; here the
compiled kernels run with the real tile sizes (128-token tiles, 64/128-token pyramid blocks) and bf16, which
numpy (and so the interpreter) cannot do. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from accel.geometry import TokenLayout
from accel.kernels.neighborhood_reference import reference_neighborhood_attention
from accel.kernels.pyramid_reference import LEVELS, reference_pyramid_attention
from accel.methods.base import AttentionCall
from accel.methods.neighborhood import Neighborhood
from accel.methods.pyramid import Pyramid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-4}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _ordered(t: torch.Tensor, perm: torch.Tensor | None, video: slice) -> torch.Tensor:
    if perm is None:
        return t
    out = t.clone()
    out[:, video] = t[:, video][:, perm]
    return out


NEIGHBORHOOD_CASES = [
    # grid, kernel, stride, dilation, causal, text tokens, batch, heads, head dim
    ((6, 20, 24), "3x7x9", "1", "1", False, 0, 1, 4, 128),
    ((6, 20, 24), "4x8x8", "2x4x8", "1", False, 13, 2, 2, 128),  # stride, text padding
    ((5, 17, 23), "3x5x6", "1x2x3", "1x2x1", True, 7, 2, 3, 64),  # odd grid, dilation, causal
    ((1, 40, 48), "13x17", "4x4", "1", False, 0, 1, 2, 128),  # image
    ((8, 16, 32), "3x7x9", "1", "1", False, 13, 2, 2, 128),  # complete tiles: uniform box
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", NEIGHBORHOOD_CASES, ids=[f"case{i}" for i in range(len(NEIGHBORHOOD_CASES))])
def test_neighborhood_forward_and_backward_on_the_gpu(case, dtype) -> None:
    grid, kernel, stride, dilation, causal, text, batch, heads, d = case
    method = Neighborhood(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    layout = TokenLayout(batch, *grid, text_tokens=text, text_position="before" if text else "none")
    dev = torch.device("cuda")
    plan = method.build_plan(layout, heads, dev)
    assert plan.tiles is not None and plan.tiles.block >= 64  # the compiled kernel's real tile size
    v_len, s = layout.video_tokens, layout.total_tokens
    q, k, v = (torch.randn(batch, s, heads, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([text, max(1, text - 5)][:batch], dtype=torch.int32, device=dev) if text else None
    vs = slice(text, text + v_len)
    kw = dict(video_keys=(text, v_len), text_keys=(0, text) if text else None, text_lengths=lengths)
    kernel_t, stride_t, dilation_t, causal_t = method.resolve(layout)
    ref = reference_neighborhood_attention(q[:, vs], k, v, grid, kernel_t, stride_t, dilation_t, causal_t, **kw)

    perm = method.token_order(layout, dev)
    inverse = torch.argsort(perm)
    qo, ko, vo = (_ordered(t, perm, vs) for t in (q, k, v))
    call = AttentionCall(text_lengths=lengths)
    out = method.run(qo, ko, vo, layout, plan, call).out[:, vs][:, inverse]
    assert out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref.float(), (q, k, v), grad.float())
    got = torch.autograd.grad(out, (q, k, v), grad)
    for name, e, g in zip("qkv", expected, got, strict=True):
        assert _rel(g, e) < 2 * TOL[dtype], name


def test_neighborhood_full_grid_window_is_dense_sdpa() -> None:
    dev = torch.device("cuda")
    layout = TokenLayout(1, 4, 16, 16)
    method = Neighborhood(kernel_size="4x16x16")
    plan = method.build_plan(layout, 2, dev)
    assert plan.dense
    q, k, v = (torch.randn(1, layout.total_tokens, 2, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    out = method.run(q, k, v, layout, plan, AttentionCall()).out
    expect = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.equal(out, expect)


def _random_levels(B: int, H: int, n: int, device: torch.device) -> torch.Tensor:
    choice = torch.tensor([0, *LEVELS], device=device)
    lv = choice[torch.randint(0, len(LEVELS) + 1, (B, H, n, n), device=device)]
    lv[..., torch.arange(n), torch.arange(n)] = 1
    return lv.to(torch.int32)


PYRAMID_GPU_CASES = [(block, dtype, 128) for block in (64, 128) for dtype in (torch.bfloat16, torch.float16)] + [
    (block, torch.bfloat16, d) for block in (64, 128) for d in (64, 256)]  # other head dims: other launch knobs


@pytest.mark.parametrize("block,dtype,D", PYRAMID_GPU_CASES,
                         ids=[f"b{b}-{str(t)[6:]}-d{d}" for b, t, d in PYRAMID_GPU_CASES])
def test_pyramid_kernel_on_the_gpu(block: int, dtype, D: int) -> None:
    from accel.kernels.pyramid import pyramid_attention

    dev = torch.device("cuda")
    B, H, T = 2, 3, 29
    V = 11 * block + 37  # not a multiple of the block
    n = -(-V // block)
    q, k, v = (torch.randn(B, T + V, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    levels = _random_levels(B, H, n, dev)
    lengths = torch.tensor([T, 11], dtype=torch.int32, device=dev)
    args = dict(video_keys=(T, V), text_keys=(0, T), text_lengths=lengths)
    got = pyramid_attention(q[:, T:], k, v, levels, block, **args)
    expect = reference_pyramid_attention(q[:, T:].float(), k.float(), v.float(), levels, block, **args)
    assert got.dtype == dtype
    assert _rel(got, expect) < TOL[dtype]
    grad = torch.randn_like(expect)
    want = torch.autograd.grad(expect, (q, k, v), grad)
    have = torch.autograd.grad(got, (q, k, v), grad.to(dtype))
    for name, e, g in zip("qkv", want, have, strict=True):
        assert _rel(g, e) < 2 * TOL[dtype], name


# (block, dtype, head dim, form): "sp" single-partition; "ws" warp-specialised (its default: one program per SM
# taking items from an atomic counter); "ws3d" with 3 programs over the items by cost, so each walks ~20 and the
# rings, Q's barrier and the consumers' turns run across items; "ws3" the same dealt out statically
GLUON_CASES = [(b, t, d, f) for b in (64, 128) for t in (torch.bfloat16, torch.float16) for d in (64, 128)
               for f in (("sp", "ws", "ws3", "ws3d") if b == 128 else ("sp",))]


@pytest.mark.parametrize("block,dtype,D,form", GLUON_CASES,
                         ids=[f"b{b}-{str(t)[6:]}-d{d}-{f}" for b, t, d, f in GLUON_CASES])
def test_pyramid_gluon_forward_on_the_gpu(block: int, dtype, D: int, form: str) -> None:
    """The Gluon forward (sm_90) directly, single-partition and warp-specialised: out and LSE vs the reference,
    with a partial last block, batch 2, per-head maps and masked text keys after the video keys; every output
    element written (the buffers start as NaN)."""
    import math

    from accel.kernels._common import text_visibility
    from accel.kernels.pyramid_gluon import gluon_fwd_problem, launch_fwd_gluon, work_order
    from accel.kernels.pyramid_levels import level_lists
    from accel.kernels.pyramid_pool import pool_kv_levels

    dev = torch.device("cuda")
    B, H, T = 2, 3, 150
    V = 9 * block + 21
    n = -(-V // block)
    q = torch.randn(B, V, H, D, device=dev, dtype=dtype)
    k, v = (torch.randn(B, V + T, H, D, device=dev, dtype=dtype) for _ in range(2))
    levels = _random_levels(B, H, n, dev)
    mask = torch.rand(B, T, device=dev) > 0.3
    kv, vv, ek, ev = k[:, :V], v[:, :V], k[:, V:], v[:, V:]
    kp, vp, r4, r8 = pool_kv_levels(kv, vv, block)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, V), float("nan"), device=dev)
    tensors = {"q": q, "out": out, "k": kv, "v": vv, "kp": kp, "vp": vp, "ek": ek, "ev": ev}
    reason = gluon_fwd_problem(q, tensors, block)
    if reason is not None:
        pytest.skip(reason)
    idx, ends = level_lists(levels)
    launch_fwd_gluon(q, kv, vv, kp, vp, ek, ev, text_visibility(T, None, mask, torch.int8), out, lse, idx, ends, r4,
                     r8, block, 1 / math.sqrt(D), form != "sp",
                     *((3, work_order(ends), form == "ws3d") if form.startswith("ws3") else ()))
    expect, expect_lse = reference_pyramid_attention(q.float(), k.float(), v.float(), levels, block,
                                                     video_keys=(0, V), text_keys=(V, T), text_mask=mask,
                                                     return_lse=True)
    assert _rel(out, expect) < TOL[dtype]
    assert float((lse - expect_lse).abs().max()) < 0.05
    if form.startswith("ws3"):  # without text, rows with no tile at all (the consumers release Q without a QK^T)
        levels[0, 0, :3] = 0
        out.fill_(float("nan"))
        idx, ends = level_lists(levels)
        launch_fwd_gluon(q, kv, vv, kp, vp, None, None, None, out, lse, idx, ends, r4, r8, block, 1 / math.sqrt(D),
                         True, 3, work_order(ends), form == "ws3d")
        expect, expect_lse = reference_pyramid_attention(q.float(), kv.float(), vv.float(), levels, block,
                                                         return_lse=True)
        assert _rel(out, expect) < TOL[dtype]
        assert torch.equal(torch.isinf(lse), torch.isinf(expect_lse))
        finite = torch.isfinite(expect_lse)
        assert float((lse - expect_lse)[finite].abs().max()) < 0.05


def test_pyramid_method_on_the_gpu_reports_its_density() -> None:
    dev = torch.device("cuda")
    layout = TokenLayout(1, 5, 30, 52)
    method = Pyramid()
    plan = method.build_plan(layout, 4, dev)
    perm = method.token_order(layout, dev)
    q, k, v = (torch.randn(1, layout.total_tokens, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    q, k, v = (t[:, perm] for t in (q, k, v))
    result = method.run(q, k, v, layout, plan, AttentionCall())
    density = float(result.density)
    assert 0.0 < density < 1.0
    levels = method.plan_call(q, k, layout, AttentionCall())
    expect = reference_pyramid_attention(q.float(), k.float(), v.float(), levels, method.block_size)
    assert _rel(result.out, expect) < TOL[torch.bfloat16]


@pytest.mark.parametrize("block", [64, 128])
def test_fused_pyramid_estimate_on_the_gpu(block: int) -> None:
    from accel.kernels.pyramid_estimate import estimate_block_importance_triton
    from accel.kernels.pyramid_reference import estimate_block_importance

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 5 * 30 * 52, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    want = estimate_block_importance(q.float(), k.float(), block, seed=1)
    got = estimate_block_importance_triton(q, k, block, seed=1)
    assert got.shape == want.shape
    assert _rel(got, want) < TOL[torch.bfloat16]
