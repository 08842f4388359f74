"""`accel` command line: generate videos with sparse attention and inspect attention masks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ATTENTION_CHOICES = ("dense", "radial")


def _add_attention_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attention")
    group.add_argument("--attention", choices=ATTENTION_CHOICES, default="dense", help="self-attention method")
    group.add_argument("--preset", help="radial preset (e.g. wan2.1-14b, hunyuan-video); sets method and schedule")
    group.add_argument("--decay", type=float, help="radial: window decay factor (reference default 1.0)")
    group.add_argument("--block-size", type=int, help="radial: block size in tokens (default: per GPU)")
    group.add_argument("--sink", dest="sink", action="store_true", default=None, help="radial: frame-0 sink")
    group.add_argument("--no-sink", dest="sink", action="store_false", help="radial: no frame-0 sink")
    group.add_argument("--spatial", choices=("band", "disk"), help="radial: 1-D raster band or 2-D disk window")
    group.add_argument("--decay-near", action="store_true", default=None, help="radial: also decay adjacent frames")
    sched = parser.add_argument_group("schedule")
    sched.add_argument("--dense-steps", type=int, help="first N denoising steps run dense")
    sched.add_argument("--dense-last-steps", type=int, help="last M denoising steps run dense")
    sched.add_argument("--dense-layers", type=int, help="first N transformer layers run dense")
    parser.add_argument(
        "--on-unsupported", choices=("error", "dense"), default="error",
        help="what to do where the method cannot run: stop with an error, or log and run dense",
    )


def method_and_schedule(args: argparse.Namespace):
    """Build the method config and schedule the CLI options describe (options override a preset)."""
    import dataclasses

    from accel.methods.dense import Dense
    from accel.schedule import Schedule

    schedule = Schedule()
    if args.attention == "dense":
        if args.preset:
            raise ValueError("--preset applies to sparse methods; add --attention radial")
        method = Dense()
    else:
        from accel.methods.radial import Radial
        from accel.presets import radial_preset

        method, schedule = radial_preset(args.preset) if args.preset else (Radial(), Schedule())
        overrides = {
            name: value
            for name, value in (
                ("decay", args.decay), ("block_size", args.block_size), ("sink", args.sink),
                ("spatial", args.spatial), ("decay_near", args.decay_near),
            )
            if value is not None
        }
        method = dataclasses.replace(method, **overrides)
    sched_overrides = {
        name: value
        for name, value in (
            ("dense_steps", args.dense_steps), ("dense_last_steps", args.dense_last_steps),
            ("dense_layers", args.dense_layers),
        )
        if value is not None
    }
    return method, dataclasses.replace(schedule, **sched_overrides)


def torchrun_command(gpus: int, argv: list[str]) -> list[str]:
    """The command that reruns `accel <argv>` as `gpus` processes under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "accel.cli", *argv]


def _distributed_setup(gpus: int):
    """Inside torchrun: one GPU per process, NCCL, and the rank (0 writes the video)."""
    import os

    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
        raise ValueError(f"--gpus {gpus} needs {gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl")
    return torch.distributed.get_rank(), torch.device("cuda", local_rank)


def cmd_generate(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from accel.pipelines.generate import (
        GenerationRequest,
        check_output_path,
        load_lora,
        load_pipeline,
        run_generation,
        write_video,
    )

    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise ValueError(f"--gpus {args.gpus} needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}")
        os.execv(sys.executable, torchrun_command(args.gpus, sys.argv[1:]))
    out = check_output_path(args.out)
    method, schedule = method_and_schedule(args)
    rank, device = (0, None) if args.gpus <= 1 else _distributed_setup(args.gpus)
    request = GenerationRequest(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
        height=args.height, width=args.width, steps=args.steps, seed=args.seed,
        guidance_scale=args.guidance_scale, lora=args.lora, lora_scale=args.lora_scale,
    )
    pipe = load_pipeline(args.model, device=device)
    pipe.set_progress_bar_config(disable=True)
    if args.gpus > 1:
        from accel.pipelines.generate import enable_ulysses

        enable_ulysses(pipe, args.gpus)
    if args.lora:
        load_lora(pipe, args.lora, args.lora_scale)
    bar = tqdm(total=None, desc=f"{args.attention} denoising", unit="step", disable=rank != 0)

    def on_step(i: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    try:
        result = run_generation(
            pipe, request, method=method, schedule=schedule, on_unsupported=args.on_unsupported, on_step=on_step
        )
    finally:
        bar.close()
    if rank == 0:
        write_video(result.frames, out, result.fps)
        print(result.summary())
        print(f"wrote {out}")
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    import torch

    from accel.methods.radial import Radial
    from accel.pipelines.models import layout_for_model

    args.attention = "radial"
    method, _ = method_and_schedule(args)
    assert isinstance(method, Radial)
    if method.block_size is None:  # the mask a GPU would use (128-token blocks on current GPUs)
        import dataclasses

        method = dataclasses.replace(method, block_size=128)
    layout = layout_for_model(args.model, args.frames, args.height, args.width)
    plan = method.build_plan(layout, 1, torch.device("cpu"))
    out = Path(args.out)
    method.visualize(plan, out)
    print(
        f"{args.model}: {layout.frames} latent frames x {layout.height}x{layout.width} tokens "
        f"({layout.video_tokens} video tokens), radial {method}: tile density {method.plan_density(plan):.1%}"
    )
    print(f"wrote {out}")
    return 0


def _gpu_benchmark(module: str):
    """`accel bench kernels|e2e`: hand the remaining arguments to the benchmark module's main."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video (or image) and write an mp4")
    gen.add_argument("--model", default="tiny-wan", help="tiny-* built-in model, local diffusers folder or Hub id")
    gen.add_argument("--prompt", default="a dog running on the beach at sunset")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--frames", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--lora", help="diffusers-format LoRA (.safetensors file or folder)")
    gen.add_argument("--lora-scale", type=float, default=1.0)
    gen.add_argument("--out", default="outputs/video.mp4", help="output .mp4 path")
    gen.add_argument("--gpus", type=int, default=1,
                     help="GPUs for one generation (Ulysses context parallelism via torchrun)")
    _add_attention_args(gen)
    gen.set_defaults(func=cmd_generate)

    mask = sub.add_parser("mask", help="render a radial block mask as a PNG and print its density")
    mask.add_argument("--model", required=True, help="model id or family (wan, hunyuan_video, ...)")
    mask.add_argument("--frames", type=int, required=True)
    mask.add_argument("--height", type=int, required=True)
    mask.add_argument("--width", type=int, required=True)
    mask.add_argument("--out", default="mask.png")
    _add_attention_args(mask)
    mask.set_defaults(func=cmd_mask)

    from accel.bench.eval import add_eval_command
    from accel.bench.fidelity import add_fidelity_command
    from accel.ui.cli import add_ui_command

    add_ui_command(sub)
    add_eval_command(sub)
    bench = sub.add_parser("bench", help="GPU benchmarks (kernels, e2e) and the attention fidelity benchmark")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, module, text in (
        ("kernels", "accel.bench.kernels", "block-sparse kernel vs cuDNN / FlashAttention SDPA / flex (GPU)"),
        ("e2e", "accel.bench.e2e", "full-size transformer forwards, dense vs radial, 50-step totals (GPU)"),
    ):
        gpu = bench_sub.add_parser(name, help=text, add_help=False)
        gpu.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (--help lists them)")
        gpu.set_defaults(func=_gpu_benchmark(module))
    add_fidelity_command(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = unknown + list(args.rest)  # `accel bench kernels|e2e` pass their options through
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, NotImplementedError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
