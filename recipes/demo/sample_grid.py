"""A picture of what the learned demo model generates: one row per prompt, every `--every`-th frame.

    python recipes/demo/sample_grid.py                         # outputs/demo_samples.png
    python recipes/demo/sample_grid.py --out benchmarks/results/demo_samples.png

Each row is titled with its prompt and what `accel.demo.track` read from the video (direction, speed, match).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ("a red square moving right", "a large blue circle moving up fast", "a large red triangle moving left fast",
           "a small white triangle moving down fast")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), help="captions, one row each")
    parser.add_argument("--seed", type=int, default=0, help="seed of every row (default 0)")
    parser.add_argument("--every", type=int, default=4, help="show every N-th frame (default 4)")
    parser.add_argument("--weights", type=Path, default=None, help="demo weights folder (default: the committed one)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo_samples.png", help="PNG to write")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    sys.path.insert(0, str(ROOT))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from accel.bench.plotting import save_figure
    from accel.demo.evaluate import generate
    from accel.demo.experiments import demo_config
    from accel.demo.model import load_demo_pipeline
    from accel.demo.track import track

    pipe = load_demo_pipeline(args.weights)
    config = demo_config(args.weights)
    rows = []
    for prompt in tqdm(args.prompts, desc="generate"):
        video = generate(pipe, prompt, args.seed, config)
        rows.append((prompt, video, track(video, prompt)))
    import numpy as np

    frames = list(range(0, rows[0][1].shape[0], args.every))
    h, w = rows[0][1].shape[1:3]
    gap = np.full((h, max(2, w // 16), 3), 255, dtype=np.uint8)  # white between frames
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.5 * len(frames), 1.75 * len(rows)), squeeze=False)
    for ax, (prompt, video, result) in zip(axes[:, 0], rows, strict=True):
        strip = np.concatenate([part for f in frames for part in (video[f], gap)][:-1], axis=1)
        ax.imshow(strip)
        ax.set_xticks([(w + gap.shape[1]) * i + w / 2 for i in range(len(frames))])
        ax.set_xticklabels([f"frame {f}" for f in frames], fontsize=7)
        ax.set_yticks([])
        verdict = "match" if result.matches else "miss"
        ax.set_title(f'"{prompt}" (seed {args.seed}): tracked {result.direction}, {result.speed_class}, {verdict}',
                     fontsize=8)
    print(f"wrote {save_figure(fig, args.out, dpi=100)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
