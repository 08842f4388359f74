"""The demo model's whole recipe (issue #17): dataset, stage 1 (VAE), stage 2 (transformer), export, curve.

1. Data: `accel.lora.synthetic` clips at the model's training shape as npz (lossless frames, no codec: the
   GPU machine has no ffmpeg, mp4 is lossy, and Pillow merges identical consecutive GIF frames), plus a
   `null_fraction` of copies captioned ``<null>`` (caption dropout: the tokenizer reads ``<null>`` as the
   empty prompt, which classifier-free guidance uses as its negative).
2. Stage 1: `accel.demo.vae.train_vae` (own loop, resumable, wall-clock budget).
3. Stage 2: the project's trainer (`accel.lora.train`) in full-parameter mode on a `WanPipeline` holding the
   trained VAE, the frozen text encoder and a fresh transformer; latents and text embeddings are cached by its
   `LatentCache`. One `train()` call (``resume=True``) per recipe run, with a timer that sends SIGTERM when
   `DiTTrainConfig.budget_s` (summed over reruns) or the run's deadline is reached: the trainer's own stop
   (checkpoint, then return). One call rather than several short ones because each call scans (decodes) every
   clip once. The trainer's resume is exact (weights, AdamW, data order, RNG), so a killed or budget-stopped run
   continues from its last checkpoint when the recipe is rerun.
4. Export: the three parts as safetensors in the model's storage dtype with ``manifest.json``
   (`accel.demo.model.export_weights`), and ``training_curve.png`` (loss vs step of both stages).
5. Task metric: the exported model, loaded back through `load_demo_pipeline`, generates the first
   `eval_prompts` of `accel.demo.evaluate.EVAL_PROMPTS`; ``eval.json`` says which match their caption.

Every stage skips work already done in the run folder, so rerunning the same command after a kill resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.demo.config import DEMO, MICRO, DemoModelConfig
from accel.demo.evaluate import EVAL_PROMPTS
from accel.demo.tokenizer import NULL_CAPTION
from accel.demo.vae import StagePaused, VAETrainConfig

MODELS = {"demo": DEMO, "micro": MICRO}
EXPORT_RESERVE_S = 45.0  # seconds kept for export, plotting and the task-metric evaluation under a deadline


@dataclass(frozen=True)
class DataConfig:
    """The training clips: `count` synthetic clips in `shards` parallel parts, plus `null_fraction` of them captioned
    ``<null>`` again (caption dropout)."""

    count: int = 1600
    seed: int = 0
    null_fraction: float = 0.1
    shards: int = 16

    def __post_init__(self) -> None:
        for name, minimum in (("count", 1), ("seed", 0), ("shards", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"DataConfig.{name} must be a whole number >= {minimum}, got {value!r}")
        f = self.null_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"DataConfig.null_fraction must be a number in [0, 1), got {f!r}")


@dataclass(frozen=True)
class DiTTrainConfig:
    """Stage 2 settings (the `accel.lora.train.TrainConfig` fields the recipe sets). Errors name the field.

    Attributes:
        steps: optimizer steps at most; budget_s: wall-clock seconds for the stage at most (whichever comes first).
        batch_size, lr, warmup, weight_decay, max_grad_norm, weighting, attention, save_every, log_every,
            gradient_checkpointing: passed to `TrainConfig`.
        mixed_precision: used on CUDA; CPU runs in float32.
    """

    steps: int = 20000
    budget_s: float = 420.0
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    weighting: str = "logit_normal"
    attention: str = "dense"
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    save_every: int = 500
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup", 0),
                              ("save_every", 0), ("log_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"DiTTrainConfig.{name} must be a whole number >= {minimum}, got {value!r}")
        for name in ("budget_s", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"DiTTrainConfig.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"DiTTrainConfig.gradient_checkpointing must be true or false, "
                             f"got {self.gradient_checkpointing!r}")


@dataclass(frozen=True)
class RecipeConfig:
    """The whole recipe: which model config, the data, and both stages. `load_recipe` reads it from JSON."""

    model: DemoModelConfig = DEMO
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    dit: DiTTrainConfig = field(default_factory=DiTTrainConfig)
    device: str | None = None
    eval_prompts: int = 16

    def __post_init__(self) -> None:
        n = self.eval_prompts
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(EVAL_PROMPTS):
            raise ValueError(f"RecipeConfig.eval_prompts must be a whole number in [0, {len(EVAL_PROMPTS)}], got {n!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": asdict(self.data), "vae": asdict(self.vae),
                "dit": asdict(self.dit), "device": self.device, "eval_prompts": self.eval_prompts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        """A recipe from JSON-like data; ``model`` is "demo", "micro" or a full model config. Errors name fields."""
        if not isinstance(data, dict):
            raise TypeError(f"a recipe must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)} - {"comment"})
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {', '.join(unknown)}; known: model, data, vae, dit, device, "
                             "eval_prompts")
        model = data.get("model", "demo")
        if isinstance(model, str):
            if model not in MODELS:
                raise ValueError(f"recipe.model must be one of {', '.join(MODELS)} or a model config, got {model!r}")
            model = MODELS[model]
        else:
            model = DemoModelConfig.from_dict(model)
        parts = {"data": DataConfig, "vae": VAETrainConfig, "dit": DiTTrainConfig}
        kw: dict[str, Any] = {"model": model, "device": data.get("device"),
                              "eval_prompts": data.get("eval_prompts", 16)}
        for key, part in parts.items():
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise TypeError(f"recipe.{key} must be a JSON object, got {type(value).__name__}")
            names = {f.name for f in fields(part)}
            bad = sorted(set(value) - names)
            if bad:
                raise ValueError(f"recipe.{key}: unknown field(s) {', '.join(bad)}; known: {', '.join(sorted(names))}")
            kw[key] = part(**value)
        return cls(**kw)

    @classmethod
    def smoke(cls) -> RecipeConfig:
        """The micro model with a handful of steps: the whole recipe in seconds on CPU (used by the tests)."""
        return cls(model=MICRO, data=DataConfig(count=4, null_fraction=0.25, shards=2),
                   vae=VAETrainConfig(steps=3, batch_size=2, frames=5, stats_clips=4, save_every=2, log_every=1,
                                      mixed_precision="no"),
                   dit=DiTTrainConfig(steps=4, batch_size=2, warmup=1, lr=1e-3, save_every=2,
                                      log_every=1), device="cpu", eval_prompts=1)


def load_recipe(path: str | Path) -> RecipeConfig:
    """The recipe in a JSON file (see `RecipeConfig.from_dict`)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe config not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"recipe config {path} is not valid JSON: {err}") from None
    return RecipeConfig.from_dict(data)


