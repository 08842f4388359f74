"""`accel` command line: generate videos with sparse attention and inspect attention masks."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

TINY_MAX_PIXELS = 1024
"""Largest height or width `accel generate` accepts for a tiny-* model (they are for tests and demos)."""

MASK_DEFAULT_METHOD = "radial"
"""The method `accel mask` draws when neither --attention nor --preset is given."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" after every option help, except where the default is None (the help says then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "(default" in text:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------- value types


def _int_type(field: str, minimum: int = 1, maximum: int | None = None, note: str = ""):
    """argparse `type=`: a whole number in [minimum, maximum]; the error names the field and its range."""
    allowed = f"a whole number >= {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{field} must be {allowed}{note}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{field} must be {allowed}{note}, got {text!r}")
        return value

    parse.__name__ = field  # argparse names the type in some messages
    return parse


def _float_type(field: str, minimum: float, maximum: float):
    """argparse `type=`: a finite number in [minimum, maximum] (nan and inf are rejected)."""
    allowed = f"a finite number from {minimum:g} to {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{field} must be {allowed}, got {text!r}") from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{field} must be {allowed}, got {text!r}")
        return value

    parse.__name__ = field
    return parse


# ---------------------------------------------------------------------------------------------- attention flags


def _dest(opt) -> str:
    return "method_opt_" + opt.name


def _sched_dest(opt) -> str:
    return "schedule_opt_" + opt.name


def _method_flags() -> dict[str, list[tuple[str, Any]]]:
    """Every method option flag -> [(method name, Option)] (a flag two methods share lists both)."""
    from accel.methods.registry import methods

    flags: dict[str, list[tuple[str, Any]]] = {}
    for name, info in methods().items():
        for opt in info.options:
            flags.setdefault(opt.flag, []).append((name, opt))
    return flags


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help texts


def _option_help(opt, owners: list[str]) -> str:
    if opt.kind is bool:
        allowed = ""
        default = "on" if opt.default else "off"
    else:
        allowed = dataclasses.replace(opt, none_means=None).range_text()
        if opt.none_means:
            allowed += f", or auto ({opt.none_means})"
        default = "auto" if opt.default is None else str(opt.default)
    methods = f"[{', '.join(owners)}] " if len(owners) > 1 else ""
    text = f"{methods}{opt.help}" + (f"; {allowed}" if allowed else "")
    return _escape(text + f" (default: {default}, or the preset's)")


def _metavar(opt) -> str:
    if opt.choices is not None:
        choices = [str(c) for c in opt.choices] + (["auto"] if opt.none_means else [])
        return "{" + ",".join(choices) + "}"
    return {int: "N", float: "X"}.get(opt.kind, "TEXT") + ("|auto" if opt.none_means else "")


def _add_attention_args(parser: argparse.ArgumentParser, *, default_method: str, schedule: bool) -> None:
    """--attention, --preset, one group of flags per registered method and (with `schedule`) the schedule's."""
    from accel.methods.registry import methods
    from accel.presets import PRESETS
    from accel.schedule import SCHEDULE_OPTIONS

    registry = methods()
    group = parser.add_argument_group("attention")
    group.add_argument(
        "--attention", choices=tuple(registry), default=None,
        help=f"self-attention method (default: the preset's method, else {default_method})",
    )
    by_method: dict[str, list[str]] = {}
    for p in PRESETS.values():
        by_method.setdefault(p.method.name, []).append(p.name)
    listing = "; ".join(f"{m}: {', '.join(names)}" for m, names in by_method.items())
    group.add_argument(
        "--preset", metavar="NAME",
        help=_escape(f"named method config and schedule from a research release ({listing}); sets --attention, "
                     "and flags given override its values"),
    )
    flags = _method_flags()
    names: dict[str, str] = {}  # option flag -> the flag on this parser (--NAME, or --METHOD-NAME if taken)
    for name, info in registry.items():
        if not info.options:
            continue
        mgroup = parser.add_argument_group(f"{name} options (with --attention {name})", _escape(info.summary))
        for opt in info.options:
            if opt.flag in names:
                continue
            owners = [m for m, _ in flags[opt.flag]]
            flag = opt.flag
            if flag in parser._option_string_actions:  # e.g. an option `width` vs generate's --width
                flag = f"--{'-'.join(owners)}-{opt.name.replace('_', '-')}"
            names[opt.flag] = flag
            if opt.kind is bool:
                mgroup.add_argument(flag, dest=_dest(opt), action=argparse.BooleanOptionalAction, default=None,
                                    help=_option_help(opt, owners))
            else:
                mgroup.add_argument(flag, dest=_dest(opt), default=None, metavar=_metavar(opt),
                                    help=_option_help(opt, owners))
    parser.set_defaults(method_flag_names=names)
    if schedule:
        sparse = [n for n in registry if n != "dense"]
        sched = parser.add_argument_group(
            "schedule (sparse methods)", f"where a sparse method ({', '.join(sparse)}) runs dense instead")
        for opt in SCHEDULE_OPTIONS:
            sched.add_argument(opt.flag, dest=_sched_dest(opt), default=None, metavar="N",
                               help=_escape(f"{opt.help}; {opt.range_text()} (default: {opt.default}, "
                                            "or the preset's)"))
        parser.add_argument(
            "--on-unsupported", choices=("error", "dense"), default="error",
            help="what to do where the method cannot run: stop with an error, or log and run dense",
        )


