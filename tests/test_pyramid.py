"""Pyramid sparse attention (PSA): pooling rule, reference vs brute force, Triton kernel, importance, level rules."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from accel.geometry import TokenLayout
from accel.kernels.pyramid import level_lists, pyramid_attention
from accel.kernels.pyramid_reference import (
    LEVELS,
    brute_force_pyramid_attention,
    cap_levels,
    estimate_block_importance,
    level_density,
    pool_levels,
    reference_pyramid_attention,
    similarity_cap,
    threshold_levels,
    topk_levels,
    torch_pyramid_attention,
)
from accel.methods.base import AttentionCall, call_from_padding_mask
from accel.methods.dense import sdpa_bshd
from accel.methods.pyramid import Pyramid, block_tile


def _random_levels(B: int, H: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    choice = torch.tensor([0, 1, 2, 4, 8])
    lv = choice[torch.randint(0, 5, (B, H, n, n), generator=generator)]
    lv[..., torch.arange(n), torch.arange(n)] = 1  # every row keeps a block
    return lv.to(torch.int32)


def _qkv(B: int, S: int, H: int, D: int, dtype=torch.float32):
    return tuple(torch.randn(B, S, H, D).to(dtype) for _ in range(3))


# ---------------------------------------------------------------------------------------- the pooling rule
def test_partial_last_block_pools_over_its_real_tokens() -> None:
    # V = 20 with block 16: the last block holds 4 tokens; at p = 8 its one group is their mean, weight 4
    x = torch.arange(20, dtype=torch.float64).view(1, 20, 1, 1)
    pooled, counts = pool_levels(x, 16)
    assert [c.tolist() for c in counts] == [[2.0] * 10 + [0.0] * 6, [4.0] * 5 + [0.0] * 3, [8, 8, 4, 0]]
    assert pooled[2][0, :, 0, 0].tolist() == [3.5, 11.5, 17.5, 0.0]
    # V = 19: the group of the last block at p = 2 holds one token (bias ln 1), at p = 4 three tokens
    _, counts = pool_levels(torch.zeros(1, 19, 1, 1), 16)
    assert counts[0][8:10].tolist() == [2.0, 1.0] and counts[1][4].item() == 3.0

    # one query, every key block at level 8: logits q.mean + ln(count) over the groups [0,8) [8,16) [16,20)
    q, k, v = (torch.randn(1, 20, 1, 4, dtype=torch.float64) for _ in range(3))
    levels = torch.full((1, 1, 2, 2), 8, dtype=torch.int32)
    out = reference_pyramid_attention(q, k, v, levels, 16, scale=1.0)
    groups = [(0, 8), (8, 16), (16, 20)]
    km = torch.stack([k[0, a:b, 0].mean(0) for a, b in groups])
    vm = torch.stack([v[0, a:b, 0].mean(0) for a, b in groups])
    bias = torch.tensor([math.log(b - a) for a, b in groups], dtype=torch.float64)
    expect = torch.softmax(q[0, :, 0] @ km.T + bias, -1) @ vm
    torch.testing.assert_close(out[0, :, 0], expect)


@pytest.mark.parametrize("block", [16, 32])
def test_reference_matches_brute_force_construction(block: int) -> None:
    B, H, D = 2, 2, 8
    V = 3 * block + 5  # partial last block
    q, k, v = _qkv(B, V, H, D, torch.float64)
    levels = _random_levels(B, H, -(-V // block))
    expect = brute_force_pyramid_attention(q, k, v, levels, block)
    torch.testing.assert_close(reference_pyramid_attention(q, k, v, levels, block), expect, rtol=1e-10, atol=1e-12)
    # the chunked PyTorch path, with chunks smaller than one query block
    got = torch_pyramid_attention(q, k, v, levels, block, chunk_elements=1)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("p", LEVELS)
def test_kernel_at_every_level(block: int, p: int) -> None:
    B, H, D = 1, 2, 16
    V = 2 * block + 3
    n = -(-V // block)
    q, k, v = _qkv(B, V, H, D)
    levels = torch.full((B, H, n, n), p, dtype=torch.int32)
    levels[0, 1, 0, 1] = 0  # one skipped pair
    got = pyramid_attention(q, k, v, levels, block)
    torch.testing.assert_close(got, reference_pyramid_attention(q, k, v, levels, block), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference_with_padded_text(block: int, dtype: torch.dtype) -> None:
    B, H, D, T = 2, 2, 16, 7
    V = 3 * block + 9
    n = -(-V // block)
    q, k, v = _qkv(B, T + V, H, D, dtype)  # text before the video
    levels = _random_levels(B, H, n)
    lengths = torch.tensor([7, 3], dtype=torch.int32)  # trailing padding in batch 1
    args = dict(video_keys=(T, V), text_keys=(0, T), text_lengths=lengths)
    got = pyramid_attention(q[:, T:], k, v, levels, block, **args)
    expect = reference_pyramid_attention(q[:, T:], k, v, levels, block, **args)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got, expect, rtol=tol, atol=tol)
    torch.testing.assert_close(torch_pyramid_attention(q[:, T:], k, v, levels, block, **args), expect,
                               rtol=tol, atol=tol)
    # hiding a text key changes the result (the padding is honoured)
    full = reference_pyramid_attention(q[:, T:], k, v, levels, block, video_keys=(T, V), text_keys=(0, T))
    assert (full[1] - expect[1]).abs().max() > 1e-3 and torch.allclose(full[0], expect[0], atol=tol)


@pytest.mark.parametrize("block,tma,pack,D", [(16, False, 0, 16), (16, True, 0, 24), (32, True, 32, 16),
                                             (16, True, 16, 24), (32, True, 16, 16)])
def test_every_forward_form_matches_the_reference(block: int, tma: bool, pack: int, D: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Pointers, tensor descriptors (TMA) and packed pooled tiles (``pack`` lanes: every pooled level, or only
    those with fewer rows while the others stay one block per tile): the same answer (D = 24: padded columns)."""
    import accel.kernels.pyramid as pk

    monkeypatch.setattr(pk, "fwd_knobs", lambda *a: {"num_warps": 4, "num_stages": 2, "USE_TMA": tma,
                                                     "PACK": pack})
    B, H, T = 2, 2, 5
    V = 4 * block + 3  # a partial last block
    n = -(-V // block)
    q, k, v = _qkv(B, V + T, H, D, torch.float16)  # text after the video
    levels = _random_levels(B, H, n, torch.Generator().manual_seed(block + pack))
    args = dict(video_keys=(0, V), text_keys=(V, T), text_lengths=torch.tensor([5, 2], dtype=torch.int32))
    got, lse = pyramid_attention(q[:, :V], k, v, levels, block, return_lse=True, **args)
    expect, expect_lse = reference_pyramid_attention(q[:, :V], k, v, levels, block, return_lse=True, **args)
    torch.testing.assert_close(got, expect, rtol=3e-3, atol=3e-3)
    torch.testing.assert_close(lse, expect_lse, rtol=1e-3, atol=1e-3)


def test_level_one_everywhere_is_dense_attention() -> None:
    B, H, D, T, V = 2, 2, 16, 5, 37
    q, k, v = _qkv(B, V + T, H, D)  # text after the video
    levels = torch.ones(B, H, 3, 3, dtype=torch.int32)
    got = pyramid_attention(q[:, :V], k, v, levels, 16, video_keys=(0, V), text_keys=(V, T))
    torch.testing.assert_close(got, sdpa_bshd(q, k, v)[:, :V], rtol=2e-5, atol=2e-5)


def test_gradients_match_the_reference() -> None:
    B, H, D, T, V, block = 1, 2, 8, 4, 35, 16
    q, k, v = (t.requires_grad_(True) for t in _qkv(B, T + V, H, D, torch.float64))
    levels = _random_levels(B, H, 3)
    args = dict(video_keys=(T, V), text_keys=(0, T), text_lengths=torch.tensor([3], dtype=torch.int32))
    dout = torch.randn(B, V, H, D, dtype=torch.float64)
    ref = torch.autograd.grad(reference_pyramid_attention(q[:, T:], k, v, levels, block, **args), (q, k, v), dout)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    got = torch.autograd.grad(pyramid_attention(qf[:, T:], kf, vf, levels, block, **args), (qf, kf, vf),
                              dout.float())
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
    assert got[1][:, T:].abs().sum() > 0 and got[1][0, 3].abs().sum() == 0  # hidden text key: no gradient


def test_level_lists_sort_blocks_by_level() -> None:
    levels = torch.tensor([[[[0, 8, 1, 2, 1, 4]]]], dtype=torch.int32)
    idx, ends = level_lists(levels)
    assert idx[0, 0, 0].tolist() == [2, 4, 3, 5, 1, 0] and ends[0, 0, 0].tolist() == [2, 3, 4, 5]


# ---------------------------------------------------------------------------------------- importance and levels
def test_importance_is_reproducible_for_a_seed() -> None:
    q, k, _ = _qkv(2, 70, 2, 8)
    a = estimate_block_importance(q, k, 16, seed=3)
    assert a.shape == (2, 2, 5, 5) and torch.allclose(a.sum(-1), torch.ones(2, 2, 5))
    assert torch.equal(a, estimate_block_importance(q, k, 16, seed=3))
    assert not torch.equal(a, estimate_block_importance(q, k, 16, seed=4))


def test_importance_follows_the_reference_formula() -> None:
    # sample every token: S_ij = max_q exp(max_{k in j} s - max_k s), rows normalised
    q, k, _ = _qkv(1, 32, 1, 4)
    e = estimate_block_importance(q, k, 16, sample_q=16, sample_k=16, scale=1.0)
    s = q[0, :, 0] @ k[0, :, 0].T
    blockmax = s.view(32, 2, 16).amax(-1)
    sij = torch.exp(blockmax - blockmax.amax(-1, keepdim=True)).view(2, 16, 2).amax(1)
    torch.testing.assert_close(e[0, 0], sij / sij.sum(-1, keepdim=True))


def test_threshold_rule_on_hand_made_rows() -> None:
    # cumulative shares .5 .7 .8 .9 .95 1 (rows given out of order: levels follow importance, not position)
    row = torch.tensor([0.05, 0.1, 0.5, 0.05, 0.2, 0.1])
    got = threshold_levels(row[None], (0.5, 0.6, 0.7, 0.8), 0.0)[0].tolist()
    # level 1: shares <= .5 -> 1 block, + the crossing one = ranks 0, 1; level 2: still 2 -> none;
    # level 4: rank 2; level 8: rank 3 (the first of the two .1: stable order); ranks 4, 5 skipped
    assert got == [0, 4, 1, 0, 1, 8]
    got = threshold_levels(row[None], (0.4, 0.6, 0.75, 0.9), 0.0)[0].tolist()
    assert got == [8, 4, 1, 0, 2, 8]
    # no share under t1: the crossing block alone; min_full_ratio 0.5 forces 3 + 1 = 4 full blocks of 6
    assert threshold_levels(row[None], (0.1, 0.1, 0.1, 0.1), 0.0)[0].tolist() == [0, 0, 1, 0, 0, 0]
    assert threshold_levels(row[None], (0.1, 0.1, 0.1, 0.1), 0.5)[0].tolist() == [0, 1, 1, 0, 1, 1]
    # thresholds at 1 keep everything
    assert threshold_levels(row[None], (1.0, 1.0, 1.0, 1.0), 0.0)[0].tolist() == [1] * 6


def test_topk_quotas() -> None:
    row = torch.arange(10, 0, -1).float()  # rank = position
    got = topk_levels(row[None], (0.2, 0.3, 0.5, 0.8))[0].tolist()
    assert got == [1, 1, 2, 4, 4, 8, 8, 8, 0, 0]
    assert level_density(torch.tensor(got)).item() == pytest.approx((2 + 1 / 2 + 2 / 4 + 3 / 8) / 10)


def test_method_forces_the_diagonal_at_full_resolution() -> None:
    layout = TokenLayout(1, 2, 4, 8)  # 64 tokens, 4 blocks of 16
    q = torch.randn(1, 64, 2, 8)
    k = torch.randn(1, 64, 2, 8) * 0.01
    k[:, :16] = q.mean(1, keepdim=True) * 20  # block 0 dominates every row
    method = Pyramid(block_size=16, t1=0.0, t2=0.0, t3=0.0, t4=0.0, min_full_ratio=0.0)
    levels = method.plan_call(q, k, layout, AttentionCall(seed=0))
    n = torch.arange(4)
    assert (levels[..., n, n] == 1).all() and (levels[..., 0] == 1).all()
    assert ((levels == 1).sum(-1)[..., 1:] == 2).all() and ((levels == 0).sum(-1)[..., 1:] == 2).all()


def test_method_run_reports_density_and_matches_reference() -> None:
    layout = TokenLayout(2, 3, 4, 6, text_tokens=5, text_position="after")  # 72 video tokens
    q, k, v = _qkv(2, layout.total_tokens, 2, 16)
    method = Pyramid(block_size=16)
    plan = method.build_plan(layout, 2, torch.device("cpu"))
    mask = torch.ones(2, layout.total_tokens, dtype=torch.bool)
    mask[1, 74:] = False  # batch 1 sees 2 of its 5 text tokens
    call = dataclasses.replace(call_from_padding_mask(mask, layout), seed=7)
    assert call.text_lengths.tolist() == [5, 2]
    res = method.run(q, k, v, layout, plan, call)
    levels = method.plan_call(q, k, layout, call)
    assert torch.is_tensor(res.density) and res.density.dim() == 0
    assert res.density.item() == pytest.approx(level_density(levels).item()) and 0 < res.density.item() < 1
    video = reference_pyramid_attention(q[:, :72], k, v, levels, 16, video_keys=(0, 72), text_keys=(72, 5),
                                        text_lengths=call.text_lengths)
    torch.testing.assert_close(res.out[:, :72], video, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(res.out[:, 72:], sdpa_bshd(q[:, 72:], k, v, key_padding_mask=mask), rtol=2e-5,
                               atol=2e-5)


def test_token_order_makes_compact_blocks() -> None:
    layout = TokenLayout(1, 4, 8, 8)
    tile = block_tile(layout.grid, 64)
    assert tile == (2, 4, 8) and block_tile((1, 8, 8), 16) == (1, 4, 4) and block_tile((1, 2, 4), 64) == (1, 2, 4)
    perm = Pyramid(block_size=64).token_order(layout, torch.device("cpu"))
    assert torch.equal(perm.sort().values, torch.arange(256))
    t, h, w = perm // 64, (perm // 8) % 8, perm % 8
    for b in range(4):  # every block of 64 tokens is one 2x4x8 box of the grid
        sl = slice(64 * b, 64 * (b + 1))
        assert [int(x[sl].max() - x[sl].min()) + 1 for x in (t, h, w)] == list(tile)
    assert Pyramid(reorder=False).token_order(layout, torch.device("cpu")) is None


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        Pyramid(t1=0.6, t2=0.5)
    with pytest.raises(ValueError, match="block_size"):
        Pyramid(block_size=24)
    with pytest.raises(ValueError, match="mode"):
        Pyramid(mode="energy")


def test_cpu_path_without_the_interpreter_matches_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = TokenLayout(1, 2, 4, 5, text_tokens=3, text_position="before")  # 40 video tokens
    q, k, v = _qkv(1, layout.total_tokens, 2, 16)
    method = Pyramid(block_size=16, t1=0.4)
    plan = method.build_plan(layout, 2, torch.device("cpu"))
    kernel = method.run(q, k, v, layout, plan, AttentionCall(seed=1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # run() now takes the chunked PyTorch path
    torch_path = method.run(q, k, v, layout, plan, AttentionCall(seed=1))
    torch.testing.assert_close(torch_path.out, kernel.out, rtol=2e-5, atol=2e-5)
    assert torch.equal(torch_path.density, kernel.density)



def test_similarity_cap_on_hand_made_keys() -> None:
    # block 0 (16 tokens): all keys equal -> every level allowed; block 1: pairs alike, groups of 4 are not
    # (first and last of each 4-group orthogonal); block 2 partial (5 tokens): random-ish
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    k = torch.zeros(1, 37, 1, 4)
    k[0, :16, 0] = e0
    k[0, 16:32, 0] = torch.stack([e0, e0, e1, e1] * 4)
    k[0, 32:, 0] = torch.stack([e0, e1, e0, e1, e0])
    cap = similarity_cap(k, 16, (0.7, 0.65, 0.6))
    # block 2: pairs (e0,e1),(e0,e1) and the one-token group (e0) -> mean 1/3 < .7; its 4-groups: (e0..e1) and
    # (e0 alone) -> 1/2; 8-group (e0..e0) -> 1: so 8x is allowed (the rule takes the largest p over its threshold)
    assert cap[0, 0].tolist() == [8, 2, 8]
    levels = torch.tensor([[[[8, 8, 4], [0, 4, 2], [1, 8, 0]]]], dtype=torch.int32)
    assert cap_levels(levels, cap)[0, 0].tolist() == [[8, 2, 4], [0, 2, 2], [1, 2, 0]]
    # through the method: with the cap on, no pair of block 1's column is pooled beyond 2x
    layout = TokenLayout(1, 1, 1, 37)
    q = torch.randn(1, 37, 1, 4)
    method = Pyramid(block_size=16, sim_cap=True, t1=0.0, t2=0.0, t3=0.0, t4=1.0, min_full_ratio=0.0)
    got = method.plan_call(q, k, layout, AttentionCall())
    assert (got[..., 1] <= 2).all()


def test_custom_op_passes_opcheck() -> None:
    q, k, v = (torch.randn(1, 20, 1, 16, requires_grad=True) for _ in range(3))
    levels = torch.tensor([[[[1, 2], [8, 1]]]], dtype=torch.int32)
    vis = torch.tensor([[1, 1, 0]], dtype=torch.int8)
    kt, vt = (torch.cat([x.detach(), torch.randn(1, 3, 1, 16)], 1).requires_grad_(True) for x in (k, v))
    torch.library.opcheck(torch.ops.accel.pyramid_fwd, (q, kt, vt, levels, vis, [0, 20, 20, 3], 16, 0.25))


# ---------------------------------------------------------------------------------------- the level-map picture
def _count_colour(img, hex_colour: str) -> int:
    rgb = torch.tensor([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.uint8)
    return int((torch.from_numpy(img) == rgb).all(-1).sum())


def test_visualize_writes_the_representative_level_map(tmp_path) -> None:
    method = Pyramid(block_size=16)
    plan = method.build_plan(TokenLayout(1, 4, 8, 16), 1, torch.device("cpu"))  # 32 blocks
    rep = method.representative_levels(plan)
    assert rep.shape == (32, 32) and torch.equal(rep, method.representative_levels(plan))  # seeded
    assert len(rep.unique()) >= 4 and (rep.diagonal() == 1).all()
    out = method.visualize(plan, tmp_path / "levels" / "psa.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_visualize_draws_a_given_call_one_colour_per_level() -> None:
    from accel.methods.pyramid import LEVEL_COLOURS

    method = Pyramid(block_size=16)
    layout = TokenLayout(1, 2, 4, 8)  # 4 blocks
    plan = method.build_plan(layout, 2, torch.device("cpu"))
    full = method.visualize(plan, levels=torch.ones(1, 2, 4, 4, dtype=torch.int32))  # batch 0, head 0 drawn
    coarse = method.visualize(plan, levels=torch.full((4, 4), 8, dtype=torch.int32))
    assert full.dtype.name == "uint8" and full.ndim == 3 and full.shape[2] == 3
    # the map's area in the level's colour (the legend's swatches hold a few hundred pixels of each colour)
    assert _count_colour(full, LEVEL_COLOURS[1]) > 20 * _count_colour(coarse, LEVEL_COLOURS[1])
    assert _count_colour(coarse, LEVEL_COLOURS[8]) > 20 * _count_colour(full, LEVEL_COLOURS[8])
    levels = method.plan_call(*_qkv(1, 64, 2, 8)[:2], layout, AttentionCall(seed=2))
    assert method.visualize(plan, levels=levels).shape == full.shape
    with pytest.raises(ValueError, match=r"n = 4 blocks"):
        method.visualize(plan, levels=torch.ones(3, 3))
    with pytest.raises(TypeError, match="PyramidPlan"):
        method.visualize(object())


def test_mask_command_draws_pyramid_levels(tmp_path, capsys) -> None:
    from accel.cli import main

    out = tmp_path / "pyramid.png"
    argv = ["mask", "--model", "wan", "--frames", "9", "--height", "64", "--width", "64", "--attention", "pyramid",
            "--block-size", "16"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "pyramid" in capsys.readouterr().out


def test_ui_mask_picture_uses_visualize(tmp_path) -> None:
    from accel.ui.engine import render_mask

    path = render_mask(Pyramid(block_size=16), (3, 4, 8), "cpu", tmp_path / "ui.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
