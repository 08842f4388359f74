"""The Gradio page: a form for one generation, live progress, Cancel, video, stats, mask and a session gallery."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from accel.guidance.ui import PRESET_KEY, guidance_controls, guidance_from_form, preset_form_values
from accel.methods.registry import methods
from accel.pipelines.generate import DEFAULT_MODEL, DEFAULT_PROMPT, GenerationRequest, load_pipeline
from accel.pipelines.tiny import TINY_MODELS
from accel.ui.engine import (
    CUSTOM_PRESET,
    USER_ERRORS,
    AttentionSettings,
    Cancelled,
    Control,
    Job,
    PipelineCache,
    method_controls,
    optional_float,
    optional_int,
    preset_choices,
    preset_values,
    schedule_controls,
)

logger = logging.getLogger("accel")

DEFAULT_OUTPUT_DIR = "outputs/ui"
SCRATCH_DIRS = (".gradio", ".scratch")
SCRATCH_MAX_AGE_HOURS = 24.0
_INTRO = """\
# accel: sparse attention for video diffusion transformers
Generate with dense or a sparse attention method and see what it computes. The `tiny-*` models are small
random-weight pipelines built offline: they show the mechanics in seconds, not pretty videos.
"""


class UiController:
    """State the page shares across events: the pipeline cache, the output folder, the form's attention
    controls and the running jobs (by browser session)."""

    def __init__(self, output_dir: str | os.PathLike, loader: Callable[[str], Any] = load_pipeline) -> None:
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.cache = PipelineCache(loader)
        self.method_controls = method_controls()
        self.schedule_controls = schedule_controls()
        self.guidance_controls = guidance_controls()
        self.controls: dict[str, Control] = {}
        for control in [*(c for cs in self.method_controls.values() for c in cs), *self.schedule_controls,
                        *self.guidance_controls]:
            if control.key in self.controls:
                raise RuntimeError(f"two UI controls share the key {control.key!r}")
            self.controls[control.key] = control
        self._jobs: dict[str, set[Job]] = {}
        self._jobs_lock = threading.Lock()

    # ------------------------------------------------------------------ form -> job
    def make_job(
        self, model: Any, prompt: Any, negative_prompt: Any, height: Any, width: Any, frames: Any, steps: Any,
        seed: Any, guidance_scale: Any, attention: Any, fallback_to_dense: Any, compare_dense: Any, lora: Any,
        lora_scale: Any, controls: dict[str, Any],
    ) -> Job:
        """The job a form describes; ValueError/TypeError naming the field otherwise."""
        if not (prompt or "").strip():
            raise ValueError("Prompt: write a prompt (an empty prompt gives the model nothing to follow)")
        unknown = sorted(set(controls) - set(self.controls))
        if unknown:
            raise ValueError(f"unknown attention controls: {', '.join(unknown)}; known: {', '.join(self.controls)}")
        attention = (attention or "dense").strip()
        options = {
            c.option.name: controls[c.key] for c in self.method_controls.get(attention, ()) if c.key in controls
        }
        schedule = {c.option.name: controls[c.key] for c in self.schedule_controls if c.key in controls}
        guidance = guidance_from_form({c.key: controls[c.key] for c in self.guidance_controls if c.key in controls})
        seed_value = optional_int("Seed", seed, zero_is_default=False)
        scale = optional_float("LoRA scale", lora_scale)
        return Job(
            request=GenerationRequest(
                model=(model or "").strip(),
                prompt=prompt,
                negative_prompt=(negative_prompt or "").strip() or None,
                frames=optional_int("Frames", frames),
                height=optional_int("Height", height),
                width=optional_int("Width", width),
                steps=optional_int("Steps", steps),
                seed=0 if seed_value is None else seed_value,
                guidance_scale=optional_float("Guidance scale", guidance_scale),
                lora=(lora or "").strip() or None,
                lora_scale=1.0 if scale is None else scale,
            ),
            attention=AttentionSettings(
                attention=attention, options=options, schedule=schedule, fallback_to_dense=bool(fallback_to_dense)
            ),
            output_dir=self.output_dir,
            compare_dense=bool(compare_dense),
            guidance=guidance,
        )

    # ------------------------------------------------------------------ events
    def generate(
        self,
        model: str,
        prompt: str,
        negative_prompt: str,
        height: float | None,
        width: float | None,
        frames: float | None,
        steps: float | None,
        seed: float | None,
        guidance_scale: float | None,
        attention: str,
        fallback_to_dense: bool,
        compare_dense: bool,
        lora: str,
        lora_scale: float | None,
        history: list | None,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
        **controls: Any,
    ) -> tuple:
        """One generation: (video, stats, mask, gallery, history, message).

        ``controls`` are the attention controls by key (``radial_decay``, ``dense_steps``, ...). A refused
        or failed run leaves video, stats, mask and gallery as they were and returns the reason as the
        message (also shown as a toast); a successful run hides the message.
        """
        history = list(history or [])
        key = getattr(request, "session_hash", None) or "default"
        try:
            job = self.make_job(
                model, prompt, negative_prompt, height, width, frames, steps, seed, guidance_scale, attention,
                fallback_to_dense, compare_dense, lora, lora_scale, controls,
            )
            job.attention.method_and_schedule()  # refuse bad controls before waiting for the pipeline
        except USER_ERRORS as err:
            return self._refused("Invalid input", str(err))

        def report(i: int, total: int, desc: str) -> None:
            if total:
                progress((i, total), desc=desc, unit="steps")
            else:
                progress(None, desc=desc)

        with self._track(key, job):
            try:
                out = job.run(self.cache, report)
            except Cancelled as err:
                return self._refused("Cancelled", f"Generation {err}.")
            except USER_ERRORS as err:
                return self._refused("Cannot generate", str(err))
            except Exception as err:  # noqa: BLE001 - the page gets a message, the log the traceback
                logger.exception("accel ui: generation failed")
                return self._refused("Generation failed", f"{type(err).__name__}: {err}")
        history.insert(0, (str(out.video), out.caption))
        mask = gr.update(value=str(out.mask), visible=True) if out.mask else gr.update(value=None, visible=False)
        return str(out.video), out.stats_markdown, mask, history, history, gr.update(value="", visible=False)

    @staticmethod
    def _refused(title: str, message: str) -> tuple:
        """Outputs for a run that produced nothing: every result stays as it was, the message says why."""
        gr.Warning(message, title=title)
        text = f"**{title}**: {message}"
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.update(value=text, visible=True)

    def cancel(self, request: gr.Request) -> Any:
        """Stop this session's running job within one denoising step (nothing is decoded)."""
        stopped = self.stop_session(getattr(request, "session_hash", None) or "default")
        if not stopped:
            return gr.skip()
        return gr.update(value="**Cancelled**: the job stops after its current step; nothing is decoded.",
                         visible=True)

    def end_session(self, request: gr.Request) -> None:
        """The tab was closed or reloaded: stop its jobs, so none keeps the pipeline busy for nobody."""
        if self.stop_session(getattr(request, "session_hash", None) or "default"):
            logger.info("accel ui: a tab closed; its job was cancelled")

    def stop_session(self, key: str) -> int:
        with self._jobs_lock:
            jobs = list(self._jobs.get(key, ()))
        for job in jobs:
            job.stop.set()
        return len(jobs)

    @contextlib.contextmanager
    def _track(self, key: str, job: Job) -> Iterator[None]:
        with self._jobs_lock:
            self._jobs.setdefault(key, set()).add(job)
        try:
            yield
        finally:
            with self._jobs_lock:
                jobs = self._jobs.get(key, set())
                jobs.discard(job)
                if not jobs:
                    self._jobs.pop(key, None)

    # ------------------------------------------------------------------ form helpers
    def show_method(self, name: str) -> list:
        """Updates when the method changes: its controls' group, the schedule, the preset menu."""
        groups = [gr.update(visible=m == name) for m in self.method_controls]
        sparse = name != "dense"
        presets = preset_choices(name) if name in self.method_controls else [CUSTOM_PRESET]
        preset = gr.update(choices=presets, value=CUSTOM_PRESET, visible=len(presets) > 1)
        return [*groups, gr.update(visible=sparse), preset]

    def fill_guidance(self, path: str) -> list:
        """The guidance fields filled from a preset file (a toast says why when it cannot be read)."""
        try:
            values = preset_form_values(path)
        except USER_ERRORS as err:
            gr.Warning(str(err), title="Guidance preset")
            return [gr.update() for _ in self.guidance_controls]
        return [gr.update(value=values[c.key]) if c.key in values else gr.update() for c in self.guidance_controls]

    def fill_preset(self, name: str) -> list:
        """The preset's values in its method's controls and the schedule controls (others unchanged)."""
        all_controls = [*(c for cs in self.method_controls.values() for c in cs), *self.schedule_controls]
        values = preset_values(name)
        if values is None:
            return [gr.update() for _ in all_controls]
        method, options, schedule = values
        out = []
        for c in all_controls:
            if c.method == method and c.option.name in options:
                out.append(options[c.option.name])
            elif c.method is None and c.option.name in schedule:
                out.append(schedule[c.option.name])
            else:
                out.append(gr.update())
        return out


