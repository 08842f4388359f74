"""`accel` flags come from the method registry; help shows defaults; the settings line and progress bar."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import pytest

import accel
import accel.cli as cli
from accel.cli import main
from accel.methods.base import AttentionMethod
from accel.options import option, options_of


@dataclass(frozen=True)
class Toy(AttentionMethod):
    """Toy window attention (a method the CLI has never heard of)."""

    name: ClassVar[str] = "toy"
    registered: ClassVar[bool] = False  # kept out of the real registry; the test adds it by hand

    width: int = option(3, "window width in frames (100% = all)", minimum=1, maximum=64)
    decay: float = option(0.5, "shares its flag with radial", minimum=0, exclusive_minimum=True)
    causal: bool = option(False, "only look back")


@pytest.fixture
def with_toy(monkeypatch):
    import accel.methods.registry as registry

    real = registry.methods

    def methods():
        return {**real(), "toy": registry.MethodInfo("toy", Toy, "Toy window attention", options_of(Toy))}

    monkeypatch.setattr(registry, "methods", methods)


def test_a_new_method_gets_flags_without_touching_the_cli(with_toy, capsys) -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    import accel.methods.registry as registry

    choices = "{" + ",".join(registry.methods()) + "}"  # the real methods plus the toy
    assert choices.endswith(",toy}") and choices.replace(" ", "") in text.replace(" ", "")
    assert "toy options (with --attention toy)" in text
    assert "--causal, --no-causal" in text and "[radial, toy]" in text  # --decay is shared and says so
    assert "--toy-width N" in text and "100% = all" in text  # generate's --width is taken: the flag says toy

    args = parser.parse_args(["generate", "--attention", "toy", "--decay", "0.25", "--causal", "--toy-width", "5",
                              "--width", "64"])
    assert cli.resolve_attention(args)[0] == Toy(width=5, decay=0.25, causal=True)
    assert args.width == 64
    args = parser.parse_args(["generate", "--attention", "toy", "--toy-width", "65"])
    with pytest.raises(ValueError, match=r"^--toy-width: Toy.width must be a whole number >= 1 and <= 64, got 65"):
        cli.resolve_attention(args)
    args = parser.parse_args(["generate", "--toy-width", "3"])
    with pytest.raises(ValueError, match="^--toy-width is a toy option; add --attention toy$"):
        cli.resolve_attention(args)
    args = parser.parse_args(["generate", "--attention", "radial", "--causal"])
    with pytest.raises(ValueError, match="^--causal is a toy option; add --attention toy$"):
        cli.resolve_attention(args)
    args = parser.parse_args(["generate", "--decay", "0.25"])
    with pytest.raises(ValueError, match="an option of radial, toy; add --attention radial or --attention toy"):
        cli.resolve_attention(args)


def test_bool_options_have_on_and_off_flags() -> None:
    from accel.methods.radial import Radial

    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--preset", "wan2.1-14b", "--no-sink", "--decay-near", "--spatial", "disk"])
    method, _ = cli.resolve_attention(args)
    assert method == Radial(decay=0.2, block_size=128, sink=False, decay_near=True, spatial="disk")


@pytest.mark.parametrize("command", [[], ["generate"], ["mask"], ["ui"], ["bench"]])
def test_help_shows_defaults_and_cites_no_missing_files(capsys, command) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "shared/" not in text
    if command != ["bench"]:  # bench only lists its subcommands
        assert "(default:" in text
    if command == ["generate"]:
        for needle in ("(default: accel-demo)", "(default: outputs/video.mp4)", "(default: 1.0, or the preset's)",
                       "(default: on, or the preset's)", "(omit: the model's default)", "--dense-layers N"):
            assert needle in text, needle
    if command == ["ui"]:
        assert "(default: 7860)" in text and "(default: 127.0.0.1)" in text


def test_dir_lists_the_lazy_names() -> None:
    names = dir(accel)
    assert {"patch", "unpatch", "Radial", "Schedule", "__version__"} <= set(names)
    assert names == sorted(names)


def test_mask_draws_any_method_with_a_picture(tmp_path, capsys) -> None:
    out = tmp_path / "masks" / "m.png"
    argv = ["mask", "--model", "wan", "--frames", "9", "--height", "64", "--width", "64", "--decay", "0.5"]
    assert main([*argv, "--out", str(out)]) == 0  # radial without --attention: mask's default method
    assert out.stat().st_size > 0
    assert "radial" in capsys.readouterr().out
    assert main([*argv[:-2], "--preset", "wan2.1-14b", "--out", str(out)]) == 0


def test_radial_generation_prints_settings_and_phases(tmp_path, capsys, monkeypatch) -> None:
    import accel.pipelines.generate as generate

    real = generate.run_generation
    phases: list[str] = []

    def with_phases(pipe, request, *, on_phase=None, **kwargs):  # works before and after generate.py has phases
        def record(phase: str) -> None:
            phases.append(phase)
            on_phase(phase)

        record("loading")
        if "on_phase" in __import__("inspect").signature(real).parameters:
            kwargs["on_phase"] = record
        return real(pipe, request, **kwargs)

    monkeypatch.setattr(generate, "run_generation", with_phases)
    out = tmp_path / "radial.mp4"
    argv = ["generate", "--model", "tiny-wan", "--frames", "9", "--height", "48", "--width", "80", "--steps", "2",
            "--attention", "radial", "--decay", "0.5", "--block-size", "16", "--dense-layers", "1", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    settings = captured.out.splitlines()[0]
    assert settings == ("settings: model=tiny-wan device=cpu dtype=float32 size=48x80 (HxW) frames=9 steps=2 "
                        "method=radial:decay=0.5,block_size=16 schedule=dense_layers=1 "
                        "(50% of attention calls sparse)")
    assert phases[0] == "loading"
    assert "radial loading" in captured.err  # the bar shows the phase
    assert "0/2" in captured.err and "2/2" in captured.err and not re.search(r"(?<![\d.])0step", captured.err)
    assert out.exists()
