"""The one-launch Triton pooling of pyramid attention's K/V levels against `pool_levels` (the PyTorch form), under
the interpreter on CPU: every block size, partial last blocks, strided (joint-buffer) inputs, fp16."""

from __future__ import annotations

import pytest
import torch

from accel.kernels.pyramid import pooled_buffer
from accel.kernels.pyramid_pool import pool_kv_levels


def _kv(B: int, V: int, H: int, D: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, V, H, D, generator=g).to(dtype) for _ in range(2))


@pytest.mark.parametrize(
    "B,V,H,D,block",
    [
        (1, 64, 1, 16, 16),  # whole blocks, 16-token chunks (2 rows at level 8)
        (2, 70, 2, 8, 16),  # partial last block: groups of 6 real tokens, rows past the end zero
        (1, 100, 1, 24, 32),  # head dim 24 (padded to 32), partial block
        (1, 300, 2, 64, 64),  # 5 blocks of 64
        (1, 200, 1, 32, 128),  # chunks of 32 inside blocks of 128, partial block
        (1, 3, 1, 16, 16),  # fewer tokens than a group of 8
    ],
)
def test_matches_pool_levels(B, V, H, D, block) -> None:
    k, v = _kv(B, V, H, D)
    kp, vp, r4, r8 = pool_kv_levels(k, v, block)
    want_k, want_r4, want_r8 = pooled_buffer(k, block)
    want_v, _, _ = pooled_buffer(v, block)
    assert (r4, r8) == (want_r4, want_r8) and kp.shape == want_k.shape and kp.dtype == k.dtype
    # the same fp32 additions in the same order, then one division: equal to rounding of the division only
    torch.testing.assert_close(kp, want_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vp, want_v, rtol=1e-6, atol=1e-6)
    if -(-V // 2) < r4:  # level-2 groups past the last token are zero
        assert kp[:, -(-V // 2):r4].abs().max() == 0


@pytest.mark.parametrize("chunk,warps", [(16, 1), (64, 4)])
def test_launch_knobs_do_not_change_the_values(chunk: int, warps: int) -> None:
    k, v = _kv(1, 150, 2, 16, seed=2)
    want = pool_kv_levels(k, v, 64)
    got = pool_kv_levels(k, v, 64, chunk=chunk, num_warps=warps)
    assert got[2:] == want[2:] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_strided_joint_buffer_and_half() -> None:
    """Video rows sliced from a joint (text + video) buffer, as `pyramid_fwd` passes them, in fp16."""
    k, v = _kv(2, 90, 3, 16, torch.float16, seed=3)
    text = torch.zeros(2, 7, 3, 16, dtype=torch.float16)
    jk, jv = torch.cat([text, k], 1), torch.cat([text, v], 1)
    kp, vp, _, _ = pool_kv_levels(jk[:, 7:], jv[:, 7:], 32)
    torch.testing.assert_close(kp, pooled_buffer(k, 32)[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(vp, pooled_buffer(v, 32)[0], rtol=1e-3, atol=1e-3)


def test_bad_input_is_named() -> None:
    k, v = _kv(1, 32, 1, 16)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        pool_kv_levels(k, v[:, :16], 16)
    with pytest.raises(ValueError, match="block must be a multiple of 16"):
        pool_kv_levels(k, v, 24)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        pool_kv_levels(k, v, 32, chunk=24)