# ------------------------------------------------------------------------------------------------ stages


def _write_shard(root: str, synthetic: dict[str, Any], shard: int) -> None:
    from accel.lora.synthetic import SyntheticConfig, make_dataset

    sub = Path(root) / f".shard{shard:02d}"
    make_dataset(sub, SyntheticConfig(**synthetic), progress=False)
    for p in sub.iterdir():
        if p.suffix in (".npz", ".txt"):
            os.replace(p, Path(root) / f"s{shard:02d}_{p.name}")
    shutil.rmtree(sub)


def make_training_data(root: str | Path, model: DemoModelConfig, data: DataConfig, *, progress: bool = True) -> Path:
    """The clips of `data` at `model`'s training shape in `root` (reused when already there with the same config).

    `data.shards` calls of `accel.lora.synthetic.make_dataset` (synthetic seed ``data.seed * 1000 + shard``, files
    ``s<shard>_clip_<i>.npz``) run in parallel processes. A deterministic `null_fraction` of the clips is copied as
    ``null_*.npz`` captioned ``<null>``.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    root = Path(root)
    per = -(-data.count // data.shards)
    counts = [max(0, min(per, data.count - k * per)) for k in range(data.shards)]
    configs = [dict(count=c, frames=model.frames, height=model.height, width=model.width, fps=model.generation.fps,
                    seed=data.seed * 1000 + k, format="npz") for k, c in enumerate(counts) if c]
    stamp = root / "recipe_data.json"
    want = {"shards": configs, "null_fraction": data.null_fraction}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    workers = max(1, min(len(configs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        jobs = [pool.submit(_write_shard, str(root), c, k) for k, c in enumerate(configs)]
        for job in tqdm(jobs, desc="make-dataset shards", disable=not progress):
            job.result()
    clips = sorted(p.name for p in root.glob("s*_clip_*.npz"))
    nulls = int(round(data.null_fraction * len(clips)))
    picks = np.random.default_rng([data.seed, 17]).choice(len(clips), size=nulls, replace=False) if nulls else []
    for i in sorted(int(i) for i in picks):
        name = clips[i].replace("_clip_", "_null_")
        shutil.copyfile(root / clips[i], root / name)
        (root / name).with_suffix(".txt").write_text(NULL_CAPTION + "\n")
    stamp.write_text(json.dumps(want) + "\n")
    return root


def stage_pipeline(model: DemoModelConfig, vae: Any) -> Any:
    """The stage-2 `WanPipeline`: fresh seeded transformer, frozen seeded text encoder, the trained `vae`."""
    from diffusers import WanPipeline

    from accel.demo.model import build_components

    parts = build_components(model, latents_mean=list(vae.config.latents_mean),
                             latents_std=list(vae.config.latents_std))
    parts["vae"] = vae
    return WanPipeline(**parts)


def _train_config(config: RecipeConfig, run: Path, steps: int, device: torch.device, progress: bool) -> Any:
    from accel.lora.dataset import Bucket
    from accel.lora.train import TrainConfig

    m, d = config.model, config.dit
    return TrainConfig(
        model=m.name, data=run / "data", out=run / "dit", cache_dir=run / "cache", mode="full",
        attention=d.attention, buckets=(Bucket(m.frames, m.height, m.width),), on_bad_data="error", steps=steps,
        batch_size=d.batch_size, lr=d.lr, warmup=d.warmup, weight_decay=d.weight_decay,
        max_grad_norm=d.max_grad_norm, mixed_precision=d.mixed_precision if device.type == "cuda" else "no",
        gradient_checkpointing=d.gradient_checkpointing, seed=d.seed, shift=float(m.shift), weighting=d.weighting,
        max_sequence_length=m.text.max_sequence_length, save_every=d.save_every, keep=2, validate_every=0,
        log_every=d.log_every, resume=True, device=device.type, progress=progress)


def _scalars(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class BudgetExpired(Exception):
    """Stage 2's wall-clock budget ran out before the trainer's loop could take the stop request."""


class _Budget:
    """Sends this process SIGTERM after `seconds`: the trainer's documented stop (checkpoint, then return).

    Outside the trainer's loop (data scan, caching, final export) the SIGTERM lands on this guard's handler,
    which raises `BudgetExpired`; a SIGTERM that does not come from the timer is re-delivered as KeyboardInterrupt.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = max(0.0, seconds)
        self.fired = False
        self._timer: threading.Timer | None = None
        self._previous: Any = None

    def _fire(self) -> None:
        self.fired = True
        os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.fired:
            raise BudgetExpired(f"stage 2 budget of {self.seconds:.0f} s used up")
        raise KeyboardInterrupt("SIGTERM")

    def __enter__(self) -> _Budget:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        signal.signal(signal.SIGTERM, self._previous)


