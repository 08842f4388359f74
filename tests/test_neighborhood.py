"""Neighborhood attention (NATTEN semantics): the 1-D window rule, tile lists, Triton kernel vs reference."""

from __future__ import annotations

import random

import pytest
import torch

from accel.kernels.neighborhood_reference import (
    INDEX_BITS,
    NEED_H,
    NEED_T,
    NEED_TAIL,
    NEED_W,
    axis_mask,
    axis_window,
    build_tile_plan,
    natten_token_mask,
    reference_neighborhood_attention,
    tile_major_order,
    unpack_index,
)


def _ranges(windows):
    return [(w[0], w[-1]) for w in windows]


# ---------------------------------------------------------------------------------------- the 1-D rule
def test_worked_examples_of_the_reference_notes() -> None:
    assert _ranges(axis_window(10, 4)) == [(0, 3)] * 3 + [(1, 4), (2, 5), (3, 6), (4, 7), (5, 8)] + [(6, 9)] * 2
    assert _ranges(axis_window(10, 5)) == [(0, 4)] * 3 + [(1, 5), (2, 6), (3, 7), (4, 8)] + [(5, 9)] * 3
    assert _ranges(axis_window(10, 6, 3)) == [(0, 5)] * 3 + [(1, 6)] * 3 + [(4, 9)] * 4
    # blocked (s == K): the partial last block shifts inward and overlaps the previous one (unlike Swin)
    assert _ranges(axis_window(10, 6, 6)) == [(0, 5)] * 6 + [(4, 9)] * 4
    causal = _ranges(axis_window(10, 4, 2, causal=True))
    assert causal[:7] == [(0, 0), (0, 1), (0, 2), (0, 3), (2, 4), (2, 5), (4, 6)]
    # windows are contiguous without dilation
    assert all(w == list(range(w[0], w[-1] + 1)) for w in axis_window(10, 6, 3))


def test_dilation_splits_the_axis_into_interleaved_groups() -> None:
    w = axis_window(10, 3, 1, 2)
    assert w == [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [3, 5, 7], [4, 6, 8], [5, 7, 9],
                 [4, 6, 8], [5, 7, 9]]
    # odd length: group 0 has 4 members (0, 3, 6, 9) at d=3, groups 1 and 2 have 3
    assert axis_window(10, 3, 1, 3)[9] == [3, 6, 9] and axis_window(10, 3, 1, 3)[8] == [2, 5, 8]


