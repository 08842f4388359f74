"""The Gradio page: a form for one generation, live progress, Cancel, video, stats, mask and a session gallery."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from accel.pipelines.generate import DEFAULT_MODEL, GenerationRequest, load_pipeline
from accel.pipelines.tiny import TINY_MODELS
from accel.ui.engine import (
    ATTENTION_METHODS,
    BLOCK_SIZE_CHOICES,
    CUSTOM_PRESET,
    USER_ERRORS,
    AttentionSettings,
    Cancelled,
    Job,
    PipelineCache,
    optional_int,
    preset_names,
    preset_values,
)

logger = logging.getLogger("accel")

DEFAULT_OUTPUT_DIR = "outputs/ui"
_INTRO = """\
# accel: sparse attention for video diffusion transformers
Generate with dense or **Radial Attention** (arXiv 2506.19852) and see what it computes. The `tiny-*` models are
small random-weight pipelines built offline: they show the mechanics in seconds, not pretty videos.
"""


class UiController:
    """State the page shares across events: the pipeline cache, the output folder and running jobs."""

    def __init__(self, output_dir: str | os.PathLike, loader: Callable[[str], Any] = load_pipeline) -> None:
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.cache = PipelineCache(loader)
        self._jobs: dict[str, set[Job]] = {}
        self._jobs_lock = threading.Lock()

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
        decay: float | None,
        block_size: str,
        sink: bool,
        spatial: str,
        decay_near: bool,
        dense_steps: float | None,
        dense_last_steps: float | None,
        dense_layers: float | None,
        fallback_to_dense: bool,
        lora: str,
        lora_scale: float | None,
        compare_dense: bool,
        history: list | None,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, str, str | None, list, list]:
        history = list(history or [])
        key = getattr(request, "session_hash", None) or "default"
        try:
            job = Job(
                request=GenerationRequest(
                    model=(model or "").strip(),
                    prompt=prompt or "",
                    negative_prompt=(negative_prompt or "").strip() or None,
                    frames=optional_int("frames", frames),
                    height=optional_int("height", height),
                    width=optional_int("width", width),
                    steps=optional_int("steps", steps),
                    seed=int(seed or 0),
                    guidance_scale=None if guidance_scale is None else float(guidance_scale),
                    lora=(lora or "").strip() or None,
                    lora_scale=1.0 if lora_scale is None else float(lora_scale),
                ),
                attention=AttentionSettings(
                    attention=attention, decay=decay, block_size=block_size, sink=sink, spatial=spatial,
                    decay_near=decay_near, dense_steps=dense_steps, dense_last_steps=dense_last_steps,
                    dense_layers=dense_layers, fallback_to_dense=fallback_to_dense,
                ),
                output_dir=self.output_dir,
                compare_dense=bool(compare_dense),
            )
        except USER_ERRORS as err:
            raise gr.Error(str(err), title="Invalid input", print_exception=False) from None

        def report(i: int, total: int, desc: str) -> None:
            if i == 0:
                progress(0.0, desc=desc)
            else:
                progress((i, total), desc=desc, unit="steps")

        with self._track(key, job):
            try:
                out = job.run(self.cache, report)
            except Cancelled as err:
                raise gr.Error(f"Generation {err}.", title="Cancelled", print_exception=False) from None
            except USER_ERRORS as err:
                raise gr.Error(str(err), title="Cannot generate", print_exception=False) from None
            except Exception as err:  # noqa: BLE001 - the page gets a message, the log the traceback
                logger.exception("accel ui: generation failed")
                raise gr.Error(f"generation failed: {type(err).__name__}: {err}", print_exception=False) from None
        history.insert(0, (str(out.video), out.caption))
        return str(out.video), out.stats_markdown, str(out.mask) if out.mask else None, history, history

    def cancel(self, request: gr.Request) -> None:
        key = getattr(request, "session_hash", None) or "default"
        with self._jobs_lock:
            for job in self._jobs.get(key, ()):
                job.stop.set()

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


def model_defaults(model: str) -> tuple:
    """Height, width, frames, steps and guidance of a tiny model; unchanged fields for other models."""
    spec = TINY_MODELS.get((model or "").strip())
    if spec is None:
        return tuple(gr.update() for _ in range(5))
    return spec.height, spec.width, spec.num_frames, spec.num_inference_steps, spec.call_defaults.get("guidance_scale")


def fill_preset(name: str) -> tuple:
    values = preset_values(name)
    keys = ("decay", "block_size", "sink", "spatial", "decay_near", "dense_steps", "dense_last_steps", "dense_layers")
    if values is None:
        return tuple(gr.update() for _ in keys)
    return tuple(values[k] for k in keys)


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
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR, *, loader: Callable[[str], Any] = load_pipeline
) -> gr.Blocks:
    """The accel web UI as a queued `gr.Blocks` (one job at a time); call `.launch()` or use `launch()`.

    Args:
        output_dir: where videos and mask pictures are written (and the only folder the app serves files from).
        loader: model id -> pipeline (default `accel.pipelines.generate.load_pipeline`).
    """
    controller = UiController(output_dir, loader)
    spec = TINY_MODELS[DEFAULT_MODEL]
    with _gradio_cache_in(controller.output_dir), gr.Blocks(title="accel", analytics_enabled=False) as demo:
        demo.accel_controller = controller  # for tests and embedding
        gr.Markdown(_INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                model = gr.Dropdown(
                    choices=sorted(TINY_MODELS), value=DEFAULT_MODEL, allow_custom_value=True, label="Model",
                    info="a tiny-* built-in (offline), or type a Hub id (org/name) or a local diffusers folder",
                )
                prompt = gr.Textbox(value="a dog running on the beach at sunset", label="Prompt", lines=2)
                negative_prompt = gr.Textbox(value="", label="Negative prompt", placeholder="(none)")
                with gr.Row():
                    height = gr.Number(value=spec.height, precision=0, label="Height", minimum=0)
                    width = gr.Number(value=spec.width, precision=0, label="Width", minimum=0)
                    frames = gr.Number(value=spec.num_frames, precision=0, label="Frames", minimum=0)
                with gr.Row():
                    steps = gr.Number(value=spec.num_inference_steps, precision=0, label="Steps", minimum=0)
                    guidance = gr.Number(value=spec.call_defaults.get("guidance_scale"), label="Guidance scale")
                    with gr.Column(min_width=160):
                        seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                        seed_btn = gr.Button("Random seed", size="sm")
                gr.Markdown("<small>0 or empty = the model's default size, frames, steps or guidance.</small>")
                with gr.Accordion("Attention", open=True):
                    attention = gr.Radio(list(ATTENTION_METHODS), value="dense", label="Self-attention method")
                    with gr.Column(visible=False) as radial_box:
                        preset = gr.Dropdown(
                            preset_names(), value=CUSTOM_PRESET, label="Radial preset",
                            info="settings shipped with the reference code; fills the fields below",
                        )
                        with gr.Row():
                            decay = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Decay")
                            block_size = gr.Dropdown(
                                list(BLOCK_SIZE_CHOICES), value="auto", label="Block size (tokens)",
                                info="auto: the kernel's fastest for the device",
                            )
                        with gr.Row():
                            spatial = gr.Radio(["band", "disk"], value="band", label="Spatial window")
                            sink = gr.Checkbox(value=True, label="Frame-0 sink")
                            decay_near = gr.Checkbox(value=False, label="Decay adjacent frames")
                        with gr.Row():
                            dense_steps = gr.Number(value=0, precision=0, minimum=0, label="Dense first steps")
                            dense_last_steps = gr.Number(value=0, precision=0, minimum=0, label="Dense last steps")
                            dense_layers = gr.Number(value=0, precision=0, minimum=0, label="Dense layers")
                        fallback = gr.Checkbox(
                            value=False, label="Fall back to dense where radial cannot run (else stop with an error)"
                        )
                        compare_dense = gr.Checkbox(
                            value=False, label="Also time dense with the same settings (reports the speed ratio)"
                        )
                with gr.Accordion("LoRA", open=False):
                    with gr.Row():
                        lora = gr.Textbox(
                            value="", label="LoRA file", scale=3,
                            placeholder="/path/to/lora.safetensors (diffusers format)",
                        )
                        lora_scale = gr.Number(value=1.0, label="LoRA scale", scale=1)
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary")
                    cancel_btn = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=4):
                video = gr.Video(
                    label="Result", format="mp4", autoplay=True, loop=True, interactive=False, elem_id="result-video"
                )
                stats = gr.Markdown("Statistics appear here after a run.", label="Statistics", elem_id="stats")
                gr.Markdown("**Attention mask** (radial runs): key blocks each query block computes, in white")
                mask = gr.Image(
                    label="Attention mask", show_label=False, type="filepath", interactive=False, format="png",
                    height=440, elem_id="mask",
                )
        history = gr.State([])
        gallery = gr.Gallery(
            label="This session's outputs", columns=5, height=280, object_fit="contain", fit_columns=False,
            interactive=False, elem_id="gallery",
        )

        model.change(model_defaults, model, [height, width, frames, steps, guidance], queue=False,
                     api_visibility="private")
        seed_btn.click(lambda: random.randrange(2**31), None, seed, queue=False, api_visibility="private")
        attention.change(lambda a: gr.update(visible=a == "radial"), attention, radial_box, queue=False,
                         api_visibility="private")
        radial_fields = [decay, block_size, sink, spatial, decay_near, dense_steps, dense_last_steps, dense_layers]
        preset.change(fill_preset, preset, radial_fields, queue=False, api_visibility="private")
        for f in radial_fields:
            f.input(lambda: CUSTOM_PRESET, None, preset, queue=False, api_visibility="private")
        run = generate_btn.click(
            controller.generate,
            [model, prompt, negative_prompt, height, width, frames, steps, seed, guidance, attention, decay,
             block_size, sink, spatial, decay_near, dense_steps, dense_last_steps, dense_layers, fallback, lora,
             lora_scale, compare_dense, history],
            [video, stats, mask, gallery, history],
            api_name="generate",
        )
        # Gradio lets a running function finish; the flag stops the pipeline after its current step.
        cancel_btn.click(
            controller.cancel, None, None, cancels=[run], queue=False, api_name="cancel", api_visibility="undocumented"
        )
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    prevent_thread_lock: bool = False,
    **launch_kwargs: Any,
) -> gr.Blocks:
    """Build and serve the UI (blocks unless `prevent_thread_lock`); returns the app (`.local_url`, `.close()`)."""
    demo = build_app(output_dir)
    out = str(demo.accel_controller.output_dir)
    demo.launch(
        server_name=host, server_port=port, share=share, allowed_paths=[out],
        prevent_thread_lock=prevent_thread_lock, **launch_kwargs,
    )
    return demo
