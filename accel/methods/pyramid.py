"""Pyramid Sparse Attention (PSA): dynamic multi-level block attention for video DiTs.

Li, Gu, Lin, Wang, Zhuang, "PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation",
arXiv 2512.04025; reference code ziplab/Pyramid-Sparse-Attention. Each (query block, KV block) pair gets a level
p in {1, 2, 4, 8} or 0 (skipped): a level-p pair attends to the block's keys and values mean-pooled by p, with
+ln(p) on the logits (semantics and the partial-block rule in `accel.kernels.pyramid_reference`).

Per call (`run`): block importance from sampled query and key tokens (seeded by `AttentionCall.seed`), levels by
the reference's cumulative-threshold rule (or its rank quotas), the diagonal forced to level 1, then one Triton
call for the video queries with the text keys at full resolution in the same softmax; text queries attend densely.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from accel.geometry import TokenLayout, compact_tile
from accel.kernels._common import triton_input_reason
from accel.kernels.neighborhood_reference import tile_major_order
from accel.kernels.pyramid_reference import (
    cap_levels,
    estimate_block_importance,
    level_density,
    similarity_cap,
    threshold_levels,
    topk_levels,
)
from accel.methods.base import (
    Attended,
    AttentionCall,
    AttentionMethod,
    check_qkv,
    figure_output,
    kernel_shape_error,
    split_joint,
)
from accel.methods.dense import sdpa_bshd
from accel.options import check_options, option

if TYPE_CHECKING:
    import numpy as np

BLOCK_SIZES = (16, 32, 64, 128)
ESTIMATE_KERNELS = ("torch", "triton")
ESTIMATE_KERNEL = os.environ.get("ACCEL_PYRAMID_ESTIMATE", "triton")
"""Which block-importance estimate runs on Triton-capable inputs, read once at import: "triton" (the default: the
fused kernel, `accel.kernels.pyramid_estimate`, 0.64 vs 1.85 ms at block 128 and 0.68 vs 2.25 ms at block 64 on
the H200, `pyramid_stages_b*.json`) or "torch" (the PyTorch estimate, its reference). Same formula;
``ACCEL_PYRAMID_ESTIMATE=torch`` A/Bs them (probes/pyramid_stages.py)."""
if ESTIMATE_KERNEL not in ESTIMATE_KERNELS:
    raise ValueError(f"ACCEL_PYRAMID_ESTIMATE must be one of {', '.join(ESTIMATE_KERNELS)}, got {ESTIMATE_KERNEL!r}")
# picture colours per level (0 = skipped, then full resolution to the coarsest pooling)
LEVEL_COLOURS = {0: "#111111", 1: "#fde725", 2: "#35b779", 4: "#31688e", 8: "#a6a6d6"}


@dataclass(frozen=True, eq=False)
class PyramidPlan:
    """The static part of a pyramid call for one geometry (the levels themselves are computed per call).

    Attributes:
        grid: (frames, height, width) of the video tokens.
        block_size: tokens per query and KV block.
        num_blocks: ceil(video tokens / block_size) (the last block may be partial).
    """

    grid: tuple[int, int, int]
    block_size: int
    num_blocks: int


def block_tile(grid: tuple[int, int, int], block_size: int) -> tuple[int, int, int]:
    """The spatially compact blocks of `Pyramid.token_order`: a `compact_tile` of ``block_size`` tokens."""
    return compact_tile(grid, block_size)


@dataclass(frozen=True)
class Pyramid(AttentionMethod):
    """Pyramid Sparse Attention (arXiv 2512.04025): per-call multi-level (1/2/4/8x pooled or skipped) KV blocks.

    Video tokens are reordered into spatially compact blocks (3-D tiles of ``block_size`` tokens, `token_order`),
    cut into blocks of ``block_size`` tokens. Per call and head, the importance of each (query block, KV block)
    pair is estimated from ``block_size // 4`` sampled query and key tokens per block (positions drawn from
    `AttentionCall.seed`); per query-block row the blocks sorted by importance get level 1 up to the cumulative
    share ``t1``, level 2 up to ``t2``, level 4 up to ``t3``, level 8 up to ``t4`` (the block crossing each
    threshold included, level 1 at least ``min_full_ratio`` of the row), the rest are skipped
    (``mode="threshold"``, the reference's ``thresholdbound``); ``mode="topk"`` uses the thresholds as
    cumulative rank fractions (the reference's ``topk``). The diagonal block is always level 1. Text keys of
    joint attention are full-resolution keys of every video query; text queries attend densely.

    Attributes:
        block_size: tokens per query and KV block (16, 32, 64 or 128). Default 128, as the reference's Wan2.1
            presets (its ``PSAConfig`` default is 64): on the H200 at equal FLOP density the attention error
            matched block 64's within a few percent on every input family and the call ran 9-36% faster
            (``benchmarks/results/fidelity_pyramid_blocks.json``, ``methods_pyramid_round2.json``).
        mode: "threshold" (cumulative importance) or "topk" (rank quotas).
        t1, t2, t3, t4: cumulative thresholds of levels 1, 2, 4, 8 (non-decreasing). Default
            0.5/0.6/0.7/0.8: the reference's Wan2.1-1.3B ``psa_balanced`` preset.
        min_full_ratio: level 1 keeps at least floor(n * ratio) + 1 blocks per row (reference 0.06).
        reorder: the 3-D tile reorder (the reference uses a Gilbert curve; tiles here).
        sim_cap, sim_2x, sim_4x, sim_8x: the optional cosine-similarity cap (paper supplement Alg. 3): KV block
            j may be pooled at most by L_j = max({1} U {p : mean first/last cosine of its p-groups > sim_px});
            level = min(level, L_j). Defaults: the reference's generation preset (0.70, 0.65, 0.60); off by
            default as in the reference's ``PSAConfig``.

    Density (reported per call, a 0-dim tensor): mean over video x video block pairs of 1/p (0 when skipped),
    the reference's FLOP-equivalent accounting; text rows and columns excluded.
    Tensor layout: q, k, v are (B, S, H, D); head_dim <= 256; fp16, bf16 or fp32.
    """

    name: ClassVar[str] = "pyramid"

    block_size: int = option(128, "tokens per query/key block; smaller blocks follow the content more closely, "
                             "larger ones run faster", choices=BLOCK_SIZES)
    mode: Literal["threshold", "topk"] = option(
        "threshold", "level rule: threshold = cumulative importance per row (paper default), topk = fixed rank "
        "quotas", choices=("threshold", "topk"))
    t1: float = option(0.5, "cumulative importance (topk: rank fraction) kept at full resolution",
                       minimum=0, maximum=1)
    t2: float = option(0.6, "cumulative importance up to which blocks are pooled 2x", minimum=0, maximum=1)
    t3: float = option(0.7, "cumulative importance up to which blocks are pooled 4x", minimum=0, maximum=1)
    t4: float = option(0.8, "cumulative importance up to which blocks are pooled 8x; the rest are skipped",
                       minimum=0, maximum=1)
    min_full_ratio: float = option(0.06, "least fraction of each row kept at full resolution (threshold mode)",
                                   minimum=0, maximum=1)
    reorder: bool = option(True, "reorder video tokens into 3-D tiles so that blocks are spatially compact")
    sim_cap: bool = option(False, "cap each KV block's pooling by how alike its tokens are (cosine similarity)")
    sim_2x: float = option(0.70, "with sim_cap: least mean cosine within pairs for 2x pooling", minimum=-1,
                           maximum=1)
    sim_4x: float = option(0.65, "with sim_cap: least mean cosine within groups of 4 for 4x pooling", minimum=-1,
                           maximum=1)
    sim_8x: float = option(0.60, "with sim_cap: least mean cosine within groups of 8 for 8x pooling", minimum=-1,
                           maximum=1)

    def __post_init__(self) -> None:
        check_options(self)
        if not self.t1 <= self.t2 <= self.t3 <= self.t4:
            raise ValueError(f"Pyramid thresholds must be non-decreasing, got t1={self.t1}, t2={self.t2}, "
                             f"t3={self.t3}, t4={self.t4}")

    @property
    def thresholds(self) -> tuple[float, float, float, float]:
        return (self.t1, self.t2, self.t3, self.t4)

    # ------------------------------------------------------------------ contract
    def can_run(self, layout: TokenLayout, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                raise_error: bool = False) -> bool:
        error = kernel_shape_error("pyramid", layout, heads, head_dim, dtype)
        if error is not None and raise_error:
            raise error
        return error is None

    def build_plan(self, layout: TokenLayout, heads: int, device: torch.device) -> PyramidPlan:
        return PyramidPlan(layout.grid, self.block_size, -(-layout.video_tokens // self.block_size))

    def plan_density(self, plan: PyramidPlan) -> float:
        """Upper bound (levels are chosen per call; `run` reports the real density)."""
        return 1.0

    def token_order(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        """Tile-major order over 3-D tiles of ``block_size`` tokens (None with ``reorder=False``)."""
        if not self.reorder:
            return None
        return tile_major_order(layout.grid, block_tile(layout.grid, self.block_size), device)

    def plan_call(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, call: AttentionCall) -> torch.Tensor:
        """(B, H, n, n) int32 levels of this call's video tokens (no host sync)."""
        return self._levels_and_density(q, k, layout, call)[0]

    def _levels_and_density(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, call: AttentionCall
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`plan_call`'s levels and their `level_density` (0-dim; from the level kernel's row sums on GPU)."""
        vs, _ = split_joint(layout)
        estimate = estimate_block_importance
        if ESTIMATE_KERNEL == "triton" and triton_input_reason(q) is None:
            from accel.kernels.pyramid_estimate import estimate_block_importance_triton as estimate
        importance = estimate(q[:, vs], k[:, vs], self.block_size, seed=call.seed, scale=call.scale)
        cap = None
        if self.sim_cap:
            cap = similarity_cap(k[:, vs], self.block_size, (self.sim_2x, self.sim_4x, self.sim_8x))
        if triton_input_reason(q) is None:  # the same rules, capped and with the diagonal, in one launch
            from accel.kernels.pyramid_levels import assign_levels

            return assign_levels(importance, self.mode, self.thresholds, self.min_full_ratio, cap, with_density=True)
        if self.mode == "threshold":
            levels = threshold_levels(importance, self.thresholds, self.min_full_ratio)
        else:
            levels = topk_levels(importance, self.thresholds)
        if cap is not None:
            levels = cap_levels(levels, cap)
        n = levels.shape[-1]
        diag = torch.eye(n, dtype=torch.bool, device=levels.device)
        levels = torch.where(diag, 1, levels).to(torch.int32)
        return levels, level_density(levels)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, plan: PyramidPlan,
            call: AttentionCall) -> Attended:
        """Pyramid attention over a joint (B, S, H, D) sequence whose video tokens are in `token_order`."""
        check_qkv(q, k, v, layout)
        if not isinstance(plan, PyramidPlan):
            raise TypeError(f"plan must be a PyramidPlan from Pyramid.build_plan, got {type(plan).__name__}")
        if plan.grid != layout.grid:
            raise ValueError(f"plan was built for grid {plan.grid}, got a layout with grid {layout.grid}")
        if call.key_padding_mask is not None and call.text_lengths is None and call.text_mask is None:
            raise NotImplementedError("pyramid attention cannot mask video keys (key_padding_mask hides some)")
        with torch.no_grad():
            levels, density = self._levels_and_density(q, k, layout, call)
        if triton_input_reason(q) is None:
            from accel.kernels.pyramid import pyramid_attention
        else:  # e.g. CPU without the Triton interpreter: the chunked PyTorch path (same semantics)
            from accel.kernels.pyramid_reference import torch_pyramid_attention as pyramid_attention
        vs, ts = split_joint(layout)
        text = {}
        if layout.text_tokens:
            text = {"text_keys": (ts.start, layout.text_tokens), "text_lengths": call.text_lengths,
                    "text_mask": call.text_mask}
        video = pyramid_attention(q[:, vs], k, v, levels, self.block_size, video_keys=(vs.start, layout.video_tokens),
                                  scale=call.scale, **text)
        if not layout.text_tokens:
            return Attended(video, density)
        text_out = sdpa_bshd(q[:, ts], k, v, key_padding_mask=call.key_padding_mask, scale=call.scale)
        out = torch.cat([text_out, video] if layout.text_position == "before" else [video, text_out], 1)
        return Attended(out, density)

    # ------------------------------------------------------------------ picture
    def representative_levels(self, plan: PyramidPlan, *, seed: int = 0, head_dim: int = 32) -> torch.Tensor:
        """(n, n) int32 levels of one call on synthetic q/k of the plan's grid (what `visualize` draws by default).

        Levels are chosen per call from q/k, so a plan alone has none. Here q = k = seeded random Fourier
        features of each token's (frame, row, column) position, smooth over the grid as real video latents are
        (nearby tokens alike), put into `token_order`; the call's seed is ``seed``. A picture of the rule, not of
        any model's attention: pass a real call's levels (`plan_call`) to `visualize` for that.
        """
        gen = torch.Generator().manual_seed(seed)
        f, h, w = plan.grid
        pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        pos = pos.reshape(-1, 3).float() / torch.tensor([max(f, 1), max(h, 1), max(w, 1)]).float()
        freq = torch.randn(3, head_dim, generator=gen) * 1.5  # about 1.5 periods per grid axis
        phase = torch.rand(head_dim, generator=gen) * 2 * math.pi
        # (N, D), unit variance per column: every level shows up under the default thresholds (at 21x30x52,
        # about 55% skipped, 12% full, 8/11/15% pooled 2x/4x/8x); sharper features leave only level 1
        feat = torch.cos(2 * math.pi * pos @ freq + phase) * math.sqrt(2.0)
        layout = TokenLayout(1, f, h, w)
        order = self.token_order(layout, torch.device("cpu"))
        if order is not None:
            feat = feat[order]
        qk = feat[None, :, None, :]
        return self.plan_call(qk, qk, layout, AttentionCall(seed=seed))[0, 0]

    def visualize(
        self, plan: PyramidPlan, path: str | Path | None = None, *, layout: TokenLayout | None = None,
        max_pixels: int = 1024, levels: torch.Tensor | None = None,
    ) -> Path | np.ndarray:
        """Picture of a level map (colour per level 0/1/2/4/8, legend; density in the title).

        ``levels``: a call's (n, n) map, or (B, H, n, n) from `plan_call` (batch 0, head 0 drawn); default: the
        `representative_levels` of the plan's grid (synthetic seeded q/k; the title says so). Blocks are in the
        method's token order (3-D tiles with ``reorder``). Maps wider than ``max_pixels`` blocks show, per pixel,
        the finest level among its blocks. Writes a PNG at ``path`` and returns it, or returns an RGB array.
        """
        if not isinstance(plan, PyramidPlan):
            raise TypeError(f"plan must be a PyramidPlan from Pyramid.build_plan, got {type(plan).__name__}")
        source = "a given call"
        if levels is None:
            levels, source = self.representative_levels(plan), "a representative call (synthetic seeded q/k)"
        levels = levels.detach().to("cpu", torch.int64)
        if levels.dim() == 4:
            levels = levels[0, 0]
        n = plan.num_blocks
        if tuple(levels.shape) != (n, n):
            raise ValueError(f"levels must be (n, n) or (B, H, n, n) with n = {n} blocks, got {tuple(levels.shape)}")
        order = " (3-D tile order)" if self.reorder else ""
        title = (f"pyramid {self.mode} t={self.t1:g}/{self.t2:g}/{self.t3:g}/{self.t4:g}, block {plan.block_size}: "
                 f"levels of {source}\ngrid {'x'.join(map(str, plan.grid))}, {n}x{n} blocks{order}: "
                 f"{float(level_density(levels)):.1%} FLOP-equivalent density")
        return render_levels(levels, path, title=title, max_pixels=max_pixels)


def render_levels(levels: torch.Tensor, path: str | Path | None = None, *, title: str = "",
                  max_pixels: int = 1024) -> Path | np.ndarray:
    """Draw an (n, n) level map with one colour per level and a legend; a PNG at ``path``, else an RGB array.

    Maps wider than ``max_pixels`` are pooled to the finest level of each cell (largest 1/p), so no kept block
    disappears from the picture.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = levels.shape[-1]
    factor = max(1, math.ceil(n / max(1, max_pixels)))
    rank = torch.zeros_like(levels)  # 0 skipped, 1 = 8x ... 4 = full: max-pooling keeps the finest level
    for r, p in enumerate((8, 4, 2, 1), start=1):
        rank = torch.where(levels == p, r, rank)
    if factor > 1:
        m = math.ceil(n / factor) * factor
        padded = torch.zeros(m, m, dtype=rank.dtype)
        padded[:n, :n] = rank
        rank = padded.view(m // factor, factor, m // factor, factor).amax(3).amax(1)
    names = {0: "skipped", 1: "full (level 1)", 2: "pooled 2x", 4: "pooled 4x", 8: "pooled 8x"}
    cmap = ListedColormap([LEVEL_COLOURS[p] for p in (0, 8, 4, 2, 1)])
    fig = Figure(figsize=(7, 7.4), dpi=150)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rank.numpy(), cmap=cmap, vmin=-0.5, vmax=4.5, interpolation="nearest", extent=(0, n, n, 0))
    share = {p: float((levels == p).float().mean()) for p in names}
    ax.legend(handles=[Patch(color=LEVEL_COLOURS[p], label=f"{names[p]}: {share[p]:.0%}") for p in names],
              loc="upper right", fontsize=7, framealpha=0.85)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    pooled = f" ({factor}x{factor} blocks per pixel: finest level shown)" if factor > 1 else ""
    ax.set_title(title + pooled, fontsize=8)
    return figure_output(fig, path)


__all__ = ["LEVEL_COLOURS", "Pyramid", "PyramidPlan", "block_tile", "render_levels"]
