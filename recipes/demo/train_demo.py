"""Train the learned demo model of issue #17 from scratch and export it (the whole recipe, one command).

    python recipes/demo/train_demo.py --config recipes/demo/config.json            # GPU: the committed model
    python recipes/demo/train_demo.py --config recipes/demo/config.json --max-seconds 540   # a 10-minute slot
    python recipes/demo/train_demo.py --smoke --run /tmp/demo-run --weights /tmp/demo-weights   # CPU, seconds

Stages (see `accel.demo.recipe`): synthetic dataset -> stage 1 VAE -> stage 2 transformer with the project's
trainer (full-parameter mode) -> safetensors + manifest.json + training_curve.png in --weights. Rerunning the same
command after a kill, Ctrl-C or a spent --max-seconds resumes where it stopped (finished stages are reused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "recipes" / "demo" / "config.json",
                        help="recipe JSON (default: recipes/demo/config.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="the micro model and a handful of steps on CPU (ignores --config)")
    parser.add_argument("--run", type=Path, default=None,
                        help="run folder for data, cache and checkpoints (default: outputs/demo-run, or "
                             "outputs/demo-smoke with --smoke)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="where the exported weights go (default: accel/demo/weights; with --smoke: "
                             "<run>/weights)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="wall-clock limit of this call; stage 2 stops in time to export, a rerun continues")
    parser.add_argument("--device", default=None, help="override the recipe's device (cpu, cuda)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import dataclasses

    from accel.demo.model import DEFAULT_WEIGHTS
    from accel.demo.recipe import RecipeConfig, load_recipe, run_recipe

    config = RecipeConfig.smoke() if args.smoke else load_recipe(args.config)
    if args.device is not None:
        config = dataclasses.replace(config, device=args.device)
    run = args.run or ROOT / "outputs" / ("demo-smoke" if args.smoke else "demo-run")
    weights = args.weights or (run / "weights" if args.smoke else DEFAULT_WEIGHTS)
    summary = run_recipe(config, run, weights, max_seconds=args.max_seconds, progress=not args.no_progress)
    if "paused" in summary:
        print(f"{summary['paused']} (run folder {run})")
        return 0
    manifest = json.loads((weights / "manifest.json").read_text())
    print(f"stage 1: {summary['stage1']['steps']} steps in {summary['stage1']['seconds']:.0f} s; stage 2: "
          f"{summary['stage2']['step']} steps in {summary['stage2']['seconds']:.0f} s")
    print(f"wrote {weights} ({manifest['total_bytes'] / 1e6:.2f} MB of weights, "
          f"{sum(summary['parameters'].values()) / 1e6:.2f} M parameters) and {weights / 'training_curve.png'}")
    if "eval" in summary:
        e = summary["eval"]
        print(f"task metric: {e['match_rate']:.0%} of {e['count']} prompts match (colour {e['colour_rate']:.0%}, "
              f"direction {e['direction_rate']:.0%}, speed {e['speed_rate']:.0%}); {weights / 'eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
