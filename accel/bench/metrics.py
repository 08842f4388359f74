"""Video quality metrics for comparing a sparse-attention generation with its dense counterpart.

Videos are numpy arrays (F, H, W, C) (or one frame (H, W, C)), uint8 in [0, 255] or floating point
in [0, 1] (or [0, 255] with ``data_range=255``). Each metric compares two videos of equal shape.

- `psnr`: peak signal-to-noise ratio of the whole video, 10 log10(R^2 / MSE) with the MSE pooled over
  every frame, pixel and channel; ``inf`` for identical videos.
- `ssim`: structural similarity (Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error
  visibility to structural similarity", IEEE TIP 2004) with the paper's 11 x 11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, "valid" filtering as in the authors' ``ssim_index.m``, computed
  per frame and channel and averaged; 1.0 for identical videos.
- `lpips_distance`: LPIPS (Zhang et al., CVPR 2018) only when the ``lpips`` package and all its
  weights (its linear heads and the torchvision AlexNet checkpoint) are on disk; nothing is ever
  downloaded. Otherwise it returns None and `lpips_status` says why.
- `relative_l2`: ||x - ref|| / ||ref|| for tensors or arrays.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_video(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be a video (F, H, W, C) or a frame (H, W, C) with C in (1, 3, 4), "
                         f"got shape {x.shape}")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or floating point, got dtype {x.dtype}")
    return x


def _pair(a: Any, b: Any, data_range: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    a, b = _as_video(a, "a"), _as_video(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got a.shape={a.shape}, b.shape={b.shape}")
    if data_range is None:
        data_range = infer_data_range(a, b)
    elif not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a number > 0, got {data_range!r}")
    return a, b, float(data_range)


def infer_data_range(a: np.ndarray, b: np.ndarray) -> float:
    """255 for uint8; 1.0 for floats inside [0, 1]; 255 for floats inside [0, 255]; else ValueError."""
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        return 255.0
    lo = min(float(np.min(a)), float(np.min(b)))
    hi = max(float(np.max(a)), float(np.max(b)))
    if lo >= 0.0 and hi <= 1.0:
        return 1.0
    if lo >= 0.0 and hi <= 255.0:
        return 255.0
    raise ValueError(f"cannot infer the data range of float videos with values in [{lo:g}, {hi:g}]; "
                     "pass data_range= explicitly")


def mse(a: Any, b: Any) -> float:
    """Mean squared error over every frame, pixel and channel (in the inputs' own units)."""
    a, b, _ = _pair(a, b, 1.0)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr(a: Any, b: Any, *, data_range: float | None = None) -> float:
    """PSNR in dB of video `a` against `b`, MSE pooled over the whole video; ``inf`` when identical.

    ``data_range`` (the peak value R) defaults to 255 for uint8 and 1.0 for floats in [0, 1].
    """
    a, b, r = _pair(a, b, data_range)
    diff = a.astype(np.float64) - b.astype(np.float64)
    err = float(np.mean(diff * diff))
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(r * r / err)


def psnr_per_frame(a: Any, b: Any, *, data_range: float | None = None) -> list[float]:
    """PSNR of each frame (``inf`` for identical frames)."""
    a, b, r = _pair(a, b, data_range)
    return [psnr(fa, fb, data_range=r) for fa, fb in zip(a, b, strict=True)]


@lru_cache(maxsize=8)
def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (N, 1, H, W)."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim_map(
    a: Any, b: Any, *, data_range: float | None = None, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> np.ndarray:
    """Per-frame, per-channel mean SSIM, shape (F, C).

    Frames smaller than the window use the largest odd window that fits (sigma scaled with it).
    """
    a, b, r = _pair(a, b, data_range)
    frames, height, width, channels = a.shape
    size = min(window, height, width)
    size = size if size % 2 else size - 1
    if size < 1:
        raise ValueError(f"frames must be at least 1 x 1 pixels, got {height} x {width}")
    g = _gaussian_1d(size, sigma * size / window)
    # (F, H, W, C) -> (F*C, 1, H, W), float64 so identical inputs give exactly 1.0.
    x = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64).permute(0, 3, 1, 2).reshape(-1, 1, height, width)
    y = torch.from_numpy(np.ascontiguousarray(b)).to(torch.float64).permute(0, 3, 1, 2).reshape(-1, 1, height, width)
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mu_x * mu_x
    syy = _filter(y * y, g) - mu_y * mu_y
    sxy = _filter(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    smap = num / den
    return smap.mean(dim=(1, 2, 3)).view(frames, channels).numpy()


def ssim(a: Any, b: Any, *, data_range: float | None = None) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window) over frames and channels; 1.0 when identical."""
    return float(ssim_map(a, b, data_range=data_range).mean())


def relative_l2(x: Any, ref: Any) -> float:
    """||x - ref||_2 / ||ref||_2 in float64 (0.0 when both are zero, inf when only ref is zero)."""
    xt = torch.as_tensor(x).detach().to(torch.float64)
    rt = torch.as_tensor(ref).detach().to(device=xt.device, dtype=torch.float64)
    if xt.shape != rt.shape:
        raise ValueError(f"relative_l2 needs equal shapes, got {tuple(xt.shape)} and {tuple(rt.shape)}")
    num = torch.linalg.vector_norm(xt - rt).item()
    den = torch.linalg.vector_norm(rt).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# ------------------------------------------------------------------------------------------ LPIPS
_ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"


def lpips_status(net: str = "alex") -> tuple[bool, str]:
    """(available, reason): whether LPIPS can run offline with pretrained weights already on disk."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False, "the lpips package is not installed (pip install lpips; weights must be present locally)"
    if net != "alex":
        return False, f"only the 'alex' LPIPS backbone is supported offline, got net={net!r}"
    head = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not head.is_file():
        return False, f"LPIPS linear-head weights not found at {head}"
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET_CHECKPOINT
    if not backbone.is_file():
        return False, f"torchvision AlexNet weights not found at {backbone} (never downloaded by accel)"
    return True, "ok"


@lru_cache(maxsize=2)
def _lpips_model(net: str, device: str) -> Any:
    import lpips

    return lpips.LPIPS(net=net, verbose=False).eval().to(device)


def lpips_distance(a: Any, b: Any, *, data_range: float | None = None, device: str = "cpu") -> float | None:
    """Mean LPIPS (AlexNet) over frames, or None when `lpips_status()` is not available."""
    ok, _ = lpips_status()
    if not ok:
        return None
    a, b, r = _pair(a, b, data_range)
    if a.shape[-1] != 3:
        raise ValueError(f"LPIPS needs RGB videos (C == 3), got C={a.shape[-1]}")
    model = _lpips_model("alex", device)

    def to_t(v: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(v)).to(torch.float32).permute(0, 3, 1, 2) / r
        return (t * 2 - 1).to(device)

    with torch.no_grad():
        d = model(to_t(a), to_t(b))
    return float(d.mean().item())


__all__ = [
    "infer_data_range",
    "lpips_distance",
    "lpips_status",
    "mse",
    "psnr",
    "psnr_per_frame",
    "relative_l2",
    "ssim",
    "ssim_map",
]