def _parse_value(flag: str, opt, value: Any) -> Any:
    try:
        return opt.check(value) if isinstance(value, bool) else opt.parse(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{flag}: {err}") from None


def _given(args: argparse.Namespace, dest: str) -> Any:
    return getattr(args, dest, None)


def resolve_attention(args: argparse.Namespace, *, default_method: str = "dense", schedule: bool = True):
    """The (method config, schedule) the flags describe.

    --preset picks the method and schedule (--attention, if given, must name the same method); a flag not
    given keeps the preset's value, else the option default. A flag of a method that is not selected, or a
    schedule flag with dense attention, is an error rather than silently ignored.
    """
    from accel.methods.registry import method_info, methods
    from accel.presets import preset as get_preset
    from accel.schedule import SCHEDULE_OPTIONS, Schedule

    p = get_preset(args.preset) if getattr(args, "preset", None) else None
    name = args.attention
    if p is not None:
        if name is not None and name != p.method.name:
            raise ValueError(f"--preset {p.name} is a {p.method.name} preset, not {name}; "
                             f"use --attention {p.method.name} or drop --attention")
        name = p.method.name
    info = method_info(name or default_method)
    values: dict[str, Any] = {}
    flag_names = getattr(args, "method_flag_names", {})
    for option_flag, owners in _method_flags().items():
        value = _given(args, _dest(owners[0][1]))
        if value is None:
            continue
        flag = flag_names.get(option_flag, option_flag)
        names = [m for m, _ in owners]
        if info.name not in names:
            what = f"a {names[0]} option" if len(names) == 1 else f"an option of {', '.join(names)}"
            fix = " or ".join(f"--attention {m}" for m in names)
            raise ValueError(f"{flag} is {what}; add {fix}")
        opt = next(o for m, o in owners if m == info.name)
        values[opt.name] = _parse_value(flag, opt, value)
    method = dataclasses.replace(p.method, **values) if p is not None else info.build(values)
    sched_values: dict[str, Any] = {}
    if schedule:
        for opt in SCHEDULE_OPTIONS:
            value = _given(args, _sched_dest(opt))
            if value is None:
                continue
            if info.name == "dense":
                sparse = [n for n in methods() if n != "dense"]
                fix = " or ".join(f"--attention {m}" for m in sparse)
                raise ValueError(f"{opt.flag} schedules a sparse method, but attention is dense; add {fix}")
            sched_values[opt.name] = _parse_value(opt.flag, opt, value)
    base = p.schedule if p is not None else Schedule()
    return method, dataclasses.replace(base, **sched_values)


def all_dense_error(schedule, steps: int, layers: int, method_name: str) -> str | None:
    """The error for a schedule under which no (step, layer) call would run `method_name`, or None."""
    if schedule.why_all_dense(steps, layers) is None:
        return None
    dense_layers = schedule.dense_layers
    covered_layers = dense_layers if isinstance(dense_layers, int) else len(set(dense_layers) & set(range(layers)))
    tail = f"no call would run {method_name}"
    if covered_layers >= layers:
        return f"dense_layers={dense_layers} covers all {layers} transformer layers: {tail}; lower --dense-layers"
    if schedule.dense_last_steps == 0:
        return (f"dense_steps={schedule.dense_steps} covers all {steps} denoising steps: {tail}; "
                "lower --dense-steps or raise --steps")
    if schedule.dense_steps == 0:
        return (f"dense_last_steps={schedule.dense_last_steps} covers all {steps} denoising steps: {tail}; "
                "lower --dense-last-steps or raise --steps")
    return (f"dense_steps={schedule.dense_steps} + dense_last_steps={schedule.dense_last_steps} cover all "
            f"{steps} denoising steps: {tail}; lower --dense-steps/--dense-last-steps or raise --steps")


def check_method_fits(method: Any, pipe: Any, settings: dict) -> None:
    """Fail before denoising when the method cannot take this size (e.g. a window longer than an axis).

    Only the geometry is checked here (heads, head size and dtype are checked per call by the runtime).
    """
    import torch

    from accel.geometry import TokenLayout
    from accel.pipelines.families import family_for_pipeline

    family = family_for_pipeline(pipe)
    if family is None:
        return  # unknown geometry: the runtime decides per call
    grid = family.facts.geometry(pipe).token_grid(int(settings.get("num_frames", 1)), int(settings["height"]),
                                                  int(settings["width"]))
    layout = TokenLayout(1, *grid)
    try:
        method.can_run(layout, 1, 64, torch.float16, torch.device("cpu"), raise_error=True)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(f"{method.name} attention cannot run at {settings['height']}x{settings['width']}"
                         f"{' x ' + str(settings['num_frames']) + ' frames' if 'num_frames' in settings else ''} "
                         f"(token grid {'x'.join(map(str, grid))}): {err}") from None


def count_attention_layers(pipe: Any) -> int | None:
    """Self-attention layers of the pipeline's transformer, as the schedule numbers them (None: unknown)."""
    from accel.pipelines.families import adapter_for

    transformer = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    if transformer is None:
        return None
    adapter = adapter_for(transformer)
    if adapter is not None:
        sites = adapter.self_attention_sites(transformer)
        if sites:
            return len(sites)
    layers = getattr(getattr(transformer, "config", None), "num_layers", None)
    return int(layers) if isinstance(layers, int) and layers > 0 else None


def _schedule_text(schedule) -> str:
    changed = [f"{f.name}={getattr(schedule, f.name)}" for f in dataclasses.fields(schedule)
               if getattr(schedule, f.name) != f.default]
    return ",".join(changed) or "none"


# ---------------------------------------------------------------------------------------------- output paths


def check_writable(path: str | os.PathLike) -> Path:
    """Create the folder of `path` and prove it takes a file (root passes os.access checks, /proc refuses)."""
    import tempfile

    out = Path(path).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise PermissionError(f"cannot create output folder {parent}: a file of that name exists")
    if out.is_dir():
        raise PermissionError(f"output path {out} is a folder; give a file name")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".accel-write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"output path is not writable: {out} ({err.strerror or err})") from None
    return out


# ---------------------------------------------------------------------------------------------- generate


def torchrun_command(gpus: int, argv: list[str]) -> list[str]:
    """The command that reruns `accel <argv>` as `gpus` processes under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "accel.cli", *argv]


def _distributed_setup(gpus: int):
    """Inside torchrun: one GPU per process, NCCL, and the rank (0 writes the video)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
        raise ValueError(f"--gpus {gpus} needs {gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl")
    return torch.distributed.get_rank(), torch.device("cuda", local_rank)


def check_tiny_size(
    model: str, height: int | None, width: int | None, frames: int | None, steps: int | None = None
) -> None:
    """Before loading: a tiny-* model's size rules and the CLI's size limit (ValueError naming the field)."""
    from accel.pipelines.tiny import TINY_MODELS, valid_size

    spec = TINY_MODELS.get(model)
    if spec is None:
        return
    import inspect

    h, w = height or spec.height, width or spec.width
    steps = {"steps": steps or spec.num_inference_steps} if "steps" in inspect.signature(valid_size).parameters else {}
    valid_size(model, h, w, frames or spec.num_frames, **steps)  # the model's multiples (and maxima, where known)
    for field, value in (("height", h), ("width", w)):
        if value > TINY_MAX_PIXELS:
            raise ValueError(f"{model}: {field}={value} is above the tiny models' limit of {TINY_MAX_PIXELS} px")


def check_lora_file(path: str) -> None:
    """Before loading the model: the LoRA exists and is not pickled (generate.py's check where it has one)."""
    from accel.pipelines import generate

    check = getattr(generate, "check_lora_path", None)
    if check is not None:
        check(path)
    elif not Path(path).expanduser().exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")


def _looks_like_full_model(model: str) -> bool:
    from accel.pipelines.tiny import TINY_MODELS

    if model in TINY_MODELS:
        return False
    local = Path(model).expanduser()
    return local.is_dir() or (model.count("/") == 1 and not model.startswith((".", "/", "~")))


def settings_line(model: str, pipe: Any, settings: dict, method, schedule, steps: int, layers: int | None) -> str:
    """One line with what is about to run: model, device, dtype, size, frames, steps, method, schedule."""
    from accel.methods.registry import method_label

    transformer = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    dtype = str(getattr(transformer, "dtype", "?")).removeprefix("torch.")
    text = (f"settings: model={model} device={getattr(pipe, 'device', '?')} dtype={dtype} "
            f"size={settings['height']}x{settings['width']} (HxW) frames={settings.get('num_frames', 1)} "
            f"steps={steps} method={method_label(method)}")
    if method.name != "dense":
        text += f" schedule={_schedule_text(schedule)}"
        if layers:
            text += f" ({schedule.sparse_share(steps, layers):.0%} of attention calls sparse)"
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    import inspect

    from tqdm import tqdm

    from accel.pipelines.generate import (
        GenerationRequest,
        check_output_path,
        default_device,
        load_lora,
        load_pipeline,
        resolve_settings,
        run_generation,
        write_video,
    )

    # Everything that can be checked without the model fails here, before torchrun, loading and denoising.
    out = check_writable(check_output_path(args.out))
    method, schedule = resolve_attention(args, default_method="dense")
    from accel.guidance.cli import guidance_from_args

    guidance = guidance_from_args(args)
    check_tiny_size(args.model, args.height, args.width, args.frames, args.steps)
    if args.lora:
        check_lora_file(args.lora)
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise ValueError(f"--gpus {args.gpus} needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}")
        sys.stdout.flush()
        os.execv(sys.executable, torchrun_command(args.gpus, sys.argv[1:]))
    rank, device = (0, None) if args.gpus <= 1 else _distributed_setup(args.gpus)
    if rank == 0 and _looks_like_full_model(args.model) and (device or default_device()).type == "cpu":
        print(f"warning: {args.model} is a full-size model and there is no GPU: generating on CPU will take "
              "hours; use a CUDA machine, or a tiny-* model to try things out", file=sys.stderr)
    request = GenerationRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
        height=args.height, width=args.width, steps=args.steps, seed=args.seed,
        guidance_scale=args.guidance_scale, lora=args.lora, lora_scale=args.lora_scale,
    )
    pipe = load_pipeline(args.model, device=device)
    pipe.set_progress_bar_config(disable=True)
    settings = resolve_settings(pipe, args.model, request)
    steps = int(settings["num_inference_steps"])
    layers = count_attention_layers(pipe)
    if method.name != "dense":
        problem = all_dense_error(schedule, steps, layers or _layers_unknown(schedule), method.name)
        if problem:
            raise ValueError(problem)
        if args.on_unsupported == "error":
            check_method_fits(method, pipe, settings)
    if args.gpus > 1:
        from accel.pipelines.generate import enable_ulysses

        enable_ulysses(pipe, args.gpus)
    if args.lora:
        load_lora(pipe, args.lora, args.lora_scale)
    if rank == 0:
        print(settings_line(args.model, pipe, settings, method, schedule, steps, layers), flush=True)
        if guidance is not None:
            from accel.guidance.cli import describe_guidance

            print(describe_guidance(guidance), flush=True)
    bar = tqdm(total=steps, desc=f"{method.name} denoising", unit="step", disable=rank != 0)

    def on_step(i: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(max(i - bar.n, 0))

    def on_phase(phase: str) -> None:
        bar.set_description_str(f"{method.name} {phase}")

    kwargs: dict[str, Any] = {"on_step": on_step}
    if guidance is not None:
        kwargs["guidance"] = guidance
    if "on_phase" in inspect.signature(run_generation).parameters:
        kwargs["on_phase"] = on_phase
    try:
        result = run_generation(
            pipe, request, method=method, schedule=schedule, on_unsupported=args.on_unsupported, **kwargs
        )
    finally:
        bar.close()
    if rank == 0:
        write_video(result.frames, out, result.fps)
        print(result.summary())
        print(f"wrote {out}")
    return 0


def _layers_unknown(schedule) -> int:
    """A layer count that lets the check look at steps only (the transformer's layers are unknown)."""
    dense_layers = schedule.dense_layers
    return (dense_layers if isinstance(dense_layers, int) else max(dense_layers, default=-1) + 1) + 1


# ---------------------------------------------------------------------------------------------- mask


def cmd_mask(args: argparse.Namespace) -> int:
    import inspect

    import torch

    from accel.methods.registry import methods
    from accel.pipelines.models import layout_for_model

    out = check_writable(args.out)
    method, _ = resolve_attention(args, default_method=MASK_DEFAULT_METHOD, schedule=False)
    visualize = getattr(method, "visualize", None)
    if method.name == "dense" or not callable(visualize):
        drawable = [n for n, info in methods().items()
                    if n != "dense" and callable(getattr(info.cls, "visualize", None))]
        why = " (every query attends to every key)" if method.name == "dense" else ""
        raise ValueError(f"{method.name} attention has no mask{why}; use --attention {' or '.join(drawable)}")
    if getattr(method, "block_size", 0) is None:  # the mask a GPU would use (128-token blocks on current GPUs)
        method = dataclasses.replace(method, block_size=128)
    layout = layout_for_model(args.model, args.frames, args.height, args.width)
    plan = method.build_plan(layout, 1, torch.device("cpu"))
    # Methods whose picture needs the token layout (the base class's token-mask drawing) take it by keyword.
    takes_layout = "layout" in inspect.signature(visualize).parameters
    visualize(plan, out, **({"layout": layout} if takes_layout else {}))
    print(
        f"{args.model}: {layout.frames} latent frames x {layout.height}x{layout.width} tokens "
        f"({layout.video_tokens} video tokens), {method.name} {method}: tile density {method.plan_density(plan):.1%}"
    )
    print(f"wrote {out}")
    return 0


def _gpu_benchmark(module: str):
    """`accel bench kernels|e2e`: hand the remaining arguments to the benchmark module's main."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest)

    return run


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    from accel.pipelines.generate import DEFAULT_MODEL, DEFAULT_PROMPT

    size = _int_type("size", 1)
    model_default = " (omit: the model's default)"

    gen = sub.add_parser("generate", help="generate a video (or image) and write an mp4",
                         formatter_class=_HelpFormatter,
                         description="Generate a video (or image) with the chosen self-attention method.")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help="built-in model (accel-demo: the learned demo; tiny-*: random test models), local "
                          "diffusers folder or Hub id")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    gen.add_argument("--negative-prompt", help="negative prompt (omit: none)")
    gen.add_argument("--frames", type=_int_type("frames", 1, note=model_default), metavar="N",
                     help="frames to generate, >= 1" + model_default)
    gen.add_argument("--height", type=_int_type("height", 1, note=model_default), metavar="PX",
                     help="height in pixels, >= 1" + model_default)
    gen.add_argument("--width", type=_int_type("width", 1, note=model_default), metavar="PX",
                     help="width in pixels, >= 1" + model_default)
    gen.add_argument("--steps", type=_int_type("steps", 1, note=model_default), metavar="N",
                     help="denoising steps, >= 1" + model_default)
    gen.add_argument("--seed", type=_int_type("seed", 0, 2**63 - 1), default=0, metavar="N",
                     help="random seed, 0 to 2**63-1")
    gen.add_argument("--guidance-scale", type=_float_type("guidance_scale", 0.0, 100.0), metavar="X",
                     help="classifier-free guidance scale, 0 to 100" + model_default)
    gen.add_argument("--lora", help="diffusers-format LoRA (.safetensors file or folder; omit: none)")
    gen.add_argument("--lora-scale", type=_float_type("lora_scale", -100.0, 100.0), default=1.0, metavar="X",
                     help="LoRA strength, -100 to 100")
    gen.add_argument("--out", default="outputs/video.mp4", help="output .mp4 path")
    gen.add_argument("--gpus", type=_int_type("gpus", 1), default=1, metavar="N",
                     help="GPUs for one generation, >= 1 (Ulysses context parallelism via torchrun)")
    _add_attention_args(gen, default_method="dense", schedule=True)
    from accel.guidance.cli import add_guidance_args, add_heads_command

    add_guidance_args(gen)
    gen.set_defaults(func=cmd_generate)

    mask = sub.add_parser("mask", help="render a sparse method's block mask as a PNG and print its density",
                          formatter_class=_HelpFormatter,
                          description="Render the block mask of a sparse attention method as a PNG.")
    mask.add_argument("--model", required=True, help="model id or family (wan, hunyuan_video, ...)")
    mask.add_argument("--frames", type=size, required=True, metavar="N", help="video frames, >= 1")
    mask.add_argument("--height", type=size, required=True, metavar="PX", help="height in pixels, >= 1")
    mask.add_argument("--width", type=size, required=True, metavar="PX", help="width in pixels, >= 1")
    mask.add_argument("--out", default="mask.png", help="output picture (.png)")
    _add_attention_args(mask, default_method=MASK_DEFAULT_METHOD, schedule=False)
    mask.set_defaults(func=cmd_mask)

    from accel.bench.eval import add_eval_command
    from accel.bench.fidelity import add_fidelity_command
    from accel.lora.cli import add_make_dataset_command, add_train_lora_command
    from accel.ui.cli import add_ui_command

    add_ui_command(sub)
    add_make_dataset_command(sub)
    add_train_lora_command(sub)
    add_eval_command(sub)
    add_heads_command(sub)
    bench = sub.add_parser("bench", help="GPU benchmarks (kernels, e2e) and the attention fidelity benchmark",
                           formatter_class=_HelpFormatter)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, module, text in (
        ("kernels", "accel.bench.kernels", "block-sparse kernel vs cuDNN / FlashAttention SDPA / flex (GPU)"),
        ("e2e", "accel.bench.e2e", "full-size transformer forwards, dense vs radial, 50-step totals (GPU)"),
        ("methods", "accel.bench.methods",
         "any method (neighborhood, pyramid, ...) at model shapes vs cuDNN SDPA and flex_attention (GPU)"),
        ("train", "accel.lora.bench", "LoRA training step time and memory, dense cuDNN vs radial (GPU)"),
    ):
        gpu = bench_sub.add_parser(name, help=text, add_help=False)
        gpu.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (--help lists them)")
        gpu.set_defaults(func=_gpu_benchmark(module))
    add_fidelity_command(bench_sub)
    return parser


# ---------------------------------------------------------------------------------------------- main


def check_device(text: str) -> None:
    """A --device value names a device this machine has (ValueError with the fix otherwise)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device; use cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {text}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available here; use --device cpu")


_HANDLED = (ValueError, TypeError, NotImplementedError, OSError)


def _cuda_error(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, (RuntimeError, AssertionError)) and ("CUDA" in text or "cuda" in text)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at devnull so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests' capture)
        pass


def _flush_stdout() -> bool:
    """Flush stdout; False (and stdout silenced) when its reader went away."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return False
    return True


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = unknown + list(args.rest)  # `accel bench kernels|e2e` pass their options through
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if isinstance(getattr(args, "device", None), str):
            check_device(args.device)
        return args.func(args)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as err:
        if args.verbose or not (isinstance(err, _HANDLED) or _cuda_error(err)):
            raise
        message = str(err) or type(err).__name__
        if _cuda_error(err) and "--device" not in message:
            message += " (no usable CUDA GPU here: use --device cpu)"
        print(f"error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`accel ...`: one-line "error: ..." messages (exit 2), "interrupted" on Ctrl-C (exit 130), quiet on a
    closed pipe (`accel --help | head -1`); -v/--verbose shows the traceback instead."""
    try:
        code = _run(argv)
    except SystemExit:  # argparse: --help, usage errors
        _flush_stdout()
        raise
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:  # Ctrl-C while parsing (imports) or with --verbose off before args existed
        given = sys.argv[1:] if argv is None else argv
        if "-v" in given or "--verbose" in given:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return code if _flush_stdout() else 1


if __name__ == "__main__":
    sys.exit(main())
