"""LoRA data side: synthetic videos, dataset scanning and bad-data reports, buckets, cache, objective, checkpoints."""

import json

import numpy as np
import pytest
import torch

from accel.lora import checkpoint as ckpt
from accel.lora.cache import CacheSettings, LatentCache, entry_key
from accel.lora.dataset import (
    Bucket,
    DataError,
    DatasetConfig,
    choose_bucket,
    load_clip,
    parse_buckets,
    resize_crop,
    scan,
)
from accel.lora.objective import FlowMatchObjective
from accel.lora.synthetic import SyntheticConfig, clip_spec, make_dataset, render_clip, write_video
from accel.lora.train import epoch_batches

BUCKET = (Bucket(17, 64, 64),)


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_per_seed_and_prefix_stable():
    a = [clip_spec(3, i) for i in range(6)]
    assert a == [clip_spec(3, i) for i in range(6)]
    assert a != [clip_spec(4, i) for i in range(6)]
    v1 = render_clip(a[0], 9, 40, 56)
    v2 = render_clip(a[0], 9, 40, 56)
    assert v1.shape == (9, 40, 56, 3) and v1.dtype == np.uint8
    assert np.array_equal(v1, v2)
    assert not np.array_equal(v1[0], v1[-1]) or a[0].speed == "slow"  # it moves


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_synthetic_shape_moves_in_its_direction(shape):
    from accel.lora.synthetic import ClipSpec

    spec = ClipSpec("red", shape, "right", "fast", "small", (0.3, 0.5))
    video = render_clip(spec, 9, 64, 64)
    mask = (video[..., 0] == 230) & (video[..., 1] == 40)
    xs = [np.nonzero(mask[f])[1].mean() for f in (0, 8)]
    assert mask[0].sum() > 20
    assert xs[1] > xs[0] + 4  # 8 frames x 0.012 x 64 px ~ 6 px to the right
    assert spec.caption == f"a small red {shape} moving right fast"


def test_make_dataset_formats_and_manifest(tmp_path):
    import imageio.v3 as iio

    root = make_dataset(tmp_path / "gif", SyntheticConfig(count=2, frames=5, height=32, width=48, format="gif"),
                        manifest=True, progress=False)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["clip_00000.gif", "clip_00001.gif"]
    assert iio.imread(root / "clip_00000.gif", index=None).shape[:3] == (5, 32, 48)
    info = json.loads((root / "synthetic.json").read_text())
    assert info["clips"][1]["caption"] == clip_spec(0, 1).caption
    with pytest.raises(ValueError, match="frames"):
        SyntheticConfig(frames=0)


def test_npz_clips_are_lossless_and_bad_ones_named(tmp_path):
    from accel.lora.dataset import read_frames

    root = make_dataset(tmp_path / "npz", SyntheticConfig(count=2, frames=5, height=32, width=48, format="npz"),
                        progress=False)
    frames = read_frames(root / "clip_00001.npz")
    assert frames.dtype == np.uint8 and np.array_equal(frames, render_clip(clip_spec(0, 1), 5, 32, 48))
    np.savez(tmp_path / "nokey.npz", video=frames)
    np.savez(tmp_path / "float.npz", frames=frames.astype(np.float32))
    np.savez(tmp_path / "pickled.npz", frames=np.array([{"a": 1}], dtype=object))
    for name, reason in (("nokey", "no 'frames' array"), ("float", "uint8"), ("pickled", "cannot read npz")):
        with pytest.raises(DataError, match=rf"^{name}\.npz: .*{reason}"):
            read_frames(tmp_path / f"{name}.npz")


# ------------------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("clips"), SyntheticConfig(count=3, frames=17), progress=False)


def _bad_folder(tmp_path, clips):
    import shutil

    for name in ("clip_00000.mp4", "clip_00000.txt", "clip_00001.mp4"):  # clip_00001 has no caption
        shutil.copy(clips / name, tmp_path / name)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (tmp_path / "broken.txt").write_text("a broken clip")
    write_video(tmp_path / "short.mp4", render_clip(clip_spec(0, 9), 5, 64, 64), 16)
    (tmp_path / "short.txt").write_text("a short clip")
    return tmp_path


def test_bad_data_reported_with_file_names(tmp_path, clips):
    root = _bad_folder(tmp_path, clips)
    report = scan(DatasetConfig(root, BUCKET))
    assert [it.path.name for it in report.items] == ["clip_00000.mp4"]
    reasons = {e.path.name: e.reason for e in report.skipped}
    print(reasons)
    assert set(reasons) == {"broken.mp4", "clip_00001.mp4", "short.mp4"}
    assert "cannot read video" in reasons["broken.mp4"]
    assert "missing caption" in reasons["clip_00001.mp4"]
    assert "too few frames: 5" in reasons["short.mp4"]
    assert "broken.mp4: cannot read video" in report.summary()
    with pytest.raises(DataError, match=r"^broken\.mp4: cannot read video"):
        scan(DatasetConfig(root, BUCKET, on_error="error"))


