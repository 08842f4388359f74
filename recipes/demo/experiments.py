"""Run one experiment of issue #17 on the learned demo model (`accel.demo.experiments`).

    python recipes/demo/experiments.py fidelity [--weights DIR] [--out DIR] [--pairs N] [--device cpu|cuda]
                                                [--batch N] [--resume]
    python recipes/demo/experiments.py length [--lora DIR | --train-lora [--run-train]]
    python recipes/demo/experiments.py caches
    python recipes/demo/experiments.py heads [--search-pairs N] [--candidates L:H,...]

Writes ``<out>/demo_<experiment>.json`` (every raw number, settings, versions, git commit, device) and
``demo_<experiment>.png``, and prints the markdown table. ``--out`` defaults to ``outputs/bench``.

``--batch N`` generates N (prompt, seed) pairs per pipeline call (default 16 on cuda, where the demo model is
launch-bound and a batch costs about one video, 1 on cpu); each video keeps its own seed's noise, a row's seconds
is its share of the call, and cache variants run at batch 1 (a cache's skip decision is batch-wide).

The JSON is rewritten after every variant (``"complete": false`` and the ``remaining`` labels until the last), so
a run stopped by ``timeout`` (SIGTERM) keeps every finished variant. ``--resume`` reuses the variants of an
existing ``<out>/demo_<experiment>.json`` made with the same settings (all but the progress bar), model, weights,
device and pairs; the videos that later variants compare with are kept in ``<out>/demo_<experiment>_videos/``
(a reference variant whose videos are missing runs again). Without ``--resume`` a run starts over.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _positive(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"--{name} must be >= {minimum}, got {value}")
        return value

    return parse


def _number(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be a number, got {text!r}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"--{name} must be >= 0, got {text}")
        return value

    return parse


class Terminated(KeyboardInterrupt):
    """SIGTERM (as `timeout` sends), raised in the main thread so that the pipeline is unpatched on the way out."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def _heads(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        layer, sep, head = item.partition(":")
        if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--candidates items must be LAYER:HEAD, got {item!r}")
        pairs.append((int(layer), int(head)))
    if not pairs:
        raise argparse.ArgumentTypeError("--candidates must name at least one LAYER:HEAD")
    return tuple(pairs)


def build_parser() -> argparse.ArgumentParser:
    from accel.demo.experiments import DEFAULT_OUT, EXPERIMENTS

    parser = argparse.ArgumentParser(prog="experiments.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--weights", help="demo weights folder (default: the committed accel/demo/weights)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--pairs", type=_positive("pairs"), default=32, help="prompt/seed pairs (default 32)")
    parser.add_argument("--seeds", type=_positive("seeds"), default=2, help="seeds per prompt (default 2)")
    parser.add_argument("--steps", type=_positive("steps"), help="denoising steps (default: the model's, 20)")
    parser.add_argument("--frames", type=_positive("frames"),
                        help="frames to generate (fidelity, caches, heads; default: the model's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup", type=_positive("warmup", 0),
                        help="untimed generations (chunks of --batch videos) per variant (default: 1 on cuda, "
                             "0 on cpu)")
    parser.add_argument("--batch", type=_positive("batch"),
                        help="videos per pipeline call (default: 16 on cuda, 1 on cpu; cache variants run at 1)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the variants of an existing <out>/demo_<experiment>.json made with the same "
                             "settings instead of generating them again")
    parser.add_argument("--no-progress", action="store_true")
    f = parser.add_argument_group("fidelity")
    f.add_argument("--methods", default="radial,pyramid,neighborhood",
                   help="comma-separated: radial, pyramid, neighborhood, binary (block top-k)")
    ln = parser.add_argument_group("length and caches")
    ln.add_argument("--radial", help="radial spec (default: length_radial_spec / the sparsest fidelity radial)")
    ln.add_argument("--lora", help="length-extension LoRA folder (length: adds the radial + LoRA row)")
    ln.add_argument("--train-lora", action="store_true",
                    help="length: print the commands that train the length LoRA (with --run-train: train it, then "
                         "run the experiment with it)")
    ln.add_argument("--run-train", action="store_true", help="with --train-lora: run the training")
    ln.add_argument("--lora-run", default="outputs/demo-length-lora", help="LoRA run folder (data, cache, lora/)")
    ln.add_argument("--lora-steps", type=_positive("lora-steps"), default=600)
    ln.add_argument("--lora-clips", type=_positive("lora-clips"), default=256)
    ln.add_argument("--lora-batch", type=_positive("lora-batch"), default=8)
    ln.add_argument("--fbc-threshold", type=_number("fbc-threshold"), default=0.05)
    ln.add_argument("--mag-threshold", type=_number("mag-threshold"), default=0.06)
    h = parser.add_argument_group("heads")
    h.add_argument("--search-pairs", type=_positive("search-pairs"), default=4)
    h.add_argument("--candidates", type=_heads, help="LAYER:HEAD,... candidate pool (default: every head)")
    h.add_argument("--top-k", type=_positive("top-k"), default=2)
    h.add_argument("--rounds", type=_positive("rounds"), default=1)
    h.add_argument("--strength", type=_number("strength"), default=1.0)
    h.add_argument("--scale", type=_number("scale"), default=3.0)
    return parser


