"""Attention fidelity: how far a sparse method's output is from dense attention, at its tile density.

For each input family (how q, k, v are synthesised) and each method config, the benchmark runs the
method on a (1, S, H, D) video-token sequence and reports the relative L2 error of its output against
dense attention on the same inputs, ||O - O_dense|| / ||O_dense||, next to the method's tile density
(`AttentionMethod.plan_density`; evaluated through the method, the density its calls reported, which is
what dynamic methods such as pyramid choose per call: FLOP-equivalent there). Results go to
``<out>/fidelity[_<tag>].json`` and a PNG with one panel per input family (error vs density, one line per
method series).

Input families
--------------
``kind="rope"``: q and k are built the way a video DiT builds them (Wan2.1 is the model): a content
feature per token, RMS-normalised per head (Wan applies RMSNorm to q and k), then 3-D rotary position
embeddings with the head dim split across the frame / height / width axes exactly like diffusers'
``WanRotaryPosEmbed`` (h_dim = w_dim = 2 * (D // 6), t_dim = D - h_dim - w_dim, interleaved pairs,
frequencies theta^(-2i/dim)). The content feature of token x is

    f_q(x) = sqrt(common) * c + sqrt(smooth) * s(x) + sqrt(noise) * n_q(x)     (and f_k with n_k)

- ``c``: one random vector per head shared by every token and by q and k. Under RoPE,
  q(x) . k(y) then depends on the relative position x - y only and peaks at x = y: this is how rotary
  embeddings make attention mass decay with spatiotemporal distance.
- ``s(x)``: a smooth Gaussian random field over the (T, H, W) grid (Gaussian correlation lengths
  ``corr_frames`` in latent frames, ``corr_tokens`` in tokens; no wrap-around), shared by q and k:
  content locality (nearby tokens look alike).
- ``n_q, n_k``: independent iid noise: the part of q and k unrelated to position.
- The weights are normalised to sum to 1, so ``common : smooth : noise`` is the content/noise ratio.
- ``rope_theta``: the RoPE base (Wan: 10,000). A smaller base rotates faster, so relative-position
  logits decay faster; ``position_scale`` multiplies positions (< 1 = position interpolation, as
  length extension does).
- ``temperature``: logits are q.k / sqrt(D) / temperature; lower = peakier, more local attention.

``kind="gaussian"``: the control: q, k iid Gaussian (RMS-normalised, no RoPE, no structure), so
attention has no locality for a static mask to exploit.

In every family v is iid Gaussian, so the output error measures the attention-weight error.
Each family records an attention-mass profile (over sampled queries) in the JSON: the mass at each
frame distance and within each spatial radius, to document how local it is.

Methods are evaluated through their own `attend` (the kernel a user gets; default on CUDA) or, with
``evaluate="mask"``, through masked SDPA with the method's token mask for methods that expose one
(Radial: `accel.methods.radial.expand_plan_mask`); the same math, much faster on CPU, where the
default is "mask" whenever a token mask exists. The dense reference is always float32 SDPA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from accel.bench import environment, method_label, parse_method_spec
from accel.bench.metrics import relative_l2
from accel.bench.plotting import save_figure
from accel.geometry import TokenLayout
from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense, sdpa_bshd

logger = logging.getLogger("accel")

REFERENCE_HEAD_DIM = 128
DEFAULT_OUT = Path("outputs/bench")
"""Default output folder, relative to the current directory (outside the source tree). The committed results in
``benchmarks/results/`` are only written with an explicit ``--out benchmarks/results``."""
DEFAULT_DECAYS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)

# name -> (frames, height, width, heads, head_dim); "wan1.3b-480p-81f" etc. from BENCHMARKS.md.
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "cpu-small": (9, 16, 16, 2, 32),
    "cpu-tiny": (5, 8, 8, 2, 32),
    "wan1.3b-480p-81f": (21, 30, 52, 12, 128),
    "wan14b-720p-81f": (21, 45, 80, 40, 128),
    "hunyuan-720p-129f": (33, 45, 80, 24, 128),
}


# --------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFamily:
    """How one panel's q, k, v are synthesised (see the module docstring for the model).

    Attributes:
        name: panel label.
        kind: "rope" (structured, video-DiT-like) or "gaussian" (iid control).
        rope_theta: RoPE base (Wan 10,000); smaller decays faster with distance.
        position_scale: multiplies the (t, h, w) positions fed to RoPE.
        common: weight of the per-head content vector shared by all tokens (RoPE locality).
        smooth: weight of the smooth random field (content locality).
        noise: weight of iid noise, independent for q and k.
        corr_frames: correlation length of the smooth field along frames (latent frames).
        corr_tokens: correlation length of the smooth field along height and width (tokens).
        temperature: divides the logits q.k / sqrt(D).
    """

    name: str
    kind: Literal["rope", "gaussian"] = "rope"
    rope_theta: float = 10000.0
    position_scale: float = 1.0
    common: float = 0.4
    smooth: float = 0.4
    noise: float = 0.2
    corr_frames: float = 1.0
    corr_tokens: float = 2.0
    temperature: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("rope", "gaussian"):
            raise ValueError(f"InputFamily.kind must be 'rope' or 'gaussian', got {self.kind!r}")
        for name in ("rope_theta", "position_scale", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"InputFamily.{name} must be a finite number > 0, got {value!r}")
        for name in ("common", "smooth", "noise", "corr_frames", "corr_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"InputFamily.{name} must be a finite number >= 0, got {value!r}")
        if self.kind == "rope" and self.common + self.smooth + self.noise <= 0:
            raise ValueError("InputFamily: common + smooth + noise must be > 0")

    @property
    def structured(self) -> bool:
        return self.kind == "rope"


DEFAULT_FAMILIES: tuple[InputFamily, ...] = (
    InputFamily("wan-rope"),
    InputFamily("rope-sharp", temperature=0.25),
    InputFamily("rope-soft", temperature=1.0),
    InputFamily("rope-theta1e3", rope_theta=1000.0),
    InputFamily("rope-noisy", common=0.25, smooth=0.25, noise=0.5),
    InputFamily("rope-temporal", corr_frames=4.0, corr_tokens=1.0),
    InputFamily("iid-gaussian", kind="gaussian", temperature=1.0),
    InputFamily("iid-gaussian-sharp", kind="gaussian", temperature=0.25),
)
FAMILIES: dict[str, InputFamily] = {f.name: f for f in DEFAULT_FAMILIES}


def parse_family_spec(spec: str) -> InputFamily:
    """``"wan-rope"`` (a preset), ``"wan-rope:temperature=0.3"`` (preset with overrides), or
    ``"rope:rope_theta=1000,noise=0.5"`` / ``"gaussian:temperature=0.5"`` (a new family)."""
    name, _, rest = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(InputFamily)} - {"name", "kind"}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in fields:
            raise ValueError(f"family spec items must be key=value with key in {sorted(fields)}, got {item!r}")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError as err:
            raise ValueError(f"family option {key.strip()} must be a number, got {value!r}") from err
    if name in FAMILIES:
        return dataclasses.replace(FAMILIES[name], name=spec.strip(), **kwargs)
    if name in ("rope", "gaussian"):
        return InputFamily(spec.strip(), kind=name, **kwargs)
    raise ValueError(f"unknown input family {name!r}; presets: {', '.join(FAMILIES)}; or 'rope:...', 'gaussian:...'")


def wan_rope_split(head_dim: int) -> tuple[int, int, int]:
    """(t_dim, h_dim, w_dim) of diffusers' WanRotaryPosEmbed for a head dim."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(
    grid: tuple[int, int, int], head_dim: int, *, theta: float = 10000.0, position_scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(S, D/2) float64 rotation angles, tokens frame-major and raster-scanned (Wan's 3-D RoPE)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3-D RoPE needs an even head_dim >= 6, got {head_dim}")
    frames, height, width = grid
    parts = []
    for axis, (size, dim) in enumerate(zip(grid, wan_rope_split(head_dim), strict=True)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device)[: dim // 2] / dim)
        pos = torch.arange(size, dtype=torch.float64, device=device) * position_scale
        view = [1, 1, 1, dim // 2]
        view[axis] = size
        parts.append((pos[:, None] * freqs[None, :]).view(view).expand(frames, height, width, -1))
    return torch.cat(parts, -1).reshape(frames * height * width, head_dim // 2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, H, D) by angles (S, D/2), as diffusers' Wan processor does."""
    cos = angles.cos().to(x.dtype)[None, :, None, :]
    sin = angles.sin().to(x.dtype)[None, :, None, :]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def smooth_field(
    grid: tuple[int, int, int], channels: int, corr: tuple[float, float, float], generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(S, channels) unit-variance Gaussian random field with Gaussian correlation lengths per axis.

    White noise on a grid padded by 3 correlation lengths is low-pass filtered through an FFT and
    cropped, so there is no wrap-around between the first and last frames.
    """
    pads = [math.ceil(3 * c) for c in corr]
    padded = [n + 2 * p for n, p in zip(grid, pads, strict=True)]
    noise = torch.randn(channels, *padded, generator=generator).to(device)
    spec = torch.fft.rfftn(noise, dim=(-3, -2, -1))
    transfer = None
    for axis, (n, c) in enumerate(zip(padded, corr, strict=True)):
        f = torch.fft.rfftfreq(n, device=device) if axis == 2 else torch.fft.fftfreq(n, device=device)
        t = torch.exp(-2 * (math.pi * c * f) ** 2)
        shape = [1, 1, 1]
        shape[axis] = -1
        t = t.view(shape)
        transfer = t if transfer is None else transfer * t
    field = torch.fft.irfftn(spec * transfer, s=padded, dim=(-3, -2, -1))
    (pt, ph, pw), (nt, nh, nw) = pads, grid
    field = field[:, pt:pt + nt, ph:ph + nh, pw:pw + nw].reshape(channels, -1)
    field = field - field.mean(1, keepdim=True)
    field = field / field.std(1, keepdim=True).clamp_min(1e-12)
    return field.t().contiguous()


def _rms_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))


def make_inputs(
    family: InputFamily,
    grid: tuple[int, int, int],
    heads: int,
    head_dim: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 q, k, v of shape (1, S, heads, head_dim), S = frames * height * width, for `family`.

    Deterministic per seed whatever the device (random numbers are drawn on the CPU). The returned
    q already carries 1 / temperature, so the default softmax scale 1/sqrt(D) gives the family's logits.
    """
    frames, height, width = grid
    s = frames * height * width
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    if family.kind == "gaussian":
        q, k = _rms_normalize(randn(1, s, heads, head_dim)), _rms_normalize(randn(1, s, heads, head_dim))
    else:
        total = family.common + family.smooth + family.noise
        wc, ws, wn = (math.sqrt(w / total) for w in (family.common, family.smooth, family.noise))
        shared = wc * randn(1, 1, heads, head_dim)
        if ws > 0:
            corr = (family.corr_frames, family.corr_tokens, family.corr_tokens)
            field = smooth_field(grid, heads * head_dim, corr, gen, device).view(1, s, heads, head_dim)
            shared = shared + ws * field
        angles = rope_angles(grid, head_dim, theta=family.rope_theta, position_scale=family.position_scale,
                             device=device)
        q = apply_rope(_rms_normalize(shared + wn * randn(1, s, heads, head_dim)), angles)
        k = apply_rope(_rms_normalize(shared + wn * randn(1, s, heads, head_dim)), angles)
    v = randn(1, s, heads, head_dim)
    # Unit-RMS q, k give logits sqrt(D) * cos(q, k); rescale to Wan's sqrt(128) so that a family means
    # the same at any head dim (iid controls: logit std sqrt(128 / D) / temperature).
    return q * (math.sqrt(REFERENCE_HEAD_DIM / head_dim) / family.temperature), k, v


@torch.no_grad()
def attention_profile(
    q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], *, queries: int = 256, seed: int = 0,
    radii: Sequence[float] = (0, 1, 2, 4, 8, 16, 32),
) -> dict[str, Any]:
    """Where the attention mass of sampled queries goes (averaged over queries and heads).

    Returns ``mass_by_frame_distance[d]`` (mass on keys d frames away), ``mass_within_radius[r]``
    (mass on keys within Euclidean (h, w) distance r, any frame), ``mean_entropy_ratio`` (entropy /
    log S; 1 = uniform) and ``self_mass`` (on the query's own token).
    """
    frames, height, width = grid
    s, dim = q.shape[1], q.shape[3]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(s, generator=gen)[: min(queries, s)].to(q.device)
    logits = torch.einsum("qhd,khd->hqk", q[0, idx].float(), k[0].float()) / math.sqrt(dim)
    p = logits.softmax(-1)  # (H, Q, S)
    tok = torch.arange(s, device=q.device)
    t, hw = tok // (height * width), tok % (height * width)
    hh, ww = hw // width, hw % width
    dt = (t[idx][:, None] - t[None, :]).abs()  # (Q, S)
    dist = ((hh[idx][:, None] - hh[None, :]).float() ** 2 + (ww[idx][:, None] - ww[None, :]).float() ** 2).sqrt()
    pm = p.mean(0)  # (Q, S)
    by_dt = torch.zeros(frames, dtype=torch.float64, device=q.device)
    by_dt.scatter_add_(0, dt.reshape(-1), pm.reshape(-1).double())
    by_dt /= len(idx)
    within = {f"{r:g}": float((pm * (dist <= r)).sum(-1).mean()) for r in radii}
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(s)
    self_mass = float(pm.gather(1, idx[:, None]).mean())
    return {
        "mass_by_frame_distance": [round(float(x), 6) for x in by_dt.cpu()],
        "mass_within_radius": within,
        "mean_entropy_ratio": float(entropy),
        "self_mass": self_mass,
        "queries": len(idx),
    }


# --------------------------------------------------------------------------------------- methods
def default_methods(
    decays: Sequence[float] = DEFAULT_DECAYS, *, block_size: int | None = None
) -> list[AttentionMethod]:
    """Dense plus Radial over ``decays`` x {band, disk} x {decay_near off, on}."""
    from accel.methods.radial import Radial

    methods: list[AttentionMethod] = [Dense()]
    for spatial in ("band", "disk"):
        for near in (False, True):
            methods += [Radial(decay=d, block_size=block_size, spatial=spatial, decay_near=near) for d in decays]
    return methods


def token_mask_fn(method: AttentionMethod) -> Callable[[Any, TokenLayout], torch.Tensor] | None:
    """The method's exact (S, S) token-mask builder (plan, layout) -> bool, when it has one."""
    from accel.methods.radial import Radial, expand_plan_mask

    if isinstance(method, Radial):
        return expand_plan_mask
    return None


def split_series(text: str) -> tuple[str | None, str]:
    """``"NAME=SPEC"`` -> (NAME, SPEC); a plain spec -> (None, spec). A name comes before the method's colon."""
    head = text.split(":", 1)[0]
    if "=" in head:
        name, _, spec = text.partition("=")
        if not name.strip():
            raise ValueError(f"empty series name in {text!r}")
        return name.strip(), spec
    return None, text


def series_key(method: AttentionMethod) -> str:
    """Plot series of a method: its label without the swept ``decay``."""
    return method_label(method, exclude=("decay",))


def _evaluate_method(
    method: AttentionMethod, plan: Any, mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, layout: TokenLayout,
) -> tuple[torch.Tensor, float | None]:
    """(output, the density the call reported, or None for the masked-SDPA evaluation).

    Through the method, the tokens go in the method's own order (`token_order`) and back, as in a model."""
    if mask is not None:
        return sdpa_mask(q, k, v, mask), None
    from accel.methods.base import AttentionCall
    from accel.pipelines.context import permute_tokens

    perm = method.token_order(layout, q.device)
    video = layout.video_slice
    if perm is not None:
        q, k, v = (permute_tokens(t, perm, 1, video) for t in (q, k, v))
    attended = method.run(q, k, v, layout, plan, AttentionCall())
    out = attended.out
    if perm is not None:
        out = permute_tokens(out, torch.argsort(perm), 1, video)
    return out, float(attended.density)


def sdpa_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA on (B, S, H, D) with an (S, S) bool mask (True = visible)."""
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=mask
    )
    return out.permute(0, 2, 1, 3)


# --------------------------------------------------------------------------------------- benchmark
@dataclass
class _Prepared:
    label: str
    method: AttentionMethod
    plan: Any = None
    density: float | None = None
    mask: torch.Tensor | None = None
    plan_seconds: float = 0.0
    skipped: str | None = None
    same_as: int = -1


def _fingerprint(method: AttentionMethod, plan: Any, mask: torch.Tensor | None) -> tuple | None:
    """Equal keys mean equal outputs: same method kind and same token mask or same block layout."""
    import hashlib

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    if mask is not None:
        return ("mask", tuple(mask.shape), digest(mask))
    layout = getattr(plan, "block_layout", None)
    if layout is not None and hasattr(layout, "offsets") and hasattr(layout, "indices"):
        return (method.name, getattr(plan, "grid", None), layout.block_m, layout.block_n,
                digest(layout.offsets), digest(layout.indices))
    return None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def run_fidelity(
    methods: Sequence[AttentionMethod] | None = None,
    families: Sequence[InputFamily] | None = None,
    *,
    grid: tuple[int, int, int] = SHAPES["cpu-small"][:3],
    heads: int = 2,
    head_dim: int = 32,
    seeds: Sequence[int] = (0, 1),
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = None,
    evaluate: Literal["auto", "attend", "mask"] = "auto",
    labels: Sequence[str] | None = None,
    series: Sequence[str | None] | None = None,
    profile_queries: int = 256,
    out_dir: str | Path | None = DEFAULT_OUT,
    tag: str | None = None,
    plot: bool = True,
) -> dict[str, Any]:
    """Relative L2 error vs dense of each method on each input family; JSON + PNG under ``out_dir``.

    Args:
        methods: configs to compare (default `default_methods()` with block 16 on CPU, else the
            kernel's block size). Dense is added first when missing (its row is the numerical floor).
        families: input families (default `DEFAULT_FAMILIES`).
        grid: (frames, height, width) video tokens; heads, head_dim: attention shape (batch 1).
        seeds: one input draw per seed; errors are averaged over seeds.
        device: "cpu", "cuda", ... (default CUDA when available).
        dtype: dtype the methods run in (default float32 on CPU, bfloat16 on CUDA, as models run); the
            dense reference is float32 SDPA on the float32 inputs, so Dense's own row is the dtype's floor.
        evaluate: "attend" (the method's kernel), "mask" (masked SDPA with the method's token mask,
            the same math) or "auto" (mask on CPU when the method has one, else attend).
        labels: names for ``methods`` (default `method_label`).
        series: plot series (a line each) for ``methods``; None entries use `series_key`.
        out_dir: where ``fidelity[_tag].json`` and ``.png`` go; None writes nothing.

    Returns:
        The JSON-ready result dict (``results``: one row per (family, method); ``band_vs_disk``).
    """
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "float32" if device.type == "cpu" else "bfloat16"
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    run_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if run_dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if evaluate not in ("auto", "attend", "mask"):
        raise ValueError(f"evaluate must be 'auto', 'attend' or 'mask', got {evaluate!r}")
    if methods is None:
        methods = default_methods(block_size=16 if device.type == "cpu" else None)
    methods = list(methods)
    for m in methods:
        if not isinstance(m, AttentionMethod):
            raise TypeError(f"methods must be AttentionMethod configs, got {type(m).__name__}")
    labels = list(labels) if labels is not None else [method_label(m) for m in methods]
    if len(labels) != len(methods):
        raise ValueError(f"got {len(labels)} labels for {len(methods)} methods")
    series = list(series) if series is not None else [None] * len(methods)
    if len(series) != len(methods):
        raise ValueError(f"got {len(series)} series names for {len(methods)} methods")
    if not any(isinstance(m, Dense) for m in methods):
        methods.insert(0, Dense())
        labels.insert(0, "dense")
        series.insert(0, None)
    series_of = {id(m): name for m, name in zip(methods, series, strict=True) if name}
    families = list(families) if families is not None else list(DEFAULT_FAMILIES)
    layout = TokenLayout(1, *grid)
    started = time.perf_counter()

    prepared: list[_Prepared] = []
    seen: dict[tuple, int] = {}
    use_mask = evaluate == "mask" or (evaluate == "auto" and device.type == "cpu")
    for label, method in zip(labels, methods, strict=True):
        entry = _Prepared(label, method)
        prepared.append(entry)
        try:
            method.can_run(layout, heads, head_dim, run_dtype, device, raise_error=True)
        except (ValueError, NotImplementedError, TypeError) as err:
            entry.skipped = f"{type(err).__name__}: {err}"
            logger.warning("fidelity: skipping %s: %s", label, entry.skipped)
            continue
        t0 = time.perf_counter()
        entry.plan = method.build_plan(layout, heads, device)
        entry.plan_seconds = time.perf_counter() - t0
        entry.density = float(method.plan_density(entry.plan))
        fn = token_mask_fn(method)
        if evaluate == "mask" and fn is None and not isinstance(method, Dense):
            logger.warning("fidelity: %s has no token mask; evaluating through attend", label)
        if use_mask and fn is not None:
            entry.mask = fn(entry.plan, layout).to(device)
        # Configs with identical masks (e.g. decays below the one-block floor) give identical outputs.
        key = _fingerprint(method, entry.plan, entry.mask)
        entry.same_as = seen.setdefault(key, len(prepared) - 1) if key is not None else len(prepared) - 1

    rows: list[dict[str, Any]] = []
    family_info = []
    for family in families:
        errors: list[list[float]] = [[] for _ in prepared]
        call_densities: list[list[float]] = [[] for _ in prepared]
        seconds = [0.0 for _ in prepared]
        profile = None
        for seed in seeds:
            q32, k32, v32 = make_inputs(family, grid, heads, head_dim, seed=seed, device=device)
            if profile is None and profile_queries:
                profile = attention_profile(q32, k32, grid, queries=profile_queries, seed=seed)
            ref = sdpa_bshd(q32, k32, v32)
            q, k, v = (t.to(run_dtype) for t in (q32, k32, v32))
            for i, entry in enumerate(prepared):
                if entry.skipped:
                    continue
                if entry.same_as != i:
                    errors[i].append(errors[entry.same_as][-1])
                    call_densities[i] += call_densities[entry.same_as][-1:]
                    continue
                t0 = time.perf_counter()
                out, call_density = _evaluate_method(entry.method, entry.plan, entry.mask, q, k, v, layout)
                if call_density is not None:
                    call_densities[i].append(call_density)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[i] += time.perf_counter() - t0
                errors[i].append(relative_l2(out.float(), ref))
        family_info.append({**dataclasses.asdict(family), "attention_profile": profile})
        for i, entry in enumerate(prepared):
            method = entry.method
            row: dict[str, Any] = {
                "family": family.name,
                "structured": family.structured,
                "method": entry.label,
                "method_name": method.name,
                "series": series_of.get(id(method)) or series_key(method),
                "config": _jsonable(dataclasses.asdict(method)) if dataclasses.is_dataclass(method) else {},
                # what the calls computed (dynamic methods choose per call), else the plan's tile density
                "density": (sum(call_densities[i]) / len(call_densities[i]) if call_densities[i]
                            else entry.density),
            }
            if entry.skipped:
                row.update(skipped=entry.skipped)
            else:
                errs = errors[i]
                mean = sum(errs) / len(errs)
                std = math.sqrt(sum((e - mean) ** 2 for e in errs) / len(errs))
                j = entry.same_as
                row.update(
                    rel_l2=mean, rel_l2_std=std, rel_l2_per_seed=errs,
                    evaluated_by="mask" if entry.mask is not None else "attend",
                    same_output_as=None if j == i else prepared[j].label,
                    plan_seconds=entry.plan_seconds, seconds_per_call=seconds[j] / len(seeds),
                )
            rows.append(row)
        logger.info("fidelity: family %s done", family.name)

    result: dict[str, Any] = {
        "benchmark": "fidelity",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(),
        "device": str(device),
        "config": {
            "grid": list(grid), "heads": heads, "head_dim": head_dim, "tokens": layout.video_tokens,
            "seeds": list(seeds), "dtype": str(run_dtype).removeprefix("torch."), "evaluate": evaluate,
            "reference": "float32 SDPA on the same float32 inputs",
            "metric": "||O - O_dense||_2 / ||O_dense||_2 over all tokens, heads and channels",
        },
        "families": family_info,
        "results": rows,
        "band_vs_disk": compare_spatial(rows),
        "seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        stem = "fidelity" + (f"_{tag}" if tag else "")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
        result["json_path"] = str(out / f"{stem}.json")
        if plot:
            result["png_path"] = str(plot_fidelity(result, out / f"{stem}.png"))
    return result


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}


# --------------------------------------------------------------------------------------- analysis
def _interp_log(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of log(y) in x over sorted xs; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return None
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            if xs[i + 1] == xs[i]:
                return ys[i]
            w = (x - xs[i]) / (xs[i + 1] - xs[i])
            return math.exp((1 - w) * math.log(ys[i]) + w * math.log(ys[i + 1]))
    return ys[-1] if abs(x - xs[-1]) <= 1e-12 else ys[0]


def _curve(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    by_density: dict[float, list[float]] = {}
    for d, e in points:
        by_density.setdefault(round(d, 9), []).append(e)
    xs = sorted(by_density)
    return xs, [max(min(by_density[x]), 1e-12) for x in xs]


def compare_spatial(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Radial band vs disk at matched density, per family and (decay_near, sink, block_size, thinning).

    Each curve's log error is interpolated linearly in density at the other curve's densities (inside
    the overlap only); ``ratio_disk_over_band`` is the geometric mean of err_disk / err_band over
    all matched points (< 1: disk is more accurate at the same density).
    """
    groups: dict[tuple, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        if row.get("method_name") != "radial" or "rel_l2" not in row:
            continue
        cfg = row["config"]
        key = (row["family"], row["structured"], cfg.get("decay_near"), cfg.get("sink"), cfg.get("block_size"),
               cfg.get("thinning"))
        groups.setdefault(key, {"band": [], "disk": []})[cfg.get("spatial")].append((row["density"], row["rel_l2"]))
    out = []
    for (family, structured, near, sink, block, thinning), curves in groups.items():
        if not curves["band"] or not curves["disk"]:
            continue
        bx, by = _curve(curves["band"])
        dx, dy = _curve(curves["disk"])
        matched = []
        for x, y in zip(dx, dy, strict=True):
            yb = _interp_log(bx, by, x)
            if yb is not None:
                matched.append({"density": x, "disk": y, "band": yb, "measured": "disk"})
        for x, y in zip(bx, by, strict=True):
            yd = _interp_log(dx, dy, x)
            if yd is not None:
                matched.append({"density": x, "disk": yd, "band": y, "measured": "band"})
        logs = [math.log(m["disk"] / m["band"]) for m in matched]
        ratio = math.exp(sum(logs) / len(logs)) if logs else None
        out.append({
            "family": family, "structured": structured, "decay_near": near, "sink": sink, "block_size": block,
            "thinning": thinning,
            "matched_points": len(matched),
            "ratio_disk_over_band": ratio,
            "disk_lower_fraction": (sum(lg < 0 for lg in logs) / len(logs)) if logs else None,
            "better": None if ratio is None else ("tie" if abs(math.log(ratio)) < 0.02 else
                                                  ("disk" if ratio < 1 else "band")),
            "points": matched,
        })
    return out


def spatial_verdict(band_vs_disk: list[dict[str, Any]], structured_only: bool = True) -> dict[str, Any]:
    """Geometric-mean disk/band error ratio over the (structured) comparisons, and which mode wins."""
    ratios = [c["ratio_disk_over_band"] for c in band_vs_disk
              if c["ratio_disk_over_band"] is not None and (c["structured"] or not structured_only)]
    if not ratios:
        return {"ratio_disk_over_band": None, "better": None, "comparisons": 0}
    g = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return {
        "ratio_disk_over_band": g,
        "better": "tie" if abs(math.log(g)) < 0.02 else ("disk" if g < 1 else "band"),
        "comparisons": len(ratios),
        "disk_wins": sum(r < 1 for r in ratios),
    }


# --------------------------------------------------------------------------------------- output
def plot_fidelity(result: dict[str, Any], path: str | Path) -> Path:
    """Error vs tile density, one panel per input family, one line per method series."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    families = [f["name"] for f in result["families"]]
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig = Figure(figsize=(5.2 * cols, 4.0 * nrows), dpi=120)
    rows = [r for r in result["results"] if "rel_l2" in r]
    positive = [r["rel_l2"] for r in rows if r["rel_l2"] > 0]
    floor = min(positive) / 3 if positive else 1e-7  # exact zeros (dense) are drawn on this line
    series = sorted({r["series"] for r in rows})
    colors = {s: f"C{i % 10}" for i, s in enumerate(series)}
    for i, fam in enumerate(families):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for s in series:
            pts = sorted((r["density"], max(r["rel_l2"], floor)) for r in rows if r["family"] == fam
                         and r["series"] == s)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            style = "o-" if len(pts) > 1 else "v"
            ax.plot(xs, ys, style, color=colors[s], label=s, ms=3.5 if len(pts) > 1 else 6, lw=1.2, clip_on=False)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xlim(0, 1.03)
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("tile density")
        ax.set_ylabel("relative L2 error vs dense")
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6, loc="lower left")
    cfg = result["config"]
    fig.suptitle(
        f"attention fidelity: grid {'x'.join(map(str, cfg['grid']))}, {cfg['heads']} heads, D {cfg['head_dim']}, "
        f"{cfg['dtype']}, {result['device']}, {len(cfg['seeds'])} seeds (zero error drawn on the bottom axis)",
        fontsize=9,
    )
    return save_figure(fig, path)


def format_summary(result: dict[str, Any]) -> str:
    """Text table: error per method (rows) and family (columns), then the band-vs-disk verdict."""
    fams = [f["name"] for f in result["families"]]
    methods: dict[str, float] = {}
    table: dict[tuple[str, str], dict] = {}
    for r in result["results"]:
        methods.setdefault(r["method"], r["density"] if r["density"] is not None else float("nan"))
        table[(r["method"], r["family"])] = r
    width = max(len(m) for m in methods) + 2
    lines = [f"{'method':<{width}} density " + " ".join(f"{f[:14]:>14}" for f in fams)]
    for m, density in methods.items():
        cells = []
        for f in fams:
            r = table.get((m, f), {})
            cells.append(f"{r['rel_l2']:>14.3e}" if "rel_l2" in r else f"{'skipped':>14}")
        lines.append(f"{m:<{width}} {density:7.3f} " + " ".join(cells))
    verdict = spatial_verdict(result["band_vs_disk"])
    if verdict["ratio_disk_over_band"] is not None:
        lines.append(
            f"radial band vs disk at matched density (structured families, {verdict['comparisons']} comparisons): "
            f"geo-mean error ratio disk/band = {verdict['ratio_disk_over_band']:.3f} -> {verdict['better']}"
        )
        for c in result["band_vs_disk"]:
            if c["ratio_disk_over_band"] is not None:
                lines.append(f"  {c['family']:<22} decay_near={c['decay_near']!s:<5}: disk/band "
                             f"{c['ratio_disk_over_band']:.3f} over {c['matched_points']} points -> {c['better']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- CLI
def add_fidelity_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fidelity`` (for ``accel bench fidelity``) on an argparse subparsers object."""
    p = subparsers.add_parser(
        "fidelity", help="relative L2 error vs dense attention of sparse methods on synthetic video q/k/v",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", choices=sorted(SHAPES), help="named shape (sets grid, heads, head dim); "
                   "default cpu-small on CPU, wan1.3b-480p-81f on CUDA")
    p.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"), help="video tokens (overrides --shape)")
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--seeds", type=int, default=2, help="input draws per family (seeds 0..N-1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="dtype the methods run in (default: float32 on CPU, "
                   "bfloat16 on CUDA); the dense reference is always float32")
    p.add_argument("--evaluate", choices=("auto", "attend", "mask"), default="auto",
                   help="attend: the method's kernel; mask: masked SDPA with its token mask; auto: mask on CPU")
    p.add_argument("--methods", nargs="+", metavar="SPEC",
                   help="method specs, e.g. dense radial:decay=0.2 radial:decay=0.5,spatial=disk "
                        "(default: dense + radial decays x band/disk x decay_near); 'NAME=SPEC' puts a spec "
                        "on the plot line NAME (e.g. binary=pyramid:mode=topk,t1=0.2,t2=0.2,t3=0.2,t4=0.2)")
    p.add_argument("--decays", type=float, nargs="+", help="decays of the default radial sweep")
    p.add_argument("--block-size", type=int, help="radial block size of the default sweep (default 16 on CPU)")
    p.add_argument("--families", nargs="+", metavar="SPEC",
                   help=f"input families: presets {', '.join(FAMILIES)}, 'preset:key=value,...', or "
                        "'rope:key=value,...' / 'gaussian:...'")
    p.add_argument("--profile-queries", type=int, default=256, help="queries sampled for the attention profile")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder for fidelity[_TAG].json/.png (default: %(default)s, relative to the current "
                        "directory; the committed results are updated only with --out benchmarks/results)")
    p.add_argument("--tag", help="suffix of the output file names")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_fidelity)
    return p


def cmd_fidelity(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("cpu-small" if device.type == "cpu" else "wan1.3b-480p-81f")
    frames, height, width, heads, head_dim = SHAPES[shape]
    grid = tuple(args.grid) if args.grid else (frames, height, width)
    if args.methods:
        named = [split_series(s) for s in args.methods]
        specs = [parse_method_spec(spec, allow_schedule=False) for _, spec in named]
        methods, labels = [s.method for s in specs], [s.label for s in specs]
        series = [name for name, _ in named]
    else:
        block = args.block_size if args.block_size else (16 if device.type == "cpu" else None)
        methods = default_methods(tuple(args.decays) if args.decays else DEFAULT_DECAYS, block_size=block)
        labels = series = None
    families = [parse_family_spec(s) for s in args.families] if args.families else None
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    result = run_fidelity(
        methods, families, grid=grid, heads=args.heads or heads, head_dim=args.head_dim or head_dim,
        seeds=tuple(range(args.seeds)), device=device, dtype=args.dtype, evaluate=args.evaluate, labels=labels,
        series=series,
        profile_queries=args.profile_queries, out_dir=args.out, tag=args.tag, plot=not args.no_plot,
    )
    print(format_summary(result))
    print(f"wrote {result['json_path']}" + (f" and {result['png_path']}" if "png_path" in result else ""))
    return 0


__all__ = [
    "DEFAULT_DECAYS",
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "SHAPES",
    "InputFamily",
    "add_fidelity_command",
    "apply_rope",
    "attention_profile",
    "compare_spatial",
    "default_methods",
    "format_summary",
    "make_inputs",
    "parse_family_spec",
    "plot_fidelity",
    "rope_angles",
    "run_fidelity",
    "smooth_field",
    "spatial_verdict",
    "wan_rope_split",
]
