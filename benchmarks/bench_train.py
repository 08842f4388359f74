"""LoRA training step time and peak memory, dense cuDNN vs radial, Wan2.1-1.3B config (H200); see accel.lora.bench.

    python benchmarks/bench_train.py --out benchmarks/results/train_h200.json     # same as `accel bench train`
"""

import sys

from accel.lora.bench import main

if __name__ == "__main__":
    sys.exit(main())
