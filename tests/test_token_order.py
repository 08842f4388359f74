"""A method's token order: applied once per forward around the block stack (Wan), or per layer elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import accel
from accel.methods.base import Attended, AttentionMethod
from accel.pipelines.families import adapter_for
from accel.pipelines.tiny import build_tiny

WINDOW = 3


def _perm(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(7))


def _masked(q, k, v, mask):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class WindowInOrder(AttentionMethod):
    """Test method: a 1-D window over the sequence in its own (random) token order."""

    name: ClassVar[str] = "window-in-order"
    registered: ClassVar[bool] = False

    def token_order(self, layout, device):
        return _perm(layout.video_tokens)

    def run(self, q, k, v, layout, plan, call):
        i = torch.arange(q.shape[1])
        mask = (i[:, None] - i[None, :]).abs() <= WINDOW
        return Attended(_masked(q, k, v, mask), float(mask.float().mean()))


@dataclass(frozen=True)
class WindowRaster(AttentionMethod):
    """The same attention written in raster order (no token order): the reference."""

    name: ClassVar[str] = "window-raster"
    registered: ClassVar[bool] = False

    def run(self, q, k, v, layout, plan, call):
        perm = _perm(q.shape[1])
        position = torch.empty_like(perm)
        position[perm] = torch.arange(perm.numel())
        mask = (position[:, None] - position[None, :]).abs() <= WINDOW
        return Attended(_masked(q, k, v, mask), float(mask.float().mean()))


def _forward(method, monkeypatch=None, no_stream: bool = False):
    pipe = build_tiny("tiny-wan")
    tr = pipe.transformer
    if no_stream:
        monkeypatch.setattr(type(adapter_for(tr)), "token_stream", lambda self, t: None,
                            raising=False)
    cfg = tr.config
    torch.manual_seed(3)
    inputs = dict(hidden_states=torch.randn(2, cfg.in_channels, 3, 8, 8), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, 8, cfg.text_dim), return_dict=False)
    handle = accel.patch(tr, method)
    streamed = bool(handle.stream_hooks)
    with torch.no_grad():
        out = tr(**inputs)[0]
    accel.unpatch(tr)
    assert not any(block._forward_pre_hooks for block in tr.blocks)  # unpatch removes the stream hooks
    return out, handle, streamed


@pytest.mark.parametrize("no_stream", [False, True], ids=["once-per-forward", "per-layer"])
def test_token_order_equals_the_raster_reference(monkeypatch, no_stream: bool) -> None:
    ours, handle, streamed = _forward(WindowInOrder(), monkeypatch, no_stream)
    reference, _, _ = _forward(WindowRaster())
    err = float((ours - reference).abs().max())
    print(f"max abs diff {err:.2e}")
    assert err < 1e-5
    assert handle.stats.sparse_calls > 0
    assert streamed == (not no_stream)


def test_a_wrong_token_order_is_refused() -> None:
    @dataclass(frozen=True)
    class Broken(WindowInOrder):
        def token_order(self, layout, device):
            return torch.zeros(layout.video_tokens, dtype=torch.long)

    with pytest.raises(ValueError, match="permutation"):
        _forward(Broken())
