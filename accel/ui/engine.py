"""What the web UI does, without Gradio: the pipeline cache, method building, one generation job, stats text.

`accel.ui.app` only wires these into widgets, so everything here is testable without a browser.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.geometry import TokenLayout
from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.pipelines.generate import GenerationRequest, GenerationResult, load_lora, load_pipeline, run_generation
from accel.pipelines.generate import write_video as _write_video
from accel.pipelines.patching import patch_handle
from accel.schedule import Schedule

logger = logging.getLogger("accel")

ATTENTION_METHODS = ("dense", "radial")
BLOCK_SIZE_CHOICES = ("auto", "16", "32", "64", "128")
CUSTOM_PRESET = "custom"

# Errors a user can cause with the form; shown as a message, never a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, NotImplementedError)


class Cancelled(Exception):
    """The user pressed Cancel; the pipeline stopped after its current step."""


# ------------------------------------------------------------------------------------------ pipelines
class PipelineCache:
    """Holds one pipeline; rebuilds it only when the model changes, reloads the LoRA only when it changes.

    A LoRA path change unloads the old adapter and loads the new one (the pipeline is rebuilt when the
    pipeline cannot unload); a scale change only re-weights the loaded adapter. ``lock`` serialises
    every use of the pipeline (a cancelled Gradio event may still be finishing its last step).
    """

    def __init__(self, loader: Callable[[str], Any] = load_pipeline) -> None:
        self.loader = loader
        self.lock = threading.Lock()
        self.pipe: Any = None
        self.model: str | None = None
        self.lora: str | None = None
        self.lora_scale: float = 1.0
        self.builds = 0
        self.lora_loads = 0

    def get(self, model: str, lora: str | None = None, lora_scale: float = 1.0) -> Any:
        """The pipeline for `model` with `lora` (a .safetensors file or folder, or None) at `lora_scale`."""
        model = (model or "").strip()
        if not model:
            raise ValueError("choose a model: a tiny-* built-in, a local diffusers folder or a Hub id")
        lora = (lora or "").strip() or None
        if lora is not None and not Path(lora).expanduser().exists():
            raise FileNotFoundError(f"LoRA file not found: {lora}")
        if self.pipe is None or model != self.model:
            self.pipe = None  # free the old weights before loading new ones
            self.model, self.lora, self.lora_scale = None, None, 1.0
            pipe = self.loader(model)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            self.pipe, self.model = pipe, model
            self.builds += 1
        if lora != self.lora:
            if self.lora is not None:
                try:
                    self.pipe.unload_lora_weights()
                except Exception:  # noqa: BLE001 - any failure: start from clean weights instead
                    logger.warning("accel ui: could not unload LoRA %s; rebuilding the pipeline", self.lora)
                    self.pipe, self.model = None, None
                    return self.get(model, lora, lora_scale)
                self.lora = None
            if lora is not None:
                try:
                    load_lora(self.pipe, lora, lora_scale)
                except Exception:
                    # a half-loaded adapter must not leak into later runs
                    self.pipe, self.model, self.lora = None, None, None
                    raise
                self.lora_loads += 1
            self.lora, self.lora_scale = lora, float(lora_scale)
        elif lora is not None and float(lora_scale) != self.lora_scale:
            self.pipe.set_adapters(["accel"], [float(lora_scale)])
            self.lora_scale = float(lora_scale)
        return self.pipe


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class AttentionSettings:
    """The attention part of the form, as plain values."""

    attention: str = "dense"
    decay: float = 1.0
    block_size: str | int | None = "auto"
    sink: bool = True
    spatial: str = "band"
    decay_near: bool = False
    dense_steps: int | None = 0
    dense_last_steps: int | None = 0
    dense_layers: int | None = 0
    fallback_to_dense: bool = False

    def method_and_schedule(self) -> tuple[AttentionMethod, Schedule]:
        """The method config and schedule these settings describe (ValueError/TypeError if invalid)."""
        if self.attention not in ATTENTION_METHODS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_METHODS)}, got {self.attention!r}")
        if self.attention == "dense":
            return Dense(), Schedule()
        from accel.methods.radial import Radial

        block = self.block_size
        if block in (None, "", "auto"):
            block = None
        else:
            try:
                block = int(block)
            except (TypeError, ValueError):
                raise ValueError(f"block size must be auto, 16, 32, 64 or 128, got {block!r}") from None
        decay = self.decay
        if decay is None:
            raise ValueError("radial decay must be a number > 0, got nothing")
        method = Radial(
            decay=float(decay), block_size=block, sink=bool(self.sink), spatial=self.spatial,
            decay_near=bool(self.decay_near),
        )
        schedule = Schedule(
            dense_steps=_count("dense first steps", self.dense_steps),
            dense_last_steps=_count("dense last steps", self.dense_last_steps),
            dense_layers=_count("dense layers", self.dense_layers),
        )
        return method, schedule


def _count(label: str, value: Any) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{label} must be a whole number >= 0, got {value}")
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{label} must be a whole number >= 0, got {value!r}")
    return value


def preset_values(name: str) -> dict[str, Any] | None:
    """Form values of a radial preset (None for "custom"): method fields and schedule."""
    if not name or name == CUSTOM_PRESET:
        return None
    from accel.presets import radial_preset

    method, schedule = radial_preset(name)
    layers = schedule.dense_layers
    return {
        "decay": method.decay,
        "block_size": "auto" if method.block_size is None else str(method.block_size),
        "sink": method.sink,
        "spatial": method.spatial,
        "decay_near": method.decay_near,
        "dense_steps": schedule.dense_steps,
        "dense_last_steps": schedule.dense_last_steps,
        "dense_layers": layers if isinstance(layers, int) else len(layers),
    }


def preset_names() -> list[str]:
    from accel.presets import RADIAL_PRESETS

    return [CUSTOM_PRESET, *RADIAL_PRESETS]


def describe_method(method: AttentionMethod, schedule: Schedule) -> str:
    if isinstance(method, Dense):
        return "dense"
    fields = ", ".join(f"{f.name}={getattr(method, f.name)}" for f in dataclasses.fields(method))
    sched = (
        f"dense first {schedule.dense_steps} / last {schedule.dense_last_steps} steps, "
        f"first {schedule.dense_layers} layers"
    )
    return f"{method.name}({fields}); {sched}"


def optional_int(label: str, value: Any) -> int | None:
    """Form number -> int, where empty or 0 means the model's default."""
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{label} must be a whole number, got {value}")
        value = int(value)
    if not isinstance(value, int):
        raise TypeError(f"{label} must be a whole number, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------ geometry
def pipeline_token_grid(pipe: Any, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(latent frames, token rows, token columns) this pipeline's transformer sees for a pixel size.

    Uses the pipeline's own VAE factors and the transformer's patch size, so tiny test models (whose
    VAEs compress less than the full-size ones) get their real grid.
    """
    tr = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    if tr is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer")
    cfg = tr.config
    patch = getattr(cfg, "patch_size", None) or 1
    if isinstance(patch, (tuple, list)):
        p_t, p_h, p_w = (1, *patch) if len(patch) == 2 else patch
    else:
        p_t, p_h, p_w = getattr(cfg, "patch_size_t", None) or 1, patch, patch
    if hasattr(pipe, "transformer_spatial_patch_size"):  # LTX
        p_h = p_w = pipe.transformer_spatial_patch_size
        p_t = pipe.transformer_temporal_patch_size
    spatial = next(
        (getattr(pipe, a) for a in ("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_scale_factor")
         if getattr(pipe, a, None)),
        8,
    )
    temporal = next(
        (getattr(pipe, a) for a in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio")
         if getattr(pipe, a, None)),
        None,
    )
    if type(pipe).__name__.startswith("Flux"):
        p_h = p_w = 2  # latents are packed in 2x2 patches
    latent_frames = 1 if temporal is None else (frames - 1) // temporal + 1
    return (-(-latent_frames // p_t), height // (spatial * p_h), width // (spatial * p_w))


# ------------------------------------------------------------------------------------------ one job
@dataclass
class JobResult:
    video: Path | None
    mask: Path | None
    stats_markdown: str
    caption: str
    result: GenerationResult | None = None
    dense_seconds: float | None = None
    grid: tuple[int, int, int] | None = None


@dataclass(eq=False)
class Job:
    """One press of Generate: the request, the attention settings and where to write."""

    request: GenerationRequest
    attention: AttentionSettings
    output_dir: Path
    compare_dense: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, cache: PipelineCache, progress: Callable[[int, int, str], None] | None = None) -> JobResult:
        method, schedule = self.attention.method_and_schedule()
        on_unsupported = "dense" if self.attention.fallback_to_dense else "error"
        req = self.request
        with cache.lock:
            if self.stop.is_set():
                raise Cancelled("cancelled before the model was loaded")
            if progress:
                progress(0, 1, f"loading {req.model}")
            pipe = cache.get(req.model, req.lora, req.lora_scale)
            grid: list[tuple[int, int, int]] = []
            label = "radial" if not isinstance(method, Dense) else "dense"

            def on_step(i: int, total: int) -> None:
                if not grid:
                    handle = patch_handle(pipe)
                    states = handle.states.values() if handle is not None else ()
                    grid.extend(s.grid for s in states if s.grid is not None)
                if progress:
                    progress(i, total, f"{label} denoising")

            if self.stop.is_set():
                raise Cancelled("cancelled before the first step")
            result = run_generation(
                pipe, req, method=method, schedule=schedule, on_unsupported=on_unsupported,
                on_step=on_step, should_stop=self.stop.is_set,
            )
            if self.stop.is_set():
                raise Cancelled("cancelled")
            dense_seconds = None
            if self.compare_dense and not isinstance(method, Dense):

                def on_dense_step(i: int, total: int) -> None:
                    if progress:
                        progress(i, total, "dense baseline (timing)")

                dense = run_generation(pipe, req, method=Dense(), on_step=on_dense_step, should_stop=self.stop.is_set)
                if self.stop.is_set():
                    raise Cancelled("cancelled during the dense timing run")
                dense_seconds = dense.seconds
            device = getattr(pipe, "device", torch.device("cpu"))
            token_grid = grid[0] if grid else _safe_grid(pipe, result)
        stem = self._stem(label)
        video = _write_video(result.frames, self.output_dir / f"{stem}.mp4", result.fps)
        mask = None
        if not isinstance(method, Dense) and token_grid is not None:
            mask = render_mask(method, token_grid, device, self.output_dir / f"{stem}-mask.png")
        return JobResult(
            video=video,
            mask=mask,
            stats_markdown=stats_markdown(result, method, schedule, dense_seconds, token_grid, req),
            caption=caption(req, result, method),
            result=result,
            dense_seconds=dense_seconds,
            grid=token_grid,
        )

    def _stem(self, label: str) -> str:
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.request.model).name or self.request.model)[:40]
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{model}-{label}-s{self.request.seed}"


def _safe_grid(pipe: Any, result: GenerationResult) -> tuple[int, int, int] | None:
    s = result.settings
    try:
        return pipeline_token_grid(pipe, int(s.get("num_frames", 1)), int(s["height"]), int(s["width"]))
    except Exception:  # noqa: BLE001 - the mask picture is optional
        return None


def render_mask(method: AttentionMethod, grid: tuple[int, int, int], device: Any, path: Path) -> Path | None:
    """PNG of the method's video x video block mask for this token grid (None when it has no picture)."""
    visualize = getattr(method, "visualize", None)
    if visualize is None:
        return None
    layout = TokenLayout(1, *grid)
    plan = method.build_plan(layout, 1, torch.device(device))
    return Path(visualize(plan, path))


def stats_markdown(
    result: GenerationResult,
    method: AttentionMethod,
    schedule: Schedule,
    dense_seconds: float | None,
    grid: tuple[int, int, int] | None,
    request: GenerationRequest,
) -> str:
    stats = result.stats
    f, h, w = result.frames.shape[:3]
    steps = result.settings.get("num_inference_steps", "?")
    per_layer = stats.per_layer_density()
    rows = [
        ("method", describe_method(method, schedule)),
        ("wall time", f"{result.seconds:.2f} s"),
        ("steps", str(steps)),
        ("output", f"{f} frames, {w}x{h} px, {result.fps} fps"),
        ("token grid", "x".join(map(str, grid)) + " (frames x rows x columns)" if grid else "n/a"),
        ("attention calls", f"{stats.calls} ({stats.sparse_calls} sparse)"),
        ("mean tile density", f"{stats.mean_density():.3f}"),
        ("density per layer", ", ".join(f"L{k}: {v:.3f}" for k, v in per_layer.items()) or "n/a"),
        ("dense fallbacks", ", ".join(f"{k} (x{v})" for k, v in stats.fallbacks.items()) or "none"),
        ("plan build time", f"{stats.plan_seconds * 1000:.1f} ms"),
    ]
    if not isinstance(method, Dense) and stats.calls and not stats.sparse_calls:
        rows.append(("note", "no call ran sparse: the schedule keeps every step or layer dense"))
    if result.peak_memory_bytes is not None:
        rows.append(("peak GPU memory", f"{result.peak_memory_bytes / 2**30:.2f} GiB"))
    if dense_seconds is not None:
        ratio = dense_seconds / result.seconds if result.seconds > 0 else float("inf")
        rows.append(("dense, same settings", f"{dense_seconds:.2f} s (measured)"))
        rows.append(("speed vs dense", f"{ratio:.2f}x"))
    if request.lora:
        rows.append(("LoRA", f"{request.lora} (scale {request.lora_scale})"))
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def caption(request: GenerationRequest, result: GenerationResult, method: AttentionMethod) -> str:
    s = result.settings
    f = result.frames.shape[0]
    text = (
        f"{request.model} · {method.name}"
        + (f" decay={method.decay}" if hasattr(method, "decay") else "")
        + f" · {s.get('width')}x{s.get('height')}x{f} · {s.get('num_inference_steps')} steps · seed {request.seed}"
        + f" · {result.seconds:.2f} s · \"{request.prompt[:40]}\""
    )
    if request.lora:
        text += f" · LoRA {Path(request.lora).name}@{request.lora_scale}"
    return text
