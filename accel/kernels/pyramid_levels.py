"""Pyramid attention's level assignment and per-row level lists as two Triton kernels (one program per row).

The PyTorch rules (`pyramid_reference.threshold_levels` / `topk_levels`, `cap_levels`, the forced diagonal, and
`pyramid.level_lists`) are chains of sorts, scans, compares and scatters: 0.9 + 0.3-0.6 ms of a 7-8 ms pyramid
call at Wan2.1-1.3B 480p on the H200 (`pyramid_stages_b*.json`). Here one program owns one (batch, head, query
block) row of n importance values:

- `assign_levels`: sorts the row's values in descending order (one ``tl.sort`` of fp32 values), takes the
  cumulative share with ``tl.cumsum``, turns the thresholds (or the rank quotas) into rank ends exactly as the
  reference rules do, then marks in block order the blocks among the first e of the reference's stable order
  (above the value at rank e - 1, or equal to it and among the first of the equal ones by block index: a scan),
  applies the optional similarity cap and the forced diagonal, and writes each row's density (sum of 1/p).
  No argsort: sorting packed ``(float bits, ~index)`` int64 keys was 2.4 ms at Wan2.1-14B 720p (591 blocks a
  row, 23,640 rows) on the H200, 1.2 ms with one warp a row (`pyramid_profile_inplace_estimate_stdout.txt`).
- `level_lists`: the row's KV blocks ordered by level (1, 2, 4, 8, then skipped; block order kept inside a
  level) by a scan per level (a block's slot: its level's start plus the blocks of that level before it; a sort
  of ``rank * NP + index`` keys was 1.1 ms at Wan2.1-14B 720p's 591 blocks a row), and the cumulative ends.

Integer outputs; the thresholds compare fp32 cumulative shares like the reference, so a share that lands within
rounding of a threshold can end a level one block apart from the PyTorch rule (the scan's summation order).
"""

# No `from __future__ import annotations`: kept like the other kernel modules.
import torch
import triton
import triton.language as tl
from torch import Tensor

from .pyramid_reference import LEVELS

__all__ = ["assign_levels", "level_lists"]

_MODES = ("threshold", "topk")


@triton.jit
def _level_of_rank(r, e1, e2, e4, e8):
    return tl.where(r < e1, 1, tl.where(r < e2, 2, tl.where(r < e4, 4, tl.where(r < e8, 8, 0))))


@triton.jit
def _threshold_end(ratio, valid, tau, last, n):
    """The reference's thresholdbound end for one level per row: the block that crosses tau is included."""
    under = tl.sum((valid & (ratio <= tau)).to(tl.int32), 1)
    end = tl.where(under > 0, under + 1, last)
    return tl.maximum(tl.minimum(end, n), last)


@triton.jit
def _top(v, sv, e, valid, offs):
    """Per row, which blocks (in block order) are among the ``e`` first of the stable descending order: above
    the value at rank e - 1, or equal to it and early enough among the equal ones (block order breaks ties)."""
    ve = tl.sum(tl.where(offs == e[:, None] - 1, sv, 0.0), 1)[:, None]  # the value at rank e - 1
    gt = valid & (v > ve)
    eq = valid & (v == ve)
    need = e[:, None] - tl.sum(gt.to(tl.int32), 1)[:, None]
    return (gt | (eq & (tl.cumsum(eq.to(tl.int32), 1) <= need))) & (e[:, None] > 0)


