"""Stage 1 of the demo recipe: the VAE loss falls, a resumed (longer) run ends with the same weights as an
uninterrupted one, a finished stage is reused, a deadline pauses with a checkpoint, and bad settings name the field."""

import dataclasses
import time

import pytest
import torch

from accel.demo.config import MICRO
from accel.demo.vae import StagePaused, VAETrainConfig, clip_batch, train_vae

CFG = VAETrainConfig(steps=4, batch_size=2, frames=5, stats_clips=4, save_every=2, log_every=1, lr=3e-3, warmup=0,
                     mixed_precision="no")


def test_loss_falls_and_latent_statistics_are_set(tmp_path):
    result = train_vae(MICRO, dataclasses.replace(CFG, steps=12), tmp_path, device="cpu", progress=False)
    print(result.losses)
    assert result.step == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) < 0.9 * sum(result.losses[:3])
    assert len(result.latents_std) == MICRO.vae.z_dim and min(result.latents_std) > 0
    assert list(result.vae.config.latents_mean) == result.latents_mean
    assert (tmp_path / "vae.safetensors").is_file() and (tmp_path / "vae.json").is_file()


def test_resume_with_more_steps_matches_uninterrupted(tmp_path):
    straight = train_vae(MICRO, CFG, tmp_path / "a", device="cpu", progress=False)
    short = train_vae(MICRO, dataclasses.replace(CFG, steps=2), tmp_path / "b", device="cpu", progress=False)
    resumed = train_vae(MICRO, CFG, tmp_path / "b", device="cpu", progress=False)
    assert short.step == 2 and resumed.resumed_from == 2 and resumed.step == 4 and not resumed.reused
    for (name, a), b in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    again = train_vae(MICRO, CFG, tmp_path / "b", device="cpu", progress=False)
    assert again.reused and again.step == 4


def test_deadline_pauses_with_a_checkpoint_and_rerun_continues(tmp_path):
    with pytest.raises(StagePaused, match="paused at step 0"):
        train_vae(MICRO, CFG, tmp_path, device="cpu", deadline=time.monotonic() - 1, progress=False)
    assert any((tmp_path / "checkpoints").iterdir())
    assert train_vae(MICRO, CFG, tmp_path, device="cpu", progress=False).step == 4


def test_other_settings_refuse_to_resume(tmp_path):
    train_vae(MICRO, dataclasses.replace(CFG, steps=1), tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train_vae(MICRO, dataclasses.replace(CFG, lr=1e-2), tmp_path, device="cpu", progress=False)


def test_clip_batch_is_the_synthetic_clips_in_range():
    x = clip_batch(0, 3, 2, 5, 32, 32)
    assert x.shape == (2, 3, 5, 32, 32) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[1], clip_batch(0, 4, 1, 5, 32, 32)[0])


@pytest.mark.parametrize("field,value,match", [
    ("frames", 6, "frames must be 4k"), ("steps", 0, "steps must be a whole number"),
    ("lr", 0.0, "lr must be a finite number >"), ("kl_weight", -1.0, "kl_weight"),
    ("mixed_precision", "fp16", "mixed_precision"),
])
def test_bad_settings_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=f"VAETrainConfig.{match}"):
        dataclasses.replace(CFG, **{field: value})
