"""Block-sparse attention layouts: for each query block, the sorted list of key blocks it attends to.

Stored as CSR (offsets + indices) so that no (S x S) tensor ever exists: the largest object is the
block list itself. A layout is either shared by all heads (`heads == 1`) or given per head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """CSR block layout.

    Attributes:
        offsets: int32 (L, num_q_blocks + 1); row r of head-group l lists
            ``indices[l, offsets[l, r]:offsets[l, r + 1]]``. L is 1 (shared by all heads) or the head count.
        indices: int32 (L, max_nnz) key-block ids, ascending within each row (padding after a row's end
            is ignored).
        block_m: query tokens per block.
        block_n: key tokens per block.
        num_q_blocks, num_k_blocks: grid size; the kernel requires ceil(Sq / block_m) and ceil(Sk / block_n).
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    block_m: int
    block_n: int
    num_q_blocks: int
    num_k_blocks: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.offsets.dim() != 2 or self.offsets.shape[1] != self.num_q_blocks + 1:
            raise ValueError(
                f"BlockLayout.offsets must have shape (L, num_q_blocks + 1) = (L, {self.num_q_blocks + 1}), "
                f"got {tuple(self.offsets.shape)}"
            )
        if self.indices.dim() != 2 or self.indices.shape[0] != self.offsets.shape[0]:
            raise ValueError(
                f"BlockLayout.indices must have shape (L, max_nnz) with L = {self.offsets.shape[0]}, "
                f"got {tuple(self.indices.shape)}"
            )
        if self.offsets.dtype != torch.int32 or self.indices.dtype != torch.int32:
            raise TypeError(
                f"BlockLayout offsets/indices must be int32, got {self.offsets.dtype}/{self.indices.dtype}"
            )
        if self.block_m < 1 or self.block_n < 1:
            raise ValueError(f"block sizes must be positive, got ({self.block_m}, {self.block_n})")

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_m: int, block_n: int | None = None) -> BlockLayout:
        """Build from a block-level boolean mask of shape (Mq, Nk) or (L, Mq, Nk)."""
        if mask.dtype != torch.bool:
            raise TypeError(f"block mask must be bool, got {mask.dtype}")
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if mask.dim() != 3:
            raise ValueError(f"block mask must be (Mq, Nk) or (L, Mq, Nk), got shape {tuple(mask.shape)}")
        block_n = block_m if block_n is None else block_n
        heads, mq, nk = mask.shape
        counts = mask.sum(-1, dtype=torch.int32)
        offsets = torch.zeros(heads, mq + 1, dtype=torch.int32, device=mask.device)
        offsets[:, 1:] = torch.cumsum(counts, dim=-1, dtype=torch.int32)
        max_nnz = max(int(offsets[:, -1].max().item()) if heads else 0, 1)
        indices = torch.zeros(heads, max_nnz, dtype=torch.int32, device=mask.device)
        head_id, _, col = mask.nonzero(as_tuple=True)  # row-major, so already sorted by (head, row, col)
        if col.numel():
            starts = torch.zeros(heads, dtype=torch.long, device=mask.device)
            starts[1:] = torch.cumsum(offsets[:, -1].long(), 0)[:-1]
            pos = torch.arange(col.numel(), device=mask.device) - starts[head_id]
            indices[head_id, pos] = col.to(torch.int32)
        return cls(offsets, indices, block_m, block_n, mq, nk)

    @classmethod
    def dense(
        cls, q_len: int, k_len: int, block_m: int, block_n: int | None = None,
        device: torch.device | str = "cpu",
    ) -> BlockLayout:
        block_n = block_m if block_n is None else block_n
        mq, nk = _cdiv(q_len, block_m), _cdiv(k_len, block_n)
        return cls.from_mask(torch.ones(mq, nk, dtype=torch.bool, device=device), block_m, block_n)

    # ------------------------------------------------------------------ views
    @property
    def heads(self) -> int:
        """1 for a layout shared across heads, else the number of heads."""
        return self.offsets.shape[0]

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @property
    def nnz(self) -> torch.Tensor:
        """Computed tiles per head group, shape (L,)."""
        return self.offsets[:, -1]

    def density(self) -> float:
        """Fraction of (query block, key block) tiles computed, averaged over heads."""
        total = self.num_q_blocks * self.num_k_blocks * self.heads
        return float(self.offsets[:, -1].sum().item()) / max(total, 1)

    def to_mask(self) -> torch.Tensor:
        """Block-level bool mask (L, num_q_blocks, num_k_blocks). Block granularity only."""
        mask = torch.zeros(
            self.heads, self.num_q_blocks, self.num_k_blocks, dtype=torch.bool, device=self.device)
        pos = torch.arange(self.indices.shape[1], device=self.device).expand(self.heads, -1)
        valid = pos < self.offsets[:, -1:].long()
        row = torch.searchsorted(self.offsets[:, 1:].contiguous(), pos.to(torch.int32), right=True)
        head = torch.arange(self.heads, device=self.device)[:, None].expand_as(pos)
        mask[head[valid], row[valid].long(), self.indices[valid].long()] = True
        return mask

    def to(self, device: torch.device | str) -> BlockLayout:
        device = torch.device(device)
        if device == self.device:
            return self
        key = ("to", str(device))
        if key not in self._cache:
            self._cache[key] = BlockLayout(
                self.offsets.to(device), self.indices.to(device), self.block_m, self.block_n,
                self.num_q_blocks, self.num_k_blocks,
            )
        return self._cache[key]

    def transpose(self) -> BlockLayout:
        """The key-major (CSC) view: for each key block, its query blocks. Used by the backward pass.

        Sort-based and on the layout's device: the largest temporary is (L, max_nnz), never the
        (L, num_q_blocks, num_k_blocks) block mask.
        """
        if "transpose" not in self._cache:
            heads, nq, nk = self.heads, self.num_q_blocks, self.num_k_blocks
            dev = self.device
            max_nnz = self.indices.shape[1]
            pos = torch.arange(max_nnz, device=dev, dtype=torch.int32).expand(heads, -1)
            valid = pos < self.offsets[:, -1:]
            row = torch.searchsorted(self.offsets[:, 1:].contiguous(), pos.contiguous(), right=True).long()
            key = torch.where(valid, self.indices.long() * nq + row, torch.iinfo(torch.long).max)
            key = key.sort(dim=-1).values
            bounds = (torch.arange(nk + 1, device=dev, dtype=torch.long) * nq).expand(heads, -1).contiguous()
            offsets = torch.searchsorted(key, bounds).to(torch.int32)
            indices = torch.where(key == torch.iinfo(torch.long).max, 0, key % max(nq, 1)).to(torch.int32)
            t = BlockLayout(offsets, indices.contiguous(), self.block_n, self.block_m, nk, nq)
            t._cache["transpose"] = self
            self._cache["transpose"] = t
        return self._cache["transpose"]

    def check_shapes(self, q_len: int, k_len: int, heads: int) -> None:
        """Raise ValueError unless this layout fits a (q_len, k_len, heads) attention call."""
        if _cdiv(q_len, self.block_m) != self.num_q_blocks or _cdiv(k_len, self.block_n) != self.num_k_blocks:
            raise ValueError(
                f"layout grid ({self.num_q_blocks} x {self.num_k_blocks} blocks of "
                f"{self.block_m}x{self.block_n}) "
                f"does not fit Sq={q_len}, Sk={k_len}: needs ({_cdiv(q_len, self.block_m)} x "
                f"{_cdiv(k_len, self.block_n)})"
            )
        if self.heads not in (1, heads):
            raise ValueError(f"layout has {self.heads} head groups; expected 1 or {heads}")


