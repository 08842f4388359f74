"""Load a pipeline, patch it, generate, and write the video: what `accel generate` and the UI share."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.methods.base import AttentionMethod
from accel.pipelines.families import FAMILIES, family_for_pipeline, family_for_transformer
from accel.pipelines.patching import patch, unpatch
from accel.pipelines.runtime import AttentionStats
from accel.pipelines.tiny import TINY_MODELS, build_tiny, size_limits, size_rules
from accel.pipelines.tiny import _check as _check_size
from accel.schedule import Schedule

logger = logging.getLogger("accel")

DEFAULT_MODEL = "accel-demo"
"""The learned demo model (issue #17, `accel.demo`): the one built-in model whose videos show the prompt; the
random ``tiny-*`` models stay for tests."""
DEFAULT_PROMPT = "a red square moving right"
"""A caption in the demo model's vocabulary (colour, size, shape, direction, speed: `accel.lora.synthetic`)."""


PHASES = ("loading", "encoding", "denoising", "decoding", "writing")
"""What a generation is doing, in order; `run_generation` reports encoding, denoising and decoding through
``on_phase`` (loading the model and writing the video are the caller's)."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_LORA_SCALE = 100.0


class ModelLoadError(ValueError):
    """The model id or path could not be turned into a pipeline."""


class Cancelled(Exception):
    """`run_generation` stopped because ``should_stop()`` became true; nothing was decoded."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs; None means the model's default."""

    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    seed: int = 0
    guidance_scale: float | None = None
    lora: str | None = None
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        # Sizes: None is the model's default; anything else a whole number >= 1 (the model's multiples and
        # maxima are checked by `resolve_settings`, which knows the pipeline).
        for name in ("frames", "height", "width", "steps"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a whole number >= 1 or None (the model's default), got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a whole number >= 1 or None (the model's default), got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be a whole number, got {self.seed!r}")
        if self.guidance_scale is not None:
            g = self.guidance_scale
            if isinstance(g, bool) or not isinstance(g, (int, float)):
                raise TypeError(f"guidance_scale must be a finite number or None (the model's default), got {g!r}")
            if not math.isfinite(g):
                raise ValueError(f"guidance_scale must be a finite number, got {g}")
        check_lora_scale(self.lora_scale)


def check_lora_scale(scale: Any) -> float:
    """``scale`` as a float, or an error naming the field: a finite number with |scale| <= 100."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"lora_scale must be a finite number between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, "
                        f"got {scale!r}")
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        raise ValueError(f"lora_scale must be a finite number between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, "
                         f"got {scale}")
    return float(scale)


@dataclass
class GenerationResult:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: int
    seconds: float
    peak_memory_bytes: int | None
    stats: AttentionStats
    settings: dict = field(default_factory=dict)

    def summary(self) -> str:
        memory = (
            f"peak GPU memory {self.peak_memory_bytes / 2**30:.2f} GiB"
            if self.peak_memory_bytes is not None
            else "peak memory n/a (CPU)"
        )
        return f"generated {self.frames.shape[0]} frames {self.frames.shape[2]}x{self.frames.shape[1]} in " \
               f"{self.seconds:.2f} s; {memory}; {self.stats.summary()}"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model: str, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """A tiny built-in model by name (`tiny-wan`, ...), a local diffusers folder, or a Hub id."""
    device = device or default_device()
    if model in TINY_MODELS:
        pipe = build_tiny(model)
        return pipe.to(device)
    from diffusers import DiffusionPipeline

    local = Path(model).expanduser()
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and not local.exists()
    if not local.is_dir() and not looks_like_hub_id:
        raise ModelLoadError(
            f"unknown model {model!r}: not a built-in tiny model ({', '.join(sorted(TINY_MODELS))}), "
            "not a local diffusers folder, and not a Hub id of the form 'org/name'"
        )
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(local) if local.is_dir() else model, dtype=dtype)
    except Exception as err:  # diffusers/hub raise many kinds; one clear message for the user
        raise ModelLoadError(f"could not load model {model!r}: {type(err).__name__}: {err}") from err
    return pipe.to(device)


def enable_ulysses(pipe: Any, world_size: int) -> None:
    """Spread each transformer over `world_size` GPUs with diffusers' Ulysses context parallelism.

    Call inside a torchrun process group, before `accel.patch` (patch carries the config over).
    """
    from diffusers import ContextParallelConfig

    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        fam = family_for_transformer(module)
        if getattr(module, "_cp_plan", None) is None or (fam is not None and not fam.facts.context_parallel):
            labels = [f.facts.label for f in FAMILIES if f.facts.context_parallel]
            supported = ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else "".join(labels)
            raise NotImplementedError(
                f"{type(module).__name__} has no context-parallel plan in diffusers; multi-GPU generation "
                f"supports {supported} transformers (xDiT serves the others)"
            )
        module.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))


def resolve_settings(pipe: Any, model: str, request: GenerationRequest) -> dict:
    """Fill a request's None fields from the model's defaults and validate sizes against the model.

    Height and width must be multiples of the model's `size_rules`, frames follow its temporal rule, and
    height, width, frames and steps stay within its `size_limits` (ValueError naming the field and range).
    """
    spec = TINY_MODELS.get(model)
    is_video = spec.is_video if spec else _is_video_pipeline(pipe)
    settings: dict[str, Any] = {
        "height": request.height or (spec.height if spec else 480),
        "width": request.width or (spec.width if spec else 832),
        "num_inference_steps": request.steps or (spec.num_inference_steps if spec else 50),
    }
    frames = request.frames or (spec.num_frames if spec else (81 if is_video else 1))
    spatial, tmul, toff = size_rules(pipe)
    limits = spec.limits if spec else size_limits(pipe)
    _check_size(model, spatial, tmul, toff, settings["height"], settings["width"], frames, is_video,
                limits=limits, steps=settings["num_inference_steps"])
    if request.guidance_scale is not None and not math.isfinite(request.guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {request.guidance_scale}")
    if is_video:
        settings["num_frames"] = frames
    extra = dict(spec.call_defaults) if spec else {}
    if request.guidance_scale is not None:
        extra["guidance_scale"] = request.guidance_scale
    if request.negative_prompt is not None:
        extra["negative_prompt"] = request.negative_prompt
    if spec is not None and spec.needs_image:
        from accel.pipelines.tiny import example_image

        extra["image"] = example_image(settings["height"], settings["width"])
    settings.update(extra)
    return settings


def _is_video_pipeline(pipe: Any) -> bool:
    fam = family_for_pipeline(pipe)
    return fam is not None and fam.facts.is_video


def check_lora_path(path: str | os.PathLike) -> Path:
    """The LoRA as a path that is safe to load: a ``.safetensors`` file, or a folder holding one.

    Pickled weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can run code when loaded, so they are refused
    everywhere (FileNotFoundError if missing, ValueError otherwise, naming the file).
    """
    lora = Path(path).expanduser()
    if not lora.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if lora.is_file():
        if lora.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(
                f"LoRA {lora.name} holds pickled weights, which can run code when loaded: only .safetensors "
                "LoRAs are loaded (convert it with safetensors.torch.save_file)"
            )
        if lora.suffix.lower() != ".safetensors":
            raise ValueError(f"LoRA files must be .safetensors (pickled weights are not loaded), got {lora.name}")
        return lora
    if lora.is_dir():
        if not any(lora.glob("*.safetensors")):
            pickled = sorted(p.name for p in lora.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            found = f" (found pickled weights: {', '.join(pickled)}; they are not loaded)" if pickled else ""
            raise ValueError(f"LoRA folder {path} holds no .safetensors file{found}")
        return lora
    raise ValueError(f"LoRA must be a .safetensors file or a folder holding one, got {path}")


def load_lora(pipe: Any, path: str, scale: float) -> None:
    """Load a diffusers-format LoRA (.safetensors file or a folder with one) into the pipeline.

    Pickled weights are refused (see `check_lora_path`), and diffusers is told ``use_safetensors=True``.
    """
    scale = check_lora_scale(scale)
    lora = check_lora_path(path)
    if not hasattr(pipe, "load_lora_weights"):
        raise NotImplementedError(f"{type(pipe).__name__} cannot load LoRA weights")
    from accel.pipelines.lora_files import check_pipeline_lora

    check_pipeline_lora(pipe, lora)  # a LoRA made for another model is refused with a clear message
    kwargs: dict[str, Any] = {"weight_name": lora.name} if lora.is_file() else {}
    if lora.is_dir() and (lora / "pytorch_lora_weights.safetensors").exists():
        kwargs["weight_name"] = "pytorch_lora_weights.safetensors"  # accel's folders also hold ComfyUI keys
    source = str(lora.parent if lora.is_file() else lora)
    try:
        pipe.load_lora_weights(source, adapter_name="accel", use_safetensors=True, **kwargs)
    except Exception as err:
        raise ValueError(f"could not load LoRA {path}: {type(err).__name__}: {err}") from err
    pipe.set_adapters(["accel"], [scale])


def _transformers(pipe: Any) -> list[torch.nn.Module]:
    mods = [getattr(pipe, n, None) for n in ("transformer", "transformer_2")]
    return [m for m in mods if isinstance(m, torch.nn.Module)]


def run_generation(
    pipe: Any,
    request: GenerationRequest,
    *,
    method: AttentionMethod | None = None,
    schedule: Schedule | None = None,
    on_unsupported: str = "error",
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_phase: Callable[[str], None] | None = None,
    guidance: Any = None,
) -> GenerationResult:
    """Patch `pipe` with `method`, generate once, unpatch; return frames and measurements.

    Args:
        on_step: called ``(0, total)`` when denoising starts (so a progress bar knows its total), then
            ``(i, total)`` after each step i = 1..total.
        should_stop: polled after every step and before every transformer forward; once it returns True
            the pipeline stops at once (no further step, no VAE decode) and `Cancelled` is raised.
        on_phase: called with ``"encoding"`` (text encoders), ``"denoising"`` (first transformer forward)
            and ``"decoding"`` (after the last step: VAE decode and post-processing), see `PHASES`.
        guidance: head-perturbation guidance for `accel.patch` (`accel.HeadPerturbation` or a preset path).
    """
    settings = resolve_settings(pipe, request.model, request)
    device = getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    total = settings["num_inference_steps"]
    progress = {"started": False, "done": 0}

    def stop_if_asked(where: str) -> None:
        if should_stop is not None and should_stop():
            done = progress["done"]
            raise Cancelled(f"cancelled {where} (after {done}/{total} steps; nothing decoded)")

    def before_forward(module: Any, args: Any) -> None:
        stop_if_asked("before a transformer forward")
        if not progress["started"]:
            progress["started"] = True
            if on_phase is not None:
                on_phase("denoising")
            if on_step is not None:
                on_step(0, total)

    def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        steps = getattr(p, "_num_timesteps", None) or total
        progress["done"] = i + 1
        if on_step is not None:
            on_step(i + 1, total)
        stop_if_asked(f"after step {i + 1}")
        if i + 1 >= steps and on_phase is not None:
            on_phase("decoding")
        return kwargs

    handle = patch(pipe, method, schedule=schedule, guidance=guidance, on_unsupported=on_unsupported,
                   seed=request.seed)
    hooks = [m.register_forward_pre_hook(before_forward) for m in _transformers(pipe)]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        stop_if_asked("before the prompt was encoded")
        if on_phase is not None:
            on_phase("encoding")
        output = pipe(
            prompt=request.prompt, generator=generator, output_type="np", callback_on_step_end=on_step_end, **settings
        )
    finally:
        for hook in hooks:
            hook.remove()
        unpatch(pipe)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    frames = output.frames[0] if hasattr(output, "frames") else np.stack(output.images[:1])
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    spec = TINY_MODELS.get(request.model)
    return GenerationResult(
        frames=frames,
        fps=spec.fps if spec else 16,
        seconds=seconds,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        stats=handle.stats,
        settings={k: v for k, v in settings.items() if isinstance(v, (int, float, str))},
    )


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, with a clear message, when the video cannot be written there."""
    out = Path(path).expanduser()
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"output must be an .mp4 file, got {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise PermissionError(f"cannot create output folder {parent}: a file of that name exists")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"cannot create output folder {parent}: {err.strerror}") from err
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"output path is not writable: {out}")
    return out


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int) -> Path:
    """Write (F, H, W, 3) uint8 frames as an H.264 mp4 through imageio-ffmpeg."""
    import imageio.v2 as imageio

    out = check_output_path(path)
    # macro_block_size=1 keeps tiny sizes exact (ffmpeg would otherwise pad to multiples of 16).
    with imageio.get_writer(out, fps=fps, codec="libx264", macro_block_size=1, quality=8) as writer:
        for frame in frames:
            writer.append_data(frame)
    return out
