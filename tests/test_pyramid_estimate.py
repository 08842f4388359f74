"""The fused Triton block-importance estimate of pyramid attention against the PyTorch estimate (same formula,
same sampled tokens), under the interpreter on CPU; and the method's switch between the two."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import accel.methods.pyramid as pyramid_method
from accel.geometry import TokenLayout
from accel.kernels.pyramid_estimate import estimate_block_importance_triton
from accel.kernels.pyramid_reference import estimate_block_importance, sample_positions
from accel.methods.base import AttentionCall
from accel.methods.pyramid import Pyramid


def _qk(B: int, V: int, H: int, D: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, V, H, D, generator=g).to(dtype) for _ in range(2))


@pytest.mark.parametrize(
    "B,V,H,D,block,samples",
    [
        (1, 64, 1, 16, 16, (None, None)),  # whole blocks, b/4 = 4 samples (padded to a 16-row dot)
        (2, 70, 2, 8, 16, (None, None)),  # partial last block (6 tokens), batch 2
        (1, 100, 1, 24, 32, (None, None)),  # head dim 24 (padded to 32), partial block
        (1, 300, 2, 64, 64, (None, None)),  # 5 blocks of 64, 16 samples
        (1, 96, 1, 16, 16, (16, 16)),  # every token sampled
        (1, 80, 1, 16, 16, (3, 5)),  # sample counts that are not powers of two
    ],
)
def test_matches_the_pytorch_estimate(B, V, H, D, block, samples) -> None:
    q, k = _qk(B, V, H, D)
    sq, sk = samples
    want = estimate_block_importance(q, k, block, seed=5, sample_q=sq, sample_k=sk)
    got = estimate_block_importance_triton(q, k, block, seed=5, sample_q=sq, sample_k=sk)
    assert got.shape == want.shape == (B, H, -(-V // block), -(-V // block)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(B, H, got.shape[-1]))


@pytest.mark.parametrize("blocks_per_dot", [1, 2, 8])
def test_blocks_per_dot_does_not_change_the_estimate(blocks_per_dot: int) -> None:
    q, k = _qk(1, 150, 2, 16, seed=4)
    want = estimate_block_importance_triton(q, k, 16, seed=1)
    got = estimate_block_importance_triton(q, k, 16, seed=1, blocks_per_dot=blocks_per_dot)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rows,programs_per_sm", [(None, None), (16, 1), (32, 4)])
def test_strided_inputs_and_programs_that_take_several_items(rows, programs_per_sm) -> None:
    """q and k read in place from a joint (B, S, H, D) buffer's video rows; 3 programs (the interpreter's grid)
    over 6-30 items, so every slot is reused; a partial last block (300 = 18 x 16 + 12)."""
    g = torch.Generator().manual_seed(6)
    joint_q, joint_k = (torch.randn(2, 307, 3, 16, generator=g) for _ in range(2))
    q, k = joint_q[:, 7:], joint_k[:, 7:]
    want = estimate_block_importance(q.contiguous(), k.contiguous(), 16, seed=3)
    got = estimate_block_importance_triton(q, k, 16, seed=3, rows=rows, programs_per_sm=programs_per_sm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_half_inputs_and_an_explicit_scale() -> None:
    q, k = _qk(1, 48, 2, 16, torch.float16, seed=1)
    want = estimate_block_importance(q, k, 16, seed=2, scale=0.5)
    got = estimate_block_importance_triton(q, k, 16, seed=2, scale=0.5)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_both_estimates_read_the_same_sampled_tokens() -> None:
    idx_q, idx_k = sample_positions((2, 70, 3, 8), 16, seed=9)
    assert idx_q.shape == idx_k.shape == (2, 3, 5, 4)
    assert int(idx_q.max()) < 70 and int(idx_k.max()) < 70  # the partial block wraps inside itself
    assert torch.equal(idx_q, sample_positions((2, 70, 3, 8), 16, seed=9)[0])
    assert (idx_q[..., -1, :] >= 64).all()  # the last block's samples are its own tokens


def test_bad_input_is_named() -> None:
    q, k = _qk(1, 32, 1, 16)
    with pytest.raises(ValueError, match="same .B, V, H, D. shape"):
        estimate_block_importance_triton(q, k[:, :16], 16)
    with pytest.raises(ValueError, match="dtype"):
        estimate_block_importance_triton(q.double(), k.double(), 16)
    with pytest.raises(ValueError, match="blocks_per_dot must be a power of two"):
        estimate_block_importance_triton(q, k, 16, blocks_per_dot=3)
    with pytest.raises(ValueError, match="rows must be a power of two"):
        estimate_block_importance_triton(q, k, 16, rows=48)


def test_the_method_uses_the_fused_estimate_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = TokenLayout(1, 2, 4, 6, text_tokens=3, text_position="after")  # 48 video tokens
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, layout.total_tokens, 2, 16, generator=g) for _ in range(2))
    method = Pyramid(block_size=16, t1=0.4)
    call = dataclasses.replace(AttentionCall(), seed=4)
    torch_levels = method.plan_call(q, k, layout, call)
    calls = []
    real = estimate_block_importance_triton

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(pyramid_method, "ESTIMATE_KERNEL", "triton")
    monkeypatch.setattr("accel.kernels.pyramid_estimate.estimate_block_importance_triton", spy)
    assert torch.equal(method.plan_call(q, k, layout, call), torch_levels)
    assert calls == [16]
