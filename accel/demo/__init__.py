"""The learned demo model of issue #17: a small Wan-architecture text-to-video model trained from scratch on
`accel make-dataset` clips (one coloured shape moving over a dark background).

- `accel.demo.config`: every size in one place (`DEMO`, and `MICRO` for smoke tests), with the measured CPU
  generation time and the H200 training estimate.
- `accel.demo.tokenizer`: the word-level tokenizer (built in code; unknown words -> ``<unk>``).
- `accel.demo.vae`: stage 1, training the small `AutoencoderKLWan`.
- `accel.demo.recipe` (+ ``recipes/demo/train_demo.py``): data, stage 1, stage 2 with the project's trainer in
  full-parameter mode, export, training curve, task metric.
- `accel.demo.model`: `load_demo_pipeline()`, a diffusers `WanPipeline` from the committed safetensors, each file
  checked against ``manifest.json`` (size, sha256, dtype).
- `accel.demo.track` / `accel.demo.evaluate`: the task metric (does the shape have the caption's colour and move
  in its direction at its speed?) and PSNR/SSIM of a sparse method against dense.

Generation needs the demo call settings (`accel.demo.model.call_defaults`), in particular
``max_sequence_length`` = 16: the model was trained with 16 text tokens, and WanPipeline's default (512) would
pad the cross-attention with hundreds of extra zero tokens it never saw.
"""
