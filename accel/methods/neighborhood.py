"""Neighborhood attention (NATTEN / Generalized Neighborhood Attention) for video and image DiTs.

Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer" (CVPR 2023) and Hassani et al.,
"Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light"
(arXiv 2504.16922); reference code SHI-Labs/NATTEN. Parameter names and semantics follow NATTEN's
``na2d``/``na3d`` exactly (window rule in `accel.kernels.neighborhood_reference`); Sliding Tile Attention
(Zhang et al., arXiv 2502.04507) is the special case `Neighborhood.sta`.

Video queries run one Triton kernel over tile-major tokens (`token_order`) with the text keys as extra keys
in the same softmax; text queries attend densely to every key. A window covering the whole grid runs dense
SDPA (NATTEN's self-attention fast path).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from accel.geometry import TokenLayout, compact_tile
from accel.kernels._common import triton_runs_here
from accel.kernels.neighborhood_reference import TilePlan, build_tile_plan, natten_token_mask, tile_major_order
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
from accel.options import check_options, option

if TYPE_CHECKING:
    import numpy as np

_AXES = ("frames", "height", "width")
Axes = tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class NeighborhoodPlan:
    """What `Neighborhood.run` needs for one geometry.

    Attributes:
        grid: (frames, height, width) of the video tokens.
        kernel, stride, dilation, causal: the per-axis NATTEN parameters resolved for this grid (images: the
            time axis is (1, 1, 1, False)).
        tiles: the kernel's `TilePlan` (None when the window covers the whole grid: dense).
        density: fraction of video x video token pairs the kernel computes (1.0 when dense), averaged over
            heads when ``groups`` give some heads other windows.
        heads: with ``groups``, the (int64, on the device) indices of the heads that use this plan's window.
        groups: per-head windows (`Neighborhood.head_windows`): one sub-plan per window, each with its
            ``heads``; the same tile shape (so one token order) for all.
    """

    grid: Axes
    kernel: Axes
    stride: Axes
    dilation: Axes
    causal: tuple[bool, bool, bool]
    tiles: TilePlan | None
    density: float
    heads: torch.Tensor | None = None
    groups: tuple[NeighborhoodPlan, ...] = ()

    @property
    def dense(self) -> bool:
        return self.tiles is None


def _canon(value) -> str:
    """'3', 3, (3, 5, 5), '3,5,5', '3x5x5' -> canonical text ('3' or '3x5x5': spec strings split items on
    commas, so the canonical separator is 'x'); anything else unchanged (then rejected)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return "x".join(str(x) for x in value)
    if isinstance(value, str):
        return "x".join(part.strip() for part in value.lower().replace(",", "x").split("x"))
    return value


def _parse(owner: str, name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split("x"))
    except ValueError:
        raise ValueError(f"{owner}.{name} must be an int or ints separated by 'x' or ',' like '3' or '3x5x5', "
                         f"got {text!r}") from None
    if not 1 <= len(values) <= 3:
        raise ValueError(f"{owner}.{name} takes 1, 2 (height, width) or 3 (frames, height, width) values, "
                         f"got {text!r}")
    return values


