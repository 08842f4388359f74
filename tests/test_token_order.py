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


def _window(q, k, v, layout, position):
    """Attention where video tokens see video tokens within WINDOW of their ``position`` (their place in the
    test order) and every text token, and text tokens see everything."""
    S, vs = q.shape[1], layout.video_slice
    mask = torch.ones(S, S, dtype=torch.bool)
    mask[vs, vs] = (position[:, None] - position[None, :]).abs() <= WINDOW
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return Attended(out.transpose(1, 2), float(mask.float().mean()))


@dataclass(frozen=True)
class WindowInOrder(AttentionMethod):
    """Test method: a 1-D window over the video tokens in its own (random) token order."""

    name: ClassVar[str] = "window-in-order"
    registered: ClassVar[bool] = False

    def token_order(self, layout, device):
        return _perm(layout.video_tokens)

    def run(self, q, k, v, layout, plan, call):
        return _window(q, k, v, layout, torch.arange(layout.video_tokens))


@dataclass(frozen=True)
class WindowRaster(AttentionMethod):
    """The same attention written in raster order (no token order): the reference."""

    name: ClassVar[str] = "window-raster"
    registered: ClassVar[bool] = False

    def run(self, q, k, v, layout, plan, call):
        perm = _perm(layout.video_tokens)
        position = torch.empty_like(perm)
        position[perm] = torch.arange(perm.numel())
        return _window(q, k, v, layout, position)


def _inputs(family: str, pipe) -> dict:
    tr = pipe.transformer
    cfg = tr.config
    torch.manual_seed(3)
    if family == "tiny-cogvideox":  # (B, F, C, H, W); the pipeline makes the (S, D) rotary tables
        frames, h, w = 2, 8, 8
        s = pipe.vae_scale_factor_spatial
        tables = pipe._prepare_rotary_positional_embeddings(h * s, w * s, frames, torch.device("cpu"))
        return dict(hidden_states=torch.randn(2, frames, cfg.in_channels, h, w), timestep=torch.tensor([500, 500]),
                    encoder_hidden_states=torch.randn(2, 6, cfg.text_embed_dim), image_rotary_emb=tables,
                    return_dict=False)
    if family.startswith("tiny-ltx"):  # patchified (B, S, C); "-per-token": a timestep per token (I2V's)
        frames, h, w = 3, 8, 8
        timestep = (torch.randint(0, 1000, (2, frames * h * w)).float() if family.endswith("per-token")
                    else torch.tensor([500.0, 500.0]))
        return dict(hidden_states=torch.randn(2, frames * h * w, cfg.in_channels),
                    encoder_hidden_states=torch.randn(2, 6, cfg.caption_channels), timestep=timestep,
                    encoder_attention_mask=torch.ones(2, 6), num_frames=frames, height=h, width=w,
                    rope_interpolation_scale=(1.0, 1.0, 1.0), return_dict=False)
    if family == "tiny-wan":
        return dict(hidden_states=torch.randn(2, cfg.in_channels, 3, 8, 8), timestep=torch.tensor([500, 500]),
                    encoder_hidden_states=torch.randn(2, 8, cfg.text_dim), return_dict=False)
    return dict(hidden_states=torch.randn(2, cfg.in_channels, 3, 8, 8), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 6, cfg.text_embed_dim),
                encoder_attention_mask=torch.ones(2, 6, dtype=torch.bool),
                pooled_projections=torch.randn(2, cfg.pooled_projection_dim), guidance=torch.tensor([1000.0] * 2),
                return_dict=False)


def _forward(method, monkeypatch=None, no_stream: bool = False, family: str = "tiny-wan"):
    pipe = build_tiny(family.removesuffix("-per-token"))
    tr = pipe.transformer
    if no_stream:
        monkeypatch.setattr(type(adapter_for(tr)), "token_stream", lambda self, t: None,
                            raising=False)
    inputs = _inputs(family, pipe)
    handle = accel.patch(tr, method)
    streamed = bool(handle.stream_hooks)
    with torch.no_grad():
        out = tr(**inputs)[0]
    accel.unpatch(tr)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tr.modules())  # unpatch removes the stream
    return out, handle, streamed


@pytest.mark.parametrize("family", ["tiny-wan", "tiny-hunyuan-video", "tiny-cogvideox", "tiny-ltx",
                                    "tiny-ltx-per-token"])
@pytest.mark.parametrize("no_stream", [False, True], ids=["once-per-forward", "per-layer"])
def test_token_order_equals_the_raster_reference(monkeypatch, no_stream: bool, family: str) -> None:
    ours, handle, streamed = _forward(WindowInOrder(), monkeypatch, no_stream, family)
    reference, _, _ = _forward(WindowRaster(), family=family)
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


def _tiny_vace(vace_layers: list[int]):
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64, vace_layers=vace_layers, vace_in_channels=8).eval()


def _vace_forward(method, vace_layers: list[int]):
    tr = _tiny_vace(vace_layers)
    torch.manual_seed(3)
    inputs = dict(hidden_states=torch.randn(2, 16, 3, 8, 8), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, 8, 32), control_hidden_states=torch.randn(2, 8, 3, 8, 8),
                  control_hidden_states_scale=torch.tensor([0.7, 1.3]), return_dict=False)
    handle = accel.patch(tr, method)
    streamed = bool(handle.stream_hooks)
    with torch.no_grad():
        out = tr(**inputs)[0]
    accel.unpatch(tr)
    return out, handle, streamed


@pytest.mark.parametrize("vace_layers", [[0, 1], [0, 2]], ids=["stream", "hint-after-last-block"])
def test_wan_vace_token_order_equals_the_raster_reference(vace_layers: list[int]) -> None:
    """Wan VACE: the hint blocks and the main blocks form one stream (hints come out in the method's order and
    are added there); with a hint after the last main block the model reorders per layer instead."""
    ours, handle, streamed = _vace_forward(WindowInOrder(), vace_layers)
    reference, _, _ = _vace_forward(WindowRaster(), vace_layers)
    assert float((ours - reference).abs().max()) < 1e-5
    assert handle.stats.sparse_calls > 0
    assert streamed == (vace_layers == [0, 1])


def test_permute_named_inputs_keeps_every_argument() -> None:
    """Positional arguments past the named ones pass through; per-token inputs are permuted along their token dim
    only when they have S there and enough dims."""
    from accel.pipelines.context import permute_named_inputs

    perm = torch.tensor([2, 0, 1])
    hidden, table, temb, extra = torch.randn(1, 3, 4), torch.randn(3, 5), torch.randn(1, 6, 4), object()
    args, kwargs = permute_named_inputs((hidden, (table, table), temb, extra), {"flag": 1},
                                        lambda t, d: t.index_select(d, perm), True,
                                        names=("hidden_states", "tables", "temb"),
                                        per_token={"tables": (0, 2), "temb": (1, 4)})
    assert len(args) == 4 and args[3] is extra and kwargs == {"flag": 1}
    assert torch.equal(args[0], hidden[:, perm]) and torch.equal(args[1][0], table[perm])
    assert args[2] is temb  # (B, 6, C): not per-token
