"""Radial Attention: a static O(n log n) spatiotemporal block mask for video DiTs.

Li, Li, Cai, Xi, Yang, Lin, Zhang, Yang, Hu, Peng, Agrawala, Stoica, Keutzer, Han, "Radial Attention:
O(n log n) Sparse Attention with Energy Decay for Long Video Generation", arXiv 2506.19852 (NeurIPS
2025); reference code mit-han-lab/radial-attention. The mask rule and its differences from the
reference are in `accel.methods.radial_mask`.

Video queries run one block-sparse kernel call over the video keys (the radial layout) with the text
keys as always-visible extra keys in the same softmax; text queries attend densely to every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from accel.geometry import TokenLayout
from accel.methods.base import (
    Attended,
    AttentionCall,
    AttentionMethod,
    check_qkv,
    kernel_shape_error,
    render_mask_image,
    split_joint,
)
from accel.methods.dense import sdpa_bshd
from accel.methods.radial_mask import radial_block_layout
from accel.options import check_options, option

if TYPE_CHECKING:
    import numpy as np

    from accel.kernels.layout import BlockLayout

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True, eq=False)
class RadialPlan:
    """What `Radial.attend` needs for one geometry; shared by every head and batch element.

    Attributes:
        block_layout: video x video `BlockLayout` (heads == 1) in video-token order.
        block_size: tokens per query and key block.
        density: fraction of video x video tiles computed.
        grid: (frames, height, width) of the video tokens (text, if any, is handled densely).
    """

    block_layout: BlockLayout
    block_size: int
    density: float
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class Radial(AttentionMethod):
    """Radial Attention (arXiv 2506.19852): static, input-independent block-sparse self-attention.

    Query token (frame i, raster index p) sees key token (frame j, raster index q) when j == 0 and
    ``sink``; or d = |i - j| <= 1 (d == 0 only with ``decay_near``); or the pair survives temporal
    thinning and lies within the spatial window w(d) = max(block_size, decay * P / 2^bit_length(d)),
    P = 2^bit_length(tokens per frame). Tiles are kept by the reference's 60 % / one-third rule.
    Text tokens (joint attention) are dense both ways.

    Attributes:
        decay: window decay factor (> 0). Reference default 1.0; shipped presets use 0.2 (Wan2.1),
            0.8 (Wan2.2) and 0.95 (HunyuanVideo). At 768x1280 any decay below about 0.22 gives the
            same mask as 0.2 (the window is floored at one block).
        block_size: kernel block in tokens (16, 32, 64 or 128); None picks the kernel's fastest for
            the device (`accel.kernels.default_block_size`).
        sink: every frame attends fully to latent frame 0 (Wan: True; HunyuanVideo: False).
        spatial: "band" (reference: |p - q| <= w(d) on raster indices) or "disk" (a 2-D disk in
            (h, w) with the band's token count, r(d)^2 = (2 w(d) + 1) / pi). Blocks are raster
            runs of tokens, so a disk spreads thinly over many tiles and the tile rule drops small
            disks: at 768x1280 a decay below about 0.5 keeps only the dense near frames and the sink;
            at decay 1 disk and band cost the same.
        decay_near: also apply the window to adjacent frames (d == 1). The reference keeps them dense,
            which caps sparsity (about 71 % at 768x1280, 69 frames).
        thinning: the reference's temporal thinning (drop frame pairs at d > 1 whose unscaled window
            P / 2^bit_length(d) is under 128 tokens unless d is a multiple of the stride). Off, every
            frame pair keeps at least its window, and a large decay makes the mask dense.

    Two departures from the reference, both invisible at its sizes: adjacent frames (d <= 1) are never
    thinned, and every query block keeps its diagonal tile, so small frames keep their neighbours and
    no token is left without keys.

    Tensor layout: q, k, v are (B, S, H, D), diffusers' order; head_dim <= 256; fp16, bf16 or fp32.
    Reference-compatible masks: ``spatial="band", decay_near=False`` with the reference's block size.
    """

    name: ClassVar[str] = "radial"
    # The UI starts radial at the shipped presets' decay: decay 1.0 is 75 % dense at the tiny models' size.
    ui_defaults: ClassVar[dict] = {"decay": 0.2}

    decay: float = option(
        1.0, "how fast the spatial window shrinks with frame distance: smaller is sparser and faster "
        "(reference presets use 0.2 for Wan2.1)", minimum=0, exclusive_minimum=True)
    block_size: int | None = option(
        None, "tokens per query/key block of the kernel", choices=BLOCK_SIZES,
        none_means="the kernel's fastest block for the device")
    sink: bool = option(True, "every frame also attends fully to latent frame 0 (an attention sink; Wan: on)")
    spatial: Literal["band", "disk"] = option(
        "band", "window shape: band = raster band as in the paper; disk = 2-D disk with the same token count",
        choices=("band", "disk"))
    decay_near: bool = option(
        False, "also narrow adjacent frames (the paper keeps them dense, which caps sparsity near 71%)")
    thinning: bool = option(
        True, "the paper's temporal thinning: far frame pairs with tiny windows are skipped except every n-th")

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def reference_compatible(self) -> bool:
        """True when the mask follows mit-han-lab/radial-attention's rule (1-D band, dense d <= 1)."""
        return self.spatial == "band" and not self.decay_near

    def resolve_block_size(self, device: torch.device | str) -> int:
        if self.block_size is not None:
            return self.block_size
        try:
            from accel.kernels import default_block_size
        except ImportError:
            return 128
        return int(default_block_size(device))

    # ------------------------------------------------------------------ contract
    def can_run(
        self,
        layout: TokenLayout,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        raise_error: bool = False,
    ) -> bool:
        error = kernel_shape_error("radial", layout, heads, head_dim, dtype)
        if error is not None and raise_error:
            raise error
        return error is None

    def build_plan(self, layout: TokenLayout, heads: int, device: torch.device) -> RadialPlan:
        """Block layout of the video x video mask for `layout` (pure; callers cache it per geometry)."""
        block = self.resolve_block_size(device)
        frames, height, width = layout.grid
        block_layout = radial_block_layout(
            frames, height, width, block_size=block, decay=self.decay, sink=self.sink,
            spatial=self.spatial, decay_near=self.decay_near, thinning=self.thinning, device=device,
        )
        return RadialPlan(block_layout, block, block_layout.density(), layout.grid)

    def plan_density(self, plan: RadialPlan) -> float:
        """Fraction of video x video tiles computed (text rows and columns, always dense, excluded)."""
        return plan.density

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, plan: RadialPlan,
        call: AttentionCall,
    ) -> Attended:
        """Radial attention over a joint (B, S, H, D) sequence in `layout` order.

        Video queries: one block-sparse call over the video keys plus every visible text key (read in place
        from the joint buffer). Text queries: dense over all keys. Padding comes as `call.text_lengths`
        (trailing) or `call.text_mask`; hidden video keys raise NotImplementedError (callers fall back).
        No host synchronisation.
        """
        check_qkv(q, k, v, layout)
        if not isinstance(plan, RadialPlan):
            raise TypeError(f"plan must be a RadialPlan from Radial.build_plan, got {type(plan).__name__}")
        if plan.grid != layout.grid:
            raise ValueError(f"plan was built for grid {plan.grid}, got a layout with grid {layout.grid}")
        if call.key_padding_mask is not None and call.text_lengths is None and call.text_mask is None:
            raise NotImplementedError("radial attention cannot mask video keys (key_padding_mask hides some)")
        vs, ts = split_joint(layout)
        has_text = layout.text_tokens > 0
        kernel_text = _kernel_text_args(k, v, layout, call) if has_text else {}
        from accel.kernels import block_sparse_attention

        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if needs_grad:
            video = block_sparse_attention(q[:, vs], k, v, plan.block_layout, scale=call.scale, **kernel_text)
            if not has_text:
                return Attended(video, plan.density)
            text = sdpa_bshd(q[:, ts], k, v, key_padding_mask=call.key_padding_mask, scale=call.scale)
            out = torch.cat([text, video] if layout.text_position == "before" else [video, text], 1)
            return Attended(out, plan.density)
        out = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
        block_sparse_attention(q[:, vs], k, v, plan.block_layout, out=out[:, vs], scale=call.scale, **kernel_text)
        if has_text:
            out[:, ts] = sdpa_bshd(q[:, ts], k, v, key_padding_mask=call.key_padding_mask, scale=call.scale)
        return Attended(out, plan.density)

    def token_mask(self, layout: TokenLayout, plan: RadialPlan | None = None) -> torch.Tensor:
        """(S, S) bool token mask `run` implements (text dense both ways); small sizes only."""
        plan = plan if plan is not None else self.build_plan(layout, 1, torch.device("cpu"))
        return expand_plan_mask(plan, layout)

    def visualize(
        self, plan: RadialPlan, path: str | Path | None = None, *, layout: TokenLayout | None = None,
        max_pixels: int = 1024,
    ) -> Path | np.ndarray:
        """Render the video x video block mask; see `visualize_plan`."""
        spatial = f"{self.spatial} window" + (", decayed adjacent frames" if self.decay_near else "")
        title = f"radial decay={self.decay:g}, {spatial}, {'frame-0 sink' if self.sink else 'no sink'}"
        return visualize_plan(plan, path, max_pixels=max_pixels, title=title)


