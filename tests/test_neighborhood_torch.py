"""The chunked PyTorch neighborhood path (CPU without the Triton interpreter) vs the brute-force reference."""

from __future__ import annotations

import pytest
import torch

from accel.kernels.neighborhood_reference import build_tile_plan, reference_neighborhood_attention, tile_major_order
from accel.kernels.neighborhood_torch import neighborhood_attention_torch


@pytest.mark.parametrize("grid, tile, kernel, stride, dilation, causal", [
    ((3, 5, 6), (2, 2, 4), (2, 3, 3), (1, 2, 1), (1, 1, 2), (False, False, False)),
    ((4, 4, 4), (2, 2, 2), (3, 3, 3), (1, 1, 1), (1, 1, 1), (True, False, False)),
])
def test_torch_path_matches_the_reference(grid, tile, kernel, stride, dilation, causal) -> None:
    B, H, D, T = 2, 2, 8, 5
    V = grid[0] * grid[1] * grid[2]
    plan = build_tile_plan(grid, tile, kernel, stride, dilation, causal)
    perm = tile_major_order(grid, tile)
    q = torch.randn(B, V, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, V + T, H, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, V + T, H, D, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 5], dtype=torch.int32)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(V)
    k_tm = torch.cat([k[:, :V][:, perm], k[:, V:]], 1)
    v_tm = torch.cat([v[:, :V][:, perm], v[:, V:]], 1)
    ours = neighborhood_attention_torch(q[:, perm], k_tm, v_tm, plan, video_keys=(0, V), text_keys=(V, T),
                                        text_lengths=lengths)[:, inverse]
    ref = reference_neighborhood_attention(q, k, v, grid, kernel, stride, dilation, causal, video_keys=(0, V),
                                           text_keys=(V, T), text_lengths=lengths)
    err = float((ours - ref).detach().abs().max())
    print(f"max abs diff {err:.2e}")
    assert err < 1e-10
    g = torch.randn_like(ref)
    got = torch.autograd.grad((ours * g).sum(), (q, k, v))
    exp = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(got, exp, strict=True):
        assert float((a - b).abs().max()) < 1e-10
