"""The training loop: flow matching on cached latents, with the transformer patched by a sparse method.

LoRA mode (peft, self-attention projections by default) and a full-parameter mode share one loop on accelerate
(bf16/fp16 mixed precision, gradient accumulation, multi-GPU under ``accelerate launch``), with gradient
checkpointing, AdamW with linear warm-up, a tqdm bar (loss, step time, tokens/s), scalars in
``logs/scalars.jsonl``, a validation video every N steps, and checkpoints every N steps and on SIGTERM/Ctrl-C.
Resume restores weights, optimizer, LR schedule, data position and every RNG, so a resumed run ends with the
same weights as an uninterrupted one (bit for bit on CPU with ``deterministic=True``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.lora.cache import CacheSettings, LatentCache, encoder_fingerprint
from accel.lora.checkpoint import (
    load_latest,
    optimizer_tensors,
    restore_optimizer,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from accel.lora.dataset import Bucket, DataError, DatasetConfig, VideoItem, scan
from accel.lora.objective import FlowMatchObjective

logger = logging.getLogger("accel.lora")

MODES = ("lora", "full")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every field is checked on creation; errors name the field.

    Attributes:
        model: tiny-* name, local diffusers folder or Hub id (Wan 2.1/2.2 or HunyuanVideo text-to-video).
        data: folder of videos with captions (`accel.lora.dataset`).
        out: run folder: checkpoints/, logs/, validation/, cache/ and the final lora/ (or transformer/).
        mode: "lora" (peft adapters) or "full" (every transformer parameter).
        rank, alpha: LoRA rank and alpha (scale alpha/rank).
        targets: peft target module names or one regex; None = the family's self-attention q/k/v/out.
        ffn: also adapt the feed-forward layers (with the default targets).
        attention: method spec the transformer is patched with (``radial``, ``radial:decay=0.2,dense_layers=1``,
            ``dense``); any registered method whose backward works.
        buckets: training shapes (frames x height x width in pixels).
        steps: optimizer steps; batch_size: clips per micro-batch (one bucket per batch); grad_accum: micro-batches
            per optimizer step.
        lr, warmup, weight_decay, max_grad_norm: AdamW with linear warm-up over `warmup` steps, then constant.
        mixed_precision: "no", "bf16" or "fp16" (accelerate autocast; trainable weights stay float32).
        expert: Wan 2.2 only: "high" trains `transformer` on t >= boundary, "low" `transformer_2` below it.
        save_every, keep: checkpoint every N steps (0: only at the end and on SIGTERM/Ctrl-C), keeping `keep`.
        validate_every: render a validation video every N steps (0: never).
        deterministic: torch deterministic algorithms (exact resume on CPU; slower on GPU).
    """

    model: str = "tiny-wan"
    data: Path = Path("data")
    out: Path = Path("outputs/lora-run")
    mode: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    ffn: bool = False
    attention: str = "radial"
    buckets: tuple[Bucket, ...] = (Bucket(17, 64, 64),)
    frame_stride: int = 1
    on_bad_data: str = "skip"
    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = True
    seed: int = 0
    deterministic: bool = False
    expert: str | None = None
    shift: float | None = None
    weighting: str = "logit_normal"
    max_sequence_length: int | None = None
    save_every: int = 50
    keep: int = 3
    validate_every: int = 0
    validation_prompt: str | None = None
    validation_steps: int = 4
    log_every: int = 1
    resume: bool = False
    cache_dir: Path | None = None
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"TrainConfig.targets must be non-empty module names, got {self.targets!r}")
        if self.mode not in MODES:
            raise ValueError(f"TrainConfig.mode must be 'lora' or 'full', got {self.mode!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.mixed_precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.mixed_precision!r}")
        if self.expert not in (None, "high", "low"):
            raise ValueError(f"TrainConfig.expert must be None, 'high' or 'low', got {self.expert!r}")
        ints = {"rank": 1, "steps": 1, "batch_size": 1, "grad_accum": 1, "warmup": 0, "save_every": 0, "keep": 2,
                "validate_every": 0, "validation_steps": 1, "log_every": 1, "seed": 0, "frame_stride": 1}
        for name, minimum in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainConfig.{name} must be a whole number >= {minimum}, got {value!r}")
        for name, positive in (("alpha", True), ("lr", True), ("weight_decay", False), ("max_grad_norm", False)):
            value = getattr(self, name)
            bad = not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            if bad or (positive and value == 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number {'>' if positive else '>='} 0, "
                                 f"got {value!r}")
        DatasetConfig(self.data, self.buckets, self.frame_stride, self.on_bad_data)  # validates those fields
        from accel.methods.registry import parse_method_spec

        parse_method_spec(self.attention)  # names the bad key or value