def default_batch(device: str) -> int:
    """Videos per pipeline call when --batch is not given: 16 on cuda (launch-bound demo model), 1 on cpu."""
    return 16 if device == "cuda" else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from accel.demo import experiments as E

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible here")
    if args.experiment != "length" and (args.lora or args.train_lora or args.run_train):
        parser.error("--lora, --train-lora and --run-train belong to the length experiment")
    if args.run_train and not args.train_lora:
        parser.error("--run-train needs --train-lora")
    if args.lora and args.train_lora:
        parser.error("give --lora (an existing LoRA) or --train-lora (train one), not both")
    if args.lora and not Path(args.lora).exists():
        parser.error(f"--lora {args.lora} does not exist")
    if args.experiment == "length" and args.frames is not None:
        parser.error("--frames does not apply to length (it generates N and 4N frames of the model)")
    if args.experiment == "heads" and args.strength > 1:
        parser.error(f"--strength must be in [0, 1], got {args.strength}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        E.fidelity_specs((5, 16, 16), methods)
        settings = E.RunSettings(pairs=args.pairs, seeds=args.seeds, steps=args.steps, frames=args.frames,
                                 warmup=args.warmup if args.warmup is not None else int(args.device == "cuda"),
                                 batch=args.batch if args.batch is not None else default_batch(args.device),
                                 progress=not args.no_progress)
        if args.radial:
            from accel.methods.registry import parse_method_spec

            if parse_method_spec(args.radial).method.name != "radial":
                raise ValueError(f"--radial must be a radial spec, got {args.radial!r}")
    except ValueError as err:
        parser.error(str(err))
    lora_config = E.LengthLoRAConfig(steps=args.lora_steps, clips=args.lora_clips, batch_size=args.lora_batch)
    lora = args.lora
    if args.train_lora:
        commands = E.train_lora_commands(args.weights, args.lora_run, args.device, lora_config)
        if not args.run_train:
            print("`accel train-lora --model` cannot load the demo model (a manifest folder read by "
                  "load_demo_pipeline, not a diffusers folder), so the LoRA is trained by the same trainer "
                  "through accel.demo.experiments.train_length_lora. Commands:")
            print("\n".join(commands))
            return 0
        lora = E.train_length_lora(args.weights, args.lora_run, lora_config, device=args.device,
                                   progress=not args.no_progress)
        print(f"length LoRA: {lora}")

    from accel.demo.model import load_demo_pipeline

    pipe = load_demo_pipeline(args.weights, device=args.device)
    config = E.demo_config(args.weights)
    common = {"device": args.device, "weights": args.weights, "out": args.out, "resume": args.resume}
    path = E.report_path(args.out, args.experiment)
    started = time.time()
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: keep the default handling
        previous = None
    try:
        if args.experiment == "fidelity":
            report = E.run_fidelity(pipe, config, settings, methods=methods, **common)
        elif args.experiment == "length":
            report = E.run_length(pipe, config, settings, radial=args.radial, lora=lora, **common)
        elif args.experiment == "caches":
            report = E.run_caches(pipe, config, settings, radial=args.radial,
                                  caches=E.CacheSettings(first_block_threshold=args.fbc_threshold,
                                                         mag_threshold=args.mag_threshold), **common)
        else:
            search = E.HeadSearchSettings(pairs=args.search_pairs, candidates=args.candidates, rounds=args.rounds,
                                          top_k=args.top_k, strength=args.strength, scale=args.scale)
            report = E.run_heads(pipe, config, settings, search, **common)
    except KeyboardInterrupt as err:
        done = path.is_file() and path.stat().st_mtime >= started
        kept = f"the finished variants are in {path}" if done else "no variant had finished"
        print(f"stopped ({'SIGTERM' if isinstance(err, Terminated) else 'interrupted'}): {kept}; rerun with "
              "--resume to continue", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    path = E.write_report(report, args.out, E.PLOTS[args.experiment])
    print(report["table"])
    for note in report.get("notes", []):
        print(f"- {note}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