@triton.jit
def _assign_kernel(Imp, Cap, Levels, RowDensity, n, rows, min_full, t1, t2, t4, t8, q1, q2, q4, q8,
                   NP: tl.constexpr, ROWS: tl.constexpr, THRESHOLD: tl.constexpr, HAS_CAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # (b * H + h) * n + i
    row_ok = row < rows
    i = (row % n)[:, None]
    bh = (row // n)[:, None]
    offs = tl.arange(0, NP)[None, :]
    valid = (offs < n) & row_ok[:, None]
    v = tl.load(Imp + row[:, None] * n + offs, mask=valid, other=-1.0)  # importance >= 0: padding sorts last
    sv = tl.sort(v, dim=1, descending=True)  # ranks past n hold the padding
    if THRESHOLD:
        cum = tl.cumsum(tl.where(valid, sv, 0.0), 1)
        total = tl.max(tl.where(valid, cum, 0.0), 1)[:, None]
        ratio = cum / tl.maximum(total, 1.1754943508222875e-38)
        e1 = tl.maximum(_threshold_end(ratio, valid, t1, 0, n), min_full)
        e2 = _threshold_end(ratio, valid, t2, e1, n)
        e4 = _threshold_end(ratio, valid, t4, e2, n)
        e8 = _threshold_end(ratio, valid, t8, e4, n)
    else:
        zero = tl.zeros([ROWS], tl.int32)
        e1, e2, e4, e8 = zero + q1, zero + q2, zero + q4, zero + q8
    lvl = tl.where(_top(v, sv, e1, valid, offs), 1, tl.where(_top(v, sv, e2, valid, offs), 2, tl.where(
        _top(v, sv, e4, valid, offs), 4, tl.where(_top(v, sv, e8, valid, offs), 8, 0))))
    if HAS_CAP:
        cap = tl.load(Cap + bh * n + offs, mask=valid, other=1)
        lvl = tl.where(lvl > 0, tl.minimum(lvl, cap), lvl)
    lvl = tl.where(offs == i, 1, lvl)
    tl.store(Levels + row[:, None] * n + offs, lvl, mask=valid)
    share = tl.where(valid & (lvl > 0), 1.0 / tl.maximum(lvl, 1).to(tl.float32), 0.0)
    tl.store(RowDensity + row, tl.sum(share, 1), mask=row_ok)


@triton.jit
def _lists_kernel(Levels, Idx, Ends, n, rows, NP: tl.constexpr, ROWS: tl.constexpr):
    """Each row's blocks grouped by level in block order: a block's slot is its level's start plus the number
    of blocks of its level before it (a scan per level, no sort)."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = row < rows
    offs = tl.arange(0, NP)[None, :]
    valid = (offs < n) & row_ok[:, None]
    lv = tl.load(Levels + row[:, None] * n + offs, mask=valid, other=0)
    m1 = valid & (lv == 1)
    m2 = valid & (lv == 2)
    m4 = valid & (lv == 4)
    m8 = valid & (lv == 8)
    c1 = tl.cumsum(m1.to(tl.int32), 1)
    c2 = tl.cumsum(m2.to(tl.int32), 1)
    c4 = tl.cumsum(m4.to(tl.int32), 1)
    c8 = tl.cumsum(m8.to(tl.int32), 1)
    c0 = tl.cumsum((valid & (lv != 1) & (lv != 2) & (lv != 4) & (lv != 8)).to(tl.int32), 1)
    e1 = tl.sum(m1.to(tl.int32), 1)[:, None]
    e2 = e1 + tl.sum(m2.to(tl.int32), 1)[:, None]
    e4 = e2 + tl.sum(m4.to(tl.int32), 1)[:, None]
    e8 = e4 + tl.sum(m8.to(tl.int32), 1)[:, None]
    slot = tl.where(m1, c1, tl.where(m2, e1 + c2, tl.where(m4, e2 + c4, tl.where(m8, e4 + c8, e8 + c0)))) - 1
    tl.store(Idx + row[:, None] * n + slot, offs + tl.zeros_like(slot), mask=valid)
    ends = row[:, None] * 4 + tl.arange(0, 4)[None, :]
    k4 = tl.arange(0, 4)[None, :]
    tl.store(Ends + ends, tl.where(k4 == 0, e1, tl.where(k4 == 1, e2, tl.where(k4 == 2, e4, e8))),
             mask=row_ok[:, None])


# (row width up to which it holds, rows per program, warps), by padded row width NP: the H200 probe's best
# (`pyramid_profile_*_levels.json` ``level_configs``): assignment one warp a row at both widths (Wan2.1-1.3B 480p:
# 0.019 ms, 14B 720p: 0.80; 2-8 rows or 2-8 warps up to 4.8x slower), lists one warp a row at 256 lanes (0.008
# ms) and four at 1024 (0.23 ms; one warp 0.36)
_ASSIGN_LAUNCH = ((1 << 30, 1, 1),)
_LISTS_LAUNCH = ((256, 1, 1), (1 << 30, 1, 4))


def _launch_rows(npad: int, rows: int | None, num_warps: int | None,
                 table: tuple[tuple[int, int, int], ...]) -> tuple[int, int]:
    """(rows per program, warps) for rows of ``npad`` lanes: the first ``table`` entry that holds them."""
    if rows is not None and (rows < 1 or rows & (rows - 1)):
        raise ValueError(f"rows must be a power of two, got {rows}")
    _, default_rows, default_warps = next(entry for entry in table if npad <= entry[0])
    return rows or default_rows, num_warps or default_warps


def _rows(x: Tensor, name: str) -> tuple[Tensor, int, int]:
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} must be (B, H, n, n), got {tuple(x.shape)}")
    n = x.shape[-1]
    return x.contiguous(), n, max(16, triton.next_power_of_2(n))


def assign_levels(importance: Tensor, mode: str, thresholds: tuple[float, float, float, float],
                  min_full_ratio: float = 0.06, cap: Tensor | None = None, *, with_density: bool = False,
                  rows: int | None = None, num_warps: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """(B, H, n, n) int32 levels: ``threshold_levels`` (mode "threshold") or ``topk_levels`` ("topk"), then
    ``cap_levels`` with ``cap`` (B, H, n) if given, then the diagonal forced to level 1; one launch.

    ``with_density``: also return `level_density` of the levels (0-dim float32, from per-row sums the kernel
    writes: one pass over n floats instead of five over the n x n map). ``rows`` (a power of two: rows per
    program) and ``num_warps`` override the launch (probes)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if len(thresholds) != len(LEVELS):
        raise ValueError(f"thresholds must hold {len(LEVELS)} values, got {len(thresholds)}")
    imp, n, npad = _rows(importance.float(), "importance")
    B, H = imp.shape[:2]
    if cap is not None and tuple(cap.shape) != (B, H, n):
        raise ValueError(f"cap must be (B, H, n) = {(B, H, n)}, got {tuple(cap.shape)}")
    quotas, last = [], 0
    for qt in thresholds:  # topk_levels' rank ends (host constants: n and the quotas are known here)
        last = max(last, min(n, int(n * qt)))
        quotas.append(last)
    levels = torch.empty(imp.shape, dtype=torch.int32, device=imp.device)
    capt = cap.to(torch.int32).contiguous() if cap is not None else levels
    taus = [float(t) + 1e-6 for t in thresholds]
    total = B * H * n
    row_density = torch.empty(total, dtype=torch.float32, device=imp.device)
    rows, num_warps = _launch_rows(npad, rows, num_warps, _ASSIGN_LAUNCH)
    _assign_kernel[(triton.cdiv(total, rows),)](
        imp, capt, levels, row_density, n, total, min(n, int(n * min_full_ratio) + 1), *taus, *quotas, NP=npad,
        ROWS=rows, THRESHOLD=mode == "threshold", HAS_CAP=cap is not None, num_warps=num_warps)
    if with_density:
        return levels, row_density.mean() / n
    return levels


def level_lists(levels: Tensor, *, rows: int | None = None, num_warps: int | None = None
                ) -> tuple[Tensor, Tensor]:
    """`accel.kernels.pyramid.level_lists` in one launch: ``(indices (B, H, n, n) int32, ends (B, H, n, 4))``.

    ``rows`` (a power of two: rows per program) and ``num_warps`` override the launch (probes)."""
    lv, n, npad = _rows(levels.to(torch.int32), "levels")
    idx = torch.empty(lv.shape, dtype=torch.int32, device=lv.device)
    ends = torch.empty(*lv.shape[:3], 4, dtype=torch.int32, device=lv.device)
    total = lv.shape[0] * lv.shape[1] * n
    rows, num_warps = _launch_rows(npad, rows, num_warps, _LISTS_LAUNCH)
    _lists_kernel[(triton.cdiv(total, rows),)](lv, idx, ends, n, total, NP=npad, ROWS=rows, num_warps=num_warps)
    return idx, ends