def train_transformer(config: RecipeConfig, run: str | Path, vae: Any, *, device: torch.device,
                      deadline: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Stage 2: one call of the project's trainer (resuming), stopped by SIGTERM when the budget runs out.

    The budget is `DiTTrainConfig.budget_s` summed over reruns (``dit/recipe_progress.json``), and at most until
    `deadline` (a `time.monotonic()` value) minus `EXPORT_RESERVE_S`. Returns steps done, seconds and each call.
    """
    from accel.lora.checkpoint import load_latest
    from accel.lora.train import train

    run = Path(run)
    d = config.dit
    state_path = run / "dit" / "recipe_progress.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"seconds": 0.0, "calls": []}
    latest = load_latest(run / "dit" / "checkpoints")
    start = latest.step if latest is not None else 0
    seconds = d.budget_s - state["seconds"]
    if deadline is not None:
        seconds = min(seconds, deadline - time.monotonic() - EXPORT_RESERVE_S)
    call: dict[str, Any] = {"from": start, "budget_s": seconds}
    if start < d.steps and seconds > 0:
        t0 = time.perf_counter()
        result = None
        pipe = stage_pipeline(config.model, vae)
        run.joinpath("dit").mkdir(parents=True, exist_ok=True)
        try:
            with _Budget(seconds) as budget:
                result = train(_train_config(config, run, d.steps, device, progress), pipe=pipe)
        except BudgetExpired:
            pass
        finally:
            state["seconds"] += time.perf_counter() - t0
            latest = load_latest(run / "dit" / "checkpoints")
            call.update(to=latest.step if latest is not None else start, seconds=time.perf_counter() - t0)
            if result is not None:
                call.update(eval_loss_start=result.eval_loss_start, eval_loss_end=result.eval_loss_end)
            state["calls"].append(call)
            state_path.write_text(json.dumps(state, indent=1) + "\n")
        if result is not None and result.interrupted and not budget.fired:
            raise KeyboardInterrupt(f"stage 2 stopped at step {result.step} (checkpoint saved); rerun to resume")
    latest = load_latest(run / "dit" / "checkpoints")
    rows = [r for r in _scalars(run / "dit" / "logs" / "scalars.jsonl") if r["tag"] == "train/step_time_s"]
    step_time = float(np.median([r["value"] for r in rows])) if rows else None
    return {"step": latest.step if latest is not None else 0, "seconds": state["seconds"], "calls": state["calls"],
            "median_step_time_s": step_time}


def trained_pipeline(config: RecipeConfig, run: str | Path, vae: Any) -> Any:
    """The stage-2 pipeline with the transformer of the latest stage-2 checkpoint."""
    from accel.lora.checkpoint import load_latest

    ckpt = load_latest(Path(run) / "dit" / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no stage 2 checkpoint in {Path(run) / 'dit' / 'checkpoints'}; run the recipe first")
    pipe = stage_pipeline(config.model, vae)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            p.copy_(ckpt.tensors[f"param.{name}"])
    return pipe


def plot_curve(run: str | Path, path: str | Path) -> Path:
    """``training_curve.png``: stage 1 reconstruction loss and stage 2 flow-matching loss (train, eval) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from accel.bench.plotting import save_figure

    run = Path(run)
    vae_rows = {r["step"]: r for r in _scalars(run / "vae" / "logs.jsonl")}  # a resumed step's last row wins
    dit_rows = _scalars(run / "dit" / "logs" / "scalars.jsonl")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = sorted(vae_rows)
    a.plot(steps, [vae_rows[s]["loss"] for s in steps], label="total")
    a.plot(steps, [vae_rows[s]["recon"] for s in steps], label="reconstruction", alpha=0.7)
    a.set(title="stage 1: VAE", xlabel="step", ylabel="loss", yscale="log")
    a.legend()
    for tag, label, style in (("train/loss", "train", "-"), ("val/loss", "eval (fixed noise)", "o-")):
        pts = sorted({r["step"]: r["value"] for r in dit_rows if r["tag"] == tag}.items())
        if pts:
            xs, ys = zip(*pts, strict=True)
            if tag == "train/loss" and len(ys) > 20:  # moving average: per-step losses vary with the sampled sigma
                k = max(1, len(ys) // 50)
                ys = np.convolve(ys, np.ones(k) / k, mode="valid")
                xs = xs[k - 1:]
            b.plot(xs, ys, style, label=label, markersize=3)
    b.set(title="stage 2: transformer (flow matching)", xlabel="step", ylabel="loss", yscale="log")
    b.legend()
    return save_figure(fig, path, dpi=100)


def run_recipe(config: RecipeConfig, run: str | Path, weights: str | Path, *, max_seconds: float | None = None,
               progress: bool = True) -> dict[str, Any]:
    """All stages into run folder `run`, the final weights, manifest and curve into `weights`; returns a summary.

    `max_seconds` bounds this call's wall time (stage 2 stops early enough to export); a rerun continues. When the
    deadline comes during stage 1, nothing is exported and the summary is ``{"paused": reason}``.
    """
    import diffusers

    from accel.bench import git_commit
    from accel.demo.model import export_weights, parameter_counts
    from accel.demo.vae import train_vae

    run, weights = Path(run), Path(weights)
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    t0 = time.perf_counter()
    make_training_data(run / "data", config.model, config.data, progress=progress)
    data_s = time.perf_counter() - t0
    try:
        stage1 = train_vae(config.model, config.vae, run / "vae", device=device.type,
                           deadline=None if deadline is None else deadline - EXPORT_RESERVE_S, progress=progress)
    except StagePaused as paused:
        return {"paused": str(paused)}
    vae = stage1.vae
    stage2 = train_transformer(config, run, vae, device=device, deadline=deadline, progress=progress)
    if stage2["step"] == 0:
        return {"paused": f"stage 2 has no checkpoint yet after {stage2['seconds']:.0f} s (budget or deadline "
                          "reached while caching); rerun to continue"}
    pipe = trained_pipeline(config, run, vae)
    summary = {
        "recipe": config.to_dict(),
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "data_seconds": data_s,
        "stage1": {"steps": stage1.step, "seconds": stage1.seconds},
        "stage2": stage2,
        "parameters": parameter_counts(pipe),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    export_weights(pipe, config.model, weights, extra=summary)
    plot_curve(run, weights / "training_curve.png")
    if config.eval_prompts:
        from accel.demo.evaluate import evaluate
        from accel.demo.model import load_demo_pipeline

        report = evaluate(load_demo_pipeline(weights, device=device), config.model,
                          prompts=EVAL_PROMPTS[:config.eval_prompts], progress=progress)
        summary["eval"] = report.to_dict()
        (weights / "eval.json").write_text(json.dumps(summary["eval"], indent=1) + "\n")
    return summary


__all__ = ["DataConfig", "DiTTrainConfig", "MODELS", "RecipeConfig", "load_recipe",
           "make_training_data", "plot_curve", "run_recipe", "stage_pipeline", "train_transformer",
           "trained_pipeline"]
