"""The rectified-flow (flow-matching) objective of Wan 2.1/2.2 and HunyuanVideo, and its timestep sampling.

All three families train the transformer to predict the velocity ``noise - x0`` at ``x_t = (1 - s) x0 + s noise``,
with the sigma ``s`` drawn from a density (uniform or logit-normal) and then shifted like their flow-match
schedulers (``shift * s / (1 + (shift - 1) s)``); the timestep given to the model is ``1000 s``. Wan 2.2 A14B
trains its two experts separately: the high-noise expert (``transformer``) on timesteps at or above
``boundary_ratio * 1000``, the low-noise expert (``transformer_2``) below it. The range is applied by sampling
the pre-shift value inside the inverse-shifted interval, so the density inside the range is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WEIGHTINGS = ("uniform", "logit_normal")
EXPERTS = ("high", "low")

# Training shift per family (Wan's released configs use 3.0 at 480p and 5.0 at 720p; HunyuanVideo 7.0).
DEFAULT_SHIFT: dict[str, float] = {"wan": 3.0, "hunyuan_video": 7.0}


@dataclass(frozen=True)
class FlowMatchObjective:
    """Timestep density, shift and sigma range of one training run.

    Attributes:
        shift: the scheduler's time shift (> 0; 1 = no shift).
        weighting: "logit_normal" (SD3/Wan practice: fewer very small and very large sigmas) or "uniform".
        logit_mean, logit_std: parameters of the logit-normal density.
        sigma_min, sigma_max: the sigma range trained (after shifting); Wan 2.2 experts use the boundary.
    """

    shift: float = 3.0
    weighting: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_min: float = 0.0
    sigma_max: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.shift) or self.shift <= 0:
            raise ValueError(f"FlowMatchObjective.shift must be a finite number > 0, got {self.shift!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"FlowMatchObjective.weighting must be one of {', '.join(WEIGHTINGS)}, "
                             f"got {self.weighting!r}")
        if not self.logit_std > 0:
            raise ValueError(f"FlowMatchObjective.logit_std must be > 0, got {self.logit_std!r}")
        if not 0.0 <= self.sigma_min < self.sigma_max <= 1.0:
            raise ValueError("FlowMatchObjective needs 0 <= sigma_min < sigma_max <= 1, "
                             f"got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")

    @classmethod
    def for_family(cls, family: str, *, expert: str | None = None, boundary_ratio: float | None = None,
                   **overrides) -> FlowMatchObjective:
        """The objective of `family`; `expert` ("high"/"low") limits sigmas to one Wan 2.2 expert's range."""
        if family not in DEFAULT_SHIFT:
            raise NotImplementedError(f"no flow-matching objective for family {family!r}; "
                                      f"known: {', '.join(DEFAULT_SHIFT)}")
        kw: dict = {"shift": DEFAULT_SHIFT[family]}
        if expert is not None:
            if expert not in EXPERTS:
                raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
            if boundary_ratio is None:
                raise ValueError(f"expert={expert!r} needs a Wan 2.2 pipeline (its boundary_ratio); this one has none")
            kw.update({"sigma_min": boundary_ratio} if expert == "high" else {"sigma_max": boundary_ratio})
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift * u / (1 + (self.shift - 1) * u)

    def unshifted(self, sigma: float) -> float:
        return sigma / (self.shift - (self.shift - 1) * sigma)

    def sample_sigmas(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch,) float32 sigmas in [sigma_min, sigma_max], drawn on the CPU from `generator`."""
        lo, hi = self.unshifted(self.sigma_min), self.unshifted(self.sigma_max)
        if self.weighting == "uniform":
            u = lo + (hi - lo) * torch.rand(batch, generator=generator)
        else:
            # Inverse-CDF sampling of the logit-normal restricted to [lo, hi]: exact and needs no rejection loop.
            normal = torch.distributions.Normal(self.logit_mean, self.logit_std)
            a = normal.cdf(torch.tensor(_logit(lo))) if lo > 0 else torch.tensor(0.0)
            b = normal.cdf(torch.tensor(_logit(hi))) if hi < 1 else torch.tensor(1.0)
            p = a + (b - a) * torch.rand(batch, generator=generator)
            u = torch.sigmoid(normal.icdf(p.clamp(1e-7, 1 - 1e-7)))
            u = u.clamp(lo, hi)
        return self.shifted(u).float()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity) for clean latents `x0` (B, ...), `noise` like it and (B,) `sigmas`."""
        s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise, noise - x0

    @staticmethod
    def timesteps(sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * 1000.0

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error in float32 (bf16 predictions are upcast first)."""
        return torch.nn.functional.mse_loss(pred.float(), target.float())


def _logit(x: float) -> float:
    return math.log(x / (1 - x))


__all__ = ["DEFAULT_SHIFT", "EXPERTS", "FlowMatchObjective", "WEIGHTINGS"]
