"""Neighborhood attention (NATTEN / GNA semantics): the window rule, brute-force masks, tile lists, reference.

Triton-free. Everything here is the specification the Triton kernel (`accel.kernels.neighborhood`) and the
method (`accel.methods.neighborhood`) are tested against, plus the host-side tile geometry both share.

Per axis (length L, window K, stride s, dilation d, causal flag), NATTEN's rule
(``csrc/include/natten/cuda/reference/mask.hpp``):

- dilation splits the axis into d interleaved groups (g = i mod d); a query sees only keys of its group, and
  the rule below runs on in-group indices over the group's length L_g = ceil((L - g) / d);
- non-causal: the stride-group leader l = min(floor(i/s)*s + floor(s/2), L_g - 1); the window is
  [clamp(l - floor(K/2), 0, L_g - K), ... + K): shifted inward at borders, never truncated (even K: K/2 keys
  before the leader, K/2 - 1 after);
- causal: l = min(floor(i/s)*s + s - 1, L_g - 1); window [max(l - K + 1, 0), min(i + 1, L_g)).

Multi-dimensional masks are the AND of the per-axis masks; video tokens are (frames, height, width) in raster
order. Text tokens (joint attention) are keys every video query sees in the same softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import resolve_key_parts, text_visibility
from .layout import BlockLayout, BoxMask

Axes = tuple[int, int, int]

__all__ = [
    "TilePlan",
    "axis_mask",
    "axis_window",
    "build_tile_plan",
    "natten_token_mask",
    "reference_neighborhood_attention",
    "tile_major_order",
]


# ---------------------------------------------------------------------------------------- the 1-D rule
def axis_window(length: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = False) -> list[list[int]]:
    """Keys (axis indices, ascending) each query ``i`` of one axis attends to: NATTEN's rule, one query at a time.

    No argument checks beyond what the formula needs (``kernel * dilation <= length``): callers validate.
    """
    windows = []
    for i in range(length):
        g, ii = i % dilation, i // dilation
        group_len = -(-(length - g) // dilation)
        if causal:
            leader = min((ii // stride) * stride + stride - 1, group_len - 1)
            start, end = max(leader - kernel + 1, 0), min(ii + 1, group_len)
        else:
            leader = min((ii // stride) * stride + stride // 2, group_len - 1)
            start = min(max(leader - kernel // 2, 0), group_len - kernel)
            end = start + kernel
        windows.append([g + dilation * m for m in range(start, end)])
    return windows


def axis_mask(length: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = False) -> torch.Tensor:
    """(length, length) bool: query i (row) may attend to key j (column) along one axis."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i, keys in enumerate(axis_window(length, kernel, stride, dilation, causal)):
        mask[i, keys] = True
    return mask


def natten_token_mask(grid: Axes, kernel: Axes, stride: Axes, dilation: Axes, causal: tuple[bool, bool, bool]
                      ) -> torch.Tensor:
    """(V, V) bool token mask of the video tokens in raster order (V = T*H*W): AND of the per-axis masks."""
    masks = [axis_mask(grid[a], kernel[a], stride[a], dilation[a], causal[a]) for a in range(3)]
    full = masks[0][:, None, None, :, None, None] & masks[1][None, :, None, None, :, None] \
        & masks[2][None, None, :, None, None, :]
    v = grid[0] * grid[1] * grid[2]
    return full.reshape(v, v)


