"""Score the demo model (or a sparse attention method on it) with the task metric of `accel.demo.track`.

For each (prompt, seed) the model generates with dense attention; with a method spec (``radial``,
``pyramid:...``) it generates again with that method, and the report adds PSNR and SSIM of the method's video
against the dense one (`accel.bench.metrics`). The motion check (colour, direction, speed vs the caption) is
made on the video under test: the method's when one is given, else the dense one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from accel.demo.config import DemoModelConfig
from accel.demo.track import MotionSummary, TrackConfig, TrackResult, summarize, track
from accel.lora.synthetic import clip_spec

EVAL_SEED = 9_001  # a synthetic seed none of the recipe's training clips use
EVAL_PROMPTS: tuple[str, ...] = ("a red square moving right", *(clip_spec(EVAL_SEED, i).caption for i in range(15)))
"""16 fixed prompts: the issue's example, then held-out captions covering colours, shapes, directions and speeds."""


@dataclass(frozen=True)
class PromptScore:
    """One generation: its prompt and seed, the tracker's verdict, and PSNR/SSIM against dense (None without one)."""

    prompt: str
    seed: int
    track: TrackResult
    seconds: float
    psnr: float | None = None
    ssim: float | None = None


@dataclass(frozen=True)
class EvalReport:
    """All scores of one evaluation with their aggregate."""

    method: str
    scores: list[PromptScore] = field(default_factory=list)

    @property
    def motion(self) -> MotionSummary:
        return summarize(s.track for s in self.scores)

    @property
    def mean_psnr(self) -> float | None:
        vals = [s.psnr for s in self.scores if s.psnr is not None]  # inf (identical videos) makes the mean inf
        return float(np.mean(vals)) if vals else None

    @property
    def mean_ssim(self) -> float | None:
        vals = [s.ssim for s in self.scores if s.ssim is not None]
        return float(np.mean(vals)) if vals else None

    def to_dict(self) -> dict[str, Any]:
        m = self.motion
        return {"method": self.method, "count": m.count, "match_rate": m.match_rate, "colour_rate": m.colour_rate,
                "direction_rate": m.direction_rate, "speed_rate": m.speed_rate, "mean_psnr": self.mean_psnr,
                "mean_ssim": self.mean_ssim,
                "scores": [{"prompt": s.prompt, "seed": s.seed, "matches": s.track.matches,
                            "direction": s.track.direction, "speed_class": s.track.speed_class,
                            "colour_ok": s.track.colour_ok, "psnr": s.psnr, "ssim": s.ssim, "seconds": s.seconds}
                           for s in self.scores]}


def generate(pipe: Any, prompt: str, seed: int, config: DemoModelConfig, *, method: Any = None,
             schedule: Any = None, **overrides: Any) -> np.ndarray:
    """(F, H, W, 3) uint8 video of `prompt` at the config's default generation settings (`overrides` win).

    With `method` (an `AttentionMethod`) the pipeline is patched for this call only.
    """
    from accel.demo.model import call_defaults
    from accel.pipelines.patching import patch, unpatch

    kwargs = {**call_defaults(config), **overrides}
    if method is not None:
        patch(pipe, method, schedule=schedule, seed=seed)
    try:
        with torch.no_grad():
            frames = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np",
                          **kwargs).frames[0]
    finally:
        if method is not None:
            unpatch(pipe)
    return (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)


def evaluate(pipe: Any, config: DemoModelConfig, *, prompts: Sequence[str] = EVAL_PROMPTS,
             seeds: Sequence[int] = (0,), method: str | None = None, track_config: TrackConfig = TrackConfig(),
             progress: bool = True, **overrides: Any) -> EvalReport:
    """Generate every (prompt, seed), dense and (if `method`, a spec string) sparse, and score them."""
    from tqdm import tqdm

    from accel.bench.metrics import psnr, ssim

    spec = None
    if method is not None:
        from accel.methods.registry import parse_method_spec

        spec = parse_method_spec(method)
    if not prompts or not seeds:
        raise ValueError(f"evaluate needs at least one prompt and one seed, got {len(prompts)} and {len(seeds)}")
    report = EvalReport(method or "dense")
    jobs = [(p, s) for p in prompts for s in seeds]
    for prompt, seed in tqdm(jobs, desc=f"evaluate {report.method}", disable=not progress):
        t0 = time.perf_counter()
        dense = generate(pipe, prompt, seed, config, **overrides)
        if spec is None:
            report.scores.append(PromptScore(prompt, seed, track(dense, prompt, track_config),
                                             time.perf_counter() - t0))
            continue
        t0 = time.perf_counter()
        video = generate(pipe, prompt, seed, config, method=spec.method, schedule=spec.schedule_over(), **overrides)
        report.scores.append(PromptScore(prompt, seed, track(video, prompt, track_config), time.perf_counter() - t0,
                                         psnr(video, dense), ssim(video, dense)))
    return report


__all__ = ["EVAL_PROMPTS", "EVAL_SEED", "EvalReport", "PromptScore", "evaluate", "generate"]
