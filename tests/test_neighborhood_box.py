"""The box-mask path: neighborhood windows as a per-token `BoxMask` inside the block-sparse forward kernels."""

from __future__ import annotations

import random

import pytest
import torch

from accel.kernels.layout import BOX_MAX_COORD, BoxMask
from accel.kernels.neighborhood_reference import (
    build_tile_plan,
    natten_token_mask,
    reference_neighborhood_attention,
    tile_major_order,
)


def _tile_major(t: torch.Tensor, perm: torch.Tensor, video: slice) -> torch.Tensor:
    out = t.clone()
    out[:, video] = t[:, video][:, perm]
    return out


def _random_case(rng: random.Random, ragged: bool = False):
    """A grid of 16-token tiles (``ragged``: some partial) and a random undilated window (stride, causal)."""
    tile = rng.choice([(1, 4, 4), (2, 2, 4), (1, 2, 8), (4, 2, 2)])
    grid = tuple(tile[a] * rng.randint(1, 3) for a in range(3))
    if ragged:
        a = rng.choice([a for a in range(3) if tile[a] > 1])
        grid = tuple(g + rng.randint(1, tile[a] - 1) if i == a else g for i, g in enumerate(grid))
    kernel = tuple(rng.randint(min(2, grid[a]), grid[a]) if grid[a] > 1 else 1 for a in range(3))
    kernel = tuple(max(k, 1) for k in kernel)
    stride = tuple(rng.randint(1, k) for k in kernel)
    causal = (rng.random() < 0.3, False, rng.random() < 0.2)
    return grid, tile, kernel, stride, causal


def test_box_mask_is_the_natten_window_in_tile_major_order() -> None:
    rng = random.Random(0)
    for i in range(16):
        grid, tile, kernel, stride, causal = _random_case(rng, ragged=i % 2 == 1)
        plan = build_tile_plan(grid, tile, kernel, stride, (1, 1, 1), causal)
        assert plan.box is not None and plan.all_blocks is not None
        assert plan.ragged == (i % 2 == 1)
        perm = tile_major_order(grid, tile)
        v_len = perm.numel()
        expected = natten_token_mask(grid, kernel, stride, (1, 1, 1), causal)[perm][:, perm]
        got = plan.box.token_mask(torch.arange(v_len), torch.arange(v_len))
        assert torch.equal(got, expected), (grid, tile, kernel, stride, causal)


def test_box_mask_is_absent_when_windows_are_not_boxes_or_coordinates_too_large() -> None:
    # dilation: windows are not boxes; partial tiles are fine (per-token key coordinates)
    assert build_tile_plan((2, 4, 8), (1, 4, 4), (2, 2, 3), (1, 1, 1), (1, 1, 2), (False,) * 3).box is None
    ragged = build_tile_plan((2, 5, 8), (1, 4, 4), (2, 2, 3), (1, 1, 1), (1, 1, 1), (False,) * 3)
    assert ragged.ragged and ragged.box is not None
    coords = torch.zeros(16, 3, dtype=torch.long)
    coords[:, 2] = torch.arange(16)
    assert BoxMask.from_boxes(coords, coords, coords) is not None
    big = coords.clone()
    big[:, 1] = BOX_MAX_COORD + 1
    assert BoxMask.from_boxes(coords, coords, big) is None
    with pytest.raises(ValueError, match="lo must be"):
        BoxMask.from_boxes(coords[:, :2], coords, coords)


