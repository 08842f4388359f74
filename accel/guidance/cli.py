"""Command line: guidance flags for `accel generate` and the `accel heads` command (search, list, show)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from accel.guidance.perturbation import HeadPerturbation, format_heads, parse_heads
from accel.options import Option, options_of

PREFIX = "perturb_"
_SKIP = {"heads", "steps"}


def parse_steps(text: str) -> tuple | None:
    """``"start:end"`` step indices (``"2:"`` to the last step) or fractions (``"0.0:0.3"``); "" or "all": None."""
    raw = text.strip()
    if raw.lower() in ("", "all", "none"):
        return None
    start, sep, end = raw.partition(":")
    if not sep:
        raise ValueError(f"steps must be start:end (e.g. 0:10, 2: or 0.0:0.3), got {text!r}")

    def number(part: str) -> int | float | None:
        part = part.strip()
        if not part:
            return None
        try:
            return float(part) if any(c in part for c in ".eE") else int(part)
        except ValueError:
            raise ValueError(f"steps must be start:end numbers, got {text!r}") from None

    first, last = number(start), number(end)
    if first is None:
        first = 0.0 if isinstance(last, float) else 0
    return (first, last)


def guidance_options() -> tuple[Option, ...]:
    return tuple(o for o in options_of(HeadPerturbation) if o.name not in _SKIP)


def add_guidance_args(parser: argparse.ArgumentParser) -> None:
    """`--guidance PRESET`, `--perturb-heads`, `--perturb-steps` and one flag per `HeadPerturbation` option."""
    group = parser.add_argument_group("head-perturbation guidance (SoftPAG on chosen heads)")
    group.add_argument("--guidance", metavar="PRESET.json",
                       help="guidance preset file from `accel heads search` (--perturb-* flags override it)")
    group.add_argument("--perturb-heads", metavar="L:H,...",
                       help="heads to perturb as layer:head pairs, e.g. 11:15,1:10 or single_transformer_blocks.3:5")
    group.add_argument("--perturb-steps", metavar="START:END",
                       help="steps where the perturbation term acts: indices (2:8, 5:) or fractions (0.0:0.3); "
                            "omit: every step")
    for opt in guidance_options():
        flag = "--" + (PREFIX + opt.name).replace("_", "-")
        help_text = f"{opt.help}; {opt.range_text()} (default {opt.default})".replace("%", "%%")
        group.add_argument(flag, dest=PREFIX + opt.name, default=None, metavar=opt.kind.__name__.upper(),
                           type=str, help=help_text)


def guidance_from_args(args: argparse.Namespace) -> Any:
    """The guidance the flags describe: None, a `HeadPerturbation`, or a `GuidancePreset` with overrides."""
    from accel.guidance.preset import GuidancePreset, load_preset

    values: dict[str, Any] = {}
    for opt in guidance_options():
        text = getattr(args, PREFIX + opt.name, None)
        if text is not None:
            values[opt.name] = opt.parse(text)
    if getattr(args, "perturb_steps", None) is not None:
        values["steps"] = parse_steps(args.perturb_steps)
    if getattr(args, "perturb_heads", None) is not None:
        values["heads"] = parse_heads(args.perturb_heads)
    preset_path = getattr(args, "guidance", None)
    if preset_path:
        preset = load_preset(preset_path)
        return GuidancePreset(preset.model_class, dataclasses.replace(preset.perturbation, **values), preset.search)
    if not values:
        return None
    if "heads" not in values:
        given = ", ".join("--" + (PREFIX + k).replace("_", "-") for k in values)
        raise ValueError(f"{given} need --perturb-heads or --guidance PRESET.json (which heads to perturb)")
    return HeadPerturbation(**values)


def describe_guidance(guidance: Any) -> str:
    """One line saying what guidance runs (for the CLI and the UI)."""
    p = getattr(guidance, "perturbation", guidance)
    steps = "every step" if p.steps is None else f"steps {p.steps[0]}:{'' if p.steps[1] is None else p.steps[1]}"
    return (f"guidance: SoftPAG {p.target}/{p.scope} on heads {format_heads(p.heads)}, strength u={p.strength:g}, "
            f"scale w_p={p.scale:g}, {steps}, {'batched with' if p.batched else 'separate from'} the cond pass")


# ---------------------------------------------------------------------------------------------- accel heads


def _layers_filter(text: str | None) -> set[int] | None:
    if not text:
        return None
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--layers must be indices and ranges like 0-3,7, got {text!r}")
        out.update(range(int(lo), int(hi) + 1) if sep else {int(lo)})
    return out


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {str(path)!r} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    return prompts


def cmd_heads_search(args: argparse.Namespace) -> int:
    from accel.guidance.preset import save_preset
    from accel.guidance.scorers import make_scorer
    from accel.guidance.search import Distributed, SearchConfig, search_heads

    prompts = _prompts(args)
    pairs = tuple((p, s) for p in prompts for s in range(args.seeds))
    steps = parse_steps(args.perturb_steps) if args.perturb_steps else None
    config = SearchConfig(prompts=pairs, rounds=args.rounds, top_k=args.top_k, strength=args.strength,
                          scale=args.scale, target=args.target, scope=args.scope, steps=steps)
    out = Path(args.out)
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        from accel.cli import torchrun_command

        sys.stdout.flush()
        os.execv(sys.executable, torchrun_command(args.gpus, sys.argv[1:]))
    dist = Distributed()
    device = None
    if dist.state is not None and dist.state.device.type == "cuda":
        device = dist.state.device
    scorer = make_scorer(args.scorer, args.scorer_arg, device=str(device or "cpu"))
    from accel.pipelines.generate import load_pipeline

    pipe = load_pipeline(args.model, device=device)
    pipe.set_progress_bar_config(disable=True)
    call: dict[str, Any] = {"guidance_scale": args.guidance_scale}
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames),
                       ("num_inference_steps", args.steps)):
        if value is not None:
            call[key] = value
    from accel.pipelines.tiny import TINY_MODELS

    if args.model in TINY_MODELS:
        spec = TINY_MODELS[args.model]
        defaults = dict(height=spec.height, width=spec.width, num_inference_steps=spec.num_inference_steps,
                        **spec.call_defaults)
        if spec.is_video:
            defaults["num_frames"] = spec.num_frames
        call = {**defaults, **call}
    layers = _layers_filter(args.layers)
    if layers is not None:
        from accel.guidance.loop import layer_sites
        from accel.pipelines.families import adapter_for

        sites = layer_sites(adapter_for(pipe.transformer), pipe.transformer)
        bad = sorted(i for i in layers if i >= len(sites))
        if bad:
            raise ValueError(f"--layers {bad} out of range: the model has {len(sites)} self-attention layers")
        config = dataclasses.replace(config, candidates=tuple((s.index, h) for s in sites if s.index in layers
                                                              for h in range(s.heads)))
    result = search_heads(pipe, config, scorer, log=args.log, call_kwargs=call, dist=dist)
    if dist.rank == 0:
        preset = result.preset(type(pipe.transformer).__name__, config, strength=args.preset_strength)
        save_preset(preset, out)
        print(f"selected heads: {format_heads(tuple(result.selected))}")
        print(f"wrote {out} (log: {args.log})")
    return 0


def cmd_heads_list(args: argparse.Namespace) -> int:
    from accel.guidance.loop import layer_sites
    from accel.pipelines.families import adapter_for
    from accel.pipelines.generate import load_pipeline

    pipe = load_pipeline(args.model)
    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    if adapter is None:
        raise ValueError(f"{type(transformer).__name__} is not a model family accel supports")
    sites = layer_sites(adapter, transformer)
    print(f"{type(transformer).__name__}: {len(sites)} self-attention layers")
    for site in sites:
        print(f"  layer {site.index:3d}  {site.name}  heads 0-{site.heads - 1}")
    return 0


def cmd_heads_show(args: argparse.Namespace) -> int:
    from accel.guidance.preset import load_preset

    preset = load_preset(args.preset)
    p = preset.perturbation
    print(f"model class: {preset.model_class}")
    print(f"heads: {format_heads(p.heads)}")
    print(f"strength {p.strength:g}, scale {p.scale:g}, steps {p.steps or 'all'}, target {p.target}, scope {p.scope}")
    return 0


def add_heads_command(subparsers: Any) -> None:
    """`accel heads search | list | show`."""
    heads = subparsers.add_parser("heads", help="head-perturbation guidance: HeadHunter head search, layers, presets")
    sub = heads.add_subparsers(dest="heads_command", required=True)
    search = sub.add_parser("search", help="greedy iterative top-k head search (HeadHunter) -> a preset file",
                            description="Each round, score 'selected + candidate' over the prompt/seed pairs and "
                                        "add the best k heads; R rounds. The log is written as it goes and a "
                                        "killed search resumes from it. Multi-GPU: --gpus N (torchrun).")
    search.add_argument("--model", default="tiny-sd3", help="tiny-* model, local diffusers folder or Hub id")
    search.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    search.add_argument("--prompts-file", help="a file with one prompt per line")
    search.add_argument("--seeds", type=int, default=1, help="seeds per prompt (0..N-1); pairs = prompts x seeds")
    search.add_argument("--rounds", type=int, default=1, help="R rounds")
    search.add_argument("--top-k", type=int, default=3, help="k heads added per round")
    search.add_argument("--strength", type=float, default=1.0, help="u while searching (paper: 1.0)")
    search.add_argument("--preset-strength", type=float, default=None,
                        help="u written into the preset (paper: about 0.5; default: --strength)")
    search.add_argument("--scale", type=float, default=3.0, help="w_p while searching (paper: 3 SD3, 8 Flux)")
    search.add_argument("--target", default="identity", choices=("identity", "uniform", "mean_query"))
    search.add_argument("--scope", default="joint", choices=("joint", "image"))
    search.add_argument("--perturb-steps", help="START:END steps where w_p acts (omit: all)")
    search.add_argument("--layers", help="restrict candidates to these layers, e.g. 0-5,12")
    search.add_argument("--scorer", default="callable", choices=("callable", "reference", "clip", "pickscore"),
                        help="objective (higher is better)")
    search.add_argument("--scorer-arg", help="module:function, a folder of reference images, or a local CLIP / "
                                             "PickScore model folder")
    search.add_argument("--guidance-scale", type=float, default=0.0,
                        help="CFG scale of the generations (HeadHunter searches without CFG: 0)")
    search.add_argument("--height", type=int)
    search.add_argument("--width", type=int)
    search.add_argument("--frames", type=int)
    search.add_argument("--steps", type=int, help="denoising steps")
    search.add_argument("--gpus", type=int, default=1, help="GPUs: candidates are split over ranks (torchrun)")
    search.add_argument("--search-log", dest="log", default="outputs/heads/search.jsonl",
                        help="JSON-lines search log (a killed search resumes from it)")
    search.add_argument("--out", default="outputs/heads/preset.json", help="preset file to write")
    search.set_defaults(func=cmd_heads_search)
    listing = sub.add_parser("list", help="the model's self-attention layers, their index and head count")
    listing.add_argument("--model", default="tiny-flux")
    listing.set_defaults(func=cmd_heads_list)
    show = sub.add_parser("show", help="print a guidance preset file")
    show.add_argument("preset")
    show.set_defaults(func=cmd_heads_show)


__all__ = ["add_guidance_args", "add_heads_command", "describe_guidance", "guidance_from_args", "parse_steps"]
