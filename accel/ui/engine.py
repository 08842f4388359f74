"""What the web UI does, without Gradio: the pipeline cache, method building, one generation job, stats text.

`accel.ui.app` only wires these into widgets, so everything here is testable without a browser.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.geometry import TokenLayout
from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.methods.registry import MethodInfo, method_info, method_label, methods
from accel.options import Option
from accel.pipelines.generate import (
    Cancelled,
    GenerationRequest,
    GenerationResult,
    check_lora_path,
    check_lora_scale,
    load_lora,
    load_pipeline,
    run_generation,
)
from accel.pipelines.generate import write_video as _write_video
from accel.pipelines.patching import patch_handle
from accel.schedule import SCHEDULE_OPTIONS, Schedule

logger = logging.getLogger("accel")

AUTO = "auto"
CUSTOM_PRESET = "custom"

# Errors a user can cause with the form; shown as a message, never a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, NotImplementedError)

# `Cancelled` (from accel.pipelines.generate): the user pressed Cancel or closed the tab; the pipeline
# stopped within one step and nothing was decoded.


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
        lora_scale = check_lora_scale(lora_scale)
        if lora is not None:
            check_lora_path(lora)  # missing or pickled: refused before anything changes
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
class Control:
    """One form control, described without Gradio: `accel.ui.app` turns it into a widget.

    ``key`` is the event's keyword (and API parameter) name: ``<method>_<option>`` for a method's option,
    the option's name for a schedule option. ``widget`` is checkbox, radio, dropdown, number or text;
    ``value`` is in the widget's terms (``AUTO`` for a None choice, None for an empty number).
    """

    key: str
    method: str | None  # None: a schedule option
    option: Option
    widget: str
    value: Any
    choices: tuple[str, ...] = ()
    info: str = ""

    @property
    def label(self) -> str:
        return self.option.label


def option_info(opt: Option) -> str:
    """The control's explanation line: the option's help and its allowed values."""
    help_text = opt.help.rstrip(".")
    if opt.choices is not None:
        allowed = f"{AUTO} = {opt.none_means}" if opt.none_means else ""
    elif opt.kind in (int, float):
        allowed = opt.range_text().replace("(empty:", "(empty =")
    else:
        allowed = ""
    return f"{help_text}; {allowed}" if allowed else help_text


def to_form(opt: Option, value: Any) -> Any:
    """A config value as its control shows it (None choice -> "auto", choices as text, None text -> "")."""
    if opt.choices is not None:
        return AUTO if value is None else str(value)
    if value is None and opt.kind is str:
        return ""
    return value


def form_value(opt: Option, raw: Any) -> Any:
    """A control's value as the option's config value; errors name the control ("Decay: ...").

    An empty number means "auto" where the option has ``none_means``, else the option's default.
    """
    label = opt.label
    if opt.choices is not None:
        if raw is None or raw == "" or raw == AUTO:
            if opt.none_means is not None:
                return None
            raise ValueError(f"{label}: choose one of {', '.join(map(str, opt.choices))}")
        for choice in opt.choices:
            if str(choice) == str(raw).strip():
                return choice
        raise ValueError(f"{label}: {raw!r} is not allowed; choose one of {', '.join(map(str, opt.choices))}"
                         + (f" or {AUTO}" if opt.none_means else ""))
    if opt.kind is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"{label}: must be true or false, got {raw!r}")
        return raw
    if opt.kind in (int, float):
        if raw is None or (isinstance(raw, str) and not raw.strip()):  # empty: auto, else the default
            return None if opt.none_means is not None else opt.default
        if isinstance(raw, str):
            try:
                raw = float(raw)
            except ValueError:
                raise ValueError(f"{label}: {raw!r} is not a number ({opt.range_text()})") from None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ValueError(f"{label}: {raw!r} is not a number ({opt.range_text()})")
        if not math.isfinite(raw):
            raise ValueError(f"{label}: {raw} is not allowed; it must be {opt.range_text()}")
        if opt.kind is int:
            if not float(raw).is_integer():
                raise ValueError(f"{label}: {raw:g} is not a whole number; it must be {opt.range_text()}")
            raw = int(raw)
        try:
            return opt.check(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{label}: {raw:g} is not allowed; it must be {opt.range_text()}") from None
    text = "" if raw is None else str(raw).strip()
    if opt.none_means is not None and text.lower() in ("", AUTO.lower(), "auto", "none"):
        return None  # an empty text field means "auto" where the option allows it
    return opt.check(text)


def method_defaults(info: MethodInfo) -> dict[str, Any]:
    """Config values a method's controls start at: its options' defaults, overridden by the class's
    ``ui_defaults`` (e.g. Radial's decay 0.2, which gives a sparse mask at the default size)."""
    overrides = dict(getattr(info.cls, "ui_defaults", None) or {})
    return {opt.name: overrides.get(opt.name, opt.default) for opt in info.options}


def _widget(opt: Option) -> tuple[str, tuple[str, ...]]:
    if opt.choices is not None:
        choices = ((AUTO,) if opt.none_means else ()) + tuple(str(c) for c in opt.choices)
        return ("radio" if len(choices) <= 3 else "dropdown"), choices
    if opt.kind is bool:
        return "checkbox", ()
    if opt.kind in (int, float):
        return "number", ()
    return "text", ()


def _control(key: str, method: str | None, opt: Option, value: Any) -> Control:
    widget, choices = _widget(opt)
    return Control(key, method, opt, widget, to_form(opt, value), choices, option_info(opt))


def method_controls(registry: dict[str, MethodInfo] | None = None) -> dict[str, list[Control]]:
    """Every registered method's controls, in registry order (dense first; a method without options has none)."""
    registry = methods() if registry is None else registry
    out: dict[str, list[Control]] = {}
    for name, info in registry.items():
        defaults = method_defaults(info)
        out[name] = [_control(f"{name}_{opt.name}", name, opt, defaults[opt.name]) for opt in info.options]
    return out


def schedule_controls() -> list[Control]:
    """The dense warm-up/cool-down controls shared by every sparse method."""
    return [_control(opt.name, None, opt, opt.default) for opt in SCHEDULE_OPTIONS]


@dataclass(frozen=True)
class AttentionSettings:
    """The attention part of the form, as plain values: a registered method name, its controls' values by
    option name, and the schedule controls' values (ignored for dense)."""

    attention: str = "dense"
    options: Mapping[str, Any] = field(default_factory=dict)
    schedule: Mapping[str, Any] = field(default_factory=dict)
    fallback_to_dense: bool = False

    def method_and_schedule(self) -> tuple[AttentionMethod, Schedule]:
        """The method config and schedule these settings describe (ValueError naming the control)."""
        registry = methods()
        if self.attention not in registry:
            raise ValueError(f"Attention: unknown method {self.attention!r}; choose one of {', '.join(registry)}")
        info = registry[self.attention]
        values = {opt.name: form_value(opt, self.options[opt.name]) for opt in info.options if opt.name in self.options}
        unknown = set(self.options) - {opt.name for opt in info.options}
        if unknown:
            raise ValueError(f"{info.name} has no option {', '.join(sorted(unknown))}")
        method = info.build(values)
        if isinstance(method, Dense):
            return method, Schedule()
        sched = {opt.name: form_value(opt, self.schedule[opt.name]) for opt in SCHEDULE_OPTIONS
                 if opt.name in self.schedule}
        return method, Schedule(**{k: v for k, v in sched.items() if v is not None})


def preset_choices(method: str) -> list[str]:
    """The preset menu for a method: "custom" and the method's presets."""
    from accel.presets import presets_for

    return [CUSTOM_PRESET, *presets_for(method)]


def preset_values(name: str) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """(method name, option values, schedule values) of a preset, in the controls' terms; None for custom."""
    if not name or name == CUSTOM_PRESET:
        return None
    from accel.presets import preset

    p = preset(name)
    info = method_info(p.method.name)
    options = {opt.name: to_form(opt, getattr(p.method, opt.name)) for opt in info.options}
    schedule = {}
    for opt in SCHEDULE_OPTIONS:
        value = getattr(p.schedule, opt.name)
        schedule[opt.name] = len(value) if isinstance(value, tuple) else value  # a layer list: its count
    return p.method.name, options, schedule


def describe_method(method: AttentionMethod, schedule: Schedule) -> str:
    if isinstance(method, Dense):
        return "dense"
    if dataclasses.is_dataclass(method):
        fields = ", ".join(f"{f.name}={getattr(method, f.name)}" for f in dataclasses.fields(method) if f.init)
    else:
        fields = ""
    layers = schedule.dense_layers
    layer_text = f"first {layers} layers" if isinstance(layers, int) else f"layers {list(layers)}"
    sched = f"dense first {schedule.dense_steps} / last {schedule.dense_last_steps} steps, {layer_text}"
    return f"{method.name}({fields}); {sched}"


def optional_int(label: str, value: Any, *, zero_is_default: bool = True) -> int | None:
    """Form number -> int >= 1, where empty (or 0) means the model's default; errors name the field.

    With ``zero_is_default=False`` (the seed): an int >= 0, empty -> None.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{label}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label}: {value!r} is not a whole number")
    if not float(value).is_integer():
        raise ValueError(f"{label}: {value:g} is not a whole number")
    value = int(value)
    if zero_is_default:
        if value == 0:
            return None
        if value < 0:
            raise ValueError(f"{label}: {value} must be a positive whole number (0 or empty: the model's default)")
    elif value < 0:
        raise ValueError(f"{label}: {value} must be a whole number >= 0")
    return value


def optional_float(label: str, value: Any) -> float | None:
    """Form number -> finite float, or None when empty; errors name the field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{label}: {value!r} is not a finite number")
    return number


# ------------------------------------------------------------------------------------------ geometry
def pipeline_token_grid(pipe: Any, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(latent frames, token rows, token columns) this pipeline's transformer sees for a pixel size.

    Uses the pipeline's own VAE factors and the transformer's patch size (its family's
    `FamilyFacts.geometry`), so tiny test models (whose VAEs compress less than the full-size ones) get
    their real grid.
    """
    from accel.pipelines.families import family_for_pipeline

    tr = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    if tr is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer")
    fam = family_for_pipeline(pipe)
    if fam is None:
        raise ValueError(f"{type(pipe).__name__} is not a supported model family")
    return fam.facts.geometry(pipe).token_grid(frames, height, width)


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


PHASE_TEXT = {
    "loading": "loading {model}",
    "encoding": "encoding the prompt",
    "denoising": "{label} denoising",
    "decoding": "decoding the video (VAE)",
    "writing": "writing the video",
}


@dataclass(eq=False)
class Job:
    """One press of Generate: the request, the attention settings and where to write.

    ``stop`` (set by Cancel or a closed tab) stops the pipeline within one denoising step; nothing is
    decoded or written and `run` raises `Cancelled`. ``phases`` records what the job did, in order
    (`accel.pipelines.generate.PHASES`; the dense timing run's phases are prefixed ``dense baseline:``).
    """

    request: GenerationRequest
    attention: AttentionSettings
    output_dir: Path
    compare_dense: bool = False
    guidance: Any = None  # head-perturbation guidance (accel.HeadPerturbation / GuidancePreset) or None
    stop: threading.Event = field(default_factory=threading.Event)
    phases: list[str] = field(default_factory=list)

    def run(
        self,
        cache: PipelineCache,
        progress: Callable[[int, int, str], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> JobResult:
        """Generate, write the video (and the mask picture), and describe the run.

        ``progress(i, total, text)`` gets denoising steps as ``(i, total)`` (starting at 0 with the total)
        and the other phases as ``(0, 0, text)``; ``on_phase(name)`` gets each phase name.
        """
        method, schedule = self.attention.method_and_schedule()
        on_unsupported = "dense" if self.attention.fallback_to_dense else "error"
        req = self.request
        label = method.name

        def phase(name: str, prefix: str = "") -> None:
            self.phases.append(prefix + name)
            if on_phase:
                on_phase(prefix + name)
            if progress and name != "denoising":  # denoising reports through its steps
                progress(0, 0, prefix + PHASE_TEXT[name].format(model=req.model, label=label))

        def check_stop(where: str) -> None:
            if self.stop.is_set():
                raise Cancelled(f"cancelled {where}")

        with cache.lock:
            check_stop("before the model was loaded")
            phase("loading")
            pipe = cache.get(req.model, req.lora, req.lora_scale)
            grid: list[tuple[int, int, int]] = []

            def on_step(i: int, total: int) -> None:
                if not grid:
                    handle = patch_handle(pipe)
                    states = handle.states.values() if handle is not None else ()
                    grid.extend(s.grid for s in states if s.grid is not None)
                if progress:
                    progress(i, total, f"{label} denoising")

            check_stop("before the first step")
            result = run_generation(
                pipe, req, method=method, schedule=schedule, on_unsupported=on_unsupported,
                on_step=on_step, should_stop=self.stop.is_set, on_phase=phase, **self._guided(),
            )
            check_stop("after decoding")
            dense_seconds = None
            if self.compare_dense and not isinstance(method, Dense):

                def on_dense_step(i: int, total: int) -> None:
                    if progress:
                        progress(i, total, "dense baseline (timing)")

                dense = run_generation(
                    pipe, req, method=Dense(), on_step=on_dense_step, should_stop=self.stop.is_set,
                    on_phase=lambda name: phase(name, "dense baseline: "), **self._guided(),
                )
                check_stop("during the dense timing run")
                dense_seconds = dense.seconds
            device = getattr(pipe, "device", torch.device("cpu"))
            token_grid = grid[0] if grid else _safe_grid(pipe, result)
        phase("writing")
        stem = self._stem(label)
        video = _write_video(result.frames, self.output_dir / f"{stem}.mp4", result.fps)
        mask = None
        if not isinstance(method, Dense) and token_grid is not None:
            mask = render_mask(method, token_grid, device, self.output_dir / f"{stem}-mask.png")
        stats = stats_markdown(result, method, schedule, dense_seconds, token_grid, req)
        if self.guidance is not None:
            from accel.guidance.cli import describe_guidance

            stats += "\n\n" + describe_guidance(self.guidance)
        return JobResult(
            video=video,
            mask=mask,
            stats_markdown=stats,
            caption=caption(req, result, method),
            result=result,
            dense_seconds=dense_seconds,
            grid=token_grid,
        )

    def _guided(self) -> dict[str, Any]:
        return {} if self.guidance is None else {"guidance": self.guidance}

    def _stem(self, label: str) -> str:
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.request.model).name or self.request.model)[:40]
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:20]
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{model}-{label}-s{self.request.seed}"


def _safe_grid(pipe: Any, result: GenerationResult) -> tuple[int, int, int] | None:
    s = result.settings
    try:
        return pipeline_token_grid(pipe, int(s.get("num_frames", 1)), int(s["height"]), int(s["width"]))
    except Exception:  # noqa: BLE001 - the mask picture is optional
        return None


def render_mask(method: AttentionMethod, grid: tuple[int, int, int], device: Any, path: Path) -> Path | None:
    """PNG of the method's video x video mask for this token grid, drawn by the method's own ``visualize``
    (None when the method has none, e.g. dense, or it fails: the picture is optional).

    Works with both method contracts: ``visualize(plan, path)`` (a plan from ``build_plan``, as Radial
    has today) and ``visualize(layout, path)``.
    """
    visualize = getattr(method, "visualize", None)
    if visualize is None:
        return None
    layout = TokenLayout(1, *grid)
    try:
        params = list(inspect.signature(visualize).parameters)
        if params and params[0] == "layout":
            out = visualize(layout, path)
        else:
            plan = method.build_plan(layout, 1, torch.device(device))
            out = visualize(plan, path)
    except Exception:  # noqa: BLE001 - log it; the run itself succeeded
        logger.exception("accel ui: could not draw the %s mask", method.name)
        return None
    return Path(out) if out is not None else None


def _layer_count(stats: Any) -> int:
    return len(stats.layers)


def no_sparse_reason(result: GenerationResult, method: AttentionMethod, schedule: Schedule) -> str | None:
    """Why a sparse method ran no call sparse (None when some did, or for dense)."""
    stats = result.stats
    if isinstance(method, Dense) or not stats.calls or stats.sparse_calls:
        return None
    steps = int(result.settings.get("num_inference_steps", 0) or 0)
    why = schedule.why_all_dense(steps, max(1, _layer_count(stats)))
    if why:
        return f"no call ran sparse: {why}"
    if stats.fallbacks:
        fallbacks = ", ".join(f"{k} (x{v})" for k, v in stats.fallbacks.items())
        return f"no call ran sparse: {method.name} could not run here and fell back to dense: {fallbacks}"
    return "no call ran sparse"


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
    why = no_sparse_reason(result, method, schedule)
    if why:
        rows.append(("note", why))
    elif not isinstance(method, Dense) and stats.sparse_calls and stats.mean_density() >= 0.999:
        rows.append(("note", f"{method.name} computed every tile at this size (the mask is dense): no saving"))
    if result.peak_memory_bytes is not None:
        rows.append(("peak GPU memory", f"{result.peak_memory_bytes / 2**30:.2f} GiB"))
    if dense_seconds is not None:
        if why:  # both runs did the same work: a ratio would only show noise
            rows.append(("dense, same settings", f"{dense_seconds:.2f} s (measured; no ratio: every call ran dense)"))
        else:
            rows.append(("dense, same settings", f"{dense_seconds:.2f} s (measured)"))
            ratio = dense_seconds / result.seconds if result.seconds > 0 else float("inf")
            rows.append(("speed vs dense", f"{ratio:.2f}x"))
    if request.lora:
        rows.append(("LoRA", f"{request.lora} (scale {request.lora_scale})"))
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def caption(request: GenerationRequest, result: GenerationResult, method: AttentionMethod) -> str:
    s = result.settings
    f = result.frames.shape[0]
    text = (
        f"{request.model} · {method_label(method)}"
        + f" · {s.get('width')}x{s.get('height')}x{f} · {s.get('num_inference_steps')} steps · seed {request.seed}"
        + f" · {result.seconds:.2f} s · \"{request.prompt[:40]}\""
    )
    if request.lora:
        text += f" · LoRA {Path(request.lora).name}@{request.lora_scale}"
    return text