@pytest.mark.parametrize("seed", range(4))
def test_non_causal_windows_never_shrink(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        d = rng.randint(1, 3)
        length = rng.randint(2 * d, 20)
        k = rng.randint(2, length // d)
        s = rng.randint(1, k)
        m = axis_mask(length, k, s, d)
        assert bool((m.sum(1) == k).all()), (length, k, s, d)
        # a stride group shares one window
        for i in range(length):
            j = (i // d // s) * s * d + i % d
            assert torch.equal(m[i], m[j])


# ---------------------------------------------------------------------------------------- tile plan
def _random_config(rng: random.Random, grid):
    kernel, stride, dilation, causal = [], [], [], []
    for length in grid:
        d = rng.choice([1, 1, 2]) if length >= 4 else 1
        k = rng.randint(2, length // d)
        kernel.append(k)
        stride.append(rng.randint(1, k))
        dilation.append(d)
        causal.append(rng.random() < 0.3)
    return tuple(kernel), tuple(stride), tuple(dilation), tuple(causal)


@pytest.mark.parametrize("seed", range(6))
def test_tile_lists_cover_the_mask_and_full_tiles_need_no_mask(seed: int) -> None:
    rng = random.Random(seed)
    grid = (rng.randint(2, 5), rng.randint(2, 7), rng.randint(2, 9))
    tile = rng.choice([(1, 2, 8), (2, 2, 4), (1, 4, 4), (2, 4, 8)])
    kernel, stride, dilation, causal = _random_config(rng, grid)
    plan = build_tile_plan(grid, tile, kernel, stride, dilation, causal)
    perm = tile_major_order(grid, tile)
    assert torch.equal(perm.sort().values, torch.arange(perm.numel()))
    mask = natten_token_mask(grid, kernel, stride, dilation, causal)[perm][:, perm]  # tile-major
    start, count = plan.tiles[:, 0].long(), plan.tiles[:, 1].long()
    # per-axis token masks in tile-major order: what each NEED_* flag stands for
    T, H, W = grid
    coords = (perm // (H * W), (perm // W) % H, perm % W)
    axis_masks = [axis_mask(grid[a], kernel[a], stride[a], dilation[a], causal[a])[coords[a]][:, coords[a]]
                  for a in range(3)]
    covered = torch.zeros_like(mask)
    indices = unpack_index(plan.indices)
    flags = plan.indices >> INDEX_BITS
    for qt in range(plan.num_tiles):
        lo, hi, nf = int(plan.offsets[qt]), int(plan.offsets[qt + 1]), int(plan.nfull[qt])
        qs = slice(int(start[qt]), int(start[qt] + count[qt]))
        for pos, kt in enumerate(indices[lo:hi].tolist()):
            ks = slice(int(start[kt]), int(start[kt] + count[kt]))
            assert bool(mask[qs, ks].any())  # no useless tile
            need = int(flags[lo + pos])
            if pos < nf:
                assert bool(mask[qs, ks].all()) and count[qt] == count[kt] == plan.block and need == 0
            for a, bit in enumerate((NEED_T, NEED_H, NEED_W)):
                if not need & bit:  # an axis without its flag is inside every query's window on that axis
                    assert bool(axis_masks[a][qs, ks].all())
            assert bool(need & NEED_TAIL) == bool(count[kt] < plan.block)
            covered[qs, ks] = True
    assert not bool((mask & ~covered).any())
    # the transposed lists hold the same pairs
    pairs = {(q, k) for q in range(plan.num_tiles) for k in indices[plan.offsets[q]:plan.offsets[q + 1]].tolist()}
    t_pairs = {(q, k) for k in range(plan.num_tiles)
               for q in plan.t_indices[plan.t_offsets[k]:plan.t_offsets[k + 1]].tolist()}
    assert pairs == t_pairs
    assert 0 < plan.density <= 1


def test_fully_block_sparse_when_stride_and_window_align_with_tiles() -> None:
    # per axis: L, K and floor(s/2) - floor(K/2) multiples of the tile, stride a multiple of the tile
    plan = build_tile_plan((4, 8, 16), (2, 2, 4), (2, 6, 12), (2, 2, 4), (1, 1, 1), (False,) * 3)
    assert torch.equal(plan.nfull, plan.offsets[1:] - plan.offsets[:-1])
    assert plan.density == pytest.approx((2 / 4) * (6 / 8) * (12 / 16))
    # one token off the alignment: some tiles need the mask
    plan = build_tile_plan((4, 8, 16), (2, 2, 4), (2, 4, 12), (2, 2, 4), (1, 1, 1), (False,) * 3)
    assert int(plan.nfull.sum()) < int(plan.offsets[-1])


# ---------------------------------------------------------------------------------------- kernel vs reference
def _tile_major(t: torch.Tensor, perm: torch.Tensor, video: slice) -> torch.Tensor:
    out = t.clone()
    out[:, video] = t[:, video][:, perm]
    return out


KERNEL_CASES = [
    # grid, tile, kernel, stride, dilation, causal, text tokens, batch, heads
    ((3, 4, 5), (2, 2, 4), (2, 3, 4), (1, 2, 1), (1, 1, 1), (True, False, False), 5, 2, 1),
    ((2, 5, 7), (1, 4, 4), (2, 2, 3), (2, 2, 3), (1, 2, 2), (False, False, False), 0, 1, 2),
    ((3, 3, 6), (2, 2, 4), (3, 2, 5), (2, 1, 2), (1, 1, 1), (False, True, False), 3, 2, 1),
    ((1, 7, 6), (1, 4, 4), (1, 4, 3), (1, 3, 1), (1, 1, 2), (False, False, True), 4, 1, 1),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[f"case{i}" for i in range(len(KERNEL_CASES))])
def test_kernel_matches_reference_forward_and_backward(case) -> None:
    from accel.kernels.neighborhood import neighborhood_attention

    grid, tile, kernel, stride, dilation, causal, text, batch, heads = case
    v_len = grid[0] * grid[1] * grid[2]
    d = 16
    q = torch.randn(batch, v_len, heads, d, requires_grad=True)
    k = torch.randn(batch, text + v_len, heads, d, requires_grad=True)  # text before the video
    v = torch.randn(batch, text + v_len, heads, d, requires_grad=True)
    vs = slice(text, text + v_len)
    lengths = torch.tensor([text, max(0, text - 3)][:batch], dtype=torch.int32) if text else None
    kw = dict(video_keys=(text, v_len), text_keys=(0, text) if text else None, text_lengths=lengths)
    ref = reference_neighborhood_attention(q, k, v, grid, kernel, stride, dilation, causal, **kw)
    plan = build_tile_plan(grid, tile, kernel, stride, dilation, causal)
    perm = tile_major_order(grid, tile)
    inverse = torch.argsort(perm)
    out = neighborhood_attention(q[:, perm], _tile_major(k, perm, vs), _tile_major(v, perm, vs), plan, **kw)
    out = out[:, inverse]
    assert (out - ref).abs().max().item() < 1e-5
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    got = torch.autograd.grad(out, (q, k, v), grad)
    for name, e, g in zip("qkv", expected, got, strict=True):
        assert (e - g).abs().max().item() < 1e-4, name


def test_kernel_fp16_scattered_text_mask_and_scale() -> None:
    from accel.kernels.neighborhood import neighborhood_attention

    grid, tile = (2, 4, 6), (1, 4, 4)
    kernel, stride, dilation, causal = (2, 3, 3), (1, 1, 2), (1, 1, 2), (False, False, False)
    v_len, text = 48, 6
    q = torch.randn(2, v_len, 1, 32).half()
    k = torch.randn(2, v_len + text, 1, 32).half()  # text after the video
    v = torch.randn(2, v_len + text, 1, 32).half()
    text_mask = torch.tensor([[True, False, True, True, False, True], [False] * 5 + [True]])
    kw = dict(video_keys=(0, v_len), text_keys=(v_len, text), text_mask=text_mask, scale=0.3)
    ref = reference_neighborhood_attention(q.float(), k.float(), v.float(), grid, kernel, stride, dilation, causal,
                                           **kw)
    plan = build_tile_plan(grid, tile, kernel, stride, dilation, causal)
    perm = tile_major_order(grid, tile)
    out = neighborhood_attention(q[:, perm], _tile_major(k, perm, slice(0, v_len)),
                                 _tile_major(v, perm, slice(0, v_len)), plan, **kw)[:, torch.argsort(perm)]
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max().item() < 3e-3


SPLIT_CASES = [
    # grid, tile, kernel, stride, text tokens: every tile complete, so the unmasked pairs can go to the
    # block-sparse kernel; the last case has no masked pair at all (blocked attention aligned with the tiles)
    ((4, 4, 8), (2, 2, 4), (4, 2, 8), (1, 1, 1), 5),
    ((4, 8, 8), (2, 2, 4), (2, 6, 8), (2, 2, 4), 0),
    ((4, 4, 8), (2, 2, 4), (2, 2, 4), (2, 2, 4), 0),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"case{i}" for i in range(len(SPLIT_CASES))])
def test_split_path_merges_the_block_sparse_kernel_exactly(case) -> None:
    from accel.kernels.neighborhood import neighborhood_attention

    grid, tile, kernel, stride, text = case
    v_len, d, batch, heads = grid[0] * grid[1] * grid[2], 16, 2, 2
    plan = build_tile_plan(grid, tile, kernel, stride, (1, 1, 1), (False,) * 3)
    assert plan.full_blocks is not None and plan.full_pairs > 0
    q = torch.randn(batch, v_len, heads, d, requires_grad=True)
    k = torch.randn(batch, v_len + text, heads, d, requires_grad=True)  # text after the video
    v = torch.randn(batch, v_len + text, heads, d, requires_grad=True)
    lengths = torch.tensor([text, max(0, text - 2)], dtype=torch.int32) if text else None
    kw = dict(video_keys=(0, v_len), text_keys=(v_len, text) if text else None, text_lengths=lengths)
    perm = tile_major_order(grid, tile)
    inverse = torch.argsort(perm)
    ref = reference_neighborhood_attention(q, k, v, grid, kernel, stride, **kw)
    qo, ko, vo = q[:, perm], _tile_major(k, perm, slice(0, v_len)), _tile_major(v, perm, slice(0, v_len))
    split, split_lse = neighborhood_attention(qo, ko, vo, plan, split=True, return_lse=True, **kw)
    whole, whole_lse = neighborhood_attention(qo, ko, vo, plan, split=False, return_lse=True, **kw)
    assert (split[:, inverse] - ref).abs().max().item() < 1e-5
    assert (split_lse - whole_lse).abs().max().item() < 1e-5
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    got = torch.autograd.grad(split[:, inverse], (q, k, v), grad)
    for name, e, g in zip("qkv", expected, got, strict=True):
        assert (e - g).abs().max().item() < 1e-4, name


def test_merge_of_partial_attention_is_one_softmax() -> None:
    from accel.kernels.neighborhood import merge_partial_attention

    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)

    def part(cols):
        lse = torch.logsumexp(s[..., cols], -1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s[..., cols], -1), v[:, cols])
        return out, lse

    a, b = part(slice(0, 4)), part(slice(4, 10))
    out, lse = merge_partial_attention(*a, *b)
    full = part(slice(0, 10))
    assert torch.allclose(out, full[0], atol=1e-6) and torch.allclose(lse, full[1], atol=1e-6)
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    out, lse = merge_partial_attention(*empty, *b)
    assert torch.allclose(out, b[0]) and torch.allclose(lse, b[1])