# ---------------------------------------------------------------------------------------- tile geometry
def tile_major_order(grid: Axes, tile: Axes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Permutation (raster -> tile-major) of the video tokens: ``perm[i]`` = raster index of position i.

    The grid is cut into (tT, tH, tW) tiles (the last tile of an axis may be partial); tiles follow each other
    in raster order over the tile grid, and tokens inside a tile in raster order. Partial tiles hold fewer
    tokens: nothing is padded.
    """
    starts, _, _ = _tile_table(grid, tile)
    T, H, W = grid
    t = torch.arange(T).view(T, 1, 1).expand(T, H, W)
    h = torch.arange(H).view(1, H, 1).expand(T, H, W)
    w = torch.arange(W).view(1, 1, W).expand(T, H, W)
    nH, nW = -(-H // tile[1]), -(-W // tile[2])
    tid = (t // tile[0]) * nH * nW + (h // tile[1]) * nW + w // tile[2]
    eH = torch.minimum(torch.full_like(h, tile[1]), H - (h // tile[1]) * tile[1])
    eW = torch.minimum(torch.full_like(w, tile[2]), W - (w // tile[2]) * tile[2])
    inner = (t % tile[0]) * eH * eW + (h % tile[1]) * eW + w % tile[2]
    position = (starts[tid] + inner).reshape(-1)
    perm = torch.empty_like(position)
    perm[position] = torch.arange(position.numel())
    return perm.to(device)


def _tile_table(grid: Axes, tile: Axes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start (NT,), count (NT,), table (NT, 8) int32 [start, count, t0, h0, w0, eT, eH, eW]) of the tiles."""
    n = [-(-grid[a] // tile[a]) for a in range(3)]
    origin = [torch.arange(n[a]) * tile[a] for a in range(3)]
    extent = [torch.clamp(grid[a] - origin[a], max=tile[a]) for a in range(3)]
    o = torch.stack(torch.meshgrid(*origin, indexing="ij"), -1).reshape(-1, 3)
    e = torch.stack(torch.meshgrid(*extent, indexing="ij"), -1).reshape(-1, 3)
    count = e.prod(-1)
    start = torch.cumsum(count, 0) - count
    table = torch.cat([start[:, None], count[:, None], o, e], 1).to(torch.int32)
    return start, count, table


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Tile geometry and tile lists of one (grid, window) pair; what the Triton kernel reads.

    Attributes:
        grid, tile: (T, H, W) token grid and tile shape; ``block`` = tokens per kernel tile (power of two >= 16,
            at least the tile's token count; partial and padded rows are masked).
        kernel, stride, dilation, causal: per-axis NATTEN parameters (images: T axis (1, 1, 1, False)).
        tiles: (NT, 8) int32 per tile [start, count, t0, h0, w0, eT, eH, eW] (start in tile-major order).
        offsets, nfull, indices: per query tile, the key tiles it visits (CSR, int32); the first ``nfull[i]``
            need no element mask (every pair in the window, both tiles complete). Each index entry packs the
            tile id (low `INDEX_BITS`; `unpack_index`) and the `NEED_*` flags of the tests that pair needs.
        t_offsets, t_nfull, t_indices: the transpose (per key tile, the query tiles reaching it; backward).
        density: fraction of video x video token pairs inside visited tiles.
        full_blocks: when every tile is complete, the unmasked pairs as a `BlockLayout` of ``block``-token
            blocks, so the block-sparse kernel can run them (`neighborhood_attention`'s split path); else None.
        full_pairs, pairs: unmasked and all visited tile pairs.
        box, all_blocks: without dilation, the window as a per-token `BoxMask` and all visited pairs as a
            `BlockLayout` of tiles: the block-sparse forward kernels (the tuned Hopper ones) then run the
            masked pairs too (partial tiles through their ``tiles`` rows); else None.
    """

    grid: Axes
    tile: Axes
    block: int
    kernel: Axes
    stride: Axes
    dilation: Axes
    causal: tuple[bool, bool, bool]
    tiles: torch.Tensor
    offsets: torch.Tensor
    nfull: torch.Tensor
    indices: torch.Tensor
    t_offsets: torch.Tensor
    t_nfull: torch.Tensor
    t_indices: torch.Tensor
    density: float
    full_blocks: BlockLayout | None = None
    full_pairs: int = 0
    pairs: int = 0
    box: BoxMask | None = None
    all_blocks: BlockLayout | None = None
    complete: bool = False

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def ragged(self) -> bool:
        """Whether some tile holds fewer than ``block`` tokens (then rows are not ``block``-aligned)."""
        return not self.complete

    @property
    def video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def params(self) -> list[int]:
        """The 15 per-axis ints the kernel takes: L, K, s, d, causal for each of T, H, W."""
        out = []
        for a in range(3):
            out += [self.grid[a], self.kernel[a], self.stride[a], self.dilation[a], int(self.causal[a])]
        return out

    def to(self, device: torch.device | str) -> TilePlan:
        names = ("tiles", "offsets", "nfull", "indices", "t_offsets", "t_nfull", "t_indices")
        moved = {n: getattr(self, n).to(device) for n in names}
        full = self.full_blocks.to(device) if self.full_blocks is not None else None
        box = self.box.to(device) if self.box is not None else None
        every = self.all_blocks.to(device) if self.all_blocks is not None else None
        return TilePlan(self.grid, self.tile, self.block, self.kernel, self.stride, self.dilation, self.causal,
                        density=self.density, full_blocks=full, full_pairs=self.full_pairs, pairs=self.pairs,
                        box=box, all_blocks=every, complete=self.complete, **moved)


def _axis_tile_pairs(length: int, tile: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis (n, n) bools: some pair of the two tiles is in the window / every real pair is."""
    n = -(-length // tile)
    pad = n * tile - length
    any_ = torch.nn.functional.pad(mask, (0, pad, 0, pad), value=False).view(n, tile, n, tile).any(3).any(1)
    all_ = torch.nn.functional.pad(mask, (0, pad, 0, pad), value=True).view(n, tile, n, tile).all(3).all(1)
    return any_, all_


INDEX_BITS = 24  # a packed index entry: tile id in the low bits, `NEED_*` mask flags above
INDEX_MASK = (1 << INDEX_BITS) - 1
NEED_T, NEED_H, NEED_W, NEED_TAIL = 1, 2, 4, 8  # which per-axis window tests (and key-tail test) a pair needs


def unpack_index(packed: torch.Tensor) -> torch.Tensor:
    """Tile ids of packed CSR entries (`TilePlan.indices`)."""
    return packed & INDEX_MASK


def _csr(rows: torch.Tensor, cols: torch.Tensor, full: torch.Tensor, n: int,
         flags: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """CSR (offsets, nfull, indices) of (row, col) pairs; per row the unmasked (full) entries first.

    With ``flags``, each index entry carries them above `INDEX_BITS` (col | flags << INDEX_BITS)."""
    key = rows * (2 * n) + (~full).long() * n + cols
    order = torch.argsort(key)
    counts = torch.bincount(rows, minlength=n)
    nfull = torch.bincount(rows[full], minlength=n)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    values = cols if flags is None else cols | (flags.long() << INDEX_BITS)
    return offsets.to(torch.int32), nfull.to(torch.int32), values[order].to(torch.int32)


def build_tile_plan(grid: Axes, tile: Axes, kernel: Axes, stride: Axes, dilation: Axes,
                    causal: tuple[bool, bool, bool], device: torch.device | str = "cpu") -> TilePlan:
    """Which key tiles each query tile visits, at tile granularity (no token x token tensor).

    The mask is a product over axes and tiles are boxes, so a tile pair has a visible pair iff every axis has
    one, and is fully visible iff every axis is. Per-axis (n x n) tile tables are combined per tile pair.
    """
    per_axis = [_axis_tile_pairs(grid[a], tile[a], axis_mask(grid[a], kernel[a], stride[a], dilation[a], causal[a]))
                for a in range(3)]
    _, count, table = _tile_table(grid, tile)
    n = [p[0].shape[0] for p in per_axis]
    block = max(16, 1 << (math.prod(tile) - 1).bit_length())
    complete = count == block
    pairs = []  # per axis: (q tile, k tile, full) of its reachable pairs
    for any_, all_ in per_axis:
        qi, ki = any_.nonzero(as_tuple=True)
        pairs.append((qi, ki, all_[qi, ki]))
    (qa, ka, fa), (qb, kb, fb), (qc, kc, fc) = pairs
    na, nb, nc = len(qa), len(qb), len(qc)
    ia = torch.arange(na).view(na, 1, 1).expand(na, nb, nc).reshape(-1)
    ib = torch.arange(nb).view(1, nb, 1).expand(na, nb, nc).reshape(-1)
    ic = torch.arange(nc).view(1, 1, nc).expand(na, nb, nc).reshape(-1)
    rows = (qa[ia] * n[1] + qb[ib]) * n[2] + qc[ic]
    cols = (ka[ia] * n[1] + kb[ib]) * n[2] + kc[ic]
    full = fa[ia] & fb[ib] & fc[ic] & complete[rows] & complete[cols]
    num_tiles = n[0] * n[1] * n[2]
    if num_tiles > INDEX_MASK:
        raise ValueError(f"neighborhood: {num_tiles} tiles exceed the kernel's {INDEX_MASK} (use a larger tile)")
    # Per pair, the element tests the kernel must make: an axis whose tile pair is wholly inside every query's
    # window on that axis needs no test; a complete key tile needs no tail test.
    need = ((~fa[ia]).long() * NEED_T | (~fb[ib]).long() * NEED_H | (~fc[ic]).long() * NEED_W
            | (~complete[cols]).long() * NEED_TAIL)
    offsets, nfull, indices = _csr(rows, cols, full, num_tiles, need)
    t_offsets, t_nfull, t_indices = _csr(cols, rows, full, num_tiles)
    v = grid[0] * grid[1] * grid[2]
    density = float((count[rows].double() * count[cols].double()).sum()) / float(v * v)
    full_blocks = None
    n_full = int(nfull.sum())
    if bool((count == block).all()) and n_full:
        row_of = torch.repeat_interleave(torch.arange(num_tiles), (offsets[1:] - offsets[:-1]).long())
        is_full = torch.arange(indices.numel()) - offsets[:-1].long()[row_of] < nfull.long()[row_of]
        f_offsets = torch.zeros(1, num_tiles + 1, dtype=torch.int32)
        f_offsets[0, 1:] = torch.cumsum(nfull, 0)
        full_blocks = BlockLayout(f_offsets, unpack_index(indices[is_full])[None].contiguous(), block, block,
                                  num_tiles, num_tiles)
    box = all_blocks = None
    if all(d == 1 for d in dilation):
        box = _window_box(grid, tile, kernel, stride, causal)
        if box is not None:
            all_blocks = BlockLayout(offsets[None].contiguous(), unpack_index(indices)[None].contiguous(), block,
                                     block, num_tiles, num_tiles)
    plan = TilePlan(tuple(grid), tuple(tile), block, tuple(kernel), tuple(stride), tuple(dilation),
                    tuple(bool(c) for c in causal), table, offsets, nfull, indices, t_offsets, t_nfull, t_indices,
                    density, full_blocks, n_full, int(indices.numel()), box, all_blocks,
                    bool((count == block).all()))
    return plan.to(device)


def _window_box(grid: Axes, tile: Axes, kernel: Axes, stride: Axes, causal: tuple[bool, bool, bool]
                ) -> BoxMask | None:
    """The undilated window of every tile-major video token as a `BoxMask` (None: an axis is too long)."""
    perm = tile_major_order(grid, tile)
    T, H, W = grid
    coords = torch.stack([perm // (H * W), (perm // W) % H, perm % W], 1)
    lo, hi = [], []
    for a in range(3):
        windows = axis_window(grid[a], kernel[a], stride[a], 1, causal[a])
        lo.append(torch.tensor([w[0] for w in windows])[coords[:, a]])
        hi.append(torch.tensor([w[-1] for w in windows])[coords[:, a]])
    return BoxMask.from_boxes(torch.stack(lo, 1), torch.stack(hi, 1), coords)


# ---------------------------------------------------------------------------------------- reference attention
def reference_neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Axes,
    kernel: Axes,
    stride: Axes = (1, 1, 1),
    dilation: Axes = (1, 1, 1),
    causal: tuple[bool, bool, bool] = (False, False, False),
    *,
    video_keys: tuple[int, int] | None = None,
    text_keys: tuple[int, int] | None = None,
    text_lengths: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention of the video queries ``q`` (B, V, H, D), raster order, over the joint k/v.

    Video keys (rows ``video_keys`` of k/v, raster order) by the brute-force NATTEN mask, plus every visible
    text key (rows ``text_keys``, visibility from ``text_lengths`` or ``text_mask``). float32 math (float64 for
    float64 inputs); differentiable; small shapes only (builds (B, H, V, V + T)).
    """
    v0, vl, t0, tl = resolve_key_parts(k.shape[1], video_keys, text_keys)
    B, V, H, D = q.shape
    if vl != V or V != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1] * grid[2]} tokens, q has {V}, video keys {vl}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = natten_token_mask(grid, kernel, stride, dilation, causal).to(q.device)[None, None].expand(B, H, V, V)
    keys, values = k[:, v0:v0 + vl], v[:, v0:v0 + vl]
    if tl:
        keys = torch.cat([keys, k[:, t0:t0 + tl]], 1)
        values = torch.cat([values, v[:, t0:t0 + tl]], 1)
        vis = text_visibility(tl, text_lengths, text_mask)
        vis = torch.ones(B, tl, dtype=torch.bool, device=q.device) if vis is None else vis.to(q.device)
        mask = torch.cat([mask, vis[:, None, None, :].expand(B, H, V, tl)], 3)
    qh, kh, vh = (t.to(cdtype).transpose(1, 2) for t in (q, keys, values))
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.matmul(torch.softmax(s, -1), vh).transpose(1, 2).to(q.dtype)
    return (out, lse.to(torch.float64 if cdtype == torch.float64 else torch.float32)) if return_lse else out
