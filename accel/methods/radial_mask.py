"""The Radial Attention mask (Li et al., arXiv 2506.19852) as a pure function of the video geometry.

Token rule (video tokens only; frame-major, raster order inside a frame, as diffusers orders them).
For a query token at in-frame raster index p of latent frame i and a key token at q of frame j,
with d = |i - j|, P = 2 ** bit_length(tokens_per_frame) and L(d) = P / 2 ** bit_length(d):

1. sink: if ``sink`` and j == 0 the pair is visible (every frame sees frame 0 fully);
2. thinning: if L(d) < THIN_WIDTH (128 tokens) the whole frame pair is dropped unless
   d % int(THIN_WIDTH / L(d)) == 0;
3. d == 0, and d == 1 unless ``decay_near``: the whole frame is visible;
4. otherwise w(d) = max(block_size, decay * P / 2 ** bit_length(d)) and
   - ``spatial="band"`` (the reference): visible iff |p - q| <= w(d), a 1-D band in raster order;
   - ``spatial="disk"``: visible iff (h_p - h_q)^2 + (w_p - w_q)^2 <= r(d)^2 in the (h, w) grid, with
     r(d)^2 = (2 * floor(w(d)) + 1) / pi, so the disk holds about as many tokens as the band
     (2 * floor(w) + 1); the radius shrinks like sqrt(w(d)), i.e. by sqrt(2) per octave of d.

Tile rule (the reference's ``shrinkMaskStrict``): a (query block, key block) tile is computed iff,
among its key columns that some query row of the tile sees, more than 60 % are seen by more than
a third of the tile's query rows.

Differences from mit-han-lab/radial-attention (its main branch):
- The tile rule is evaluated on the true token positions of the whole tile. The reference shrinks
  every frame pair separately inside a block-aligned padded canvas that is cut to ceil(tpf / B)
  blocks, so when frames are not block aligned it drops frame tails and judges straddling tiles
  on half their rows. At block-aligned sizes (e.g. 768x1280: 3840 tokens per frame) the two agree
  exactly; partial last blocks use their real row count as the density denominator.
- The thinning threshold stays 128 tokens whatever the block size (the reference hard-codes it;
  keeping it makes Wan2.2's block-64 preset reproduce the reference mask, and makes thinning a
  property of the token rule, not of the kernel tile).
- The mask is built at block granularity in O(candidate tiles) memory: no (S x S) or per-frame-pair
  token mask exists. Tiles with the same local structure (offsets inside their frames and the
  rule class of each frame pair they touch) are evaluated once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from accel.kernels.layout import BlockLayout

Spatial = Literal["band", "disk"]

THIN_WIDTH = 128
"""Token width below which the reference thins diagonals (hard-coded 128 in radial-attention)."""

FULL, EMPTY, PARTIAL = 0, 1, 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def distance_rule(
    d: int,
    tokens_per_frame: int,
    *,
    block_size: int,
    decay: float,
    spatial: Spatial = "band",
    decay_near: bool = False,
    thinning: bool = True,
) -> tuple[int, int]:
    """Rule for one frame distance d (sink excluded): (FULL|EMPTY|PARTIAL, width).

    width is floor(w(d)) for a band, floor(r(d)^2) for a disk, and 0 for FULL/EMPTY.
    Frames at distance d <= 1 are never thinned (the reference thins them too when a frame has fewer
    than 128 tokens, which leaves small videos with almost nothing but the diagonal).
    """
    p = 1 << tokens_per_frame.bit_length()
    span = p / 2 ** d.bit_length()
    if thinning and d > 1 and span < THIN_WIDTH and d % int(THIN_WIDTH / span) != 0:
        return EMPTY, 0
    if d == 0 or (d == 1 and not decay_near):
        return FULL, 0
    w = math.floor(max(float(block_size), span * decay))
    if spatial == "band":
        return PARTIAL, w
    return PARTIAL, math.floor((2 * w + 1) / math.pi)


def distance_table(
    frames: int, height: int, width: int, *, block_size: int, decay: float, spatial: Spatial, decay_near: bool,
    thinning: bool = True,
) -> tuple[list[int], list[int]]:
    """`distance_rule` for d = 0 .. frames - 1, as (kinds, widths)."""
    rules = [
        distance_rule(d, height * width, block_size=block_size, decay=decay, spatial=spatial, decay_near=decay_near,
                      thinning=thinning)
        for d in range(frames)
    ]
    return [r[0] for r in rules], [r[1] for r in rules]


# ---------------------------------------------------------------------------------------- reference
def reference_token_mask(
    frames: int,
    height: int,
    width: int,
    *,
    block_size: int,
    decay: float = 1.0,
    sink: bool = True,
    spatial: Spatial = "band",
    decay_near: bool = False,
    thinning: bool = True,
) -> torch.Tensor:
    """(S, S) bool token mask of the rule above, S = frames * height * width. Small sizes only."""
    tpf = height * width
    kinds, widths = distance_table(
        frames, height, width, block_size=block_size, decay=decay, spatial=spatial, decay_near=decay_near,
        thinning=thinning,
    )
    idx = torch.arange(frames * tpf)
    f, p = idx // tpf, idx % tpf
    d = (f[:, None] - f[None, :]).abs()
    kind = torch.tensor(kinds)[d]
    wid = torch.tensor(widths)[d]
    if spatial == "band":
        near = (p[:, None] - p[None, :]).abs() <= wid
    else:
        hh, ww = p // width, p % width
        near = (hh[:, None] - hh[None, :]) ** 2 + (ww[:, None] - ww[None, :]) ** 2 <= wid
    mask = (kind == FULL) | ((kind == PARTIAL) & near)
    if sink:
        mask |= (f == 0)[None, :]
    return mask


def reference_shrink(token_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Tile rule on a (S, S) token mask -> (ceil(S/B), ceil(S/B)) bool block mask.

    A column's density is its count of visible query rows over the tile's real rows (a partial last
    block counts only its rows); a tile is kept iff more than 60 % of its non-empty key columns have
    density above 1/3.
    """
    s = token_mask.shape[0]
    nb = _cdiv(s, block_size)
    pad = nb * block_size - s
    m = torch.nn.functional.pad(token_mask, (0, pad, 0, pad)).view(nb, block_size, nb, block_size)
    cnt = m.sum(1, dtype=torch.int64)  # (q block, k block, column)
    rows = (torch.clamp(s - torch.arange(nb) * block_size, max=block_size))[:, None, None]
    high = (3 * cnt > rows).sum(-1)
    nonzero = (cnt > 0).sum(-1)
    return 5 * high > 3 * nonzero


