"""LoRA training on the tiny Wan (CPU): the loss falls (dense and radial), kill -9 + resume is exact, the LoRA loads
in diffusers and changes the output, metadata round-trips, a LoRA for another model is refused, full-parameter mode."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from accel.lora.dataset import Bucket
from accel.lora.synthetic import SyntheticConfig, make_dataset
from accel.lora.train import TrainConfig, check_trainable, train
from accel.pipelines import tiny

ROOT = Path(__file__).resolve().parents[1]
X = torch.Generator().manual_seed(3)
INPUTS = dict(hidden_states=torch.randn(1, 16, 5, 8, 8, generator=X), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 16, 32, generator=X), return_dict=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    make_dataset(root / "clips", SyntheticConfig(count=4, frames=17), progress=False)
    return root


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=data / "clips", out=out, cache_dir=data / "cache", attention="dense", rank=4, alpha=4.0,
                lr=2e-3, warmup=2, save_every=0, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _forward(transformer) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**INPUTS)[0]


@pytest.mark.parametrize("attention,steps", [("dense", 24), ("radial", 8)])
def test_loss_falls(data, tmp_path, attention, steps):
    lr = 2e-3 if attention == "dense" else 1e-2
    result = train(_config(data, tmp_path, attention=attention, steps=steps, lr=lr))
    print(attention, result.eval_loss_start, result.eval_loss_end, result.attention)
    assert result.step == steps and len(result.losses) == steps and not result.interrupted
    assert result.eval_loss_end < 0.98 * result.eval_loss_start
    if attention == "radial":
        assert "sparse" in result.attention and " 0 sparse" not in result.attention
    rows = [json.loads(line) for line in (tmp_path / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert sum(r["tag"] == "train/loss" for r in rows) == steps
    assert {"train/lr", "train/step_time_s", "train/tokens_per_s", "val/loss"} <= {r["tag"] for r in rows}
    assert sorted(p.name for p in result.output.iterdir()) == [
        "accel_lora.json", "lora_comfyui.safetensors", "pytorch_lora_weights.safetensors"]


def _cli(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accel.cli", "train-lora", "--data", str(data / "clips"), "--out", str(out),
            "--cache-dir", str(data / "cache"), "--attention", "dense", "--rank", "4", "--lr", "3e-3", "--steps",
            str(steps), "--save-every", "2", "--grad-accum", "2", "--deterministic", "--no-progress", "--device",
            "cpu", "--warmup", "3", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}


def _lora(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "lora" / "pytorch_lora_weights.safetensors")


def test_kill_9_then_resume_matches_uninterrupted(data, tmp_path):
    steps = 8
    # The uninterrupted reference runs in this process (also filling the shared latent cache), same settings.
    train(_config(data, tmp_path / "ref", steps=steps, lr=3e-3, warmup=3, save_every=2, grad_accum=2,
                  deterministic=True))
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(data, run, steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (run / "lora").exists()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    newest = run / "checkpoints" / saved[-1] / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # a corrupt latest checkpoint: resume must fall back
    resumed = subprocess.run(_cli(data, run, steps, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint {saved[-1]}" in resumed.stderr and "falling back" in resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = _lora(tmp_path / "ref"), _lora(run)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print("max difference after resume", diff)
    assert diff == 0.0


def test_sigterm_saves_checkpoint_and_stops(data, tmp_path, caplog):
    import threading

    log = tmp_path / "logs" / "scalars.jsonl"

    def send_after_first_step() -> None:  # the handler is installed before step 1, so SIGTERM is safe then
        deadline = time.time() + 240
        while not (log.exists() and "train/loss" in log.read_text()) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_after_first_step, daemon=True)
    sender.start()
    with caplog.at_level("WARNING", logger="accel.lora"):
        result = train(_config(data, tmp_path, steps=1000))
    sender.join()
    assert result.interrupted and 1 <= result.step < 1000 and result.output is None
    assert result.checkpoint == tmp_path / "checkpoints" / f"step-{result.step:08d}"
    assert "SIGTERM: checkpoint saved at step" in caplog.text and "--resume" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    pipe = tiny.wan()
    out = tmp_path_factory.mktemp("trained")
    result = train(_config(data, out, steps=3, lr=1e-2, warmup=0, alpha=8.0, attention="radial:decay=0.5",
                           validate_every=3, validation_steps=1), pipe=pipe)
    return pipe, result


def test_lora_loads_in_diffusers_and_changes_output(trained):
    from diffusers import WanPipeline

    import accel
    from accel.pipelines.generate import load_lora

    pipe, result = trained
    ref = _forward(pipe.transformer)  # the trained transformer (unpatched after training)
    fresh = tiny.wan()
    base = _forward(fresh.transformer)
    load_lora(fresh, str(result.output), 1.0)
    got = _forward(fresh.transformer)
    print("loaded vs trained", (got - ref).abs().max().item(), "base vs trained", (base - ref).abs().max().item())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)  # alpha/rank scale round-trips
    assert (base - ref).abs().max() > 1e-3
    comfy = tiny.wan()
    comfy.load_lora_weights(str(result.output), weight_name="lora_comfyui.safetensors", adapter_name="c")
    torch.testing.assert_close(_forward(comfy.transformer), ref, rtol=0, atol=1e-6)
    # composed with sparse processors in a whole generation
    handle = accel.patch(fresh, accel.Radial(decay=0.5))
    fresh.set_progress_bar_config(disable=True)
    video = fresh("a red circle", height=64, width=64, num_frames=17, num_inference_steps=2, max_sequence_length=16,
                  output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]
    assert video.shape == (17, 64, 64, 3) and handle.stats.sparse_calls > 0
    assert isinstance(fresh, WanPipeline)


def test_metadata_roundtrip(trained):
    from accel.lora.export import read_metadata

    _, result = trained
    import imageio.v3 as iio

    video = iio.imread(result.output.parent / "validation" / "step-00000003.mp4", index=None)
    assert video.shape == (17, 64, 64, 3)  # the validation video of step 3
    meta = read_metadata(result.output)
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["base_model"]["class"] == "WanTransformer3DModel"
    assert meta["attention"]["method"] == "radial" and meta["attention"]["config"]["decay"] == 0.5
    assert meta["attention"]["spec"] == "radial:decay=0.5"
    assert meta["trained_on"] == [{"frames": 17, "height": 64, "width": 64}]
    assert meta["steps"] == 3 and meta["mode"] == "lora" and meta["base_model_name"] == "tiny-wan"
    assert "attn1" in str(meta["target_modules"]) and "attn2" not in str(meta["target_modules"])
    from safetensors import safe_open

    with safe_open(str(result.output / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.blocks.") and ".attn1." in k for k in keys)


def test_lora_for_another_model_is_refused(trained, tmp_path):
    from accel.pipelines.generate import load_lora
    from accel.pipelines.lora_files import check_lora_fits

    _, result = trained
    other = tiny.wan()
    other.transformer = tiny._wan_transformer(attention_head_dim=16)
    with pytest.raises(ValueError, match=r"trained for another base model \(attention_head_dim: LoRA 12 vs model 16"):
        load_lora(other, str(result.output), 1.0)
    lone = tmp_path / "lone.safetensors"  # no metadata next to it: the tensor shapes decide
    shutil.copy(result.output / "pytorch_lora_weights.safetensors", lone)
    fits = r"does not fit this model: .*attn1\.to_\w+\.lora_A\.weight has 24 input features"
    with pytest.raises(ValueError, match=fits):
        check_lora_fits(other.transformer, lone)
    check_lora_fits(tiny.wan().transformer, lone)  # the right model passes


def test_full_parameter_mode(data, tmp_path):
    from diffusers import WanTransformer3DModel

    result = train(_config(data, tmp_path, mode="full", steps=2, lr=1e-3, warmup=0))
    assert result.output == tmp_path / "transformer"
    meta = json.loads((result.output / "accel_train.json").read_text())
    assert meta["mode"] == "full" and meta["attention"]["method"] == "dense"
    assert not list(result.output.glob("*.bin"))
    loaded = WanTransformer3DModel.from_pretrained(result.output, use_safetensors=True)
    assert (_forward(loaded) - _forward(tiny.wan().transformer)).abs().max() > 1e-4


def test_wan22_low_noise_expert(data, tmp_path):
    pipe = tiny.wan22()
    result = train(_config(data, tmp_path, model="tiny-wan22", expert="low", steps=1), pipe=pipe)
    assert any("lora_" in n for n, _ in pipe.transformer_2.named_parameters())
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    from accel.lora.export import read_metadata

    assert read_metadata(result.output)["load_into_transformer_2"] is True
    with pytest.raises(ValueError, match="two experts"):
        train(_config(data, tmp_path / "x", model="tiny-wan22", steps=1), pipe=tiny.wan22())


def test_method_without_backward_is_refused():
    from dataclasses import dataclass

    from accel.methods.dense import Dense

    @dataclass(frozen=True)
    class Detached(Dense):
        registered = False

        def attend(self, q, k, v, layout, plan, **kw):
            return super().attend(q, k, v, layout, plan, **kw).detach()

    with pytest.raises(NotImplementedError, match="cannot be trained"):
        check_trainable(Detached(), torch.device("cpu"))
    check_trainable(Dense(), torch.device("cpu"))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="TrainConfig.mode"):
        TrainConfig(mode="half")
    with pytest.raises(ValueError, match="radial has no option 'nope'"):
        TrainConfig(attention="radial:nope=1")
    with pytest.raises(ValueError, match="DatasetConfig.buckets"):
        TrainConfig(buckets=())
    assert TrainConfig(buckets=(Bucket(9, 32, 32),)).buckets[0].frames == 9


def test_bench_train_step_runs_on_cpu():
    """The GPU benchmark's model, inputs and timed step on a tiny config (the H200 run uses Wan2.1-1.3B)."""
    import accel
    from accel.lora import bench

    cfg = dict(bench.WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=32)
    model = bench.build_model(2, 4, True, config=cfg, device="cpu")
    inputs = bench.make_inputs(9, 64, 64, text_dim=32, text_tokens=8, device="cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    handle = accel.patch(model, accel.Radial())
    times, peak = bench.time_steps(model, inputs, torch.optim.AdamW(params, lr=1e-2), steps=1)
    accel.unpatch(model)
    assert len(times) == 1 and peak is None and handle.stats.sparse_calls > 0
    assert any((p - b).abs().max() > 0 for p, b in zip(params, before, strict=True))
    table = bench.format_table({"rows": [{"frames": 81, "tokens": 32760, "method": "radial", "step_s": 1.0,
                                          "peak_memory_gib": 2.0, "tokens_per_s": 32760.0}]})
    assert "| 81 | 32,760 | radial | 1.00 | 2.0 | 32,760 |" in table


def test_hunyuan_video_lora_trains_and_loads(data, tmp_path):
    from accel.pipelines.generate import load_lora

    pipe = tiny.hunyuan_video()
    result = train(_config(data, tmp_path, model="tiny-hunyuan-video", steps=4, lr=1e-2, warmup=0), pipe=pipe)
    print("hunyuan", result.eval_loss_start, result.eval_loss_end)
    assert result.eval_loss_end < 0.98 * result.eval_loss_start
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 5, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 16, 16, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 5 + [0] * 11]),
                  pooled_projections=torch.randn(1, 8, generator=g), guidance=torch.tensor([1000.0]),
                  return_dict=False)
    with torch.no_grad():
        ref = pipe.transformer(**inputs)[0]
        fresh = tiny.hunyuan_video()
        base = fresh.transformer(**inputs)[0]
        load_lora(fresh, str(result.output), 1.0)
        got = fresh.transformer(**inputs)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert (base - ref).abs().max() > 1e-4
    names = [n for n, _ in fresh.transformer.named_parameters() if "lora_A" in n]
    assert any("single_transformer_blocks" in n for n in names) and not any("refiner" in n for n in names)
    assert not (result.output / "lora_comfyui.safetensors").exists()  # ComfyUI keys are written for Wan only
