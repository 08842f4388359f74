"""Stage 1 of the demo recipe: train the small `AutoencoderKLWan` on synthetic clips rendered on the fly.

Clips come straight from `accel.lora.synthetic` (clip ``step * batch + b`` of `VAETrainConfig.seed`), so the
stage needs no files and never repeats a clip. The loss is a foreground-weighted MSE of the reconstruction
(shape pixels count `foreground_weight` times more: the shapes cover ~5-20% of a frame and would otherwise be
blurred into the background) plus a tiny KL term on the posterior. Afterwards the per-channel mean and std of
the latents (posterior mode over `stats_clips` clips) go into the VAE config, which is how WanPipeline and the
training cache normalise latents.

Resumable: a checkpoint (weights, AdamW state, step, wall time spent) every `save_every` steps, at the end, on
Ctrl-C and on SIGTERM; the clips and the posterior noise of step s are seeded from s, so a resumed run ends with
the same weights as an uninterrupted one. The stage stops at `steps` or when `budget_s` seconds of training
(summed over resumes) are spent, and then writes ``vae.safetensors`` + ``vae.json``; a stage finished with the
same config is loaded, not retrained, and raising `steps` or `budget_s` continues from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.demo.config import DemoModelConfig
from accel.lora.synthetic import BACKGROUND, clip_spec, render_clip
from accel.lora.train import _StopFlag  # SIGTERM/Ctrl-C: checkpoint, then stop (the trainer's own)

PRECISIONS = ("no", "bf16")


@dataclass(frozen=True)
class VAETrainConfig:
    """Stage 1 settings. Errors name the field.

    Attributes:
        steps: optimizer steps at most; budget_s: wall-clock seconds of training at most (whichever comes first).
        batch_size: clips per step; frames: frames per training clip (4k + 1; the causal VAE runs on any length).
        lr, warmup: AdamW learning rate with a linear warm-up, then constant.
        kl_weight: weight of the mean per-element KL divergence to N(0, 1).
        foreground_weight: extra loss weight of pixels that are not background.
        seed: the synthetic seed the clips are drawn from.
        save_every: checkpoint period in steps; log_every: loss log period.
        stats_clips: clips encoded to measure the latent mean and std.
        mixed_precision: "no" or "bf16" (autocast on CUDA only).
    """

    steps: int = 3000
    budget_s: float = 150.0
    batch_size: int = 8
    frames: int = 9
    lr: float = 1e-3
    warmup: int = 50
    kl_weight: float = 1e-4
    foreground_weight: float = 4.0
    seed: int = 1
    save_every: int = 250
    log_every: int = 10
    stats_clips: int = 64
    mixed_precision: str = "bf16"

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("frames", 1), ("warmup", 0), ("seed", 0),
                              ("save_every", 1), ("log_every", 1), ("stats_clips", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"VAETrainConfig.{name} must be a whole number >= {minimum}, got {value!r}")
        if (self.frames - 1) % 4:
            raise ValueError(f"VAETrainConfig.frames must be 4k + 1 (the VAE's temporal rule), got {self.frames}")
        for name in ("budget_s", "lr", "kl_weight", "foreground_weight"):
            value = getattr(self, name)
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            positive = name in ("budget_s", "lr")
            if bad or value < 0 or (positive and value == 0):
                raise ValueError(f"VAETrainConfig.{name} must be a finite number {'>' if positive else '>='} 0, "
                                 f"got {value!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"VAETrainConfig.mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")


class StagePaused(Exception):
    """A stage stopped at the caller's deadline with a checkpoint; rerunning continues it."""


@dataclass
class VAEResult:
    """What stage 1 produced: the trained VAE (latent statistics set), steps, seconds, and this process's losses."""

    vae: Any
    step: int
    seconds: float
    latents_mean: list[float]
    latents_std: list[float]
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    reused: bool = False


def clip_batch(seed: int, start: int, count: int, frames: int, height: int, width: int) -> torch.Tensor:
    """Clips ``start .. start+count-1`` of synthetic seed `seed` as (count, 3, frames, H, W) floats in [-1, 1]."""
    clips = np.stack([render_clip(clip_spec(seed, start + i), frames, height, width) for i in range(count)])
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def _foreground(x: torch.Tensor) -> torch.Tensor:
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device).div(127.5).sub(1.0).view(1, 3, 1, 1, 1)
    return (x - bg).abs().amax(dim=1, keepdim=True).gt(0.05).to(x.dtype)


def vae_loss(vae: Any, x: torch.Tensor, generator: torch.Generator, config: VAETrainConfig
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Foreground-weighted reconstruction MSE + ``kl_weight`` x KL of a (B, 3, F, H, W) batch in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device, posterior.mean.dtype)
    z = posterior.mean + posterior.std * eps
    recon = vae.decode(z).sample.float()
    w = 1.0 + config.foreground_weight * _foreground(x)
    rec = ((recon - x) ** 2 * w).sum() / (w.sum() * x.shape[1])
    kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
    return rec + config.kl_weight * kl, {"recon": float(rec.detach()), "kl": float(kl.detach())}