def test_bad_data_fatal_through_cli(tmp_path, clips, capsys):
    from accel.cli import main

    (tmp_path / "data").mkdir()
    root = _bad_folder(tmp_path / "data", clips)
    code = main(["train-lora", "--data", str(root), "--out", str(tmp_path / "run"), "--on-bad-data", "error",
                 "--attention", "dense", "--steps", "1", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "error: broken.mp4: cannot read video" in err


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_captions(tmp_path, clips, kind):
    import shutil

    shutil.copy(clips / "clip_00000.mp4", tmp_path / "a.mp4")
    shutil.copy(clips / "clip_00001.mp4", tmp_path / "b.mp4")
    if kind == "jsonl":
        (tmp_path / "metadata.jsonl").write_text('{"file": "a.mp4", "caption": "first"}\n'
                                                 '{"file": "gone.mp4", "caption": "x"}\n')
    else:
        (tmp_path / "metadata.csv").write_text("file,caption\na.mp4,first\ngone.mp4,x\n")
    report = scan(DatasetConfig(tmp_path, BUCKET))
    assert [(it.path.name, it.caption) for it in report.items] == [("a.mp4", "first")]
    assert {e.path.name: e.reason.split(" (")[0] for e in report.skipped} == {
        "b.mp4": "missing caption", "gone.mp4": "listed in the manifest but the file does not exist"}


def test_buckets_and_resize():
    buckets = parse_buckets("9x32x64, 17x64x64,17x64x32")
    assert buckets == (Bucket(9, 32, 64), Bucket(17, 64, 64), Bucket(17, 64, 32))
    assert choose_bucket(buckets, 20, 100, 50) == Bucket(17, 64, 32)  # most frames, then aspect
    assert choose_bucket(buckets, 12, 100, 50) == Bucket(9, 32, 64)
    assert choose_bucket(buckets, 20, 100, 50, stride=2) == Bucket(9, 32, 64)
    assert choose_bucket(buckets, 8, 100, 50) is None
    with pytest.raises(ValueError, match="FRAMESxHEIGHTxWIDTH"):
        parse_buckets("17x64")
    frames = torch.linspace(-1, 1, 2 * 3 * 30 * 50).view(2, 3, 30, 50)
    out = resize_crop(frames, 16, 16)
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1


def test_load_clip_shape_and_stride(clips):
    report = scan(DatasetConfig(clips, (Bucket(5, 32, 48),), frame_stride=3))
    clip = load_clip(report.items[0], frame_stride=3)
    assert clip.shape == (3, 5, 32, 48) and clip.dtype == torch.float32
    assert -1 <= clip.min() and clip.max() <= 1


def test_cache_key_changes_with_file_caption_and_settings(tmp_path, clips):
    import dataclasses

    item = scan(DatasetConfig(clips, BUCKET)).items[0]
    settings = CacheSettings("enc", 16)
    key = entry_key(item, settings)
    assert key == entry_key(item, settings)
    assert key != entry_key(dataclasses.replace(item, caption="other"), settings)
    assert key != entry_key(item, CacheSettings("enc", 32))
    assert key != entry_key(dataclasses.replace(item, bucket=Bucket(9, 64, 64)), settings)
    cache = LatentCache(tmp_path, settings)
    calls = []

    def text(caption):
        return {"text": torch.ones(4, 2), "text_mask": torch.ones(4, dtype=torch.long)}

    def video(x):
        calls.append(1)
        return x[:, :, ::4, ::8, ::8]

    failed = cache.fill([item], video, text, progress=False)
    entry = cache.load(item)
    assert not failed and entry["latents"].shape == (3, 5, 8, 8) and entry["text_mask"].dtype == torch.long
    cache.fill([item], video, text, progress=False)
    assert len(calls) == 1  # encoded once
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------------------------------ objective


def test_flow_matching_objective():
    obj = FlowMatchObjective(shift=3.0)
    gen = torch.Generator().manual_seed(0)
    s = obj.sample_sigmas(4000, gen)
    assert 0 <= s.min() and s.max() <= 1 and s.dtype == torch.float32
    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(obj.shifted(u), torch.tensor([0.0, 0.75, 1.0]))
    assert abs(obj.unshifted(0.75) - 0.5) < 1e-9
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    x_t, target = obj.noisy(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1]) and torch.equal(target, noise - x0)
    assert obj.loss(target, target) == 0
    assert torch.equal(obj.timesteps(torch.tensor([0.5])), torch.tensor([500.0]))


@pytest.mark.parametrize("weighting", ["uniform", "logit_normal"])
def test_wan22_experts_split_by_noise(weighting):
    gen = torch.Generator().manual_seed(0)
    high = FlowMatchObjective.for_family("wan", expert="high", boundary_ratio=0.875, weighting=weighting)
    low = FlowMatchObjective.for_family("wan", expert="low", boundary_ratio=0.875, weighting=weighting)
    sh, sl = high.sample_sigmas(2000, gen), low.sample_sigmas(2000, gen)
    assert sh.min() >= 0.875 - 1e-6 and sh.max() <= 1 and sl.max() <= 0.875 + 1e-6 and sl.min() >= 0
    assert sh.std() > 0.01 and sl.std() > 0.05
    with pytest.raises(ValueError, match="boundary_ratio"):
        FlowMatchObjective.for_family("wan", expert="low")
    with pytest.raises(NotImplementedError, match="family"):
        FlowMatchObjective.for_family("flux")
    with pytest.raises(ValueError, match="shift"):
        FlowMatchObjective(shift=0)
    assert FlowMatchObjective.for_family("hunyuan_video").shift == 7.0


def test_epoch_batches_group_by_bucket():
    from accel.lora.dataset import VideoItem

    items = [VideoItem(__import__("pathlib").Path(f"{i}.mp4"), "c", Bucket(9 if i % 2 else 17, 64, 64))
             for i in range(7)]
    batches = epoch_batches(items, 2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({items[i].bucket for i in b}) == 1 for b in batches)
    assert batches == epoch_batches(items, 2, seed=0, epoch=0) != epoch_batches(items, 2, seed=0, epoch=1)


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_atomic_roundtrip_and_corrupt_fallback(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2, 3, 4):
        tensors, meta = ckpt.optimizer_tensors(opt)
        rt, rm = ckpt.rng_state(gen)
        ckpt.save_checkpoint(tmp_path, step, {**tensors, **rt, "w": model.weight * step},
                             {"optimizer": meta, "rng": rm}, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003", "step-00000004"]
    (tmp_path / ".tmp-step-00000005-abc").mkdir()  # an interrupted save is ignored
    latest = ckpt.load_latest(tmp_path)
    assert latest.step == 4 and torch.equal(latest.tensors["w"], (model.weight * 4).detach())
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    ckpt.restore_optimizer(opt2, latest.tensors, latest.meta["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expected = torch.randn(3, generator=gen)
    gen2 = torch.Generator()
    ckpt.restore_rng(gen2, latest.tensors, latest.meta["rng"])
    assert torch.equal(torch.randn(3, generator=gen2), expected)
    data = (tmp_path / "step-00000004" / "state.safetensors").read_bytes()
    (tmp_path / "step-00000004" / "state.safetensors").write_bytes(data[:-7] + b"garbage")
    with caplog.at_level("WARNING", logger="accel.lora"):
        fallback = ckpt.load_latest(tmp_path)
    assert fallback.step == 3
    assert "step-00000004" in caplog.text and "checksum" in caplog.text and "previous" in caplog.text
    (tmp_path / "step-00000003" / "state.json").write_text("{not json")
    with pytest.raises(ckpt.CorruptCheckpointError, match="step-00000003.*not JSON"):
        ckpt.load_checkpoint(tmp_path / "step-00000003")


@pytest.mark.parametrize("command", ["make-dataset", "train-lora"])
def test_cli_help(capsys, command):
    from accel.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "(default:" in text


def test_make_dataset_cli(tmp_path, capsys):
    from accel.cli import main

    assert main(["make-dataset", str(tmp_path), "--count", "2", "--frames", "5", "--height", "16", "--width", "24",
                 "--seed", "7"]) == 0
    assert "wrote 2 clips of 5x16x24" in capsys.readouterr().out
    assert (tmp_path / "clip_00001.txt").read_text().strip() == clip_spec(7, 1).caption
    with pytest.raises(SystemExit):
        main(["make-dataset", str(tmp_path), "--count", "0"])
    assert "count must be a whole number >= 1" in capsys.readouterr().err


def test_cache_fill_batches_clips_of_one_bucket_and_encodes_each_caption_once(tmp_path, clips):
    report = scan(DatasetConfig(clips, BUCKET))
    items = report.items
    calls = {"video": [], "text": []}

    def encode_video(video):
        calls["video"].append(video.shape[0])
        return video.mean(dim=(1, 3, 4), keepdim=True)[:, :, :1] * torch.arange(1, 5).view(1, 4, 1, 1, 1)

    def encode_text(caption):
        calls["text"].append(caption)
        return {"text": torch.full((2, 3), float(len(caption)))}

    b = items[0].bucket
    cache = LatentCache(tmp_path / "c", CacheSettings("fp", 16, 1))
    pair = 2 * b.frames * b.height * b.width
    assert cache.fill(items, encode_video, encode_text, progress=False, batch_pixels=pair) == []
    assert calls["video"] == [2, 1] and sorted(calls["text"]) == sorted({it.caption for it in items})
    one = LatentCache(tmp_path / "one", CacheSettings("fp", 16, 1))
    one.fill(items, encode_video, encode_text, progress=False, batch_pixels=1)
    for it in items:
        assert torch.allclose(cache.load(it)["latents"], one.load(it)["latents"])
