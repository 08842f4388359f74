"""The contract every attention method follows (v2).

A method is a frozen dataclass (its config). Per geometry it builds a static plan once (`build_plan`, cached
by the caller per layout, heads and device). Per call, `run` takes q/k/v and the per-call facts of an
`AttentionCall` (scale, text padding computed once per forward by the caller) and returns the output with the
density it really computed; a dynamic method (pyramid) does its per-call planning on q/k inside `run`
(`plan_call`). A method may own a token order (`token_order`): a permutation of the video tokens that the
caller applies once per forward. `token_mask` is the specification tests compare against; `visualize`
draws the plan for the UI and `accel mask`. Methods know tensors and token layouts, never pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from accel.geometry import TokenLayout

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class AttentionCall:
    """Per-call facts of one self-attention call, computed once per forward by the caller.

    Attributes:
        scale: softmax scale (None: 1/sqrt(D)).
        text_lengths: (B,) int32 on the tensors' device: only the first ``text_lengths[b]`` text tokens are
            visible keys (text encoders pad at the end). None: every text token is visible.
        text_mask: (B, T) bool, True = visible, for padding that is not a prefix. None when ``text_lengths``
            describes the padding or nothing is padded.
        key_padding_mask: (B, S) bool over the whole joint sequence, the same facts in the form dense SDPA
            takes; None when nothing is hidden.
        seed: a per-call seed for methods that sample (pyramid's token sampling). A patched pipeline derives
            it from the patch's seed (the generation seed), the denoising step and the layer (`call_seed`):
            the same generation seed gives the same masks, another step or layer other samples.
    """

    scale: float | None = None
    text_lengths: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    seed: int = 0

    @property
    def padded(self) -> bool:
        return self.key_padding_mask is not None


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints that spreads every input bit over the output."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def call_seed(seed: int, step: int | None, layer: int) -> int:
    """The seed of one (step, layer) attention call from a generation ``seed``, in [0, 2**63): plain integer
    arithmetic on the host (no device sync), the same every run. ``step`` None (a call outside a denoising loop)
    is a value of its own."""
    step_code = 0 if step is None else step + 1
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ step_code) ^ (layer & _MASK64)) >> 1


class Attended(NamedTuple):
    """A method's output and the density it computed (float, or a 0-dim tensor for dynamic methods)."""

    out: torch.Tensor
    density: float | torch.Tensor


@dataclass(frozen=True)
class AttentionMethod:
    """Base class of method configs. Subclasses are frozen dataclasses and so hashable cache keys.

    Subclasses set ``name`` (the registry key) and declare their fields with `accel.options.option` so that
    the CLI, the UI and spec strings get help texts and ranges. ``registered = False`` hides a subclass.
    """

    name: ClassVar[str] = "base"
    registered: ClassVar[bool] = True

    def can_run(
        self,
        layout: TokenLayout,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        raise_error: bool = False,
    ) -> bool:
        """Whether this method can run these shapes; with raise_error, raise the reason instead of False."""
        return True

    # ------------------------------------------------------------------ static, per geometry
    def build_plan(self, layout: TokenLayout, heads: int, device: torch.device) -> Any:
        """Precompute what `run` needs for this geometry (masks, block lists). Pure; cached by callers."""
        return None

    def plan_density(self, plan: Any) -> float:
        """Fraction of attention tiles the plan computes (1.0 = dense); dynamic methods: an upper bound."""
        return 1.0

    def token_order(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        """A permutation of the video tokens (raster order -> method order) or None to keep raster order.

        ``perm[i]`` is the raster index of the token at position i of the method's order. The caller applies
        it once per forward; plans and `run` then see tokens in that order.
        """
        return None

    # ------------------------------------------------------------------ per call
    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, plan: Any, call: AttentionCall
    ) -> Attended:
        """Attention over a whole joint (B, S, H, D) sequence in `layout` order, with the density computed."""
        out = self.attend(q, k, v, layout, plan, key_padding_mask=call.key_padding_mask, scale=call.scale)
        return Attended(out, self.plan_density(plan))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        plan: Any,
        *,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Direct use (tests, benchmarks): attention over a joint sequence, returning only the output.

        Args:
            q, k, v: (B, S, H, D) in diffusers' layout, S = layout.total_tokens, tokens in layout order.
            layout: where video and text tokens sit.
            plan: this method's `build_plan` result for `layout`.
            key_padding_mask: optional (B, S) bool, True where a key may be attended (text padding).
            scale: softmax scale, default 1/sqrt(D).
        """
        call = call_from_padding_mask(key_padding_mask, layout, scale)
        return self.run(q, k, v, layout, plan, call).out

    def flex_mask_mod(self, layout: TokenLayout, plan: Any, device: torch.device) -> Any:
        """A `flex_attention` mask_mod over the video tokens in `token_order` that equals this plan's mask,
        for benchmarks that compare against flex with the same mask; None when the method has no such mask
        (dense, or dynamic per-call plans)."""
        return None

    # ------------------------------------------------------------------ specification and pictures
    def token_mask(self, layout: TokenLayout, plan: Any = None) -> torch.Tensor:
        """(S, S) bool: which key each query attends to (the specification; small sizes only)."""
        s = layout.total_tokens
        return torch.ones(s, s, dtype=torch.bool)

    def visualize(
        self, plan: Any, path: str | Path | None = None, *, layout: TokenLayout | None = None, max_pixels: int = 1024
    ) -> Path | np.ndarray:
        """Picture of what the plan computes (white = attended): a PNG at ``path``, or an RGB array."""
        if layout is None:
            raise ValueError(f"{self.name}.visualize needs the token layout the plan was built for")
        mask = self.token_mask(layout, plan)
        return render_mask_image(mask, layout, path, title=str(self), max_pixels=max_pixels)


def call_from_padding_mask(
    key_padding_mask: torch.Tensor | None, layout: TokenLayout, scale: float | None = None
) -> AttentionCall:
    """An `AttentionCall` from a (B, S) key-padding mask (one host sync: for direct calls, not per layer)."""
    if key_padding_mask is None:
        return AttentionCall(scale=scale)
    b = key_padding_mask.shape[0]
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, layout.total_tokens):
        raise ValueError(
            f"key_padding_mask must be bool (B, S) with S = {layout.total_tokens}, "
            f"got dtype={key_padding_mask.dtype}, shape={tuple(key_padding_mask.shape)}"
        )
    facts = padding_facts(key_padding_mask[:, layout.text_slice])
    if not bool(key_padding_mask[:, layout.video_slice].all()):
        return AttentionCall(scale=scale, key_padding_mask=key_padding_mask, text_mask=None, text_lengths=None)
    if facts is None:
        return AttentionCall(scale=scale)
    lengths, text_mask = facts
    return AttentionCall(scale=scale, text_lengths=lengths, text_mask=text_mask, key_padding_mask=key_padding_mask)


def padding_facts(text_visible: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """Classify a (B, T) bool text mask once: None if all visible, else (lengths, None) for trailing padding
    or (None, mask) for scattered padding. One host sync; callers do this once per forward."""
    if text_visible.numel() == 0:
        return None
    lengths = text_visible.sum(1, dtype=torch.int32)
    prefix = torch.arange(text_visible.shape[1], device=text_visible.device)[None, :] < lengths[:, None]
    all_visible, trailing = torch.stack([text_visible.all(), (prefix == text_visible).all()]).tolist()  # one sync
    if all_visible:
        return None
    if trailing:
        return lengths, None
    return None, text_visible


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_shape_error(
    method: str, layout: Any, heads: int, head_dim: int, dtype: torch.dtype, max_head_dim: int = 256
) -> Exception | None:
    """The error (not raised) for a call the Triton-backed methods cannot take, or None: what every `can_run` checks."""
    if not isinstance(layout, TokenLayout):
        return TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if head_dim < 1 or heads < 1:
        return ValueError(f"heads and head_dim must be >= 1, got heads={heads}, head_dim={head_dim}")
    if head_dim > max_head_dim:
        return NotImplementedError(f"{method} attention supports head_dim <= {max_head_dim}, got head_dim={head_dim}")
    if dtype not in KERNEL_DTYPES:
        return NotImplementedError(f"{method} attention supports float16/bfloat16/float32, got dtype={dtype}")
    return None


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> None:
    """Raise ValueError unless q, k, v are (B, S, H, D) self-attention tensors matching the layout."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, S, H, D) with equal shapes, got q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"v={tuple(v.shape)}"
        )
    if q.shape[1] != layout.total_tokens:
        raise ValueError(
            f"sequence length {q.shape[1]} does not match the token layout ({layout.video_tokens} video + "
            f"{layout.text_tokens} text tokens)"
        )