def _kernel_text_args(k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, call: AttentionCall) -> dict:
    """Keyword arguments that tell the block-sparse kernel where the text keys sit in the joint k/v buffer."""
    vs, ts = split_joint(layout)
    args: dict = {"video_keys": (vs.start, layout.video_tokens), "text_keys": (ts.start, layout.text_tokens)}
    if call.text_lengths is not None:
        args["text_lengths"] = call.text_lengths
    elif call.text_mask is not None:
        args["text_mask"] = call.text_mask
    return args


# ---------------------------------------------------------------------------------------- visualizer
def pooled_block_mask(plan: RadialPlan, max_pixels: int = 1024) -> tuple[torch.Tensor, int]:
    """OR-pooled (n, n) bool block mask with n <= max_pixels, and the pooling factor. Built from the CSR
    lists, so no (blocks x blocks) tensor exists for big plans."""
    lay = plan.block_layout
    nb = lay.num_q_blocks
    factor = max(1, math.ceil(nb / max(1, max_pixels)))
    n = math.ceil(nb / factor)
    offsets = lay.offsets[0].long().cpu()
    nnz = int(offsets[-1])
    rows = torch.repeat_interleave(torch.arange(nb), offsets[1:] - offsets[:-1], output_size=nnz)
    cols = lay.indices[0, :nnz].long().cpu()
    img = torch.zeros(n * n, dtype=torch.bool)
    img[(rows // factor) * n + cols // factor] = True
    return img.view(n, n), factor


def visualize_plan(
    plan: RadialPlan, path: str | Path | None = None, *, max_pixels: int = 1024, title: str | None = None
) -> Path | np.ndarray:
    """PNG of the block mask (white = computed): axes in latent frames, frame boundaries, density in the title.

    Masks wider than ``max_pixels`` blocks are OR-pooled from the CSR lists (no blocks x blocks tensor).
    Writes ``path`` and returns it, or returns the RGB image as a (H, W, 3) uint8 array when ``path`` is None.
    """
    img, factor = pooled_block_mask(plan, max_pixels)
    layout = TokenLayout(1, *plan.grid)
    head = f"{title}, block {plan.block_size}" if title else f"block {plan.block_size}"
    return render_mask_image(img, layout, path, title=head, max_pixels=max_pixels, cell=plan.block_size * factor,
                             density=plan.density)


def expand_plan_mask(plan: RadialPlan, layout: TokenLayout) -> torch.Tensor:
    """(S, S) bool token mask that `Radial.attend` implements for `layout` (text dense both ways).

    The specification `attend` is tested against; small sizes only.
    """
    from accel.kernels.reference import token_mask

    s, nv = layout.total_tokens, layout.video_tokens
    video = token_mask(plan.block_layout.to("cpu"), nv, nv)[0]
    mask = torch.ones(s, s, dtype=torch.bool)
    vs = layout.video_slice
    mask[vs, vs] = video
    return mask


__all__ = [
    "Radial",
    "RadialPlan",
    "expand_plan_mask",
    "pooled_block_mask",
    "visualize_plan",
]
