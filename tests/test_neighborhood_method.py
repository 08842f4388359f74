"""The `neighborhood` method: options, plan-time checks, joint text, token order, dense fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel.geometry import TokenLayout
from accel.methods.base import call_from_padding_mask
from accel.methods.neighborhood import Neighborhood
from accel.methods.registry import method_info, parse_method_spec


def _masked_sdpa(q, k, v, mask):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _run_raster(method, q, k, v, layout, key_padding_mask=None):
    """The method as the patched pipeline runs it: token order applied to the video tokens, then undone."""
    perm = method.token_order(layout, q.device)
    vs = layout.video_slice

    def order(t, p):
        t = t.clone()
        t[:, vs] = t[:, vs][:, p]
        return t

    plan = method.build_plan(layout, q.shape[2], q.device)
    call = call_from_padding_mask(key_padding_mask, layout)
    attended = method.run(order(q, perm), order(k, perm), order(v, perm), layout, plan, call)
    return order(attended.out, torch.argsort(perm)), attended.density, plan


@pytest.mark.parametrize("position", ["before", "after"])
def test_method_matches_token_mask_with_padded_text(position: str) -> None:
    layout = TokenLayout(2, 3, 4, 5, text_tokens=4, text_position=position)
    method = Neighborhood(kernel_size="2x3x3", stride="1x2x1", is_causal=True, tile="2x2x4")
    s = layout.total_tokens
    q, k, v = (torch.randn(2, s, 2, 16) for _ in range(3))
    kpm = torch.ones(2, s, dtype=torch.bool)
    ts = layout.text_slice
    kpm[1, ts.start + 1:ts.stop] = False  # trailing padding in batch 1
    out, density, plan = _run_raster(method, q, k, v, layout, kpm)
    mask = method.token_mask(layout, plan)[None, None] & kpm[:, None, None, :]
    ref = _masked_sdpa(q, k, v, mask)
    assert (out - ref).abs().max().item() < 1e-5
    assert 0 < density < 1 and density == method.plan_density(plan)


def test_image_grid_with_two_values_and_full_window_is_dense() -> None:
    layout = TokenLayout(1, 1, 6, 7, text_tokens=3, text_position="before")  # Flux-like: text before
    method = Neighborhood(kernel_size="3x5", dilation="2x1")
    q, k, v = (torch.randn(1, layout.total_tokens, 1, 16) for _ in range(3))
    out, _, plan = _run_raster(method, q, k, v, layout)
    assert plan.kernel == (1, 3, 5) and plan.dilation == (1, 2, 1)
    ref = _masked_sdpa(q, k, v, method.token_mask(layout, plan))
    assert (out - ref).abs().max().item() < 1e-5

    full = Neighborhood(kernel_size="6x7")
    plan = full.build_plan(layout, 1, torch.device("cpu"))
    assert plan.dense and full.plan_density(plan) == 1.0
    out, density, _ = _run_raster(full, q, k, v, layout)
    assert density == 1.0 and (out - _masked_sdpa(q, k, v, None)).abs().max().item() < 1e-5
    # causal along time with the whole grid is not dense
    video = TokenLayout(1, 3, 4, 4)
    assert not Neighborhood(kernel_size="3x4x4", is_causal=True).build_plan(video, 1, torch.device("cpu")).dense


def test_gradients_through_the_method() -> None:
    layout = TokenLayout(1, 2, 4, 4, text_tokens=2, text_position="after")
    method = Neighborhood(kernel_size="2x3x2", stride="1x1x2", tile="1x4x4")
    base = [torch.randn(1, layout.total_tokens, 1, 16) for _ in range(3)]
    q, k, v = (t.clone().requires_grad_(True) for t in base)
    out, _, plan = _run_raster(method, q, k, v, layout)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in base)
    ref = _masked_sdpa(qr, kr, vr, method.token_mask(layout, plan))
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(ref, (qr, kr, vr), grad)
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max().item() < 1e-4


def test_options_parse_and_round_trip_through_specs() -> None:
    info = method_info("neighborhood")
    assert [o.name for o in info.options] == ["kernel_size", "stride", "dilation", "is_causal", "head_windows", "tile"]
    spec = parse_method_spec("neighborhood:kernel_size=3x5x5,stride=1x2x2,is_causal=true")
    assert spec.method == Neighborhood(kernel_size=(3, 5, 5), stride="1,2,2", is_causal=True)
    assert parse_method_spec(spec.label).method == spec.method
    assert Neighborhood(kernel_size=7).kernel_size == "7"
    sta = Neighborhood.sta(tile=(2, 4, 4), tiles=(1, 3, 3))
    assert (sta.kernel_size, sta.stride) == ("2x12x12", "2x4x4")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"kernel_size": 1}, "kernel_size"),
    ({"kernel_size": "3x1x3"}, "kernel_size"),
    ({"kernel_size": "three"}, "kernel_size"),
    ({"kernel_size": "3x3x3x3"}, "kernel_size"),
    ({"kernel_size": 3, "stride": 4}, "stride"),
    ({"kernel_size": 3, "stride": 0}, "stride"),
    ({"kernel_size": 3, "dilation": 0}, "dilation"),
    ({"kernel_size": 3.5}, "kernel_size"),
    ({"kernel_size": 3, "tile": "4"}, "tile"),
    ({"kernel_size": 3, "tile": "8x8x8"}, "tile"),
])
def test_invalid_arguments_name_the_field(kwargs, field) -> None:
    with pytest.raises((ValueError, TypeError), match=f"Neighborhood.{field}"):
        Neighborhood(**kwargs)


@pytest.mark.parametrize(("kwargs", "field", "layout"), [
    ({"kernel_size": 5}, "kernel_size", TokenLayout(1, 3, 8, 8)),  # 5 > 3 frames
    ({"kernel_size": 3, "dilation": "1x2x2"}, "kernel_size", TokenLayout(1, 3, 5, 8)),  # 3 x 2 > 5 rows
    ({"kernel_size": "3x3"}, "kernel_size", TokenLayout(1, 3, 8, 8)),  # video needs 3 values
    ({"kernel_size": "2x3x3"}, "kernel_size", TokenLayout(1, 1, 8, 8)),  # an image has one frame
])
def test_grid_dependent_checks_raise_at_plan_time(kwargs, field, layout) -> None:
    method = Neighborhood(**kwargs)
    assert not method.can_run(layout, 1, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=f"Neighborhood.{field}"):
        method.build_plan(layout, 1, torch.device("cpu"))


def test_token_order_is_a_tile_major_permutation_and_visualize_draws() -> None:
    layout = TokenLayout(1, 3, 5, 6)
    method = Neighborhood(kernel_size=3)
    perm = method.token_order(layout, torch.device("cpu"))
    assert torch.equal(perm.sort().values, torch.arange(90))
    plan = method.build_plan(layout, 1, torch.device("cpu"))
    assert plan.tiles.block == 16 and plan.tiles.tile[0] * plan.tiles.tile[1] * plan.tiles.tile[2] == 16
    img = method.visualize(plan, layout=layout, max_pixels=64)
    assert img.ndim == 3 and img.shape[2] == 3
    big = Neighborhood(kernel_size="3x7x7").build_plan(TokenLayout(1, 9, 32, 32), 1, torch.device("cpu"))
    assert method.visualize(big, max_pixels=64).ndim == 3


@pytest.mark.parametrize("spec", [dict(kernel_size="3x4x5", stride="1x2x2", dilation="1x1x2", is_causal=True),
                                  dict(kernel_size="2x3x3"), dict(kernel_size="4x6x6", stride="4x6x6")])
def test_flex_mask_mod_equals_the_token_mask_in_tile_major_order(spec) -> None:
    method = Neighborhood(**spec)
    layout = TokenLayout(1, 4, 7, 11)
    plan = method.build_plan(layout, 1, torch.device("cpu"))
    mask_mod = method.flex_mask_mod(layout, plan, torch.device("cpu"))
    n = layout.video_tokens
    got = mask_mod(0, 0, torch.arange(n)[:, None].expand(n, n), torch.arange(n)[None, :].expand(n, n))
    perm = method.token_order(layout, torch.device("cpu"))
    assert torch.equal(got, method.token_mask(layout, plan)[perm][:, perm])
    assert Neighborhood(kernel_size="4x7x11").flex_mask_mod(layout, Neighborhood(kernel_size="4x7x11").build_plan(
        layout, 1, torch.device("cpu")), torch.device("cpu")) is None  # a whole-grid window is dense


@pytest.mark.parametrize("windows", ["0-1:2x3x5;3:4x6x4", "0+2-3:2x2x2"])
def test_head_windows_give_each_head_its_window(windows: str) -> None:
    """Per-head windows equal, head by head, the method with that head's kernel_size (text padding, batch 2)."""
    layout = TokenLayout(2, 4, 6, 8, text_tokens=3, text_position="before")
    method = Neighborhood(kernel_size="3x3x3", stride="1x1x2", head_windows=windows, tile="2x2x4")
    heads = 4
    q, k, v = (torch.randn(2, layout.total_tokens, heads, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, layout.total_tokens, dtype=torch.bool)
    mask[1, 2] = False  # trailing text padding of batch 1
    out, density, plan = _run_raster(method, q, k, v, layout, key_padding_mask=mask)
    per_head = {h: "3x3x3" for h in range(heads)}
    for group, window in method.windows():
        per_head.update({h: window for h in group})
    expected = []
    for h in range(heads):
        single = Neighborhood(kernel_size=per_head[h], stride="1x1x2")
        head_mask = single.token_mask(layout) & mask[:, None, :]
        expected.append(_masked_sdpa(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], head_mask[:, None]))
    expected = torch.cat(expected, 2)
    assert (out - expected).abs().max().item() < 1e-5
    singles = [Neighborhood(kernel_size=per_head[h], stride="1x1x2", tile="2x2x4").build_plan(
        layout, 1, q.device).density for h in range(heads)]  # the same tile shape: the same visited tiles
    assert density == pytest.approx(sum(singles) / heads)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() < 1e-4
    assert parse_method_spec(f"neighborhood:kernel_size=3x3x3,head_windows={windows}").method.head_windows == windows


@pytest.mark.parametrize("windows, field", [
    ("0-3", "HEADS:KERNEL"), ("a:3x3x3", "ranges"), ("3-1:3x3x3", "bad head range"),
    ("0-2:3x3x3;2:2x2x2", "two windows"), ("0:1x3x3", ">= 2"), (";", "empty"),
])
def test_head_windows_errors_name_the_field(windows: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Neighborhood(kernel_size="3", head_windows=windows)


def test_head_windows_checked_against_the_model_and_grid() -> None:
    layout = TokenLayout(1, 4, 6, 8)
    with pytest.raises(ValueError, match="names head 5, but this model has 4 heads"):
        Neighborhood(kernel_size="3", head_windows="5:2x2x2").build_plan(layout, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="more than the 4 tokens"):
        Neighborhood(kernel_size="3", head_windows="0:5x3x3").build_plan(layout, 4, torch.device("cpu"))
    assert not Neighborhood(kernel_size="3", head_windows="9:2x2x2").can_run(
        layout, 4, 16, torch.float32, torch.device("cpu"))
