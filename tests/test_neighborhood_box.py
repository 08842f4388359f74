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


# ------------------------------------------------------------------------------- the box mask's two forms
def _box_forward(plan, q, k, v, form, **kw):
    from accel.kernels.neighborhood import neighborhood_attention

    return neighborhood_attention(q, k, v, plan, box=True, box_mask_form=form, return_lse=True, **kw)


@pytest.mark.parametrize("seed", range(6))
def test_box_mma_form_equals_swar_and_the_reference(seed: int) -> None:
    """Random windows, strides and causality, plain and partial tiles, batch 2, text with padding; fp32."""
    rng = random.Random(100 + seed)
    grid, tile, kernel, stride, causal = _random_case(rng, ragged=seed % 2 == 1)
    plan = build_tile_plan(grid, tile, kernel, stride, (1, 1, 1), causal)
    v_len, d, heads, text = grid[0] * grid[1] * grid[2], 16, rng.choice([1, 2]), rng.choice([0, 4])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, v_len, heads, d, generator=gen)
    k = torch.randn(2, v_len + text, heads, d, generator=gen)
    v = torch.randn(2, v_len + text, heads, d, generator=gen)
    lengths = torch.tensor([text, text - 3], dtype=torch.int32) if text else None
    kw = dict(video_keys=(0, v_len), text_keys=(v_len, text) if text else None, text_lengths=lengths)
    ref = reference_neighborhood_attention(q, k, v, grid, kernel, stride, (1, 1, 1), causal, **kw)
    perm = tile_major_order(grid, tile)
    qo, ko, vo = q[:, perm], _tile_major(k, perm, slice(0, v_len)), _tile_major(v, perm, slice(0, v_len))
    swar, swar_lse = _box_forward(plan, qo, ko, vo, "swar", **kw)
    mma, mma_lse = _box_forward(plan, qo, ko, vo, "mma", **kw)
    assert (mma - swar).abs().max().item() < 1e-6, (grid, tile, kernel, stride, causal)
    assert (mma_lse - swar_lse).abs().max().item() < 1e-6
    assert (mma[:, torch.argsort(perm)] - ref).abs().max().item() < 1e-5


def test_box_mma_form_fp16_text_mask_and_64_slots() -> None:
    """fp16 with a scattered text mask; and a tile whose extents need 64 slots (1 + 2 + 40 + the hidden one)."""
    grid, tile, kernel, stride, causal = (2, 5, 8), (1, 4, 4), (2, 3, 5), (1, 2, 1), (True, False, False)
    plan = build_tile_plan(grid, tile, kernel, stride, (1, 1, 1), causal)
    v_len, text = 80, 6
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 2, 32, generator=gen).half() for n in (v_len, text + v_len, text + v_len))
    text_mask = torch.tensor([[True, False, True, True, False, True], [False] * 5 + [True]])
    kw = dict(video_keys=(text, v_len), text_keys=(0, text), text_mask=text_mask, scale=0.3)
    ref = reference_neighborhood_attention(q.float(), k.float(), v.float(), grid, kernel, stride, (1, 1, 1), causal,
                                           **kw)
    perm = tile_major_order(grid, tile)
    vs = slice(text, text + v_len)
    args = (q[:, perm], _tile_major(k, perm, vs), _tile_major(v, perm, vs))
    swar, _ = _box_forward(plan, *args, "swar", **kw)
    mma, _ = _box_forward(plan, *args, "mma", **kw)
    assert mma.dtype == torch.float16
    assert (mma.float() - swar.float()).abs().max().item() < 1e-3
    assert (mma[:, torch.argsort(perm)].float() - ref).abs().max().item() < 3e-3

    grid, tile, kernel = (1, 2, 70), (1, 2, 40), (1, 2, 9)  # partial tiles along W
    plan = build_tile_plan(grid, tile, kernel, (1, 1, 1), (1, 1, 1), (False,) * 3)
    assert plan.ragged and plan.block == 128
    q, k, v = (torch.randn(1, 140, 1, 16, generator=gen) for _ in range(3))
    ref = reference_neighborhood_attention(q, k, v, grid, kernel, (1, 1, 1), (1, 1, 1), (False,) * 3)
    perm = tile_major_order(grid, tile)
    mma, _ = _box_forward(plan, q[:, perm], k[:, perm], v[:, perm], "mma")
    assert (mma[:, torch.argsort(perm)] - ref).abs().max().item() < 1e-5