@dataclass
class TrainResult:
    """What a run did: final step, per-step losses of this process, output paths, whether it was interrupted."""

    step: int
    losses: list[float] = field(default_factory=list)
    output: Path | None = None
    checkpoint: Path | None = None
    interrupted: bool = False
    skipped: list[DataError] = field(default_factory=list)
    eval_loss_start: float | None = None
    eval_loss_end: float | None = None
    attention: str | None = None  # the patch's summary: calls, sparse calls, mean tile density


# ------------------------------------------------------------------------------------------------ helpers


def check_trainable(method: Any, device: torch.device) -> None:
    """NotImplementedError unless `method` passes gradients to q, k and v on a small geometry."""
    from accel.geometry import TokenLayout

    layout = TokenLayout(1, 3, 4, 4)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.total_tokens, 2, 16, generator=gen).to(device).requires_grad_() for _ in range(3))
    try:
        plan = method.build_plan(layout, 2, device)
        out = method.attend(q, k, v, layout, plan)
        out.float().square().sum().backward()
    except Exception as err:
        raise NotImplementedError(f"attention method {method.name!r} cannot be trained: its backward failed "
                                  f"({type(err).__name__}: {err})") from err
    if any(t.grad is None for t in (q, k, v)):
        raise NotImplementedError(f"attention method {method.name!r} cannot be trained: it passes no gradient to q/k/v")


