"""`accel make-dataset` and `accel train-lora`: parser construction and the commands behind them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accel.lora.synthetic import FORMATS


def _formatter():
    from accel.cli import _HelpFormatter

    return _HelpFormatter


def add_make_dataset_command(subparsers) -> argparse.ArgumentParser:
    """`accel make-dataset OUT`: synthetic captioned videos of moving shapes."""
    from accel.cli import _int_type

    p = subparsers.add_parser(
        "make-dataset", help="write a synthetic dataset of captioned moving-shape videos", formatter_class=_formatter(),
        description="Write captioned videos of moving shapes (colour, shape, direction, speed, size), deterministic "
                    "per seed, for tests, demos and LoRA training.")
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=_int_type("count", 1), default=16, metavar="N", help="number of clips")
    p.add_argument("--frames", type=_int_type("frames", 1), default=17, metavar="N", help="frames per clip")
    p.add_argument("--height", type=_int_type("height", 8), default=64, metavar="PX", help="height in pixels")
    p.add_argument("--width", type=_int_type("width", 8), default=64, metavar="PX", help="width in pixels")
    p.add_argument("--fps", type=_int_type("fps", 1), default=16, metavar="N", help="frames per second")
    p.add_argument("--seed", type=_int_type("seed", 0, 2**63 - 1), default=0, metavar="N", help="dataset seed")
    p.add_argument("--format", choices=FORMATS, default="mp4", help="video container")
    p.add_argument("--manifest", action="store_true",
                   help="captions in one metadata.jsonl instead of a .txt per clip")
    p.set_defaults(func=cmd_make_dataset)
    return p


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from accel.lora.synthetic import SyntheticConfig, make_dataset

    cfg = SyntheticConfig(count=args.count, frames=args.frames, height=args.height, width=args.width, fps=args.fps,
                          seed=args.seed, format=args.format)
    out = make_dataset(args.out, cfg, manifest=args.manifest)
    print(f"wrote {cfg.count} clips of {cfg.frames}x{cfg.height}x{cfg.width} to {out}")
    return 0


def add_train_lora_command(subparsers) -> argparse.ArgumentParser:
    """`accel train-lora`: LoRA (or full-parameter) fine-tuning with a sparse attention method."""
    from accel.cli import _float_type, _int_type

    p = subparsers.add_parser(
        "train-lora", help="fine-tune a LoRA (or all weights) with sparse attention on a video folder",
        formatter_class=_formatter(),
        description="Flow-matching fine-tuning of a Wan 2.1/2.2 or HunyuanVideo transformer patched with a sparse "
                    "attention method (radial by default), on cached latents. Multi-GPU: `accelerate launch -m "
                    "accel.cli train-lora ...`. Writes OUT/lora (diffusers + ComfyUI files, accel_lora.json) or "
                    "OUT/transformer.")
    p.add_argument("--model", default="tiny-wan", help="tiny-* built-in model, local diffusers folder or Hub id")
    p.add_argument("--data", required=True, help="folder of videos with .txt captions or metadata.jsonl/.csv")
    p.add_argument("--out", default="outputs/lora-run", help="run folder (checkpoints, logs, cache, result)")
    p.add_argument("--mode", choices=("lora", "full"), default="lora", help="LoRA adapters or every weight")
    p.add_argument("--rank", type=_int_type("rank", 1, 1024), default=16, metavar="N", help="LoRA rank")
    p.add_argument("--alpha", type=_float_type("alpha", 1e-6, 1e6), default=None, metavar="X",
                   help="LoRA alpha (scale alpha/rank; default: the rank)")
    p.add_argument("--targets", metavar="NAMES",
                   help="comma-separated peft target modules or one regex (default: self-attention q/k/v/out)")
    p.add_argument("--ffn", action="store_true", help="also adapt the feed-forward layers")
    p.add_argument("--attention", default="radial", metavar="SPEC",
                   help="method spec the transformer trains with, e.g. radial:decay=0.2,dense_layers=1 or dense")
    p.add_argument("--buckets", default="17x64x64", metavar="FxHxW,...",
                   help="training shapes frames x height x width; a clip goes to the longest it can fill")
    p.add_argument("--frame-stride", type=_int_type("frame_stride", 1), default=1, metavar="N",
                   help="take every N-th source frame")
    p.add_argument("--on-bad-data", choices=("skip", "error"), default="skip",
                   help="bad video / missing caption / too few frames: report and skip, or stop")
    p.add_argument("--steps", type=_int_type("steps", 1), default=100, metavar="N", help="optimizer steps")
    p.add_argument("--batch-size", type=_int_type("batch_size", 1), default=1, metavar="N", help="clips per batch")
    p.add_argument("--grad-accum", type=_int_type("grad_accum", 1), default=1, metavar="N",
                   help="micro-batches per optimizer step")
    p.add_argument("--lr", type=_float_type("lr", 1e-12, 1.0), default=1e-4, metavar="X", help="AdamW learning rate")
    p.add_argument("--warmup", type=_int_type("warmup", 0), default=10, metavar="N", help="linear warm-up steps")
    p.add_argument("--weight-decay", type=_float_type("weight_decay", 0.0, 10.0), default=0.0, metavar="X",
                   help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=_float_type("max_grad_norm", 0.0, 1e6), default=1.0, metavar="X",
                   help="gradient clipping norm (0: off)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="accelerate autocast precision (trainable weights stay float32)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations (more memory)")
    p.add_argument("--expert", choices=("high", "low"), help="Wan 2.2: train the high- or low-noise expert")
    p.add_argument("--shift", type=_float_type("shift", 1e-3, 100.0), default=None, metavar="X",
                   help="timestep shift (default: the family's, Wan 3.0, HunyuanVideo 7.0)")
    p.add_argument("--weighting", choices=("logit_normal", "uniform"), default="logit_normal",
                   help="timestep density")
    p.add_argument("--max-sequence-length", type=_int_type("max_sequence_length", 1, 4096), default=None,
                   metavar="N", help="text tokens (default: Wan 512, HunyuanVideo 256, tiny models 16)")
    p.add_argument("--seed", type=_int_type("seed", 0, 2**31 - 1), default=0, metavar="N", help="random seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    p.add_argument("--save-every", type=_int_type("save_every", 0), default=50, metavar="N",
                   help="checkpoint every N steps (0: only at the end and on SIGTERM/Ctrl-C)")
    p.add_argument("--keep", type=_int_type("keep", 2), default=3, metavar="N", help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--validate-every", type=_int_type("validate_every", 0), default=0, metavar="N",
                   help="render a validation video every N steps (0: never)")
    p.add_argument("--validation-prompt", help="validation prompt (default: the first clip's caption)")
    p.add_argument("--validation-steps", type=_int_type("validation_steps", 1), default=4, metavar="N",
                   help="denoising steps of the validation video")
    p.add_argument("--cache-dir", help="latent/text cache folder (default: OUT/cache)")
    p.add_argument("--device", help="cpu, cuda, ... (default: what accelerate picks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_lora)
    return p


def config_from_args(args: argparse.Namespace):
    """The `TrainConfig` of parsed `train-lora` arguments."""
    from accel.lora.dataset import parse_buckets
    from accel.lora.train import TrainConfig

    targets = None
    if args.targets:
        targets = (args.targets,) if any(c in args.targets for c in "\\*()|") else tuple(
            t.strip() for t in args.targets.split(",") if t.strip())
    return TrainConfig(
        model=args.model, data=Path(args.data), out=Path(args.out), mode=args.mode, rank=args.rank,
        alpha=float(args.rank if args.alpha is None else args.alpha), targets=targets, ffn=args.ffn,
        attention=args.attention, buckets=parse_buckets(args.buckets), frame_stride=args.frame_stride,
        on_bad_data=args.on_bad_data, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        mixed_precision=args.mixed_precision, gradient_checkpointing=not args.no_gradient_checkpointing,
        expert=args.expert, shift=args.shift, weighting=args.weighting, max_sequence_length=args.max_sequence_length,
        seed=args.seed, deterministic=args.deterministic, save_every=args.save_every, keep=args.keep,
        resume=args.resume, validate_every=args.validate_every, validation_prompt=args.validation_prompt,
        validation_steps=args.validation_steps, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        device=args.device, progress=not args.no_progress,
    )


def cmd_train_lora(args: argparse.Namespace) -> int:
    from accel.lora.train import train

    result = train(config_from_args(args))
    for err in result.skipped:
        print(f"skipped {err}", file=sys.stderr)
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}; continue with --resume",
              file=sys.stderr)
        return 130
    if result.output is None:  # not the main process of a multi-GPU run
        return 0
    loss = f", eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}" \
        if result.eval_loss_start is not None and result.eval_loss_end is not None else ""
    print(f"trained {result.step} steps{loss}; wrote {result.output}")
    return 0


__all__ = ["add_make_dataset_command", "add_train_lora_command", "cmd_make_dataset", "cmd_train_lora",
           "config_from_args"]
