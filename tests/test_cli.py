"""`accel generate` end to end on the embedded model, and its error messages."""

from __future__ import annotations

import imageio.v3 as iio
import pytest

from accel.cli import main


def test_generate_writes_a_readable_mp4(tmp_path, capsys) -> None:
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--model", "tiny-wan", "--frames", "9", "--height", "48", "--width", "80", "--steps", "2",
            "--out", str(out)]
    assert main(argv) == 0
    video = iio.imread(out)
    assert video.shape == (9, 48, 80, 3)
    captured = capsys.readouterr()
    printed = captured.out
    assert "generated 9 frames" in printed and "self-attention calls" in printed
    settings = printed.splitlines()[0]
    assert settings.startswith("settings: model=tiny-wan device=cpu dtype=float32 size=48x80 (HxW) frames=9 steps=2")
    assert "method=dense" in settings
    assert "0/2" in captured.err and "2/2" in captured.err  # the progress bar knows its total from the start


def test_generate_image_model(tmp_path) -> None:
    out = tmp_path / "image.mp4"
    assert main(["generate", "--model", "tiny-flux", "--out", str(out)]) == 0
    assert iio.imread(out).shape[0] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "./missing/folder"], "unknown model"),
        (["--frames", "16"], "num_frames=16 must satisfy num_frames % 4 == 1"),
        (["--height", "50"], "height=50 must be a positive multiple of 16"),
        (["--model", "tiny-flux", "--frames", "5"], "must be 1 for an image model"),
        (["--lora", "missing.safetensors"], "LoRA file not found"),
        (["--attention", "dense", "--preset", "wan2.1-14b"], "--preset wan2.1-14b is a radial preset, not dense"),
    ],
)
def test_generate_bad_input_gives_one_clear_error(tmp_path, capsys, argv, message) -> None:
    code = main(["generate", "--out", str(tmp_path / "x.mp4"), *argv])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err, err
    assert "Traceback" not in err


def test_generate_unwritable_output(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["generate", "--out", str(blocker / "x.mp4")]) == 2
    assert "cannot create output folder" in capsys.readouterr().err
    assert main(["generate", "--out", str(tmp_path / "x.gif")]) == 2
    assert "must be an .mp4" in capsys.readouterr().err


def test_multi_gpu_generation_runs_under_torchrun() -> None:
    from accel.cli import torchrun_command

    cmd = torchrun_command(2, ["generate", "--gpus", "2", "--attention", "radial"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-4:] == ["generate", "--gpus", "2", "--attention", "radial"][-4:]