@torch.no_grad()
def latent_statistics(vae: Any, model: DemoModelConfig, config: VAETrainConfig, device: torch.device
                      ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over `config.stats_clips` clips of the training shape."""
    total, total_sq, n = None, None, 0
    seed = config.seed + 1_000  # clips the VAE was not trained on
    for start in range(0, config.stats_clips, config.batch_size):
        count = min(config.batch_size, config.stats_clips - start)
        x = clip_batch(seed, start, count, model.frames, model.height, model.width).to(device)
        z = vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist.mode().double()
        dims = (0, 2, 3, 4)
        s, sq = z.sum(dims), (z * z).sum(dims)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        n += z.numel() // z.shape[1]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return [float(v) for v in mean.cpu()], [float(v) for v in std.cpu()]


def _log(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


# Fields that may change between a run and its resume: how long to train and how often to save or log.
_EXTENDABLE = ("steps", "budget_s", "save_every", "log_every")


def _resumable(saved: dict[str, Any], config: VAETrainConfig) -> bool:
    now = asdict(config)
    return all(saved.get(k) == v for k, v in now.items() if k not in _EXTENDABLE)


def load_trained_vae(out: str | Path, model: DemoModelConfig, config: VAETrainConfig | None = None
                     ) -> VAEResult | None:
    """The finished stage-1 VAE in `out` (``vae.safetensors`` + ``vae.json``), or None if there is none.

    With `config`, only a VAE finished with exactly that config counts (a longer budget continues training).
    """
    from safetensors.torch import load_file

    from accel.demo.model import build_components

    root = Path(out)
    if not (root / "vae.json").is_file() or not (root / "vae.safetensors").is_file():
        return None
    info = json.loads((root / "vae.json").read_text())
    if config is not None and info.get("config") != asdict(config):
        return None
    vae = build_components(model, latents_mean=info["latents_mean"], latents_std=info["latents_std"])["vae"]
    vae.load_state_dict(load_file(str(root / "vae.safetensors")))
    return VAEResult(vae.eval(), info["step"], info["seconds"], info["latents_mean"], info["latents_std"],
                     reused=True)


def train_vae(model: DemoModelConfig, config: VAETrainConfig, out: str | Path, *, device: str | None = None,
              deadline: float | None = None, progress: bool = True) -> VAEResult:
    """Train (or resume, or reuse) the demo VAE in folder `out`; returns it with its latent statistics set.

    `deadline` (a `time.monotonic()` value) stops early with a checkpoint and raises `StagePaused`.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from accel.demo.model import build_components
    from accel.lora.checkpoint import load_latest, optimizer_tensors, restore_optimizer, save_checkpoint
    from accel.lora.train import step_seed, warmup_lambda

    root = Path(out)
    done = load_trained_vae(root, model, config)
    if done is not None:
        return done
    root.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = build_components(model)["vae"].to(dev).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup))
    step, seconds = 0, 0.0
    ckpt_dir = root / "checkpoints"
    ckpt = load_latest(ckpt_dir)
    if ckpt is not None:
        if not _resumable(ckpt.meta.get("config", {}), config) or ckpt.meta.get("model") != model.to_dict():
            raise ValueError(f"stage 1 checkpoint {ckpt.path} was made with other settings (only "
                             f"{', '.join(_EXTENDABLE)} may change on resume); use a new output folder")
        with torch.no_grad():
            for name, p in vae.named_parameters():
                p.copy_(ckpt.tensors[f"param.{name}"])
        restore_optimizer(optimizer, ckpt.tensors, ckpt.meta["optimizer"])
        scheduler.load_state_dict(ckpt.meta["scheduler"])
        step, seconds = ckpt.step, float(ckpt.meta["seconds"])
    resumed_from = step
    log_path = root / "logs.jsonl"
    autocast = dev.type == "cuda" and config.mixed_precision == "bf16"
    generator = torch.Generator()
    losses: list[float] = []

    def save() -> None:
        tensors = {f"param.{n}": p.detach() for n, p in vae.named_parameters()}
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta = {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "seconds": seconds,
                "config": asdict(config), "model": model.to_dict()}
        save_checkpoint(ckpt_dir, step, tensors, meta, keep=2)

    def batch(at: int) -> torch.Tensor:
        return clip_batch(config.seed, at * config.batch_size, config.batch_size, config.frames, model.height,
                          model.width)

    bar = tqdm(total=config.steps, initial=step, desc="stage 1: vae", disable=not progress)
    # Rendering a batch on the CPU takes about as long as a GPU step: the next one is drawn while this one runs.
    prefetch = ThreadPoolExecutor(1)
    pending = prefetch.submit(batch, step)
    with _StopFlag() as stop, prefetch:
        while step < config.steps and seconds < config.budget_s and not stop.requested:
            if deadline is not None and time.monotonic() >= deadline:
                break
            t0 = time.perf_counter()
            generator.manual_seed(step_seed(config.seed, step, 0))
            x = pending.result().to(dev)
            pending = prefetch.submit(batch, step + 1)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                loss, parts = vae_loss(vae, x, generator, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds += time.perf_counter() - t0
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", s=f"{seconds:.0f}")
            bar.update(1)
            if step % config.log_every == 0 or step == 1:
                _log(log_path, {"step": step, "loss": losses[-1], **parts, "seconds": seconds})
            if step % config.save_every == 0:
                save()
        save()
    bar.close()
    if stop.requested:
        raise KeyboardInterrupt(f"stage 1 stopped by {stop.requested} at step {step}; rerun to resume")
    if step < config.steps and seconds < config.budget_s:
        raise StagePaused(f"stage 1 paused at step {step} ({seconds:.0f} of {config.budget_s:.0f} s) at the deadline; "
                          "rerun to continue")
    vae.eval()
    mean, std = latent_statistics(vae, model, config, dev)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in vae.state_dict().items()},
              str(root / "vae.safetensors"))
    info = {"step": step, "seconds": seconds, "latents_mean": mean, "latents_std": std,
            "final_loss": losses[-1] if losses else None, "config": asdict(config)}
    (root / "vae.json").write_text(json.dumps(info, indent=1) + "\n")
    return VAEResult(vae.cpu(), step, seconds, mean, std, losses, resumed_from)


__all__ = ["StagePaused", "VAEResult", "VAETrainConfig", "clip_batch", "latent_statistics", "load_trained_vae",
           "train_vae", "vae_loss"]