def test_box_mma_form_with_compute_tiles_smaller_than_the_plan_tiles() -> None:
    """Key sub-tiles of a plan tile (BLOCK_N < block) take the plan tile's corner as their origin."""
    from accel.kernels import fwd_pipelined
    from accel.kernels.configs import KernelConfig

    grid, tile, kernel, stride = (4, 4, 8), (2, 4, 4), (3, 3, 5), (1, 1, 2)
    plan = build_tile_plan(grid, tile, kernel, stride, (1, 1, 1), (False, False, True))
    assert not plan.ragged and plan.block == 32
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 128, 2, 16, generator=gen) for _ in range(3))
    outs = {}
    for form in ("swar", "mma"):
        out = torch.empty_like(q)
        lse = torch.empty(2, 2, 128)
        fwd_pipelined.launch(q, k, v, None, None, None, plan.all_blocks, 0.25, out, lse, KernelConfig(16, 16, 1, 1),
                             box=plan.box, box_mask_form=form, box_tile=plan.tile)
        outs[form] = out
    assert (outs["mma"] - outs["swar"]).abs().max().item() < 1e-6
    perm = tile_major_order(grid, tile)
    ref = reference_neighborhood_attention(q[:, torch.argsort(perm)], k[:, torch.argsort(perm)],
                                           v[:, torch.argsort(perm)], grid, kernel, stride, (1, 1, 1),
                                           (False, False, True), scale=0.25)
    assert (outs["mma"] - ref[:, perm]).abs().max().item() < 1e-5


def test_box_mask_form_selection_and_errors(monkeypatch) -> None:
    from accel.kernels import fwd_pipelined
    from accel.kernels.configs import KernelConfig

    grid, tile = (2, 4, 8), (1, 4, 4)
    plan = build_tile_plan(grid, tile, (2, 3, 5), (1, 1, 1), (1, 1, 1), (False,) * 3)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 64, 1, 16, generator=gen) for _ in range(3))

    def run(form, box_tile=plan.tile, scale=0.25):
        out = torch.empty_like(q)
        fwd_pipelined.launch(q, k, v, None, None, None, plan.all_blocks, scale, out, None, KernelConfig(16, 16, 1, 1),
                             box=plan.box, box_mask_form=form, box_tile=box_tile)
        return out

    swar = run("swar")
    assert (run("mma") - swar).abs().max().item() < 1e-6
    # the mma form really runs: a box smaller than the tiles hides the keys outside it
    assert (run("mma", box_tile=(1, 1, 1)) - swar).abs().max().item() > 1e-2
    monkeypatch.setattr(fwd_pipelined, "BOX_MASK_FORM", "mma")
    assert (run(None, box_tile=(1, 1, 1)) - swar).abs().max().item() > 1e-2  # the default form
    assert torch.equal(run(None, box_tile=None), swar)  # no box tile: the default falls back to SWAR
    assert torch.equal(run(None, scale=1e-4), run("swar", scale=1e-4))  # too small a scale for BIG: SWAR
    with pytest.raises(ValueError, match="cannot run"):
        run("mma", box_tile=(1, 1, 64))
    with pytest.raises(ValueError, match="cannot run"):
        run("mma", scale=1e-4)
    with pytest.raises(ValueError, match="box_mask_form"):
        run("dense")
    from accel.kernels.neighborhood import neighborhood_attention

    with pytest.raises(ValueError, match="box_mask_form"):
        neighborhood_attention(q, k, v, plan, box=True, box_mask_form="fast")
    monkeypatch.setenv("ACCEL_BOX_MASK", "fast")
    with pytest.raises(ValueError, match="ACCEL_BOX_MASK"):
        fwd_pipelined._box_mask_form_from_env()
    monkeypatch.setenv("ACCEL_BOX_MASK", "MMA")
    assert fwd_pipelined._box_mask_form_from_env() == "mma"