def epoch_batches(items: list[VideoItem], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (item indices, one bucket each) of `epoch`: a seeded shuffle, grouped by bucket in that order."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    batches: list[list[int]] = []
    open_batches: dict[Bucket, list[int]] = {}
    for i in perm:
        group = open_batches.setdefault(items[i].bucket, [])
        group.append(i)
        if len(group) == batch_size:
            batches.append(group)
            open_batches[items[i].bucket] = []
    batches.extend(g for g in open_batches.values() if g)
    return batches


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the noise/timestep generator at optimizer step `step` on process `rank`."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


def warmup_lambda(warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    return factor


class _StopFlag:
    """SIGTERM and the first Ctrl-C ask the loop to checkpoint and stop; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ScalarLog:
    """TensorBoard-style scalars (step, tag, value, wall time) appended to a JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        with self.path.open("a") as f:
            for tag, value in values.items():
                f.write(json.dumps({"step": step, "tag": tag, "value": float(value), "wall_time": now}) + "\n")


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Builds everything a run needs from a `TrainConfig`; `run()` trains and returns a `TrainResult`."""

    def __init__(self, config: TrainConfig, *, pipe: Any = None) -> None:
        self.config = config
        self._pipe = pipe

    def run(self) -> TrainResult:
        previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._run()
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])

    def _run(self) -> TrainResult:
        cfg = self.config
        from accelerate import Accelerator

        cpu = cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available())
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                                  cpu=cpu)
        device = accelerator.device
        pipe, adapter = self._pipeline(device)
        self._family = adapter.family
        self._validation_kwargs = adapter.validation_kwargs()
        items, skipped, cache = self._prepare_data(accelerator, pipe, adapter)
        self._scan_skipped = skipped
        transformer = adapter.transformer(cfg.expert)
        params = self._trainable(transformer)
        spec, method, schedule = self._method()
        check_trainable(method, device)
        import accel

        handle = accel.patch(transformer, method, schedule=schedule)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        for name in ("vae", "text_encoder"):  # training holds only the transformer
            if cfg.validate_every == 0:
                getattr(pipe, name).to("cpu")
        optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.warmup))
        model, optimizer = accelerator.prepare(transformer, optimizer)
        objective = FlowMatchObjective.for_family(adapter.family, expert=cfg.expert,
                                                  boundary_ratio=adapter.boundary_ratio, shift=cfg.shift,
                                                  weighting=cfg.weighting)
        generator = torch.Generator()
        state = {"step": 0, "epoch": 0, "batch": 0}
        ckpt_dir = cfg.out / "checkpoints"
        fingerprint = self._run_fingerprint(items, spec.label)
        if cfg.resume:
            self._resume(ckpt_dir, params, optimizer, scheduler, generator, state, fingerprint, accelerator)
        log = ScalarLog(cfg.out / "logs" / "scalars.jsonl")
        result = TrainResult(step=state["step"], skipped=skipped)
        evaluate = lambda: self._eval_loss(model, adapter, objective, cache, items, device, accelerator)  # noqa: E731
        result.eval_loss_start = evaluate()
        if accelerator.is_main_process:
            log.write(state["step"], {"val/loss": result.eval_loss_start})
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], desc="train", disable=not (cfg.progress and
                                                                                      accelerator.is_main_process))
        world, rank = accelerator.num_processes, accelerator.process_index
        with _StopFlag() as stop:
            while state["step"] < cfg.steps:
                t0 = time.perf_counter()
                # Noise and sigmas of step s on rank r depend only on (seed, s, r): resume is exact on any rank.
                generator.manual_seed(step_seed(cfg.seed, state["step"], rank))
                losses, tokens = [], 0
                for _ in range(cfg.grad_accum):
                    batches = epoch_batches(items, cfg.batch_size, cfg.seed, state["epoch"])
                    mine = batches[state["batch"] * world + rank] if state["batch"] * world + rank < len(batches) \
                        else batches[(state["batch"] * world + rank) % len(batches)]
                    with accelerator.accumulate(model):
                        loss, n = self._micro_step(model, adapter, objective, cache, [items[i] for i in mine],
                                                   generator, device, accelerator)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    tokens += n
                    state["batch"] += 1
                    if state["batch"] * world >= len(batches):
                        state["epoch"] += 1
                        state["batch"] = 0
                scheduler.step()
                state["step"] += 1
                dt = time.perf_counter() - t0
                step_loss = sum(losses) / len(losses)
                result.losses.append(step_loss)
                tps = tokens * world / dt
                bar.set_postfix(loss=f"{step_loss:.4f}", step_s=f"{dt:.2f}", tok_s=f"{tps:.0f}")
                bar.update(1)
                if accelerator.is_main_process and state["step"] % cfg.log_every == 0:
                    log.write(state["step"], {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                                              "train/step_time_s": dt, "train/tokens_per_s": tps})
                last = state["step"] >= cfg.steps
                if (cfg.save_every and state["step"] % cfg.save_every == 0) or stop.requested or last:
                    result.checkpoint = self._save(ckpt_dir, params, optimizer, scheduler, generator, state,
                                                   fingerprint, accelerator)
                if cfg.validate_every and state["step"] % cfg.validate_every == 0 and accelerator.is_main_process:
                    log.write(state["step"], {"val/loss": evaluate()})
                    self._validate(pipe, transformer, items, state["step"], device)
                if stop.requested:
                    logger.warning("%s: checkpoint saved at step %d; resume with --resume", stop.requested,
                                   state["step"])
                    result.interrupted = True
                    break
        bar.close()
        result.step = state["step"]
        result.eval_loss_end = evaluate()
        if accelerator.is_main_process:
            log.write(state["step"], {"val/loss": result.eval_loss_end})
        if not result.interrupted and accelerator.is_main_process:
            result.output = self._export(pipe, transformer, spec, method, schedule, state["step"])
        accelerator.wait_for_everyone()
        result.attention = handle.stats.summary()
        accel.unpatch(transformer)
        return result

    # ------------------------------------------------------------------ setup

    def _pipeline(self, device: torch.device):
        from accel.lora.models import training_adapter
        from accel.pipelines.tiny import TINY_MODELS

        cfg = self.config
        pipe = self._pipe
        if pipe is None:
            from accel.pipelines.generate import load_pipeline

            dtype = torch.float32 if cfg.mode == "full" or device.type == "cpu" else torch.bfloat16
            pipe = load_pipeline(cfg.model, device=device, dtype=dtype)
        else:
            pipe.to(device)
        spec = TINY_MODELS.get(cfg.model)
        defaults = spec.call_defaults if spec is not None else {}
        length = cfg.max_sequence_length or defaults.get("max_sequence_length")
        return pipe, training_adapter(pipe, length, defaults.get("prompt_template"))

    def _prepare_data(self, accelerator, pipe, adapter) -> tuple[list[VideoItem], list[DataError], LatentCache]:
        cfg = self.config
        report = scan(DatasetConfig(cfg.data, cfg.buckets, cfg.frame_stride, cfg.on_bad_data))
        settings = CacheSettings(encoder_fingerprint(pipe), adapter.max_sequence_length, cfg.frame_stride)
        cache = LatentCache(cfg.cache_dir or cfg.out / "cache", settings)
        skipped = list(report.skipped)
        if accelerator.is_main_process:
            failed = cache.fill(report.items, adapter.encode_video, adapter.encode_text,
                                progress=cfg.progress)
            if failed and cfg.on_bad_data == "error":
                raise failed[0]
            for err in failed:
                logger.warning("skipping %s", err)
            skipped.extend(failed)
        accelerator.wait_for_everyone()
        bad = {e.path for e in skipped}
        items = [it for it in report.items if it.path not in bad and cache.path(it).exists()]
        if not items:
            reasons = "; ".join(str(e) for e in skipped) or "no video files found"
            raise ValueError(f"no usable training clips in {cfg.data} ({reasons})")
        return items, skipped, cache

    def _trainable(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        cfg = self.config
        transformer.requires_grad_(False)
        if cfg.mode == "lora":
            from peft import LoraConfig

            from accel.lora.models import default_targets

            if cfg.targets is None:
                targets: Any = default_targets(self._family, cfg.ffn)
            else:
                targets = cfg.targets[0] if len(cfg.targets) == 1 and any(c in cfg.targets[0] for c in "\\*()|") \
                    else list(cfg.targets)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                try:
                    transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                                       target_modules=targets))
                except ValueError as err:
                    raise ValueError(f"LoRA targets {targets!r} match no layer of {type(transformer).__name__}: "
                                     f"{err}") from None
            params = [(n, p) for n, p in transformer.named_parameters() if "lora_" in n]
        else:
            transformer.requires_grad_(True)
            params = list(transformer.named_parameters())
        for _, p in params:
            p.requires_grad_(True)
            p.data = p.data.float()  # trainable weights in float32 under bf16/fp16 autocast
        return params

    def _method(self):
        from accel.methods.registry import parse_method_spec

        spec = parse_method_spec(self.config.attention)
        return spec, spec.method, spec.schedule_over()

    def _run_fingerprint(self, items: list[VideoItem], label: str) -> dict[str, Any]:
        cfg = self.config
        return {"mode": cfg.mode, "rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets, "ffn": cfg.ffn,
                "attention": label, "items": [it.path.name for it in items], "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum, "seed": cfg.seed, "expert": cfg.expert}

    # ------------------------------------------------------------------ one micro-step

    def _micro_step(self, model, adapter, objective, cache, batch: list[VideoItem], generator, device,
                    accelerator) -> tuple[torch.Tensor, int]:
        entries = [cache.load(it) for it in batch]
        x0 = torch.stack([e["latents"] for e in entries])
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = objective.sample_sigmas(x0.shape[0], generator)
        x_t, target = objective.noisy(x0, noise, sigmas)
        dtype = _input_dtype(model, self.config.mode)
        cond = _conditioning(entries, device, dtype)
        timesteps = objective.timesteps(sigmas).to(device)
        with accelerator.autocast():
            pred = adapter.forward(model, x_t.to(device, dtype), timesteps, cond)
        loss = objective.loss(pred, target.to(device))
        return loss, adapter.tokens(accelerator.unwrap_model(model), tuple(x0.shape))

    def _eval_loss(self, model, adapter, objective, cache, items, device, accelerator) -> float:
        """Loss on up to 8 clips at fixed noise and sigmas (0.25, 0.5, 0.75): comparable across steps."""
        gen = torch.Generator().manual_seed(1234)
        total, count = 0.0, 0
        dtype = _input_dtype(model, self.config.mode)
        with torch.no_grad():
            for item in items[:8]:
                entry = cache.load(item)
                x0, cond = entry["latents"][None], _conditioning([entry], device, dtype)
                for sigma in (0.25, 0.5, 0.75):  # one clip per forward: long clips fit in memory
                    sigmas = torch.tensor([sigma])
                    x_t, target = objective.noisy(x0, torch.randn(x0.shape, generator=gen), sigmas)
                    with accelerator.autocast():
                        pred = adapter.forward(model, x_t.to(device, dtype), objective.timesteps(sigmas).to(device),
                                               cond)
                    total += float(objective.loss(pred, target.to(device)))
                    count += 1
        return total / count

    # ------------------------------------------------------------------ checkpoints

    def _save(self, root, params, optimizer, scheduler, generator, state, fingerprint, accelerator) -> Path | None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        tensors = {f"param.{n}": p.detach() for n, p in params}
        opt_tensors, opt_meta = optimizer_tensors(getattr(optimizer, "optimizer", optimizer))
        rng_tensors, rng_meta = rng_state(generator)
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        meta = {"data": {"epoch": state["epoch"], "batch": state["batch"]}, "scheduler": scheduler.state_dict(),
                "optimizer": opt_meta, "rng": rng_meta, "run": fingerprint}
        return save_checkpoint(root, state["step"], tensors, meta, keep=self.config.keep)

    def _resume(self, root, params, optimizer, scheduler, generator, state, fingerprint, accelerator) -> None:
        ckpt = load_latest(root)
        if ckpt is None:
            logger.warning("--resume: no usable checkpoint in %s; starting from step 0", root)
            return
        saved = ckpt.meta.get("run", {})
        changed = [k for k in fingerprint if json.dumps(saved.get(k)) != json.dumps(fingerprint[k])]
        if changed:
            raise ValueError(f"--resume: checkpoint {ckpt.path.name} was made with different settings "
                             f"({', '.join(changed)}); use a new --out or the same settings")
        with torch.no_grad():
            for name, p in params:
                p.copy_(ckpt.tensors[f"param.{name}"])
        restore_optimizer(getattr(optimizer, "optimizer", optimizer), ckpt.tensors, ckpt.meta["optimizer"])
        scheduler.load_state_dict(ckpt.meta["scheduler"])
        restore_rng(generator, ckpt.tensors, ckpt.meta["rng"])
        state.update(step=ckpt.step, epoch=ckpt.meta["data"]["epoch"], batch=ckpt.meta["data"]["batch"])
        if accelerator.is_main_process:
            logger.warning("resumed from %s (step %d)", ckpt.path, ckpt.step)

    # ------------------------------------------------------------------ validation and export

    def _validate(self, pipe, transformer, items, step: int, device) -> Path:
        from accel.lora.synthetic import write_video

        cfg = self.config
        bucket = items[0].bucket
        prompt = cfg.validation_prompt or items[0].caption
        transformer.eval()
        try:
            with torch.no_grad():
                frames = pipe(prompt=prompt, height=bucket.height, width=bucket.width, num_frames=bucket.frames,
                              num_inference_steps=cfg.validation_steps, output_type="np",
                              generator=torch.Generator().manual_seed(cfg.seed), **self._validation_kwargs).frames[0]
        finally:
            transformer.train()
        import numpy as np

        path = cfg.out / "validation" / f"step-{step:08d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), 16)
        return path

    def _export(self, pipe, transformer, spec, method, schedule, step: int) -> Path:
        cfg = self.config
        meta = {
            "base_model_name": cfg.model, "mode": cfg.mode, "steps": step, "expert": cfg.expert,
            "attention": {"spec": spec.label, "method": method.name, "config": _jsonable(method),
                          "schedule": _jsonable(schedule)},
            "trained_on": [{"frames": b.frames, "height": b.height, "width": b.width} for b in cfg.buckets],
            "objective": {"weighting": cfg.weighting, "shift": cfg.shift},
            "load_into_transformer_2": cfg.expert == "low",
        }
        if cfg.mode == "lora":
            from accel.lora.export import save_lora

            return save_lora(cfg.out / "lora", transformer, meta, pipeline_class=type(pipe))
        from accel.lora.export import write_metadata
        from accel.pipelines.lora_files import identity_hash, transformer_identity

        out = cfg.out / "transformer"
        transformer.save_pretrained(str(out), safe_serialization=True)
        identity = transformer_identity(transformer)
        write_metadata(out / "accel_train.json", {"format": "accel-full", "base_model": identity,
                                                  "base_model_hash": identity_hash(identity), **meta})
        return out


def _conditioning(entries: list[dict[str, torch.Tensor]], device, dtype) -> dict[str, torch.Tensor]:
    """The caption tensors of cache entries stacked into a batch (floats in the model's dtype, masks as they are)."""
    keys = [k for k in entries[0] if k != "latents"]
    out = {}
    for k in keys:
        v = torch.stack([e[k] for e in entries]).to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _input_dtype(model: torch.nn.Module, mode: str) -> torch.dtype:
    """The dtype inputs go in: the frozen base weights' in LoRA mode, float32 (autocast decides) in full mode."""
    if mode == "lora":
        return next(p.dtype for p in model.parameters() if not p.requires_grad)
    return torch.float32


def _jsonable(obj: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(obj):
        return {}
    return {f.name: (list(v) if isinstance(v := getattr(obj, f.name), tuple) else v) for f in dataclasses.fields(obj)
            if f.init}


def train(config: TrainConfig, *, pipe: Any = None) -> TrainResult:
    """Run `config` (optionally on an already built `pipe`) and return what it did."""
    return Trainer(config, pipe=pipe).run()


__all__ = ["MODES", "TrainConfig", "TrainResult", "Trainer", "check_trainable", "epoch_batches", "train"]
