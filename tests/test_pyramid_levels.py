"""The one-launch Triton level assignment and level lists of pyramid attention against the PyTorch rules
(`threshold_levels`, `topk_levels`, `cap_levels`, the forced diagonal, `level_lists`), under the interpreter."""

from __future__ import annotations

import pytest
import torch

from accel.kernels.pyramid import level_lists as torch_level_lists
from accel.kernels.pyramid_levels import assign_levels, level_lists
from accel.kernels.pyramid_reference import LEVELS, cap_levels, level_density, threshold_levels, topk_levels

THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
QUOTAS = (0.09, 0.14, 0.22, 0.30)


def _importance(B: int, H: int, n: int, seed: int = 0, ties: bool = False) -> torch.Tensor:
    """Rows that sum to 1 like the estimate's; ``ties``: values on a coarse grid, so many rows hold equal values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, H, n, n, generator=g) ** 4
    if ties:
        x = (x * 4).round() + 1e-3 * (torch.rand(B, H, n, n, generator=g) < 0.05)
    return x / x.sum(-1, keepdim=True)


def _want(imp: torch.Tensor, mode: str, thresholds, min_full_ratio: float = 0.06, cap=None) -> torch.Tensor:
    levels = (threshold_levels(imp, thresholds, min_full_ratio) if mode == "threshold"
              else topk_levels(imp, thresholds))
    if cap is not None:
        levels = cap_levels(levels, cap)
    diag = torch.eye(imp.shape[-1], dtype=torch.bool)
    return torch.where(diag, 1, levels).to(torch.int32)


@pytest.mark.parametrize("mode,thresholds", [("threshold", THRESHOLDS), ("threshold", (0.2, 0.2, 0.5, 0.9)),
                                             ("topk", QUOTAS), ("topk", (0.25, 0.4, 0.55, 0.75))])
@pytest.mark.parametrize("B,H,n,ties", [(1, 1, 16, False), (2, 2, 13, False), (1, 1, 24, True), (1, 1, 1, False)])
def test_assign_levels_matches_the_pytorch_rules(mode, thresholds, B, H, n, ties) -> None:
    imp = _importance(B, H, n, seed=n, ties=ties)
    got = assign_levels(imp, mode, thresholds)
    assert got.dtype == torch.int32 and got.shape == (B, H, n, n)
    assert torch.equal(got, _want(imp, mode, thresholds))


def test_min_full_ratio_and_the_similarity_cap() -> None:
    imp = _importance(2, 2, 24, seed=4)
    cap = torch.tensor(LEVELS, dtype=torch.int32)[torch.randint(0, 4, (2, 2, 24), generator=torch.Generator()
                                                               .manual_seed(1))]
    for mfr in (0.0, 0.06, 0.3):
        assert torch.equal(assign_levels(imp, "threshold", THRESHOLDS, mfr, cap),
                           _want(imp, "threshold", THRESHOLDS, mfr, cap))
    assert torch.equal(assign_levels(imp, "topk", QUOTAS, cap=cap), _want(imp, "topk", QUOTAS, cap=cap))


def test_zero_rows_and_a_one_hot_row() -> None:
    imp = torch.zeros(1, 1, 8, 8)
    imp[0, 0, 3, 5] = 1.0
    assert torch.equal(assign_levels(imp, "threshold", THRESHOLDS), _want(imp, "threshold", THRESHOLDS))


@pytest.mark.parametrize("B,H,n", [(1, 1, 16), (2, 2, 9), (1, 1, 20)])
def test_level_lists_match(B, H, n) -> None:
    levels = assign_levels(_importance(B, H, n, seed=2), "topk", (0.1, 0.3, 0.5, 0.7))
    for lv in (levels, levels.transpose(-1, -2)):  # the backward lists the transposed map
        idx, ends = level_lists(lv)
        want_idx, want_ends = torch_level_lists(lv)
        assert torch.equal(idx, want_idx) and torch.equal(ends, want_ends)
        assert idx.dtype == ends.dtype == torch.int32


def test_bad_input_is_named() -> None:
    imp = _importance(1, 1, 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        assign_levels(imp, "binary", THRESHOLDS)
    with pytest.raises(ValueError, match="thresholds must hold 4"):
        assign_levels(imp, "topk", (0.1, 0.2))
    with pytest.raises(ValueError, match=r"importance must be \(B, H, n, n\)"):
        assign_levels(imp[0], "topk", QUOTAS)
    with pytest.raises(ValueError, match=r"cap must be \(B, H, n\)"):
        assign_levels(imp, "topk", QUOTAS, cap=torch.ones(1, 1, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows must be a power of two"):
        assign_levels(imp, "topk", QUOTAS, rows=3)
    with pytest.raises(ValueError, match="rows must be a power of two"):
        level_lists(assign_levels(imp, "topk", QUOTAS), rows=6)


@pytest.mark.parametrize("rows,num_warps", [(4, 1), (8, 4)])
def test_several_rows_per_program_give_the_same_levels_and_lists(rows, num_warps) -> None:
    """Multi-row launches (a last program with fewer rows than it holds: 2 x 3 x 13 = 78 rows) match."""
    imp = _importance(2, 3, 13, seed=7, ties=True)
    for mode, thresholds in (("threshold", THRESHOLDS), ("topk", QUOTAS)):
        got = assign_levels(imp, mode, thresholds, rows=rows, num_warps=num_warps)
        assert torch.equal(got, _want(imp, mode, thresholds))
        idx, ends = level_lists(got, rows=rows, num_warps=num_warps)
        want_idx, want_ends = torch_level_lists(got)
        assert torch.equal(idx, want_idx.to(torch.int32)) and torch.equal(ends, want_ends.to(torch.int32))


def test_the_density_from_the_kernel_is_level_density() -> None:
    imp = _importance(2, 2, 21, seed=8)
    for mode, thresholds in (("threshold", THRESHOLDS), ("topk", QUOTAS)):
        levels, density = assign_levels(imp, mode, thresholds, with_density=True)
        assert torch.equal(levels, assign_levels(imp, mode, thresholds)) and density.dim() == 0
        torch.testing.assert_close(density, level_density(levels))