# ---------------------------------------------------------------------------------------- builder
def _disk_tables(
    radii2: list[int], width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per disk class k (squared radius radii2[k]): Rr[k] = isqrt, dx[k, D + Rmax] = half row width at
    row offset D (-1 outside), cum[k, wq, n] = disk points in the first n rows (D = -Rr .. -Rr + n - 1)
    clipped to columns [0, width), for a centre in column wq (padded with the total)."""
    rr = [math.isqrt(r2) for r2 in radii2] or [0]
    rmax = max(rr)
    dx = torch.full((len(rr), 2 * rmax + 1), -1, dtype=torch.int64)
    cum = torch.zeros(len(rr), width, 2 * rmax + 2, dtype=torch.int64)
    wq = torch.arange(width)
    for k, r2 in enumerate(radii2):
        r = rr[k]
        half = torch.tensor([math.isqrt(r2 - o * o) for o in range(-r, r + 1)], dtype=torch.int64)
        dx[k, rmax - r:rmax + r + 1] = half
        rowcnt = (torch.clamp(wq[:, None] + half, max=width - 1) - torch.clamp(wq[:, None] - half, min=0) + 1)
        c = torch.cumsum(rowcnt.clamp(min=0), 1)
        cum[k, :, 1:2 * r + 2] = c
        cum[k, :, 2 * r + 2:] = c[:, -1:]
    return (torch.tensor(rr, dtype=torch.int64, device=device), dx.to(device), cum.to(device), rmax)


class _Geometry:
    """Tensors shared by candidate enumeration and tile evaluation."""

    def __init__(self, frames, height, width, block_size, decay, sink, spatial, decay_near, device, thinning=True):
        self.frames, self.height, self.width = frames, height, width
        self.tpf = tpf = height * width
        self.S = frames * tpf
        self.B = block_size
        self.nb = _cdiv(self.S, block_size)
        self.sink, self.spatial = sink, spatial
        self.device = device
        kinds, widths = distance_table(
            frames, height, width, block_size=block_size, decay=decay, spatial=spatial, decay_near=decay_near,
            thinning=thinning,
        )
        self.kind = torch.tensor(kinds, dtype=torch.int64, device=device)
        self.wid = torch.tensor(widths, dtype=torch.int64, device=device)
        code = torch.where(self.kind == PARTIAL, self.wid, -1 - self.kind)
        _, self.cls = torch.unique(code, return_inverse=True)
        self.num_cls = int(self.cls.max()) + 1
        self.full_cls = int(self.cls[kinds.index(FULL)]) if FULL in kinds else -1
        if spatial == "band":
            reach = self.wid
        else:
            radii2 = sorted({w for k, w in zip(kinds, widths, strict=True) if k == PARTIAL})
            self.disk_rr, self.disk_dx, self.disk_cum, self.disk_rmax = _disk_tables(radii2, width, device)
            lookup = {r2: i for i, r2 in enumerate(radii2)}
            self.disk_k = torch.tensor(
                [lookup.get(w, 0) if k == PARTIAL else 0 for k, w in zip(kinds, widths, strict=True)],
                dtype=torch.int64, device=device,
            )
            reach = (self.disk_rr[self.disk_k] + 1) * width
        self.reach = torch.where(self.kind == FULL, tpf, torch.where(self.kind == EMPTY, -1, reach))

        # Query segments: the frames a query block overlaps, with in-frame raster ranges [pa, pb].
        qb = torch.arange(self.nb, dtype=torch.int64, device=device)
        s0 = qb * block_size
        s1 = torch.clamp(s0 + block_size, max=self.S)
        f0, f1 = s0 // tpf, (s1 - 1) // tpf
        self.nseg = int((f1 - f0).max()) + 1
        seg = f0[:, None] + torch.arange(self.nseg, device=device)
        self.seg_ok = seg <= f1[:, None]
        self.seg_i = torch.clamp(seg, max=frames - 1)
        self.seg_pa = torch.where(self.seg_ok, torch.clamp(s0[:, None] - seg * tpf, min=0), 0)
        self.seg_pb = torch.where(self.seg_ok, torch.clamp(s1[:, None] - 1 - seg * tpf, max=tpf - 1), -1)
        self.rows_in_block = s1 - s0

    # -------------------------------------------------------------------------------- candidates
    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted unique (query block, key block) pairs that can contain a visible token pair."""
        tpf, B, nb, dev = self.tpf, self.B, self.nb, self.device
        j = torch.arange(self.frames, device=dev)
        d = (self.seg_i[:, :, None] - j).abs()
        r = self.reach[d]
        if self.sink:
            r = torch.where(j == 0, tpf, r)
        ok = self.seg_ok[:, :, None] & (r >= 0)
        lo = torch.where(ok, torch.clamp(self.seg_pa[:, :, None] - r, min=0), tpf).amin(1)
        hi = torch.where(ok, torch.clamp(self.seg_pb[:, :, None] + r, max=tpf - 1), -1).amax(1)
        blo = (j * tpf + lo) // B
        n = torch.where(hi >= lo, (j * tpf + hi) // B - blo + 1, 0).flatten()
        total = int(n.sum())
        qrow = torch.arange(nb, device=dev)[:, None].expand(nb, self.frames).flatten()
        rows = torch.repeat_interleave(qrow, n, output_size=total)
        first = torch.cumsum(n, 0) - n
        cols = torch.repeat_interleave(blo.flatten() - first, n, output_size=total)
        cols += torch.arange(total, device=dev)
        key = torch.unique(rows * nb + cols)
        return key // nb, key % nb

    def signatures(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """One int64 (or row) per tile; tiles with equal signatures have equal token content.

        General tiles are keyed by their offsets inside their frames and the rule class of every frame
        distance they can touch. Two shortcuts collapse most tiles: a tile whose frame pairs are all
        fully visible is keyed as "full", and a band tile inside one query frame and one key frame is
        translation invariant, so only its key-minus-query offset matters.
        """
        tpf, B, nb = self.tpf, self.B, self.nb
        s0, t0 = rows * B, cols * B
        i0, j0 = s0 // tpf, t0 // tpf
        po, qo = s0 % tpf, t0 % tpf
        lastq, lastk = (rows == nb - 1).long(), (cols == nb - 1).long()
        sink = ((j0 == 0) & self.sink).long()
        m = torch.arange(-(self.nseg - 1), self.nseg, device=self.device)
        cls = self.cls[torch.clamp(((j0 - i0)[:, None] + m).abs(), max=self.frames - 1)]
        nrows = self.rows_in_block[rows]
        ncols = torch.clamp(self.S - t0, max=B)
        single = (po + nrows <= tpf) & (qo + ncols <= tpf)
        centre = cls[:, self.nseg - 1]
        full = (cls == self.full_cls).all(1) | (single & ((centre == self.full_cls) | (sink == 1)))
        kind = torch.zeros_like(rows)
        if self.spatial == "band":
            shift = single & ~full
            kind = torch.where(shift, 1, kind)
            qo = torch.where(shift, qo - po + tpf, qo)
            po = torch.where(shift, 0, po)
            cls = torch.where(shift[:, None] & (m != 0), 0, cls)
        kind = torch.where(full, 2, kind)
        zero = torch.zeros_like(rows)
        fields = [kind] + [torch.where(full, zero, f) for f in (po, qo, lastq, lastk, sink)]
        fields.extend(torch.where(full, zero, c) for c in cls.unbind(1))
        radices = [3, tpf, 2 * tpf, 2, 2, 2] + [self.num_cls] * m.numel()
        if math.prod(radices) < 2**62:
            packed = torch.zeros_like(rows)
            for f, r in zip(fields, radices, strict=True):
                packed = packed * r + f
            return packed
        return torch.stack(fields, 1)

    # -------------------------------------------------------------------------------- tile rule
    def keep_tiles(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Tile rule for the given tiles, evaluated column by column on true token positions."""
        tpf, B, S = self.tpf, self.B, self.S
        c = cols[:, None] * B + torch.arange(B, device=self.device)
        cval = c < S
        c = torch.clamp(c, max=S - 1)
        j, q = c // tpf, (c % tpf)[:, :, None]
        pa, pb = self.seg_pa[rows][:, None, :], self.seg_pb[rows][:, None, :]
        d = (self.seg_i[rows][:, None, :] - j[:, :, None]).abs()
        kind = self.kind[d]
        full = kind == FULL
        if self.sink:
            full |= (j == 0)[:, :, None]
        if self.spatial == "band":
            w = self.wid[d]
            cnt = torch.clamp(torch.minimum(pb, q + w) - torch.maximum(pa, q - w) + 1, min=0)
        else:
            k = self.disk_k[d]
            cnt = self._disk_prefix(pb, q, k) - self._disk_prefix(pa - 1, q, k)
        cnt = torch.where(full, pb - pa + 1, torch.where(kind == EMPTY, 0, cnt))
        cnt = torch.where(self.seg_ok[rows][:, None, :], cnt, 0).sum(-1)
        nrows = self.rows_in_block[rows][:, None]
        high = ((3 * cnt > nrows) & cval).sum(1)
        nonzero = ((cnt > 0) & cval).sum(1)
        return 5 * high > 3 * nonzero

    def _disk_prefix(self, t: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Disk points (centre q, class k) with raster index <= t, counting rows above the frame alike
        for every t so that differences are exact."""
        W, rmax = self.width, self.disk_rmax
        ht = torch.div(t, W, rounding_mode="floor")
        wt = t - ht * W
        hq, wq = q // W, q % W
        rr = self.disk_rr[k]
        off = ht - hq
        above = self.disk_cum[k, wq.expand_as(off), torch.clamp(off + rr, 0, 2 * rmax + 1)]
        dx = torch.where(off.abs() <= rr, self.disk_dx[k, torch.clamp(off + rmax, 0, 2 * rmax)], -1)
        part = torch.clamp(torch.minimum(wq + dx, wt) - torch.clamp(wq - dx, min=0) + 1, min=0)
        return above + part


def radial_block_layout(
    frames: int,
    height: int,
    width: int,
    *,
    block_size: int,
    decay: float = 1.0,
    sink: bool = True,
    spatial: Spatial = "band",
    decay_near: bool = False,
    thinning: bool = True,
    device: torch.device | str = "cpu",
    max_chunk_elements: int = 1 << 20,
) -> BlockLayout:
    """Video x video `BlockLayout` (shared by all heads) of the radial mask; see the module docstring.

    Built directly at block granularity: candidate tiles come from per (query block, key frame)
    reach ranges, tiles are grouped by signature, and the tile rule is evaluated once per group on
    (group, column, query segment) tensors of at most ``max_chunk_elements`` entries. Peak memory is
    O(candidate tiles), a few hundred MB at 300k-500k tokens.
    """
    from accel.kernels.layout import BlockLayout

    device = torch.device(device)
    g = _Geometry(frames, height, width, block_size, decay, sink, spatial, decay_near, device, thinning)
    rows, cols = g.candidates()
    rstep = max(1, max_chunk_elements // (4 * g.nseg))
    sig = torch.cat([g.signatures(rows[a:a + rstep], cols[a:a + rstep]) for a in range(0, rows.numel(), rstep)])
    if sig.dim() == 1:
        uniq, inverse = torch.unique(sig, return_inverse=True)
    else:
        uniq, inverse = torch.unique(sig, dim=0, return_inverse=True)
    rep = torch.zeros(uniq.shape[0], dtype=torch.int64, device=device)
    rep.scatter_(0, inverse, torch.arange(rows.numel(), device=device))
    step = max(1, max_chunk_elements // (block_size * g.nseg))
    keep_rep = torch.cat(
        [g.keep_tiles(rows[rep[a:a + step]], cols[rep[a:a + step]]) for a in range(0, rep.numel(), step)]
        or [torch.zeros(0, dtype=torch.bool, device=device)]
    )
    keep = keep_rep[inverse]
    rows, cols = rows[keep], cols[keep]
    # Every query block keeps its diagonal tile, so no token is left without keys: the tile rule can drop
    # it when blocks hold several small frames. Real sizes keep it anyway (d = 0 is dense).
    diag = torch.arange(g.nb, device=device)
    pairs = torch.unique(torch.cat([rows * g.nb + cols, diag * g.nb + diag]))  # sorted by (row, col)
    rows, cols = pairs // g.nb, pairs % g.nb
    offsets = torch.zeros(1, g.nb + 1, dtype=torch.int32, device=device)
    offsets[0, 1:] = torch.cumsum(torch.bincount(rows, minlength=g.nb), 0)
    indices = cols.to(torch.int32)[None] if cols.numel() else torch.zeros(1, 1, dtype=torch.int32, device=device)
    return BlockLayout(offsets, indices.contiguous(), block_size, block_size, g.nb, g.nb)
