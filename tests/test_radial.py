"""Radial Attention: the mask rule, the block builder, the method and its presets (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

import accel
from accel.methods.radial_mask import (
    EMPTY,
    FULL,
    PARTIAL,
    distance_rule,
    radial_block_layout,
    reference_shrink,
    reference_token_mask,
)


def _block_mask(frames, height, width, **kw) -> torch.Tensor:
    return radial_block_layout(frames, height, width, **kw).to_mask()[0]


def _port_of_reference(frames: int, tpf: int, block: int, decay: float, sink: bool) -> torch.Tensor:
    """mit-han-lab/radial-attention `gen_log_mask_shrinked` (current main rule), one frame pair at a
    time in a padded canvas, with `shrinkMaskStrict`. Token count must be block aligned."""
    s = frames * tpf
    out = torch.zeros(s // block, s // block, dtype=torch.bool)
    idx = torch.arange(tpf)
    p = 2 ** tpf.bit_length()
    for i in range(frames):
        for j in range(frames):
            dist = abs(i - j)
            if j == 0 and sink:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                if dist <= 1:
                    w = tpf
                else:
                    w = max(p / 2 ** dist.bit_length() * decay, block)
                local = (idx[None, :] - idx[:, None]).abs() <= w
                span = p / 2 ** dist.bit_length()
                if span < 128 and dist % int(128 / span) != 0:
                    local = torch.zeros_like(local)
            rr, rc = (i * tpf) % block, (j * tpf) % block
            nblk = (tpf - 1) // block + 1
            canvas = torch.zeros(rr + nblk * block, rc + nblk * block, dtype=torch.bool)
            canvas[rr:rr + tpf, rc:rc + tpf] = local
            nb = canvas.shape[0] // block
            c = canvas[:nb * block, :nb * block].view(nb, block, nb, block)
            dens = c.sum(1) / block
            frac = (dens > 1 / 3).sum(-1) / ((dens > 0).sum(-1) + 1e-9)
            bm = frac > 0.6
            r0, c0 = (i * tpf) // block, (j * tpf) // block
            out[r0:r0 + nb, c0:c0 + nb] |= bm
    return out


# ------------------------------------------------------------------------------------------ the rule
def test_window_width_for_768x1280():
    tpf = 48 * 80  # P = 4096
    kw = dict(block_size=128, spatial="band", decay_near=False)
    assert distance_rule(0, tpf, decay=1.0, **kw) == (FULL, 0)
    assert distance_rule(1, tpf, decay=1.0, **kw) == (FULL, 0)
    assert distance_rule(2, tpf, decay=1.0, **kw) == (PARTIAL, 1024)
    assert distance_rule(3, tpf, decay=1.0, **kw) == (PARTIAL, 1024)
    assert distance_rule(4, tpf, decay=1.0, **kw) == (PARTIAL, 512)
    assert distance_rule(16, tpf, decay=1.0, **kw) == (PARTIAL, 128)
    assert distance_rule(2, tpf, decay=0.2, **kw) == (PARTIAL, 204)  # 204.8 -> |p - q| <= 204
    assert distance_rule(8, tpf, decay=0.2, **kw) == (PARTIAL, 128)  # floored at the block size
    assert distance_rule(8, tpf, decay=0.2, block_size=64, spatial="band", decay_near=False) == (PARTIAL, 64)


def test_temporal_thinning_for_768x1280():
    tpf = 48 * 80
    kw = dict(block_size=128, decay=1.0, spatial="band", decay_near=False)
    assert distance_rule(31, tpf, **kw)[0] == PARTIAL
    assert [distance_rule(d, tpf, **kw)[0] for d in (32, 33, 34, 63)] == [PARTIAL, EMPTY, PARTIAL, EMPTY]
    assert [distance_rule(d, tpf, **kw)[0] for d in (64, 65, 66, 67, 68)] == [PARTIAL, EMPTY, EMPTY, EMPTY, PARTIAL]
    assert [distance_rule(d, tpf, **kw)[0] for d in (128, 132, 136)] == [PARTIAL, EMPTY, PARTIAL]
    # The threshold stays 128 tokens whatever the block size (the reference hard-codes it).
    assert distance_rule(33, tpf, block_size=64, decay=1.0, spatial="band", decay_near=False)[0] == EMPTY


def test_small_frames_are_thinned_but_keep_adjacent_frames():
    # tpf = 32 -> P = 64: L(1) = 32 < 128, split 4. The reference drops even adjacent frames here;
    # we keep d <= 1 dense as the rule states.
    assert distance_rule(1, 32, block_size=16, decay=1.0)[0] == FULL
    assert distance_rule(4, 32, block_size=16, decay=1.0)[0] == EMPTY  # L = 8, split 16
    assert distance_rule(4, 32, block_size=16, decay=1.0, thinning=False)[0] == PARTIAL
    assert distance_rule(0, 32, block_size=16, decay=1.0)[0] == FULL


def test_every_query_block_keeps_a_key_block():
    from accel.geometry import TokenLayout

    # Blocks larger than a frame (and than the whole video) used to leave query blocks empty.
    for block in (16, 64, 128):
        plan = accel.Radial(decay=0.2, block_size=block).build_plan(TokenLayout(1, 5, 4, 4), 1, torch.device("cpu"))
        counts = plan.block_layout.offsets[0, 1:] - plan.block_layout.offsets[0, :-1]
        assert bool((counts > 0).all()), f"block {block}: empty query blocks {counts.tolist()}"


def test_large_decay_without_thinning_is_dense():
    from accel.geometry import TokenLayout

    plan = accel.Radial(decay=1e6, block_size=16, thinning=False).build_plan(
        TokenLayout(1, 5, 4, 4), 1, torch.device("cpu")
    )
    assert plan.density == 1.0


def _expected_small(frames: int, near_band: int | None, far_band: int, sink: bool) -> torch.Tensor:
    """Hand-derived block mask for H=8, W=16 (tpf 128 = 8 blocks of 16): d = 0 full; d = 1 full or
    |a - b| <= near_band; d = 2 |a - b| <= far_band; d = 3 thinned (L = 64, split 2); sink column 0."""
    nb = frames * 8
    m = torch.zeros(nb, nb, dtype=torch.bool)
    for qb in range(nb):
        for kb in range(nb):
            i, a, j, b = qb // 8, qb % 8, kb // 8, kb % 8
            d = abs(i - j)
            if sink and j == 0:
                m[qb, kb] = True
            elif d == 0 or (d == 1 and near_band is None):
                m[qb, kb] = True
            elif d == 1:
                m[qb, kb] = abs(a - b) <= near_band
            elif d == 2:
                m[qb, kb] = abs(a - b) <= far_band
    return m


def test_band_hand_computed():
    # w(2) = max(16, 256 / 4 * 1.0) = 64. Tile offset k: |k| <= 3 all visible; k = 4 keeps 11 of 16
    # columns seen by >= 6 of 16 rows (11/16 > 0.6); k = 5 sees nothing.
    got = _block_mask(4, 8, 16, block_size=16, decay=1.0, sink=False)
    assert torch.equal(got, _expected_small(4, None, 4, sink=False))


def test_band_at_block_floor_is_tridiagonal():
    # w = max(16, 12.8) = 16: the +-1 tile keeps 11/16 columns, the +-2 tile is empty.
    got = _block_mask(4, 8, 16, block_size=16, decay=0.2, sink=False)
    assert torch.equal(got, _expected_small(4, None, 1, sink=False))


def test_sink_makes_frame_zero_visible():
    got = _block_mask(4, 8, 16, block_size=16, decay=1.0, sink=True)
    assert torch.equal(got, _expected_small(4, None, 4, sink=True))
    assert got[:, :8].all() and not got[:8, 24:].any()  # frame 0 -> frame 3 (d = 3) is thinned


def test_decay_near_decays_adjacent_frames():
    # decay_near: w(1) = max(16, 128 * 0.25) = 32 -> |a - b| <= 2; w(2) = max(16, 16) = 16 -> tridiagonal.
    got = _block_mask(4, 8, 16, block_size=16, decay=0.25, sink=False, decay_near=True)
    assert torch.equal(got, _expected_small(4, 2, 1, sink=False))
    dense_near = _block_mask(4, 8, 16, block_size=16, decay=0.25, sink=False)
    assert got.sum() < dense_near.sum()


def test_disk_is_a_2d_neighbourhood():
    # tpf = 400 (P = 512): w(2) = max(16, 512 / 4) = 128, so r^2 = 257 / pi = 81.8: (9, 0) and (6, 6)
    # are inside, (7, 6) and (10, 0) are not; the band reaches 128 raster positions: (6, 0) = 120 is
    # inside, (7, 0) = 140 is not.
    h = w = 20
    disk = reference_token_mask(3, h, w, block_size=16, decay=1.0, sink=False, spatial="disk")
    band = reference_token_mask(3, h, w, block_size=16, decay=1.0, sink=False, spatial="band")
    tpf = h * w
    q = 2 * tpf + 10 * w + 10  # frame 2, (10, 10)

    def key(dh, dw):
        return (10 + dh) * w + (10 + dw)  # frame 0

    assert disk[q, key(9, 0)] and disk[q, key(-9, 0)] and disk[q, key(6, 6)] and disk[q, key(-6, -6)]
    assert not disk[q, key(7, 6)] and not disk[q, key(-7, 6)] and not disk[q, key(0, 10)]
    assert band[q, key(6, 0)] and not band[q, key(7, 0)] and band[q, key(0, 9)]
    assert int(band[q, :tpf].sum()) == 2 * 128 + 1
    area = int(disk[q, :tpf].sum())
    assert area == 253  # lattice points with x^2 + y^2 <= 81, about the band's 257


def test_text_free_layout_only_covers_video():
    lay = radial_block_layout(3, 8, 16, block_size=16)
    assert lay.num_q_blocks == lay.num_k_blocks == 3 * 128 // 16
    assert lay.heads == 1


# ------------------------------------------------------------------------------- builder vs references
SMALL_GEOMETRIES = [
    # frames, height, width, block, decay, sink, spatial, decay_near
    (5, 8, 16, 16, 1.0, True, "band", False),
    (6, 8, 20, 32, 0.5, False, "band", False),  # tpf 160: frames not block aligned
    (7, 5, 30, 16, 0.2, True, "band", True),  # tpf 150: not aligned, odd
    (4, 9, 17, 64, 1.0, True, "band", False),  # tpf 153, block > rows
    (9, 3, 5, 16, 1.0, True, "band", False),  # tpf 15 < block: a block spans several frames
    (5, 12, 12, 16, 1.0, True, "disk", False),
    (6, 10, 14, 32, 0.5, False, "disk", True),
    (3, 11, 13, 64, 2.0, True, "disk", False),
    (1, 7, 9, 16, 1.0, True, "band", False),  # one frame: dense
]


@pytest.mark.parametrize("geom", SMALL_GEOMETRIES)
def test_block_builder_matches_token_reference(geom):
    f, h, w, b, decay, sink, spatial, near = geom
    kw = dict(block_size=b, decay=decay, sink=sink, spatial=spatial, decay_near=near)
    expected = reference_shrink(reference_token_mask(f, h, w, **kw), b)
    got = _block_mask(f, h, w, **kw)
    print("mismatching tiles:", int((got != expected).sum()), "of", expected.numel())
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "frames,height,width,block,decay,sink",
    [(6, 16, 16, 16, 1.0, True), (5, 16, 16, 64, 0.3, False), (9, 8, 32, 32, 1.0, True), (4, 16, 24, 128, 1.0, True)],
)
def test_matches_reference_port_at_aligned_sizes(frames, height, width, block, decay, sink):
    expected = _port_of_reference(frames, height * width, block, decay, sink)
    got = _block_mask(frames, height, width, block_size=block, decay=decay, sink=sink)
    assert torch.equal(got, expected)


def test_misaligned_frames_use_true_positions():
    # tpf = 150, block 16: the reference's canvas drops each frame's tail tiles and judges straddling
    # tiles per frame pair; ours evaluates the true token mask tile by tile.
    f, h, w, b = 6, 5, 30, 16
    truth = reference_shrink(reference_token_mask(f, h, w, block_size=b, decay=1.0), b)
    got = _block_mask(f, h, w, block_size=b, decay=1.0)
    assert torch.equal(got, truth)
    port = _port_of_reference(f, h * w, b, 1.0, True)
    n = port.shape[0]
    assert not torch.equal(got[:n, :n], port)


# ------------------------------------------------------------------------------------ densities (§1.6)
@pytest.mark.parametrize(
    "frames,decay,block,sink,expected",
    [
        (18, 0.2, 128, True, 28.7),  # Wan2.1 768x1280, 69 frames
        (18, 0.5, 128, True, 33.9),
        (18, 1.0, 128, True, 43.1),
        (21, 0.2, 128, True, 26.1),  # 81 frames
        (41, 0.2, 128, True, 18.2),  # 161 frames
        (30, 0.95, 128, False, 27.5),  # HunyuanVideo 117 frames
        (20, 0.8, 64, True, 34.9),  # Wan2.2 77 frames, block 64
    ],
)
def test_reference_densities(frames, decay, block, sink, expected):
    lay = radial_block_layout(frames, 48, 80, block_size=block, decay=decay, sink=sink)
    density = 100 * lay.density()
    print(f"frames={frames} decay={decay}: density {density:.2f}% (reference table {expected}%)")
    assert abs(density - expected) <= 1.0


def test_small_decays_give_the_same_mask_at_768x1280():
    a = radial_block_layout(18, 48, 80, block_size=128, decay=0.2)
    # The +-2 tile of the d = 2..3 band needs w > 233 (decay > 0.227) to pass the 60 % rule.
    b = radial_block_layout(18, 48, 80, block_size=128, decay=0.22)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.indices, b.indices)


def test_decay_near_lifts_the_sparsity_cap():
    ref = radial_block_layout(18, 48, 80, block_size=128, decay=0.2).density()
    near = radial_block_layout(18, 48, 80, block_size=128, decay=0.2, decay_near=True).density()
    print(f"density {ref:.3f} -> {near:.3f} with decay_near")
    assert near < ref - 0.05


def test_300k_tokens_without_quadratic_memory():
    # Wan2.1 768x1280 at 321 frames: 311 040 tokens; an (S x S) bool mask would be 97 GB.
    lay = radial_block_layout(81, 48, 80, block_size=128, decay=0.2)
    nb = math.ceil(81 * 3840 / 128)
    assert lay.num_q_blocks == nb
    assert lay.offsets.numel() == nb + 1
    assert lay.indices.numel() == int(lay.offsets[0, -1]) < 0.2 * nb * nb
    assert abs(100 * lay.density() - 12.3) <= 1.0
    assert lay.indices.element_size() * lay.indices.numel() < 4 * 1024 * 1024


# ------------------------------------------------------------------------------------------ the method
from accel.geometry import TokenLayout  # noqa: E402
from accel.methods import Radial, RadialPlan  # noqa: E402
from accel.presets import RADIAL_PRESETS, radial_preset  # noqa: E402
from accel.schedule import Schedule  # noqa: E402

CPU = torch.device("cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _expected_attention(q, k, v, layout, method, key_padding_mask=None, scale=None):
    """Masked softmax attention in float64 over the token mask the plan stands for: the block mask of
    the rule (token reference + tile rule), repeated to tokens, text rows and columns dense."""
    f, h, w = layout.grid
    block = method.resolve_block_size(CPU)
    blocks = reference_shrink(
        reference_token_mask(
            f, h, w, block_size=block, decay=method.decay, sink=method.sink,
            spatial=method.spatial, decay_near=method.decay_near,
        ),
        block,
    )
    nv = layout.video_tokens
    video = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:nv, :nv]
    s = layout.total_tokens
    mask = torch.ones(s, s, dtype=torch.bool)
    vs = layout.video_slice
    mask[vs, vs] = video
    mask = mask[None].expand(q.shape[0], s, s)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, :]
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (qd @ kd.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    return (logits.softmax(-1) @ vd).transpose(1, 2)


def _rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _qkv(layout, heads, dim, dtype, requires_grad=False):
    shape = (layout.batch, layout.total_tokens, heads, dim)
    return [torch.randn(shape, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


ATTEND_CASES = [
    # batch, frames, height, width, text, position, block, dtype, padding
    (1, 3, 5, 7, 0, "none", 16, torch.float32, False),
    (2, 3, 5, 7, 9, "before", 16, torch.float32, True),
    (2, 4, 3, 11, 6, "after", 16, torch.float32, True),
    (2, 3, 5, 7, 9, "after", 32, torch.float16, True),
    (1, 5, 4, 4, 3, "before", 16, torch.float16, False),
]


@pytest.mark.parametrize("case", ATTEND_CASES)
def test_attend_matches_masked_sdpa(case):
    batch, f, h, w, text, pos, block, dtype, padding = case
    layout = TokenLayout(batch, f, h, w, text, pos)
    method = Radial(decay=0.5, block_size=block, sink=True)
    plan = method.build_plan(layout, 2, CPU)
    q, k, v = _qkv(layout, 2, 24, dtype)
    kpm = None
    if padding:
        kpm = torch.ones(batch, layout.total_tokens, dtype=torch.bool)
        kpm[-1, layout.text_slice.stop - 2:layout.text_slice.stop] = False  # last two text tokens padded
    out = method.attend(q, k, v, layout, plan, key_padding_mask=kpm)
    ref = _expected_attention(q, k, v, layout, method, kpm)
    err = _rel_l2(out, ref)
    print(f"{case}: density {plan.density:.3f}, rel L2 {err:.2e}")
    assert out.shape == q.shape and out.dtype == dtype
    assert err < TOLERANCE[dtype]
    again = method.attend(q, k, v, layout, plan, key_padding_mask=kpm)
    assert torch.equal(out, again)


def test_attend_disk_and_decay_near():
    layout = TokenLayout(1, 4, 6, 6, 4, "after")
    method = Radial(decay=0.3, block_size=16, spatial="disk", decay_near=True, sink=False)
    plan = method.build_plan(layout, 1, CPU)
    assert plan.density < 1.0
    q, k, v = _qkv(layout, 1, 16, torch.float32)
    out = method.attend(q, k, v, layout, plan, scale=0.3)
    ref = _expected_attention(q, k, v, layout, method, scale=0.3)
    assert _rel_l2(out, ref) < 1e-5


def test_attend_text_is_dense_both_ways():
    # Zero queries give uniform weights over the visible keys: a text query averages every value, a
    # video query the values of its visible video blocks plus every text token.
    layout = TokenLayout(1, 6, 4, 8, 5, "before")
    method = Radial(decay=0.2, block_size=16, sink=False)
    plan = method.build_plan(layout, 1, CPU)
    assert plan.density < 0.7
    s = layout.total_tokens
    q = torch.zeros(1, s, 1, 16)
    k = torch.zeros(1, s, 1, 16)
    v = torch.randn(1, s, 1, 16)
    out = method.attend(q, k, v, layout, plan)
    text = out[0, layout.text_slice, 0]
    assert torch.allclose(text, v[0, :, 0].mean(0).expand_as(text), atol=1e-5)
    video_first = out[0, layout.video_slice.start, 0]
    vis = torch.zeros(s, dtype=torch.bool)
    vis[layout.text_slice] = True
    row = plan.block_layout.to_mask()[0, 0].repeat_interleave(16)[: layout.video_tokens]
    vis[layout.video_slice] = row
    assert torch.allclose(video_first, v[0, vis, 0].mean(0), atol=1e-5)


def test_attend_is_differentiable():
    layout = TokenLayout(1, 3, 4, 5, 4, "after")
    method = Radial(decay=0.5, block_size=16)
    plan = method.build_plan(layout, 1, CPU)
    q, k, v = _qkv(layout, 1, 16, torch.float32, requires_grad=True)
    out = method.attend(q, k, v, layout, plan)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _expected_attention(q2, k2, v2, layout, method)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    assert _rel_l2(out.detach(), ref.detach()) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert _rel_l2(g, r) < 1e-4


def test_attend_refuses_masked_video_keys():
    layout = TokenLayout(1, 2, 4, 4, 3, "after")
    method = Radial(block_size=16)
    plan = method.build_plan(layout, 1, CPU)
    q, k, v = _qkv(layout, 1, 16, torch.float32)
    kpm = torch.ones(1, layout.total_tokens, dtype=torch.bool)
    kpm[0, 5] = False
    with pytest.raises(NotImplementedError, match="video keys"):
        method.attend(q, k, v, layout, plan, key_padding_mask=kpm)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        method.attend(q, k, v, layout, plan, key_padding_mask=kpm.float())


def test_attend_checks_plan_and_shapes():
    layout = TokenLayout(1, 2, 4, 4)
    method = Radial(block_size=16)
    plan = method.build_plan(TokenLayout(1, 2, 4, 8), 1, CPU)
    q, k, v = _qkv(layout, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="plan was built for grid"):
        method.attend(q, k, v, layout, plan)
    with pytest.raises(TypeError, match="RadialPlan"):
        method.attend(q, k, v, layout, None)
    with pytest.raises(ValueError, match="sequence length"):
        method.attend(q[:, :-1], k[:, :-1], v[:, :-1], layout, method.build_plan(layout, 1, CPU))


def test_plan_is_small_and_shared():
    layout = TokenLayout(2, 4, 8, 16, 7, "after")
    method = Radial(decay=1.0, block_size=16, sink=False)
    plan = method.build_plan(layout, 12, CPU)
    assert isinstance(plan, RadialPlan)
    assert plan.block_layout.heads == 1 and plan.block_size == 16 and plan.grid == (4, 8, 16)
    assert method.plan_density(plan) == plan.density == plan.block_layout.density()
    assert torch.equal(plan.block_layout.to_mask()[0], _expected_small(4, None, 4, sink=False))
    # Plans depend on geometry only: the batch size does not matter.
    other = method.build_plan(layout.with_batch(5), 12, CPU)
    assert torch.equal(other.block_layout.indices, plan.block_layout.indices)
    assert hash(method) == hash(Radial(decay=1, block_size=16, sink=False))


def test_default_block_size_follows_the_kernel():
    from accel.kernels import default_block_size

    method = Radial()
    assert method.resolve_block_size(CPU) == default_block_size(CPU)
    assert method.build_plan(TokenLayout(1, 2, 8, 8), 1, CPU).block_size == default_block_size(CPU)


def test_can_run():
    method = Radial()
    layout = TokenLayout(1, 2, 4, 4)
    assert method.can_run(layout, 2, 128, torch.bfloat16, CPU)
    assert not method.can_run(layout, 2, 512, torch.float16, CPU)
    with pytest.raises(NotImplementedError, match="head_dim <= 256"):
        method.can_run(layout, 2, 512, torch.float16, CPU, raise_error=True)
    with pytest.raises(NotImplementedError, match="float16/bfloat16/float32"):
        method.can_run(layout, 2, 64, torch.float64, CPU, raise_error=True)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        method.can_run(layout, 2, 0, torch.float16, CPU, raise_error=True)
    with pytest.raises(TypeError, match="TokenLayout"):
        method.can_run((1, 2, 4, 4), 2, 64, torch.float16, CPU, raise_error=True)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(decay=0.0), ValueError, r"Radial.decay must be a number > 0, got 0.0"),
        (dict(decay=float("nan")), ValueError, "decay"),
        (dict(decay="1"), TypeError, "Radial.decay must be a number"),
        (dict(decay=True), TypeError, "Radial.decay must be a number"),
        (dict(block_size=48), ValueError, "Radial.block_size must be one of 16, 32, 64, 128"),
        (dict(block_size=256), ValueError, "block_size must be one of"),
        (dict(block_size=64.5), ValueError, "block_size must be one of"),
        (dict(block_size="64"), TypeError, "block_size must be one of"),
        (dict(sink=1), TypeError, "Radial.sink must be true or false"),
        (dict(decay_near="yes"), TypeError, "decay_near must be true or false"),
        (dict(spatial="circle"), ValueError, "Radial.spatial must be one of band, disk"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        Radial(**kwargs)


def test_config_defaults():
    m = Radial()
    assert (m.decay, m.block_size, m.sink, m.spatial, m.decay_near) == (1.0, None, True, "band", False)
    assert m.name == "radial" and m.reference_compatible
    assert not Radial(spatial="disk").reference_compatible and not Radial(decay_near=True).reference_compatible
    assert isinstance(Radial(decay=1).decay, float)


# ------------------------------------------------------------------------------------------ presets
def test_presets_match_the_reference_scripts():
    expected = {
        "wan2.1-14b": (0.2, 128, True, 1, 12),
        "wan2.1-1.3b": (0.2, 128, True, 1, 12),
        "wan2.1-14b-lightx2v": (0.2, 128, True, 1, 1),
        "wan2.1-14b-fusionx": (0.2, 128, True, 1, 2),
        "wan2.1-2x": (0.2, 128, True, 2, 2),
        "wan2.1-4x": (0.2, 128, True, 2, 2),
        "wan2.2": (0.8, 64, True, 1, 11),
        "hunyuan-video": (0.95, 128, False, 0, 12),
        "hunyuan-video-4x": (0.95, 128, False, 2, 2),
    }
    assert set(RADIAL_PRESETS) == set(expected)
    for name, (decay, block, sink, layers, steps) in expected.items():
        method, schedule = radial_preset(name)
        assert isinstance(method, Radial) and isinstance(schedule, Schedule)
        assert (method.decay, method.block_size, method.sink) == (decay, block, sink), name
        assert method.reference_compatible
        assert (schedule.dense_layers, schedule.dense_steps, schedule.dense_last_steps) == (layers, steps, 0), name


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="known presets: .*wan2.1-14b.*hunyuan-video"):
        radial_preset("wan3")
    with pytest.raises(TypeError):
        radial_preset(None)


# ------------------------------------------------------------------------------------------ visualize
def test_visualize_writes_png_and_returns_image(tmp_path):
    method = Radial(decay=0.5, block_size=16)
    plan = method.build_plan(TokenLayout(1, 6, 8, 16), 1, CPU)
    path = method.visualize(plan, tmp_path / "mask.png")
    assert path == tmp_path / "mask.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = method.visualize(plan)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8"


def test_visualize_pools_big_masks():
    from accel.methods.radial import pooled_block_mask

    method = Radial(decay=0.2, block_size=16)
    plan = method.build_plan(TokenLayout(1, 10, 8, 16), 1, CPU)  # 80 x 80 blocks
    pooled, factor = pooled_block_mask(plan, max_pixels=32)
    assert factor == 3 and pooled.shape == (27, 27)
    full = plan.block_layout.to_mask()[0]
    padded = torch.zeros(81, 81, dtype=torch.bool)
    padded[:80, :80] = full
    assert torch.equal(pooled, padded.view(27, 3, 27, 3).any(3).any(1))
    img = method.visualize(plan, max_pixels=32)
    assert img.shape[2] == 3


# ------------------------------------------------------------------------------------------ GPU
from conftest import requires_cuda  # noqa: E402


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attend_on_cuda(dtype):
    cuda = torch.device("cuda")
    layout = TokenLayout(2, 5, 9, 15, 13, "before")
    method = Radial(decay=0.5, block_size=32)
    plan = method.build_plan(layout, 3, cuda)
    assert plan.block_layout.device.type == "cuda"
    cpu_plan = method.build_plan(layout, 3, CPU)
    assert torch.equal(plan.block_layout.indices.cpu(), cpu_plan.block_layout.indices)
    q, k, v = (t.to(cuda) for t in _qkv(layout, 3, 64, dtype))
    kpm = torch.ones(2, layout.total_tokens, dtype=torch.bool, device=cuda)
    kpm[0, :4] = False
    out = method.attend(q, k, v, layout, plan, key_padding_mask=kpm)
    ref = _expected_attention(q.cpu(), k.cpu(), v.cpu(), layout, method, kpm.cpu())
    err = _rel_l2(out.cpu(), ref)
    print(f"{dtype}: rel L2 {err:.2e}")
    assert err < TOLERANCE[dtype]