# ---------------------------------------------------------------------------------------------- box masks
BOX_FIELD_BITS = 10  # one packed coordinate field per axis: (t << 20) | (h << 10) | w
BOX_MAX_COORD = (1 << (BOX_FIELD_BITS - 1)) - 1  # 511: bit 9 of each field is the SWAR guard bit
BOX_GUARD = (1 << 9) | (1 << 19) | (1 << 29)


def pack_box_coords(coords: torch.Tensor) -> torch.Tensor:
    """(N, 3) ints in [0, 511] -> (N,) int32 packed as (c0 << 20) | (c1 << 10) | c2."""
    c = coords.long()
    return ((c[:, 0] << 20) | (c[:, 1] << 10) | c[:, 2]).to(torch.int32)


@dataclass(frozen=True, eq=False)
class BoxMask:
    """Token-level visibility inside computed tiles: query row r sees key c iff, on each of 3 axes,
    ``lo[r] <= coord[c] <= hi[r]`` (a box per query, e.g. a neighborhood window).

    Stored packed (`pack_box_coords`) so the kernel tests all three axes with two subtractions and one AND
    (a SWAR range test on guarded 10-bit fields, coordinates <= `BOX_MAX_COORD`) instead of six compares.

    Attributes:
        row_lo: (Sq,) int32 packed lower corners.
        row_hi: (Sq,) int32 packed upper corners (inclusive) plus ``2 * BOX_GUARD``.
        key: (Sk,) int32 packed key coordinates plus ``BOX_GUARD``.
    """

    row_lo: torch.Tensor
    row_hi: torch.Tensor
    key: torch.Tensor

    @classmethod
    def from_boxes(cls, lo: torch.Tensor, hi: torch.Tensor, key_coords: torch.Tensor) -> BoxMask | None:
        """From per-query (Sq, 3) inclusive corners and per-key (Sk, 3) coordinates; None when a coordinate
        exceeds `BOX_MAX_COORD` (callers then use a per-token mask instead)."""
        for name, t in (("lo", lo), ("hi", hi), ("key_coords", key_coords)):
            if t.dim() != 2 or t.shape[1] != 3:
                raise ValueError(f"BoxMask.from_boxes: {name} must be (N, 3), got {tuple(t.shape)}")
        if lo.shape != hi.shape:
            raise ValueError(f"BoxMask.from_boxes: lo and hi shapes differ: {tuple(lo.shape)} vs {tuple(hi.shape)}")
        stacked = torch.cat([lo, hi, key_coords])
        if stacked.numel() and (int(stacked.min()) < 0 or int(stacked.max()) > BOX_MAX_COORD):
            return None
        return cls(pack_box_coords(lo), pack_box_coords(hi) + 2 * BOX_GUARD, pack_box_coords(key_coords) + BOX_GUARD)

    def to(self, device: torch.device | str) -> BoxMask:
        return BoxMask(self.row_lo.to(device), self.row_hi.to(device), self.key.to(device))

    def token_mask(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(len(rows), len(cols)) bool for given query rows and key columns (tests, small inputs only)."""
        a = self.key.long()[cols][None, :] - self.row_lo.long()[rows][:, None]
        b = self.row_hi.long()[rows][:, None] - self.key.long()[cols][None, :]
        return (a & b & BOX_GUARD) == BOX_GUARD