@pytest.mark.parametrize("seed", range(6))
def test_box_path_matches_reference_forward_and_backward(seed: int) -> None:
    from accel.kernels.neighborhood import neighborhood_attention

    rng = random.Random(seed)
    grid, tile, kernel, stride, causal = _random_case(rng, ragged=seed % 2 == 1)
    plan = build_tile_plan(grid, tile, kernel, stride, (1, 1, 1), causal)
    assert plan.ragged == (seed % 2 == 1)
    v_len, d, batch, heads = grid[0] * grid[1] * grid[2], 16, 2, rng.choice([1, 2])
    text = rng.choice([0, 5])
    q = torch.randn(batch, v_len, heads, d, requires_grad=True)
    k = torch.randn(batch, v_len + text, heads, d, requires_grad=True)  # text after the video
    v = torch.randn(batch, v_len + text, heads, d, requires_grad=True)
    lengths = torch.tensor([text, max(0, text - 3)], dtype=torch.int32) if text else None
    kw = dict(video_keys=(0, v_len), text_keys=(v_len, text) if text else None, text_lengths=lengths)
    ref = reference_neighborhood_attention(q, k, v, grid, kernel, stride, (1, 1, 1), causal, **kw)
    perm = tile_major_order(grid, tile)
    inverse = torch.argsort(perm)
    qo, ko, vo = q[:, perm], _tile_major(k, perm, slice(0, v_len)), _tile_major(v, perm, slice(0, v_len))
    out, lse = neighborhood_attention(qo, ko, vo, plan, box=True, return_lse=True, **kw)
    _, old_lse = neighborhood_attention(qo, ko, vo, plan, box=False, split=False, return_lse=True, **kw)
    assert (out[:, inverse] - ref).abs().max().item() < 1e-5
    assert (lse - old_lse).abs().max().item() < 1e-5
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    got = torch.autograd.grad(out[:, inverse], (q, k, v), grad)
    for name, e, g in zip("qkv", expected, got, strict=True):
        assert (e - g).abs().max().item() < 1e-4, name


def test_box_path_fp16_scattered_text_mask() -> None:
    from accel.kernels.neighborhood import neighborhood_attention

    grid, tile, kernel, stride, causal = (2, 5, 8), (1, 4, 4), (2, 3, 5), (1, 2, 1), (False, False, False)
    plan = build_tile_plan(grid, tile, kernel, stride, (1, 1, 1), causal)
    assert plan.ragged
    v_len, text = 80, 6
    q = torch.randn(2, v_len, 2, 32).half()
    k = torch.randn(2, text + v_len, 2, 32).half()  # text before the video
    v = torch.randn(2, text + v_len, 2, 32).half()
    text_mask = torch.tensor([[True, False, True, True, False, True], [False] * 5 + [True]])
    kw = dict(video_keys=(text, v_len), text_keys=(0, text), text_mask=text_mask, scale=0.3)
    ref = reference_neighborhood_attention(q.float(), k.float(), v.float(), grid, kernel, stride, (1, 1, 1), causal,
                                           **kw)
    perm = tile_major_order(grid, tile)
    vs = slice(text, text + v_len)
    out = neighborhood_attention(q[:, perm], _tile_major(k, perm, vs), _tile_major(v, perm, vs), plan, box=True,
                                 **kw)[:, torch.argsort(perm)]
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max().item() < 3e-3


def test_box_is_the_default_and_all_unmasked_plans_run_block_sparse_with_text(monkeypatch) -> None:
    from accel.kernels import neighborhood as nbhd

    calls = []
    real = torch.ops.accel.neighborhood_fwd

    def spy(*args):
        calls.append(bool(args[-3]))  # the box tensors
        return real(*args)

    monkeypatch.setattr(torch.ops.accel, "neighborhood_fwd", spy)
    grid, tile = (2, 4, 8), (1, 4, 4)
    q = torch.randn(1, 64, 1, 16)
    k = torch.randn(1, 64 + 3, 1, 16)
    kw = dict(video_keys=(0, 64), text_keys=(64, 3))
    masked = build_tile_plan(grid, tile, (2, 3, 5), (1, 1, 1), (1, 1, 1), (False,) * 3)
    nbhd.neighborhood_attention(q, k, k, masked, **kw)
    assert calls == [True]  # the box path, no split
    blocked = build_tile_plan(grid, tile, (1, 4, 4), (1, 4, 4), (1, 1, 1), (False,) * 3)
    assert blocked.full_pairs == blocked.pairs
    perm = tile_major_order(grid, tile)
    out = nbhd.neighborhood_attention(q[:, perm], _tile_major(k, perm, slice(0, 64)),
                                      _tile_major(k, perm, slice(0, 64)), blocked, **kw)
    assert calls == [True]  # no neighborhood kernel at all
    ref = reference_neighborhood_attention(q, k, k, grid, (1, 4, 4), (1, 4, 4), **kw)
    assert (out[:, torch.argsort(perm)] - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="box=True needs"):
        nbhd.neighborhood_attention(q, k, k, build_tile_plan(grid, tile, (2, 3, 5), (1, 1, 1), (1, 1, 2),
                                                               (False,) * 3), box=True, **kw)
