"""Radial Attention: the mask rule, the block builder, the method and its presets (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

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


def test_small_frames_are_thinned_like_the_reference():
    # tpf = 32 -> P = 64: L(1) = 32 < 128, split 4, so even adjacent frames are dropped.
    assert distance_rule(1, 32, block_size=16, decay=1.0)[0] == EMPTY
    assert distance_rule(4, 32, block_size=16, decay=1.0)[0] == EMPTY  # L = 8, split 16
    assert distance_rule(0, 32, block_size=16, decay=1.0)[0] == FULL


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