def model_defaults(model: str) -> tuple:
    """Height, width, frames, steps and guidance of a tiny model; unchanged fields for other models."""
    spec = TINY_MODELS.get((model or "").strip())
    if spec is None:
        return tuple(gr.update() for _ in range(5))
    return spec.height, spec.width, spec.num_frames, spec.num_inference_steps, spec.call_defaults.get("guidance_scale")


def clean_scratch(output_dir: Path, max_age_hours: float = SCRATCH_MAX_AGE_HOURS) -> int:
    """Delete scratch files (Gradio's upload/cache copies) older than `max_age_hours`; returns the count.

    Only ``.gradio/`` and ``.scratch/`` inside the output folder, and Gradio's hash-named cache folders
    directly in it, are touched (matplotlib's font cache is kept); videos and mask pictures the UI wrote
    at the top of the output folder are never deleted.
    """
    cutoff = time.time() - max_age_hours * 3600
    roots = [output_dir / d for d in SCRATCH_DIRS]
    roots += [d for d in output_dir.iterdir() if d.is_dir() and re.fullmatch(r"[0-9a-f]{32,64}", d.name)]
    removed = 0
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            if "matplotlib" in path.relative_to(root).parts:
                continue
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            except OSError:
                continue
        if root.parent == output_dir and root.name not in SCRATCH_DIRS and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    return removed


