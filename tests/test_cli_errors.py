"""`accel` fails early and in one line: unselected method options, all-dense schedules, unwritable outputs,
nonsense values, missing GPUs, busy ports, Ctrl-C and closed pipes (issue #11)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import accel.cli as cli
from accel.cli import main

MASK = ["mask", "--model", "wan", "--frames", "9", "--height", "64", "--width", "64"]


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def no_generation(monkeypatch):
    """Checks that must come before the denoising: fail the test if a generation starts."""
    import accel.pipelines.generate as generate

    def forbidden(*args, **kwargs):
        raise AssertionError("run_generation was called")

    monkeypatch.setattr(generate, "run_generation", forbidden)


@pytest.fixture
def no_loading(monkeypatch):
    """Checks that must come before the model is loaded."""
    import accel.pipelines.generate as generate

    def forbidden(*args, **kwargs):
        raise AssertionError("load_pipeline was called")

    monkeypatch.setattr(generate, "load_pipeline", forbidden)


# ------------------------------------------------------------------ 1. options of an unselected method


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--decay", "0.2"], "error: --decay is a radial option; add --attention radial"),
        (["--attention", "dense", "--no-sink"], "error: --sink is a radial option; add --attention radial"),
        (["--dense-steps", "3"], "error: --dense-steps schedules a sparse method, but attention is dense"),
        (["--attention", "dense", "--preset", "wan2.1-14b"], "error: --preset wan2.1-14b is a radial preset"),
        (["--preset", "no-such"], "error: unknown preset 'no-such'; known presets: wan2.1-14b"),
        (["--attention", "radial", "--decay", "-1"], "error: --decay: Radial.decay must be a number > 0"),
        (["--attention", "radial", "--block-size", "100"], "error: --block-size: Radial.block_size must be one of"),
        (["--attention", "radial", "--dense-steps", "-2"], "error: --dense-steps: Schedule.dense_steps must be"),
    ],
)
def test_method_and_schedule_flags_are_checked_before_loading(tmp_path, capsys, no_loading, argv, message):
    code, err = _run(["generate", "--out", str(tmp_path / "x.mp4"), *argv], capsys)
    assert code == 2
    assert err.startswith(message), err


def test_preset_selects_its_method_and_flags_override_it() -> None:
    from accel.methods.radial import Radial
    from accel.presets import preset
    from accel.schedule import Schedule

    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--preset", "wan2.1-14b", "--decay", "0.5", "--dense-steps", "3"])
    method, schedule = cli.resolve_attention(args)
    assert method == Radial(decay=0.5, block_size=128, sink=True)  # block size from the preset
    assert schedule == Schedule(dense_steps=3, dense_layers=1)  # dense_layers from the preset
    args = parser.parse_args(["generate", "--attention", "radial", "--preset", "hunyuan-video"])
    assert cli.resolve_attention(args) == (preset("hunyuan-video").method, preset("hunyuan-video").schedule)
    args = parser.parse_args(["generate", "--attention", "radial", "--no-thinning", "--block-size", "auto"])
    assert cli.resolve_attention(args) == (Radial(thinning=False), Schedule())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "wan2.1-14b"],
         "error: dense_steps=12 covers all 2 denoising steps: no call would run radial; "
         "lower --dense-steps or raise --steps"),
        (["--attention", "radial", "--dense-steps", "100"], "error: dense_steps=100 covers all 2 denoising steps"),
        (["--attention", "radial", "--dense-steps", "1", "--dense-last-steps", "1"],
         "error: dense_steps=1 + dense_last_steps=1 cover all 2 denoising steps"),
        (["--attention", "radial", "--dense-layers", "100"],
         "error: dense_layers=100 covers all 2 transformer layers: no call would run radial; lower --dense-layers"),
    ],
)
def test_schedule_without_a_sparse_call_is_an_error(tmp_path, capsys, no_generation, argv, message):
    code, err = _run(["generate", "--model", "tiny-wan", "--out", str(tmp_path / "x.mp4"), *argv], capsys)
    assert code == 2
    assert err.startswith(message), err


def test_all_dense_error_counts_layers_of_the_transformer() -> None:
    from accel.pipelines.tiny import build_tiny
    from accel.schedule import Schedule

    assert cli.count_attention_layers(build_tiny("tiny-flux")) == 4  # double + single stream blocks
    assert cli.all_dense_error(Schedule(dense_layers=3), 2, 4, "radial") is None
    assert cli.all_dense_error(Schedule(dense_layers=4), 2, 4, "radial").startswith("dense_layers=4 covers all 4")


# ------------------------------------------------------------------ 2. settings line, CPU warning


def test_full_size_model_on_cpu_warns(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("the warning is for CPU-only machines")
    folder = tmp_path / "big-model"
    folder.mkdir()
    code, err = _run(["generate", "--model", str(folder), "--out", str(tmp_path / "x.mp4")], capsys)
    assert code == 2  # not a diffusers folder: the load fails after the warning
    assert err.startswith(f"warning: {folder} is a full-size model and there is no GPU: generating on CPU will take "
                          "hours"), err
    assert "could not load model" in err


# ------------------------------------------------------------------ 3. unwritable outputs


@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_unwritable_out_fails_before_loading(tmp_path, capsys, no_loading, where) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "x.mp4" if where == "under_file" else "/proc/accel-test.mp4"
    code, err = _run(["generate", "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and ("cannot create output folder" in err or "not writable" in err), err


def test_mask_out_under_a_file(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _run([*MASK, "--out", str(blocker / "mask.png")], capsys)
    assert code == 2
    assert err.startswith(f"error: cannot create output folder {blocker}: a file of that name exists"), err


# ------------------------------------------------------------------ 4. one-line errors


def test_tiny_model_above_1024_px(tmp_path, capsys, no_loading) -> None:
    code, err = _run(["generate", "--model", "tiny-wan", "--height", "2048", "--out", str(tmp_path / "x.mp4")], capsys)
    assert code == 2
    assert err.startswith("error: tiny-wan") and "height" in err and "2048" in err and "1024" in err, err


def test_mask_needs_a_method_with_a_mask(tmp_path, capsys) -> None:
    code, err = _run([*MASK, "--attention", "dense", "--out", str(tmp_path / "m.png")], capsys)
    assert code == 2
    assert err.startswith("error: dense attention has no mask"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_eval_on_missing_cuda_is_one_line(capsys, device) -> None:
    code, err = _run(["eval", "--device", device], capsys)
    assert code == 2
    assert err.startswith(f"error: --device {device}: ") and "use --device cpu" in err, err
    code, err = _run(["bench", "fidelity", "--device", "gpu0"], capsys)
    assert code == 2 and err.startswith("error: --device 'gpu0' is not a device"), err


def test_cuda_runtime_errors_are_one_line_unless_verbose(monkeypatch, tmp_path, capsys) -> None:
    def no_cuda(args):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(cli, "cmd_mask", no_cuda)
    code, err = _run([*MASK, "--out", str(tmp_path / "m.png")], capsys)
    assert code == 2 and err.startswith("error: Torch not compiled with CUDA enabled"), err
    with pytest.raises(AssertionError):
        main(["--verbose", *MASK])


def test_ui_on_a_busy_port(capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, err = _run(["ui", "--port", str(port)], capsys)
    assert code == 2
    assert err.startswith(f"error: port {port} on 127.0.0.1 is in use; pass --port"), err


def test_ctrl_c_is_interrupted_not_a_traceback(monkeypatch, capsys) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_mask", interrupted)
    code, err = _run(MASK, capsys)
    assert code == 130 and err == "interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # --verbose keeps the traceback for debugging
        main(["-v", *MASK])


def test_real_sigint_exits_130() -> None:
    # A child of a background job starts with SIGINT ignored (POSIX shells without job control), where Python
    # installs no KeyboardInterrupt handler; a terminal's Ctrl-C meets Python's default one, so install it.
    script = (
        "import signal, sys, time, accel.cli as c\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "def wait(args):\n    print('ready', flush=True); time.sleep(60)\n"
        "c.cmd_mask = wait\n"
        f"sys.exit(c.main({MASK!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip() == "interrupted" and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], [*MASK, "--attention", "radial"]])
def test_closed_stdout_exits_quietly(tmp_path, argv) -> None:
    if "mask" in argv:
        argv = [*argv, "--out", str(tmp_path / "m.png")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "accel.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    proc.stdout.close()  # the reader is gone before accel writes: like `accel ... | head -1` or `| true`
    err = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert code in (0, 1)


# ------------------------------------------------------------------ 5. nonsense values


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--frames", "0"], "frames must be a whole number >= 1"),
        (["generate", "--height", "0"], "height must be a whole number >= 1"),
        (["generate", "--width", "-16"], "width must be a whole number >= 1"),
        (["generate", "--steps", "0"], "steps must be a whole number >= 1"),
        (["generate", "--steps", "two"], "steps must be a whole number >= 1"),
        (["generate", "--gpus", "0"], "gpus must be a whole number >= 1"),
        (["generate", "--gpus", "-1"], "gpus must be a whole number >= 1"),
        (["generate", "--guidance-scale", "nan"], "guidance_scale must be a finite number from 0 to 100"),
        (["generate", "--guidance-scale", "inf"], "guidance_scale must be a finite number"),
        (["generate", "--lora-scale", "inf"], "lora_scale must be a finite number from -100 to 100"),
        (["generate", "--lora-scale", "nan"], "lora_scale must be a finite number"),
        (["generate", "--lora-scale", "1000"], "lora_scale must be a finite number from -100 to 100"),
        (["generate", "--seed", "-1"], "seed must be a whole number from 0 to 9223372036854775807"),
        (["generate", "--seed", str(2**63)], "seed must be a whole number from 0"),
        ([*MASK[:3], "--frames", "0", "--height", "64", "--width", "64"], "size must be a whole number >= 1"),
        (["ui", "--port", "0"], "port must be a whole number from 1 to 65535"),
        (["ui", "--port", "70000"], "port must be a whole number from 1 to 65535"),
    ],
)
def test_nonsense_values_name_the_field_and_range(capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_a_method_that_cannot_take_the_size_fails_before_denoising(monkeypatch, capsys) -> None:
    import accel.pipelines.generate as generate

    def no_run(*args, **kwargs):
        raise AssertionError("run_generation must not be called")

    monkeypatch.setattr(generate, "run_generation", no_run)
    monkeypatch.setattr(cli, "run_generation", no_run, raising=False)
    code = cli.main(["generate", "--model", "tiny-wan", "--attention", "neighborhood", "--kernel-size", "3x9x9",
                     "--out", "/tmp/x.mp4"])
    err = capsys.readouterr().err
    assert code == 2 and "neighborhood attention cannot run at 64x64" in err and "kernel_size" in err, err
