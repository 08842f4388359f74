"""Web UI: the Gradio app end to end through gradio_client, a real Chromium through Playwright, and its parts."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import pytest

gr = pytest.importorskip("gradio", reason="the UI needs gradio (a core dependency)")
gradio_client = pytest.importorskip("gradio_client", reason="UI tests need gradio_client (the test extra)")

from accel.methods.dense import Dense  # noqa: E402
from accel.methods.radial import Radial  # noqa: E402
from accel.pipelines.generate import GenerationRequest  # noqa: E402
from accel.presets import RADIAL_PRESETS, radial_preset  # noqa: E402
from accel.schedule import Schedule  # noqa: E402
from accel.ui.engine import (  # noqa: E402
    AttentionSettings,
    Cancelled,
    Job,
    PipelineCache,
    pipeline_token_grid,
    preset_values,
)

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
    demo = launch(host="127.0.0.1", port=_free_port(), output_dir=out, prevent_thread_lock=True, quiet=True)
    try:
        yield SimpleNamespace(demo=demo, url=demo.local_url, out=out, controller=demo.accel_controller)
    finally:
        demo.close()


@pytest.fixture
def client(server, tmp_path):
    return gradio_client.Client(server.url, verbose=False, download_files=str(tmp_path))


# ------------------------------------------------------------------------------ gradio_client end to end
def test_generate_endpoint_radial_returns_mp4_stats_mask_and_gallery(server, client) -> None:
    video, stats, mask, gallery = client.predict(
        model="tiny-wan", prompt="a cat walking in the city", height=64, width=48, frames=9, steps=2, seed=3,
        attention="radial", block_size="16", dense_steps=0, api_name="/generate",
    )
    frames = iio.imread(video)
    assert frames.shape[:3] == (9, 64, 48)
    assert "mean tile density" in stats and "density per layer" in stats and "L1:" in stats
    assert "token grid**: 3x4x3" in stats  # 9 frames -> 3 latent frames; 64x48 px / (VAE 8 x patch 2)
    assert "speed vs dense" not in stats  # not measured, so not reported
    assert mask is not None and Path(mask).read_bytes()[:4] == b"\x89PNG"
    assert len(gallery) == 1 and "seed 3" in gallery[0]["caption"] and "radial" in gallery[0]["caption"]
    written = sorted(p.suffix for p in server.out.iterdir() if p.is_file())
    assert ".mp4" in written and ".png" in written


def test_pipeline_built_once_and_dense_timing_reported(server, client) -> None:
    cache = server.controller.cache
    client.predict(model="tiny-wan", attention="dense", api_name="/generate")
    builds = cache.builds
    _, stats, mask, gallery = client.predict(
        model="tiny-wan", attention="radial", compare_dense=True, api_name="/generate"
    )
    assert cache.builds == builds  # same model, no LoRA: the pipeline is reused
    assert "speed vs dense" in stats and "(measured)" in stats
    assert len(gallery) == 2  # this client's session: newest first
    _, stats, mask, _ = client.predict(model="tiny-wan", attention="dense", compare_dense=True, api_name="/generate")
    assert mask is None and "speed vs dense" not in stats


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=50), "height=50 must be a positive multiple of 16"),
        (dict(frames=10), "num_frames=10 must satisfy"),
        (dict(lora="/no/such/lora.safetensors"), "LoRA file not found"),
        (dict(model="no-such-model"), "unknown model 'no-such-model'"),
        (dict(model="acme/not-cached"), "could not load model 'acme/not-cached'"),
        (dict(attention="radial", dense_steps=-1), "Value -1 is less than minimum value 0"),
    ],
)
def test_bad_input_returns_the_message(client, kwargs, message) -> None:
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict(api_name="/generate", **kwargs)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)


def test_cancel_stops_the_running_generation(server, client) -> None:
    job = client.submit(model="tiny-wan", steps=500, api_name="/generate")
    deadline = time.monotonic() + 60
    while not server.controller._jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    client.predict(api_name="/cancel")
    start = time.monotonic()
    with pytest.raises(gradio_client.exceptions.AppError, match="cancelled"):
        job.result(timeout=60)
    assert time.monotonic() - start < 30  # 500 steps would take far longer
    assert not server.controller.cache.lock.locked()


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
    for name in RADIAL_PRESETS:
        method, schedule = radial_preset(name)
        values = preset_values(name)
        settings = AttentionSettings(attention="radial", **values)
        assert settings.method_and_schedule() == (method, schedule)
    assert preset_values("custom") is None


def test_attention_settings() -> None:
    assert AttentionSettings().method_and_schedule() == (Dense(), Schedule())
    method, schedule = AttentionSettings(
        attention="radial", decay=0.5, block_size="auto", sink=False, spatial="disk", decay_near=True,
        dense_steps=1, dense_last_steps=2.0, dense_layers=None,
    ).method_and_schedule()
    assert method == Radial(decay=0.5, block_size=None, sink=False, spatial="disk", decay_near=True)
    assert schedule == Schedule(dense_steps=1, dense_last_steps=2, dense_layers=0)
    with pytest.raises(ValueError, match="decay must be a finite number > 0"):
        AttentionSettings(attention="radial", decay=0.0).method_and_schedule()
    with pytest.raises(ValueError, match="block size must be auto, 16, 32, 64 or 128"):
        AttentionSettings(attention="radial", block_size="big").method_and_schedule()


@pytest.mark.parametrize("model, size", [("tiny-wan", (13, 32, 80)), ("tiny-flux", (1, 64, 32))])
def test_token_grid_from_pipeline_matches_the_patched_run(tmp_path, model, size) -> None:
    frames, height, width = size
    cache = PipelineCache()
    job = Job(
        GenerationRequest(model=model, frames=frames, height=height, width=width, steps=1),
        AttentionSettings(attention="radial", block_size="16"),
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
    page.get_by_label("Prompt", exact=True).fill("a red car driving down a street at night")
    page.get_by_label("radial", exact=True).check()
    page.get_by_label("Radial preset").click()
    page.get_by_role("option", name="wan2.1-14b", exact=True).click()
    page.wait_for_function("() => document.querySelector('input[aria-label=\"Dense first steps\"]').value === '12'")
    page.get_by_label("Block size (tokens)").click()
    page.get_by_role("option", name="16", exact=True).click()
    dense_steps = page.get_by_label("Dense first steps", exact=True)
    dense_steps.fill("0")
    dense_steps.press("Tab")
    assert page.get_by_label("Radial preset").input_value() == "custom"  # edited: no longer the preset
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


@pytest.mark.browser
def test_browser_shows_bad_input_error(page) -> None:
    height = page.get_by_label("Height", exact=True)
    height.fill("50")
    height.press("Tab")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("height=50 must be a positive multiple of 16").first.wait_for(timeout=30_000)
    assert "Traceback" not in page.content()


@pytest.mark.browser
def test_browser_cancel(page, server) -> None:
    steps = page.get_by_label("Steps", exact=True)
    steps.fill("500")
    steps.press("Tab")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("denoising").first.wait_for(timeout=60_000)  # live per-step progress
    page.get_by_role("button", name="Cancel").click()
    deadline = time.monotonic() + 30
    while server.controller._jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.controller._jobs and not server.controller.cache.lock.locked()

