"""Web UI: the Gradio app end to end through gradio_client, a real Chromium through Playwright, and its parts."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import pytest

gr = pytest.importorskip("gradio", reason="the UI needs gradio (a core dependency)")
gradio_client = pytest.importorskip("gradio_client", reason="UI tests need gradio_client (the test extra)")

from accel.methods.dense import Dense  # noqa: E402
from accel.methods.radial import Radial  # noqa: E402
from accel.pipelines.generate import GenerationRequest  # noqa: E402
from accel.presets import PRESETS  # noqa: E402
from accel.schedule import Schedule  # noqa: E402
from accel.ui.engine import (  # noqa: E402
    AttentionSettings,
    Cancelled,
    Job,
    PipelineCache,
    pipeline_token_grid,
    preset_values,
)

RADIAL = dict(attention="radial", radial_block_size="16", radial_decay=0.2)


def _message(out) -> str:
    """The message output (last) of /generate: '' after a successful run."""
    last = out[-1]
    return last.get("value", "") if isinstance(last, dict) else (last or "")


def _unchanged(value) -> bool:
    return value == {"__type__": "update"}

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from accel.ui import launch

    out = tmp_path_factory.mktemp("ui-out")
    # tiny-wan: 2 layers at 64x64, so browser tests generate in a second (the page's default is accel-demo)
    demo = launch(host="127.0.0.1", port=_free_port(), output_dir=out, prevent_thread_lock=True, quiet=True,
                  model="tiny-wan")
    try:
        yield SimpleNamespace(demo=demo, url=demo.local_url, out=out, controller=demo.accel_controller)
    finally:
        demo.close()


@pytest.fixture
def client(server, tmp_path):
    return gradio_client.Client(server.url, verbose=False, download_files=str(tmp_path))


# ------------------------------------------------------------------------------ gradio_client end to end
def test_generate_endpoint_radial_returns_mp4_stats_mask_and_gallery(server, client) -> None:
    out = client.predict(
        model="tiny-wan", prompt="a cat walking in the city", height=64, width=48, frames=9, steps=2, seed=3,
        dense_steps=0, api_name="/generate", **RADIAL,
    )
    video, stats, mask, gallery = out[:4]
    assert _message(out) == ""
    frames = iio.imread(video)
    assert frames.shape[:3] == (9, 64, 48)
    assert "mean tile density" in stats and "density per layer" in stats and "L1:" in stats
    assert "token grid**: 3x4x3" in stats  # 9 frames -> 3 latent frames; 64x48 px / (VAE 8 x patch 2)
    assert "speed vs dense" not in stats  # not measured, so not reported
    assert mask["visible"] and Path(mask["value"]).read_bytes()[:4] == b"\x89PNG"
    assert len(gallery) == 1 and "seed 3" in gallery[0]["caption"] and "radial" in gallery[0]["caption"]
    written = sorted(p.suffix for p in server.out.iterdir() if p.is_file())
    assert ".mp4" in written and ".png" in written


def test_pipeline_built_once_and_dense_timing_reported(server, client) -> None:
    cache = server.controller.cache
    client.predict(model="tiny-wan", attention="dense", api_name="/generate")
    builds = cache.builds
    _, stats, mask, gallery, _ = client.predict(model="tiny-wan", compare_dense=True, api_name="/generate", **RADIAL)
    assert cache.builds == builds  # same model, no LoRA: the pipeline is reused
    assert "speed vs dense" in stats and "(measured)" in stats
    assert len(gallery) == 2  # this client's session: newest first
    _, stats, mask, _, _ = client.predict(model="tiny-wan", attention="dense", compare_dense=True,
                                          api_name="/generate")
    assert mask == {"__type__": "update", "value": None, "visible": False}  # no empty mask box for dense
    assert "speed vs dense" not in stats


def test_no_speed_ratio_when_every_call_ran_dense(client) -> None:
    _, stats, *_ = client.predict(model="tiny-wan", steps=2, dense_steps=2, compare_dense=True,
                                  api_name="/generate", **RADIAL)
    assert "attention calls**: 8 (0 sparse)" in stats
    assert "no call ran sparse: dense_steps=2 + dense_last_steps=0 cover all 2 denoising steps" in stats
    assert "speed vs dense" not in stats and "no ratio" in stats


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=50), "height=50 must be a positive multiple of 16"),
        (dict(width=64.5), "Width: 64.5 is not a whole number"),
        (dict(width=2048), "width: 2048 exceeds the maximum 1024 for tiny-wan (its rotary embedding table covers"),
        (dict(frames=10), "num_frames=10 must satisfy"),
        (dict(steps=-3), "Steps: -3 must be a positive whole number"),
        (dict(prompt="   "), "Prompt: write a prompt"),
        (dict(lora="/no/such/lora.safetensors"), "LoRA file not found"),
        (dict(lora_scale=1000), "lora_scale must be a finite number between -100 and 100"),
        (dict(model="no-such-model"), "unknown model 'no-such-model'"),
        (dict(model="acme/not-cached"), "could not load model 'acme/not-cached'"),
        (dict(attention="radial", dense_steps=-1), "Dense steps: -1 is not allowed; it must be a whole number >= 0"),
        (dict(attention="radial", radial_decay=0), "Decay: 0 is not allowed; it must be a number > 0"),
        (dict(attention="radial", radial_block_size="big"), "Block size: 'big' is not allowed; choose one of"),
    ],
)
def test_bad_input_returns_the_message_and_keeps_the_results(client, kwargs, message) -> None:
    out = client.predict(api_name="/generate", **kwargs)
    assert message in _message(out)
    assert "Traceback" not in _message(out) and "minimum value" not in _message(out)
    assert all(_unchanged(v) for v in out[:-1])  # video, stats, mask and gallery are left as they were


def test_cancel_stops_the_running_generation(server, client) -> None:
    job = client.submit(model="tiny-wan", steps=500, api_name="/generate")
    deadline = time.monotonic() + 60
    while not server.controller._jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it reach the denoising loop
    start = time.monotonic()
    assert "Cancelled" in client.predict(api_name="/cancel")["value"]
    out = job.result(timeout=60)
    assert time.monotonic() - start < 10  # stops within a step; 500 steps would take far longer
    assert "Cancelled" in _message(out) and "nothing decoded" in _message(out)
    assert all(_unchanged(v) for v in out[:-1])
    assert not server.controller.cache.lock.locked() and not server.controller._jobs


def test_binds_localhost_and_serves_only_its_output_folder(server) -> None:
    import urllib.error
    import urllib.request

    assert server.url.startswith("http://127.0.0.1:")
    assert str(server.controller.output_dir) in server.demo.allowed_paths
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{server.url}gradio_api/file={Path(__file__).resolve()}", timeout=10)


# ------------------------------------------------------------------------------ parts
class _FakePipe:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple] = []

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def load_lora_weights(self, source, adapter_name, **kwargs) -> None:
        self.calls.append(("load", Path(source) / kwargs.get("weight_name", "")))

    def set_adapters(self, names, weights) -> None:
        self.calls.append(("scale", weights[0]))

    def unload_lora_weights(self) -> None:
        self.calls.append(("unload",))


def test_pipeline_cache_rebuilds_only_on_model_change_and_reloads_only_changed_lora(tmp_path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"")
    b.write_bytes(b"")
    cache = PipelineCache(loader=_FakePipe)
    pipe = cache.get("m1")
    assert cache.get("m1") is pipe and cache.builds == 1
    assert cache.get("m1", str(a), 0.5) is pipe
    assert pipe.calls == [("load", a), ("scale", 0.5)]
    cache.get("m1", str(a), 0.5)
    cache.get("m1", str(a), 0.8)  # scale only: re-weight, no reload
    assert pipe.calls[-1] == ("scale", 0.8) and cache.lora_loads == 1
    cache.get("m1", str(b), 0.8)
    assert pipe.calls[-3:] == [("unload",), ("load", b), ("scale", 0.8)] and cache.lora_loads == 2
    cache.get("m1")
    assert pipe.calls[-1] == ("unload",) and cache.builds == 1
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        cache.get("m1", str(tmp_path / "missing.safetensors"))
    assert cache.pipe is pipe  # a bad path leaves the cached pipeline alone
    assert cache.get("m2") is not pipe and cache.builds == 2


def _tiny_wan_lora(folder: Path) -> Path:
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from accel.pipelines.tiny import build_tiny

    transformer = build_tiny("tiny-wan").transformer
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    transformer.add_adapter(config)
    layers = get_peft_model_state_dict(transformer)
    WanPipeline.save_lora_weights(str(folder), transformer_lora_layers=layers, weight_name="tiny.safetensors")
    return folder / "tiny.safetensors"


def test_lora_loads_rescales_and_unloads_without_rebuilding(tmp_path) -> None:
    lora = str(_tiny_wan_lora(tmp_path / "lora"))
    cache = PipelineCache()

    def frames(**kwargs):
        request = GenerationRequest(model="tiny-wan", steps=1, frames=5, **kwargs)
        return Job(request, AttentionSettings(), tmp_path).run(cache).result.frames.astype(int)

    base = frames()
    with_lora = frames(lora=lora, lora_scale=1.0)
    assert abs(with_lora - base).max() > 0
    assert (frames(lora=lora, lora_scale=0.0) == base).all()  # re-weighted to nothing
    assert (frames() == base).all()  # unloaded
    assert cache.builds == 1 and cache.lora_loads == 1


def test_presets_fill_method_and_schedule() -> None:
    for name, p in PRESETS.items():
        method, options, schedule = preset_values(name)
        settings = AttentionSettings(attention=method, options=options, schedule=schedule)
        assert settings.method_and_schedule() == (p.method, p.schedule)
    assert preset_values("custom") is None


def test_attention_settings() -> None:
    assert AttentionSettings().method_and_schedule() == (Dense(), Schedule())
    method, schedule = AttentionSettings(
        attention="radial",
        options=dict(decay=0.5, block_size="auto", sink=False, spatial="disk", decay_near=True),
        schedule=dict(dense_steps=1, dense_last_steps=2.0, dense_layers=None),
    ).method_and_schedule()
    assert method == Radial(decay=0.5, block_size=None, sink=False, spatial="disk", decay_near=True)
    assert schedule == Schedule(dense_steps=1, dense_last_steps=2, dense_layers=0)
    with pytest.raises(ValueError, match="Decay: 0 is not allowed; it must be a number > 0"):
        AttentionSettings(attention="radial", options=dict(decay=0.0)).method_and_schedule()
    with pytest.raises(ValueError, match="Block size: 'big' is not allowed; choose one of 16, 32, 64, 128 or auto"):
        AttentionSettings(attention="radial", options=dict(block_size="big")).method_and_schedule()
    with pytest.raises(ValueError, match="Dense layers: 1.5 is not a whole number"):
        AttentionSettings(attention="radial", schedule=dict(dense_layers=1.5)).method_and_schedule()


def _toy_method() -> type:
    from dataclasses import dataclass

    from accel.methods.base import AttentionMethod
    from accel.options import option

    @dataclass(frozen=True)
    class Toy(AttentionMethod):
        name: typing.ClassVar[str] = "toy"
        registered: typing.ClassVar[bool] = False
        ui_defaults: typing.ClassVar[dict] = {"window": 3}
        window: int = option(8, "tokens each query sees on either side", minimum=1)
        shape: str = option("box", "window shape", choices=("box", "disk", "cross", "star"))
        block: int | None = option(None, "block size", choices=(16, 32), none_means="per-device default")
        causal: bool = option(False, "only look back")

    return Toy


def test_controls_come_from_the_registry_with_help_lines(monkeypatch) -> None:
    """A new method gets its controls with no change in accel/ui: built from its options alone."""
    from accel.methods.registry import MethodInfo, methods
    from accel.options import options_of
    from accel.ui.engine import method_controls

    Toy = _toy_method()
    registry = {**methods(), "toy": MethodInfo("toy", Toy, "a toy", options_of(Toy))}
    controls = {c.option.name: c for c in method_controls(registry)["toy"]}
    assert [c.key for c in controls.values()] == ["toy_window", "toy_shape", "toy_block", "toy_causal"]
    assert (controls["window"].widget, controls["window"].value) == ("number", 3)  # the class's ui_defaults
    assert controls["window"].info == "tokens each query sees on either side; a whole number >= 1"
    assert controls["shape"].widget == "dropdown" and controls["shape"].choices == ("box", "disk", "cross", "star")
    assert controls["block"].choices == ("auto", "16", "32") and controls["block"].value == "auto"
    assert "auto = per-device default" in controls["block"].info
    assert controls["causal"].widget == "checkbox"
    radial = {c.option.name: c for c in method_controls()["radial"]}
    assert all(c.info for c in radial.values()) and "0.2" in radial["decay"].info

    # and the page shows it: one more group of controls, wired into /generate
    import accel.ui.engine as engine

    monkeypatch.setattr(engine, "methods", lambda: registry)
    monkeypatch.setattr("accel.ui.app.methods", lambda: registry)
    from accel.ui.app import build_app

    demo = build_app(Path(__file__).parent / ".." / ".pytest_cache" / "ui-toy")
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    assert {"opt-toy_window", "opt-toy_shape", "opt-toy_block", "opt-toy_causal", "opt-radial_decay"} <= ids


def test_radial_ui_defaults_give_a_sparse_mask_at_the_default_size(monkeypatch) -> None:
    """With ``ui_defaults = {"decay": 0.2}`` on Radial, the default form is sparse at the default size."""
    import torch

    from accel.geometry import TokenLayout
    from accel.methods.registry import method_info
    from accel.ui.engine import method_defaults

    if not getattr(Radial, "ui_defaults", None):
        monkeypatch.setattr(Radial, "ui_defaults", {"decay": 0.2}, raising=False)
    values = method_defaults(method_info("radial"))
    method = Radial(**{**values, "block_size": 16})
    plan = method.build_plan(TokenLayout(1, 5, 4, 4), 1, torch.device("cpu"))  # tiny-wan's default 64x64x17
    assert values["decay"] == 0.2 and plan.density < 1.0


def test_job_reports_its_phases_in_order(tmp_path) -> None:
    job = Job(GenerationRequest(model="tiny-wan", steps=2, frames=5), AttentionSettings(), tmp_path)
    texts: list = []
    job.run(PipelineCache(), lambda i, n, desc: texts.append((i, n, desc)))
    assert job.phases == ["loading", "encoding", "denoising", "decoding", "writing"]
    assert texts == [
        (0, 0, "loading tiny-wan"), (0, 0, "encoding the prompt"), (0, 2, "dense denoising"),
        (1, 2, "dense denoising"), (2, 2, "dense denoising"), (0, 0, "decoding the video (VAE)"),
        (0, 0, "writing the video"),
    ]


def test_scratch_cleanup_keeps_videos(tmp_path) -> None:
    from accel.ui.app import clean_scratch

    old = time.time() - 48 * 3600
    scratch = [tmp_path / ".gradio" / "abc" / "upload.mp4", tmp_path / ("a" * 64) / "copy.mp4"]
    keep = [tmp_path / "20250101-video.mp4", tmp_path / ".gradio" / "new.png",
            tmp_path / ".scratch" / "matplotlib" / "fontlist.json"]
    for path in scratch + keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        if path.name != "new.png":
            os.utime(path, (old, old))
    assert clean_scratch(tmp_path) == 2
    assert not any(p.exists() for p in scratch) and all(p.exists() for p in keep)
    assert not (tmp_path / ("a" * 64)).exists()


def test_app_writes_matplotlib_cache_under_its_output_folder(tmp_path, monkeypatch) -> None:
    from accel.ui.app import build_app

    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    build_app(tmp_path)
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path.resolve() / ".scratch" / "matplotlib")


@pytest.mark.parametrize("model, size", [("tiny-wan", (13, 32, 80)), ("tiny-flux", (1, 64, 32))])
def test_token_grid_from_pipeline_matches_the_patched_run(tmp_path, model, size) -> None:
    frames, height, width = size
    cache = PipelineCache()
    job = Job(
        GenerationRequest(model=model, frames=frames, height=height, width=width, steps=1),
        AttentionSettings(attention="radial", options=dict(block_size="16")),
        tmp_path,
    )
    out = job.run(cache)
    assert out.grid == pipeline_token_grid(cache.pipe, frames, height, width)
    assert out.mask is not None and out.mask.parent == tmp_path and out.video.parent == tmp_path


def test_job_cancel_flag_stops_after_the_current_step(tmp_path) -> None:
    job = Job(GenerationRequest(model="tiny-wan", steps=50), AttentionSettings(), tmp_path)
    seen: list[int] = []

    def progress(i: int, total: int, desc: str) -> None:
        seen.append(i)
        if i == 2:
            job.stop.set()

    with pytest.raises(Cancelled):
        job.run(PipelineCache(), progress)
    assert max(seen) <= 3 and not list(tmp_path.glob("*.mp4"))


def test_add_ui_command_defaults() -> None:
    import argparse

    from accel.ui import add_ui_command

    parser = argparse.ArgumentParser()
    add_ui_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui"])
    assert (args.host, args.port, args.share, args.output_dir) == ("127.0.0.1", 7860, False, "outputs/ui")
    args = parser.parse_args(["ui", "--host", "0.0.0.0", "--port", "9000", "--share", "--output-dir", "x"])
    assert (args.host, args.port, args.share, args.output_dir) == ("0.0.0.0", 9000, True, "x")
    assert args.model == "accel-demo" and parser.parse_args(["ui", "--model", "tiny-wan"]).model == "tiny-wan"


@pytest.mark.parametrize("model", [None, "tiny-wan", "org/some-model"])
def test_the_page_opens_on_the_learned_demo_model_with_its_sizes(tmp_path, model) -> None:
    from accel.pipelines.tiny import TINY_MODELS
    from accel.ui.app import build_app

    demo = build_app(tmp_path) if model is None else build_app(tmp_path, model=model)
    values = {c.get("elem_id") or c.get("label"): c.get("value") for c in
              (block["props"] for block in demo.config["components"])}
    spec = TINY_MODELS.get(model or "accel-demo")
    assert values["Model"] == (model or "accel-demo")
    want = (spec.height, spec.width, spec.num_frames, spec.num_inference_steps) if spec else (0, 0, 0, 0)
    assert (values["height"], values["width"], values["frames"], values["steps"]) == want


# ------------------------------------------------------------------------------ a real browser
@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (the test extra)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(server.url)
    page.get_by_role("button", name="Generate").wait_for(timeout=30_000)
    try:
        yield page
    finally:
        page.close()


@pytest.mark.browser
def test_browser_generates_and_plays_a_video(page, tmp_path) -> None:
    page.locator("#prompt textarea").fill("a red car driving down a street at night")
    page.get_by_label("radial", exact=True).check()
    page.get_by_label("Preset").click()
    page.get_by_role("option", name="wan2.1-14b", exact=True).click()
    page.wait_for_function("() => document.querySelector('#opt-dense_steps input').value === '12'")
    block = page.locator("#opt-radial_block_size input")
    block.fill("16")
    block.press("Enter")
    dense_steps = page.locator("#opt-dense_steps input")
    dense_steps.fill("0")
    dense_steps.press("Tab")
    assert page.get_by_label("Preset").input_value() == "custom"  # edited: no longer the preset
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(
        "() => { const v = document.querySelector('#result-video video'); return v && v.src; }", timeout=60_000
    )
    state = page.evaluate(
        """async () => {
            const v = document.querySelector('#result-video video');
            v.muted = true;
            if (v.readyState < 2) await new Promise(r => v.addEventListener('loadeddata', r, {once: true}));
            await v.play();
            await new Promise(r => setTimeout(r, 400));
            return {readyState: v.readyState, time: v.currentTime, width: v.videoWidth, height: v.videoHeight};
        }"""
    )
    assert state["readyState"] >= 2 and state["time"] > 0
    assert (state["width"], state["height"]) == (64, 64)
    page.locator("#mask img").wait_for(timeout=30_000)
    stats = page.locator("#stats").inner_text()
    # the preset's decay and dense layer, then the edited block size and dense steps
    assert "decay=0.2" in stats and "block_size=16" in stats and "first 0 / last 0 steps, first 1 layers" in stats
    assert "attention calls: 8 (4 sparse)" in stats and "L0: 1.000, L1: 0." in stats  # layer 1 sparse
    page.wait_for_timeout(300)
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def _wait_for_video(page, timeout: int = 60_000) -> str:
    page.wait_for_function(
        "() => { const v = document.querySelector('#result-video video'); return v && v.src; }", timeout=timeout
    )
    return page.evaluate("() => document.querySelector('#result-video video').src")


@pytest.mark.browser
def test_browser_enter_submits_and_an_error_keeps_the_previous_result(page) -> None:
    prompt = page.locator("#prompt textarea")
    prompt.fill("a dog running on the beach")
    prompt.press("Enter")  # Enter generates
    src = _wait_for_video(page)
    page.locator("#gallery img, #gallery video").first.wait_for(timeout=30_000)
    assert not page.locator("#mask").is_visible()  # dense: no empty mask box
    stats = page.locator("#stats").inner_text()
    width = page.locator("#width input")
    width.fill("64.5")
    width.press("Tab")
    page.get_by_role("button", name="Generate").click()
    page.locator("#message").get_by_text("Width: 64.5 is not a whole number").wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    assert page.evaluate("() => document.querySelector('#result-video video').src") == src  # still shown
    assert page.locator("#stats").inner_text() == stats
    assert page.locator("#gallery img, #gallery video").count() >= 1
    assert "Traceback" not in page.content() and "minimum value" not in page.content()
    height = page.locator("#height input")
    height.fill("50")
    height.press("Tab")
    width.fill("64")
    width.press("Tab")
    page.get_by_role("button", name="Generate").click()
    page.locator("#message").get_by_text("height=50 must be a positive multiple of 16").wait_for(timeout=30_000)
    prompt.fill("")
    prompt.press("Enter")
    page.locator("#message").get_by_text("Prompt: write a prompt").wait_for(timeout=30_000)


@pytest.mark.browser
def test_browser_cancel_shows_progress_with_its_total_then_cancelled(page, server) -> None:
    steps = page.locator("#steps input")
    steps.fill("500")
    steps.press("Tab")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("denoising").first.wait_for(timeout=60_000)  # live per-step progress
    page.get_by_text(re.compile(r"\d+/500")).first.wait_for(timeout=30_000)  # with its total
    page.get_by_role("button", name="Cancel").click()
    page.locator("#message").get_by_text("Cancelled").wait_for(timeout=30_000)
    deadline = time.monotonic() + 30
    while server.controller._jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.controller._jobs and not server.controller.cache.lock.locked()


@pytest.mark.browser
def test_browser_closing_the_tab_cancels_its_job(browser, server) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(server.url)
    page.get_by_role("button", name="Generate").wait_for(timeout=30_000)
    steps = page.locator("#steps input")
    steps.fill("1000")
    steps.press("Tab")
    page.get_by_role("button", name="Generate").click()
    deadline = time.monotonic() + 60  # the page's help texts say "denoising" too: wait for the job itself
    while not server.controller._jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.controller._jobs
    page.close()
    deadline = time.monotonic() + 40
    while server.controller._jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.controller._jobs  # no orphan job: 1000 steps would run for minutes
    assert server.controller.cache.lock.acquire(timeout=10)
    server.controller.cache.lock.release()