def split_joint(layout: TokenLayout) -> tuple[slice, slice]:
    """(video slice, text slice) of a joint sequence: the one place that knows where each part sits."""
    return layout.video_slice, layout.text_slice


def render_mask_image(
    mask: torch.Tensor,
    layout: TokenLayout,
    path: str | Path | None = None,
    *,
    title: str = "",
    max_pixels: int = 1024,
    cell: int = 1,
    density: float | None = None,
) -> Path | np.ndarray:
    """Draw a (N, N) bool mask (OR-pooled to at most ``max_pixels``) with frame boundaries in frames.

    ``cell`` is how many tokens one mask row covers (a block size for block masks, 1 for token masks).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = mask.shape[-1]
    factor = max(1, math.ceil(n / max(1, max_pixels)))
    if factor > 1:
        m = math.ceil(n / factor) * factor
        padded = torch.zeros(m, m, dtype=torch.bool)
        padded[:n, :n] = mask
        img = padded.view(m // factor, factor, m // factor, factor).any(3).any(1)
    else:
        img = mask
    frames = layout.frames
    tokens_per_frame = layout.tokens_per_frame
    fig = Figure(figsize=(7, 7.4), dpi=150)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", extent=(0, n, n, 0))
    if frames > 1:
        per_frame = tokens_per_frame / cell
        step = max(1, math.ceil(frames / 16))
        ticks = [f * per_frame for f in range(0, frames, step)]
        ax.set_xticks(ticks, [str(f) for f in range(0, frames, step)])
        ax.set_yticks(ticks, [str(f) for f in range(0, frames, step)])
        if frames <= 64:
            for f in range(1, frames):
                ax.axhline(f * per_frame, color="tab:red", lw=0.4, alpha=0.6)
                ax.axvline(f * per_frame, color="tab:red", lw=0.4, alpha=0.6)
            ax.legend(handles=[Line2D([], [], color="tab:red", lw=1, label="latent frame boundary")],
                      loc="upper right", fontsize=7, framealpha=0.8)
        ax.set_xlabel("key latent frame")
        ax.set_ylabel("query latent frame")
    else:
        ax.set_xlabel("key token" if cell == 1 else "key block")
        ax.set_ylabel("query token" if cell == 1 else "query block")
    fraction = float(mask.float().mean()) if density is None else density
    pooled = f", {factor}x{factor} pooled" if factor > 1 else ""
    grid = "x".join(map(str, layout.grid))
    ax.set_title((f"{title}\n" if title else "") + f"grid {grid} (frames x rows x cols){pooled}: "
                 f"{fraction:.1%} computed", fontsize=8)
    return figure_output(fig, path)


def figure_output(fig: Any, path: str | Path | None) -> Path | np.ndarray:
    """A matplotlib `Figure` written to ``path`` (a PNG), or as an RGB array when ``path`` is None."""
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