@dataclass(frozen=True)
class Neighborhood(AttentionMethod):
    """Neighborhood attention (NATTEN/GNA): each video token attends to a window of its neighbours.

    Per axis (frames, height, width), NATTEN's rule: the window of ``kernel_size`` tokens is centred on the
    query (even sizes: K/2 before, K/2 - 1 after) and shifted inward at borders, never shrunk, so every query
    sees exactly prod(kernel_size) video keys. ``stride`` > 1: queries of a stride group share the window of
    the group's centre query (stride == kernel_size: blocked attention). ``dilation`` splits an axis into
    interleaved groups attending only within their group. ``is_causal``: along time, a query sees only
    earlier and same frames (NATTEN's ``is_causal=(True, False, False)``). Text tokens of joint attention are
    extra keys of every video query; text queries attend to everything.

    Values are an int (every axis) or ints separated by "x" or ",": "3x5x5" (or "3,5,5", or a tuple in
    Python) for (frames, height, width) on video; for images (one frame) an int or "5x7" applies to
    (height, width). Spec strings split items on commas, so write ``neighborhood:kernel_size=3x5x5``.
    Kernel sizes must be >= 2, at most the axis length / dilation, and strides at most the kernel size
    (grid-dependent checks raise when the plan is built). A window equal to the whole grid runs dense SDPA.

    Attributes:
        kernel_size: window size per axis (NATTEN ``kernel_size``).
        stride: stride-group size per axis (NATTEN ``stride``).
        dilation: dilation per axis (NATTEN ``dilation``).
        is_causal: causal along the time axis.
        head_windows: per-head kernel sizes, ``"HEADS:KERNEL;..."`` with heads as ranges joined by "+"
            (``"0-3+8:5x9x9;4-7:3x5x5"``); other heads use ``kernel_size``. Stride, dilation and causality are
            shared. One kernel call per distinct window (a loop over windows, not heads).
        tile: kernel tile in tokens "TxHxW" ("HxW" for images); None picks 128 tokens on GPUs (64 before
            Ampere) and 16 on CPU under the Triton interpreter, shaped to the grid.
    """

    name: ClassVar[str] = "neighborhood"

    kernel_size: str = option(
        "3", "window size in tokens: an int or 'TxHxW' (images: 'HxW'); smaller is sparser and faster",
        kind=str)
    stride: str = option(
        "1", "queries in groups of this many tokens share one window (int or 'TxHxW'); stride = kernel_size "
        "is blocked attention, larger strides make the kernel skip element masks", kind=str)
    dilation: str = option("1", "dilation per axis (int or 'TxHxW'): the window skips tokens in between",
                           kind=str)
    is_causal: bool = option(False, "causal along time: a frame sees only itself and earlier frames")
    head_windows: str | None = option(
        None, "other windows for some heads: 'HEADS:KERNEL;...', heads as 0-3+8, e.g. '0-3:5x9x9;8:3x5x5'",
        kind=str, none_means="every head uses kernel_size")
    tile: str | None = option(
        None, "kernel tile in tokens, 'TxHxW' (images 'HxW')", kind=str,
        none_means="128 tokens on GPUs (64 before Ampere), 16 under the interpreter, shaped to the grid")

    def __post_init__(self) -> None:
        for name in ("kernel_size", "stride", "dilation", "tile"):
            object.__setattr__(self, name, _canon(getattr(self, name)))
        check_options(self)
        owner = type(self).__name__
        kernel = _parse(owner, "kernel_size", self.kernel_size)
        stride = _parse(owner, "stride", self.stride)
        dilation = _parse(owner, "dilation", self.dilation)
        for name, values, low in (("kernel_size", kernel, 2), ("stride", stride, 1), ("dilation", dilation, 1)):
            if any(x < low for x in values):
                what = "NATTEN rejects 1: fold that axis into the batch instead" if name == "kernel_size" else ""
                raise ValueError(f"{owner}.{name} values must be >= {low}, got {getattr(self, name)!r}"
                                 + (f" ({what})" if what else ""))
        lengths = {len(x) for x in (kernel, stride, dilation)} - {1}
        if len(lengths) > 1:
            raise ValueError(f"{owner}: kernel_size={self.kernel_size!r}, stride={self.stride!r} and "
                             f"dilation={self.dilation!r} give different numbers of axes")
        n = lengths.pop() if lengths else 1
        kernel, stride = (x * n if len(x) == 1 else x for x in (kernel, stride))
        for a in range(n):
            if stride[a] > kernel[a]:
                raise ValueError(f"{owner}.stride must be <= kernel_size on every axis, got stride="
                                 f"{self.stride!r}, kernel_size={self.kernel_size!r}")
        if self.head_windows is not None:
            for _, window in self.windows():
                if any(x < 2 for x in _parse(owner, "head_windows", window)):
                    raise ValueError(f"{owner}.head_windows kernel sizes must be >= 2, got {self.head_windows!r}")
        if self.tile is not None:
            tile = _parse(owner, "tile", self.tile)
            if any(x < 1 for x in tile) or len(tile) == 1:
                raise ValueError(f"{owner}.tile must be 'TxHxW' (or 'HxW' for images) of positive ints, "
                                 f"got {self.tile!r}")
            if _prod(tile) > 256:
                raise ValueError(f"{owner}.tile holds at most 256 tokens, got {self.tile!r}")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def sta(cls, tile: tuple[int, ...] = (6, 8, 8), tiles: tuple[int, ...] = (3, 3, 3), **kwargs) -> Neighborhood:
        """Sliding Tile Attention (arXiv 2502.04507): a window of ``tiles`` STA tiles of ``tile`` tokens.

        Equals NATTEN GNA with kernel_size = tiles x tile and stride = tile (exact when each axis length is a
        multiple of the tile and ``tiles`` are odd). ``tile``/``tiles`` are (T, H, W) or, for images, (H, W).
        """
        tile, tiles = tuple(tile), tuple(tiles)
        if len(tile) != len(tiles) or len(tile) not in (2, 3):
            raise ValueError(f"Neighborhood.sta: tile and tiles must both be (T, H, W) or (H, W), got tile={tile}, "
                             f"tiles={tiles}")
        if any(t < 1 for t in tile) or any(n < 1 for n in tiles):
            raise ValueError(f"Neighborhood.sta: tile and tiles must be positive, got tile={tile}, tiles={tiles}")
        return cls(kernel_size=tuple(t * n for t, n in zip(tile, tiles, strict=True)), stride=tile, **kwargs)

    def windows(self) -> list[tuple[tuple[int, ...], str]]:
        """``head_windows`` as [(head indices, kernel text)]; raises naming the field on bad syntax."""
        if self.head_windows is None:
            return []
        owner = type(self).__name__
        groups, seen = [], set()
        for part in filter(None, (x.strip() for x in self.head_windows.split(";"))):
            heads_text, colon, window = part.partition(":")
            if not colon or not window.strip():
                raise ValueError(f"{owner}.head_windows items are 'HEADS:KERNEL' (e.g. '0-3:5x9x9'), got {part!r}")
            heads: list[int] = []
            for piece in heads_text.split("+"):
                first, dash, last = piece.strip().partition("-")
                try:
                    lo, hi = int(first), int(last if dash else first)
                except ValueError:
                    raise ValueError(f"{owner}.head_windows: heads are ints or ranges like 0-3 joined by '+', got "
                                     f"{heads_text!r}") from None
                if lo < 0 or hi < lo:
                    raise ValueError(f"{owner}.head_windows: bad head range {piece.strip()!r}")
                heads += range(lo, hi + 1)
            if seen & set(heads):
                raise ValueError(f"{owner}.head_windows gives head(s) {sorted(seen & set(heads))} two windows")
            seen |= set(heads)
            groups.append((tuple(heads), _canon(window.strip())))
        if not groups:
            raise ValueError(f"{owner}.head_windows is empty; omit it for one window on every head")
        return groups

    def resolve(self, layout: TokenLayout, kernel_size: str | None = None
                ) -> tuple[Axes, Axes, Axes, tuple[bool, bool, bool]]:
        """(kernel, stride, dilation, causal) per (frames, height, width) for this grid; raises naming the field.

        ``kernel_size``: another window (a `head_windows` entry) with this method's stride and dilation."""
        owner = type(self).__name__
        frames = layout.frames
        out = []
        for name in ("kernel_size", "stride", "dilation"):
            text = kernel_size if (name == "kernel_size" and kernel_size is not None) else getattr(self, name)
            values = _parse(owner, name, text)
            if len(values) == 1:
                values = values * (3 if frames > 1 else 2)
            if len(values) == 2:
                if frames > 1:
                    raise ValueError(f"{owner}.{name}={text!r} gives (height, width) only: a video "
                                     f"of {frames} frames needs 'TxHxW'")
                values = (1,) + values
            out.append(values)
        kernel, stride, dilation = out
        for a, axis in enumerate(_AXES):
            if frames == 1 and a == 0 and kernel[0] == 1:
                continue
            length = layout.grid[a]
            if kernel[a] * dilation[a] > length:
                raise ValueError(f"{owner}.kernel_size x dilation along {axis} is {kernel[a]} x {dilation[a]} = "
                                 f"{kernel[a] * dilation[a]}, more than the {length} tokens of that axis")
            if stride[a] > kernel[a]:
                raise ValueError(f"{owner}.stride along {axis} ({stride[a]}) exceeds kernel_size ({kernel[a]})")
        causal = (self.is_causal and frames > 1, False, False)
        return kernel, stride, dilation, causal

    def resolve_tile(self, grid: Axes, device: torch.device | str, window: tuple | None = None) -> Axes:
        """The kernel tile for this grid (see ``tile``).

        Automatic tiles hold the device's token target (128 on GPUs). Given the resolved ``window`` (kernel,
        stride, dilation, causal), the tile shape is the one whose tile pairs cost least: a pair the window
        covers wholly runs without element masks, a partly covered pair costs `MASKED_PAIR_COST` of one, and a
        tile that does not divide its axis wastes the rows it lacks (more tiles for the same tokens).
        """
        if self.tile is not None:
            tile = _parse(type(self).__name__, "tile", self.tile)
            return (1,) + tile if len(tile) == 2 else tile
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            target = 128 if torch.cuda.get_device_capability(device)[0] >= 8 else 64
        elif os.environ.get("TRITON_INTERPRET") == "1" or device.type == "cpu":
            target = 16
        else:
            target = 128
        if window is not None:
            best = _cheapest_tile(grid, target, *window)
            if best is not None:
                return best
        return compact_tile(grid, target)

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
        error = kernel_shape_error("neighborhood", layout, heads, head_dim, dtype)
        if error is None:
            try:
                self.resolve(layout)
                self._check_windows(layout, heads)
            except ValueError as err:
                error = err
        if error is not None and raise_error:
            raise error
        return error is None

    def _check_windows(self, layout: TokenLayout, heads: int) -> list[tuple[tuple[int, ...], tuple]]:
        """The resolved per-head windows; heads out of range or windows that do not fit raise naming the field."""
        out = []
        for group, window in self.windows():
            if max(group) >= heads:
                raise ValueError(f"{type(self).__name__}.head_windows names head {max(group)}, but this model has "
                                 f"{heads} heads (0..{heads - 1})")
            out.append((group, self.resolve(layout, kernel_size=window)))
        return out

    def build_plan(self, layout: TokenLayout, heads: int, device: torch.device) -> NeighborhoodPlan:
        """Resolve the per-axis parameters and build the tile lists (pure; callers cache it per geometry)."""
        window = self.resolve(layout)
        grid = layout.grid
        tile = self.resolve_tile(grid, device, window)  # one tile shape, so one token order, for every head
        plan = self._plan(grid, tile, window, device)
        overrides = self._check_windows(layout, heads)
        if not overrides:
            return plan
        own = sorted(set(range(heads)) - {h for group, _ in overrides for h in group})
        groups = tuple(dataclasses.replace(self._plan(grid, tile, w, device),
                                           heads=torch.tensor(group, dtype=torch.long, device=device))
                       for group, w in overrides)
        density = (len(own) * plan.density + sum(len(g.heads) * g.density for g in groups)) / heads
        return dataclasses.replace(plan, density=density, heads=torch.tensor(own, dtype=torch.long, device=device),
                                   groups=groups)

    @staticmethod
    def _plan(grid: Axes, tile: Axes, window: tuple, device: torch.device) -> NeighborhoodPlan:
        kernel, stride, dilation, causal = window
        if not any(causal) and all(kernel[a] == grid[a] for a in range(3)):
            return NeighborhoodPlan(grid, kernel, stride, dilation, causal, None, 1.0)
        tiles = build_tile_plan(grid, tile, kernel, stride, dilation, causal, device)
        return NeighborhoodPlan(grid, kernel, stride, dilation, causal, tiles, tiles.density)

    def plan_density(self, plan: NeighborhoodPlan) -> float:
        """Fraction of video x video token pairs inside the tiles the kernel visits (1.0 when dense)."""
        return plan.density

    def token_order(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        """Tile-major order of the video tokens (the kernel's tiles are contiguous runs of tokens)."""
        return tile_major_order(layout.grid, self.resolve_tile(layout.grid, device, self.resolve(layout)), device)

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, plan: NeighborhoodPlan,
        call: AttentionCall,
    ) -> Attended:
        """Neighborhood attention over a joint (B, S, H, D) sequence whose video tokens are in `token_order`.

        Video queries: one Triton call over the video keys (window) plus every visible text key, read in
        place from the joint buffer. Text queries: dense SDPA over all keys. Hidden video keys raise
        NotImplementedError (callers fall back). No host synchronisation.
        """
        check_qkv(q, k, v, layout)
        if not isinstance(plan, NeighborhoodPlan):
            raise TypeError(f"plan must be a NeighborhoodPlan from Neighborhood.build_plan, got "
                            f"{type(plan).__name__}")
        if plan.grid != layout.grid:
            raise ValueError(f"plan was built for grid {plan.grid}, got a layout with grid {layout.grid}")
        if plan.groups:  # per-head windows: one call per distinct window over its heads (no loop over heads)
            if q.shape[2] != plan.heads.numel() + sum(g.heads.numel() for g in plan.groups):
                raise ValueError(f"plan was built for {plan.heads.numel() + sum(g.heads.numel() for g in plan.groups)}"
                                 f" heads, got {q.shape[2]}")
            parts = [(plan.heads, dataclasses.replace(plan, groups=()))] if plan.heads.numel() else []
            out = None
            for heads, sub in parts + [(g.heads, g) for g in plan.groups]:
                pick = [t.index_select(2, heads) for t in (q, k, v)]
                part = self.run(*pick, layout, sub, call).out
                out = (torch.zeros_like(q) if out is None else out).index_copy(2, heads, part)
            return Attended(out, plan.density)
        if plan.dense:
            return Attended(sdpa_bshd(q, k, v, key_padding_mask=call.key_padding_mask, scale=call.scale), 1.0)
        if call.key_padding_mask is not None and call.text_lengths is None and call.text_mask is None:
            raise NotImplementedError("neighborhood attention cannot mask video keys (key_padding_mask hides some)")
        if triton_runs_here(q):
            from accel.kernels.neighborhood import neighborhood_attention
        else:  # CPU without the Triton interpreter: the chunked PyTorch path (same semantics, slower)
            from accel.kernels.neighborhood_torch import neighborhood_attention_torch as neighborhood_attention

        vs, ts = split_joint(layout)
        text = {}
        if layout.text_tokens:
            text = {"text_keys": (ts.start, layout.text_tokens), "text_lengths": call.text_lengths,
                    "text_mask": call.text_mask}
        video = neighborhood_attention(q[:, vs], k, v, plan.tiles, video_keys=(vs.start, layout.video_tokens),
                                       scale=call.scale, **text)
        if not layout.text_tokens:
            return Attended(video, plan.density)
        text_out = sdpa_bshd(q[:, ts], k, v, key_padding_mask=call.key_padding_mask, scale=call.scale)
        out = torch.cat([text_out, video] if layout.text_position == "before" else [video, text_out], 1)
        return Attended(out, plan.density)

    def flex_mask_mod(self, layout: TokenLayout, plan: NeighborhoodPlan, device: torch.device):
        """NATTEN's window as a flex mask_mod over the video tokens in tile-major order (None when dense, or
        when heads have different windows)."""
        if plan.dense or plan.groups:
            return None
        from accel.kernels.neighborhood_reference import axis_window

        perm = self.token_order(layout, device)  # position -> raster index
        T, H, W = plan.grid
        coords = (perm // (H * W), (perm // W) % H, perm % W)
        rules = []
        for a in range(3):
            windows = axis_window(plan.grid[a], plan.kernel[a], plan.stride[a], plan.dilation[a], plan.causal[a])
            d = plan.dilation[a]
            group = torch.tensor([i % d for i in range(len(windows))], device=device)
            start = torch.tensor([w[0] // d for w in windows], device=device)
            end = torch.tensor([w[-1] // d + 1 for w in windows], device=device)
            rules.append((coords[a].to(device), d, group, start, end))

        def mask_mod(b, h, q_idx, kv_idx):
            ok = None
            for coord, d, group, start, end in rules:
                qc, kc = coord[q_idx], coord[kv_idx]
                inside = ((kc % d) == group[qc]) & (kc // d >= start[qc]) & (kc // d < end[qc])
                ok = inside if ok is None else ok & inside
            return ok

        return mask_mod

    def token_mask(self, layout: TokenLayout, plan: NeighborhoodPlan | None = None) -> torch.Tensor:
        """(S, S) bool NATTEN token mask in raster order (brute force; text dense both ways); small sizes only.

        With ``head_windows`` the heads differ: this is the mask of the heads that use ``kernel_size``."""
        kernel, stride, dilation, causal = (
            (plan.kernel, plan.stride, plan.dilation, plan.causal) if plan is not None else self.resolve(layout))
        s = layout.total_tokens
        mask = torch.ones(s, s, dtype=torch.bool)
        vs = layout.video_slice
        mask[vs, vs] = natten_token_mask(layout.grid, kernel, stride, dilation, causal)
        return mask

    def visualize(
        self, plan: NeighborhoodPlan, path: str | Path | None = None, *, layout: TokenLayout | None = None,
        max_pixels: int = 1024,
    ) -> Path | np.ndarray:
        """The video x video token mask in raster order (white = attended), frames marked; density in the title.

        Grids over 8192 tokens draw one sampled query per pooled row (the mask is too big to build).
        """
        grid = plan.grid
        layout = TokenLayout(1, *grid)
        title = (f"neighborhood kernel={'x'.join(map(str, plan.kernel))} stride={'x'.join(map(str, plan.stride))} "
                 f"dilation={'x'.join(map(str, plan.dilation))}" + (" causal" if any(plan.causal) else "")
                 + (f" (heads with other windows: {self.head_windows})" if plan.groups else ""))
        n = layout.video_tokens
        if n <= 8192:
            mask = natten_token_mask(grid, plan.kernel, plan.stride, plan.dilation, plan.causal)
            return render_mask_image(mask, layout, path, title=title, max_pixels=max_pixels, density=plan.density)
        from accel.kernels.neighborhood_reference import axis_mask

        factor = -(-n // max_pixels)
        m = -(-n // factor)
        axes = [axis_mask(grid[a], plan.kernel[a], plan.stride[a], plan.dilation[a], plan.causal[a])
                for a in range(3)]
        img = torch.zeros(m, m, dtype=torch.bool)
        hw, w = grid[1] * grid[2], grid[2]
        for r in range(m):
            i = min(n - 1, r * factor + factor // 2)
            row = (axes[0][i // hw][:, None, None] & axes[1][(i // w) % grid[1]][None, :, None]
                   & axes[2][i % w][None, None, :]).reshape(-1)
            padded = torch.zeros(m * factor, dtype=torch.bool)
            padded[:n] = row
            img[r] = padded.view(m, factor).any(1)
        return render_mask_image(img, layout, path, title=title + " (sampled rows)", max_pixels=max_pixels,
                                 cell=factor, density=plan.density)


# A tile pair with element masks vs one without. An estimate, not a fit: on the H200 the masked stride-1 cases
# ran at about a quarter of cuDNN's per-tile speed and unmasked ones at ~0.9 (benchmarks/results/
# methods_neighborhood.json), a ratio near 3.5; 2.5 leaves room for the cheaper per-axis tests.
MASKED_PAIR_COST = 2.5


def _cheapest_tile(grid: Axes, target: int, kernel: Axes, stride: Axes, dilation: Axes,
                   causal: tuple[bool, bool, bool]) -> Axes | None:
    """The power-of-two tile of ``target`` tokens whose visited tile pairs cost least (None: none fits).

    Per axis, the tile pairs with some query-key pair inside the window (`any`) and those wholly inside (`all`)
    come from the 1-D rule; the window is a product over axes, so the counts multiply. Ties go to the tile
    that divides the grid, then to the squarest one.
    """
    from accel.kernels.neighborhood_reference import _axis_tile_pairs, axis_mask

    def pow2s(limit: int) -> list[int]:
        out, x = [], 1
        while x <= max(1, limit) * 2 - 1 and x <= target:
            out.append(x)
            x *= 2
        return out

    masks = [axis_mask(grid[a], kernel[a], stride[a], dilation[a], causal[a]) for a in range(3)]
    best, best_key = None, None
    for t in pow2s(grid[0]):
        for h in pow2s(grid[1]):
            w = target // (t * h)
            if w < 1 or t * h * w != target or w > max(1, 2 * grid[2] - 1):
                continue
            tile = (t, h, w)
            total, full = 1, 1
            for a in range(3):
                any_, all_ = _axis_tile_pairs(grid[a], tile[a], masks[a])
                total *= int(any_.sum())
                full *= int(all_.sum())
            cost = full + MASKED_PAIR_COST * (total - full)
            divides = all(grid[a] % tile[a] == 0 for a in range(3))
            key = (cost, not divides, max(tile) / min(tile))
            if best_key is None or key < best_key:
                best, best_key = tile, key
    return best


def _prod(values) -> int:
    out = 1
    for x in values:
        out *= x
    return out


__all__ = ["Neighborhood", "NeighborhoodPlan"]