def _component(control: Control) -> gr.components.Component:
    """The Gradio widget for one attention control (no Gradio-side range checks: `form_value` checks)."""
    common: dict[str, Any] = dict(label=control.label, info=control.info, elem_id=f"opt-{control.key}")
    if control.widget == "checkbox":
        return gr.Checkbox(value=control.value, **common)
    if control.widget == "radio":
        return gr.Radio(list(control.choices), value=control.value, **common)
    if control.widget == "dropdown":
        return gr.Dropdown(list(control.choices), value=control.value, allow_custom_value=True, **common)
    if control.widget == "number":
        return gr.Number(value=control.value, **common)
    return gr.Textbox(value="" if control.value is None else str(control.value), **common)


@contextlib.contextmanager
def _gradio_cache_in(folder: Path) -> Iterator[None]:
    """Components created inside keep their file cache in `folder` (GRADIO_TEMP_DIR is read at creation).

    Outputs already under `folder` are then served in place instead of being copied to the system temp dir.
    """
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


def build_app(
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR, *, loader: Callable[[str], Any] = load_pipeline,
    model: str = DEFAULT_MODEL,
) -> gr.Blocks:
    """The accel web UI as a queued `gr.Blocks` (one job at a time); call `.launch()` or use `launch()`.

    The attention controls come from the method registry (`accel.methods.registry.methods()`), one group
    per method, and the schedule controls from `accel.schedule.SCHEDULE_OPTIONS`: a new method appears
    here without a change to this module.

    Everything the app writes stays in `output_dir`: videos and masks at its top, Gradio's scratch copies
    in it, matplotlib's cache in ``.scratch/matplotlib`` (``MPLCONFIGDIR``, unless already set). Scratch
    files older than 24 hours are deleted at start-up (`clean_scratch`); videos never are.

    Args:
        output_dir: where videos and mask pictures are written (and the only folder the app serves files from).
        loader: model id -> pipeline (default `accel.pipelines.generate.load_pipeline`).
    """
    controller = UiController(output_dir, loader)
    out_dir = controller.output_dir
    os.environ.setdefault("MPLCONFIGDIR", str(out_dir / ".scratch" / "matplotlib"))
    clean_scratch(out_dir)
    spec = TINY_MODELS.get(model)  # a Hub id or folder: size fields start at 0 (the model's default)
    size_defaults = (spec.height, spec.width, spec.num_frames, spec.num_inference_steps,
                     spec.call_defaults.get("guidance_scale")) if spec is not None else (0, 0, 0, 0, None)
    registry = methods()
    with _gradio_cache_in(out_dir), gr.Blocks(title="accel", analytics_enabled=False) as demo:
        demo.accel_controller = controller  # for tests and embedding
        gr.Markdown(_INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                model_box = gr.Dropdown(
                    choices=sorted(TINY_MODELS), value=model, allow_custom_value=True, label="Model",
                    info="accel-demo (the learned demo) or a tiny-* random test model (offline), or type a Hub id "
                         "(org/name) or a local diffusers folder",
                )
                prompt = gr.Textbox(
                    value=DEFAULT_PROMPT, label="Prompt", lines=1, max_lines=6,
                    info="Enter generates", elem_id="prompt",
                )
                negative_prompt = gr.Textbox(value="", label="Negative prompt", placeholder="(none)")
                with gr.Row():
                    height = gr.Number(value=size_defaults[0], label="Height", elem_id="height",
                                       info="pixels; a multiple of the model's VAE factor times its patch")
                    width = gr.Number(value=size_defaults[1], label="Width", elem_id="width", info="pixels")
                    frames = gr.Number(value=size_defaults[2], label="Frames", elem_id="frames",
                                       info="Wan: 4k+1 (5, 9, 13, 17, ...)")
                with gr.Row():
                    steps = gr.Number(value=size_defaults[3], label="Steps", elem_id="steps",
                                      info="denoising steps")
                    guidance = gr.Number(value=size_defaults[4], label="Guidance scale",
                                         info="classifier-free guidance strength")
                    with gr.Column(min_width=160):
                        seed = gr.Number(value=0, label="Seed", info="same seed, same video")
                        seed_btn = gr.Button("Random seed", size="sm")
                gr.Markdown("<small>0 or empty = the model's default size, frames, steps or guidance.</small>")
                with gr.Accordion("Attention", open=True):
                    attention = gr.Radio(
                        list(registry), value="dense", label="Self-attention method",
                        info=" · ".join(f"{n}: {i.summary}" for n, i in registry.items()),
                    )
                    preset = gr.Dropdown(
                        [CUSTOM_PRESET], value=CUSTOM_PRESET, label="Preset", visible=False,
                        info="settings shipped with the method's reference code; fills the fields below",
                    )
                    groups, method_components = [], []
                    for name, controls in controller.method_controls.items():
                        with gr.Column(visible=name == "dense") as group:
                            for control in controls:
                                method_components.append((control, _component(control)))
                        groups.append(group)
                    with gr.Column(visible=False) as schedule_box:
                        gr.Markdown("**Schedule**: which steps and layers stay dense")
                        with gr.Row():
                            schedule_components = [(c, _component(c)) for c in controller.schedule_controls]
                        fallback = gr.Checkbox(
                            value=False, label="Fall back to dense where the method cannot run",
                            info="otherwise the run stops with the reason",
                        )
                        compare_dense = gr.Checkbox(
                            value=False, label="Also time dense with the same settings",
                            info="a second, dense run; reports the speed ratio when some call ran sparse",
                        )
                with gr.Accordion("Guidance (head perturbation, SoftPAG)", open=False):
                    guidance_components = [(c, _component(c)) for c in controller.guidance_controls]
                    load_preset_btn = gr.Button("Load preset into the fields", size="sm")
                with gr.Accordion("LoRA", open=False):
                    with gr.Row():
                        lora = gr.Textbox(
                            value="", label="LoRA file", scale=3,
                            placeholder="/path/to/lora.safetensors (diffusers format)",
                            info="a .safetensors file or a folder with one; pickled .bin/.pt files are refused",
                        )
                        lora_scale = gr.Number(value=1.0, label="LoRA scale", scale=1, info="-100 to 100")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary")
                    cancel_btn = gr.Button("Cancel", variant="stop")
                message = gr.Markdown("", visible=False, elem_id="message")
            with gr.Column(scale=4):
                video = gr.Video(
                    label="Result", format="mp4", autoplay=True, loop=True, interactive=False, elem_id="result-video"
                )
                stats = gr.Markdown("Statistics appear here after a run.", label="Statistics", elem_id="stats")
                mask = gr.Image(
                    label="Attention mask: key blocks each query block computes (white)", type="filepath",
                    interactive=False, format="png", height=440, elem_id="mask", visible=False,
                )
        history = gr.State([])
        gallery = gr.Gallery(
            label="This session's outputs", columns=5, height=280, object_fit="contain", fit_columns=False,
            interactive=False, elem_id="gallery",
        )

        private = dict(queue=False, api_visibility="private")
        model_box.change(model_defaults, model_box, [height, width, frames, steps, guidance], **private)
        seed_btn.click(lambda: random.randrange(2**31), None, seed, **private)
        attention.change(controller.show_method, attention, [*groups, schedule_box, preset], **private)
        all_components = [comp for _, comp in method_components] + [comp for _, comp in schedule_components]
        preset.change(controller.fill_preset, preset, all_components, **private)
        for comp in all_components:
            comp.input(lambda: CUSTOM_PRESET, None, preset, **private)
        keyword_inputs = {c.key: comp for c, comp in [*method_components, *schedule_components,
                                                      *guidance_components]}
        guidance_by_key = dict((c.key, comp) for c, comp in guidance_components)
        load_preset_btn.click(controller.fill_guidance, guidance_by_key[PRESET_KEY],
                              [comp for _, comp in guidance_components], **private)
        run = gr.on(
            [generate_btn.click, prompt.submit],
            controller.generate,
            [model_box, prompt, negative_prompt, height, width, frames, steps, seed, guidance, attention, fallback,
             compare_dense, lora, lora_scale, history],
            [video, stats, mask, gallery, history, message],
            inputs_kwargs=keyword_inputs,
            api_name="generate",
        )
        # A running job stops within one step through its flag; `cancels` drops queued ones.
        cancel_btn.click(
            controller.cancel, None, message, cancels=[run], queue=False, api_name="cancel",
            api_visibility="undocumented",
        )
        demo.unload(controller.end_session)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    prevent_thread_lock: bool = False,
    model: str = DEFAULT_MODEL,
    **launch_kwargs: Any,
) -> gr.Blocks:
    """Build and serve the UI (blocks unless `prevent_thread_lock`); returns the app (`.local_url`, `.close()`)."""
    demo = build_app(output_dir, model=model)
    out = str(demo.accel_controller.output_dir)
    demo.launch(
        server_name=host, server_port=port, share=share, allowed_paths=[out],
        prevent_thread_lock=prevent_thread_lock, **launch_kwargs,
    )
    return demo
