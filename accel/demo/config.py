"""Sizes of the learned demo model (issue #17), in one place: text encoder, VAE, transformer, shapes, defaults.

`DEMO` is the committed model; `MICRO` the same architecture at toy sizes for the CPU smoke test of the recipe.

Why these sizes (measured on the 2-core CPU of the dev machine with random weights of `DEMO`, torch 2.13, fp32):

- Weights: transformer 6.16 M, VAE 0.81 M, text encoder 0.08 M parameters = 7.05 M, stored as float16:
  14.13 MB of safetensors (12.33 + 1.63 + 0.17 MB; the issue's budget is 16 MB).
- Default generation, 128 x 128 x 17 frames, 20 Euler steps with CFG 5.0 (two batch-1 transformer calls per
  step): 9.9 s on the 2 CPU cores end to end (0.36 s for the first step incl. text encoding, 0.36 s per
  step after, VAE decode 2.7 s), well under the 30 s target. Measured 2026-12 with random weights of `DEMO`;
  a busy machine (another job on the cores) took 10x longer in one run, so the test does not assert a time.
- Token grid: VAE 8x spatial / 4x temporal and patch (1, 1, 1) give 5 x 16 x 16 = 1,280 video tokens at the
  training size (10 GPU tiles of 128, 80 CPU tiles of 16; 256 tokens = 2 GPU tiles per latent frame), and
  17 x 16 x 16 = 4,352 tokens for the 4x length extension (65 frames). Patch 1 rather than Wan's 2 buys 4x the
  tokens at the same pixel size, so the sparse methods have blocks to choose from while the VAE decode (the
  part of CPU generation that scales with pixels) stays at 128 px.
- Training (estimate for one H200, bf16 autocast): a forward pass costs about 22 GFLOP per clip (12 GFLOP of
  matmuls: ~4.7 M per-token weights x 2 x 1,280 tokens; 10 GFLOP of attention: 4 N^2 d x 6 layers), so a
  training step at batch 32 is ~2.1 TFLOP. At a pessimistic 10-20% of the H200's dense bf16 peak for
  d=256 matmuls that is 10-20 ms of compute, plus ~30-50 ms of Python, launch and cache-loading overhead: about
  15-25 steps/s, i.e. ~7,000-10,000 steps (~250k clips seen) in ~8 minutes of stage-2 stepping. The CPU
  measures ~100 GFLOP/s on the same model: 0.22 s per batch-1 forward, 0.65 s per batch-1 training step
  (forward + backward, ~66 GFLOP), which is what the FLOP count above predicts.
- `rope_max_seq_len=64` covers 512 px and 253 frames (64 latent frames): enough for 4x length extension.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STORAGE_DTYPES = ("float16", "bfloat16", "float32")


def _check_ints(obj: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{type(obj).__name__}.{name} must be a whole number >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class TextEncoderConfig:
    """A small `UMT5EncoderModel`, frozen, from a seeded random init.

    Why random and frozen: the trainer caches text embeddings once and trains only the transformer, so the text
    encoder must be fixed before stage 2 anyway; with a word-level vocabulary of 32 words a seeded random
    encoder is a fixed, distinct embedding per word and position, and the transformer's text projection and
    cross-attention learn to read it. Its weights are still committed, so loading never depends on torch's RNG.
    """

    d_model: int = 64
    d_kv: int = 16
    d_ff: int = 128
    num_layers: int = 2
    num_heads: int = 4
    relative_attention_num_buckets: int = 8
    max_sequence_length: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _check_ints(self, ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"))
        _check_ints(self, ("max_sequence_length",), 2)
        _check_ints(self, ("seed",), 0)


@dataclass(frozen=True)
class VAEConfig:
    """A small `AutoencoderKLWan`: 8x spatial and 4x temporal compression to `z_dim` channels."""

    base_dim: int = 16
    z_dim: int = 8
    dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mult", tuple(self.dim_mult))
        object.__setattr__(self, "temperal_downsample", tuple(self.temperal_downsample))
        _check_ints(self, ("base_dim", "z_dim", "num_res_blocks"))
        if len(self.dim_mult) != 4 or len(self.temperal_downsample) != 3:
            raise ValueError("VAEConfig needs 4 dim_mult and 3 temperal_downsample entries (WanPipeline assumes 8x "
                             f"spatial compression), got dim_mult={self.dim_mult}, "
                             f"temperal_downsample={self.temperal_downsample}")

    @property
    def spatial(self) -> int:
        return 2 ** len(self.temperal_downsample)

    @property
    def temporal(self) -> int:
        return 2 ** sum(self.temperal_downsample)


@dataclass(frozen=True)
class TransformerConfig:
    """A small `WanTransformer3DModel`; in/out channels come from the VAE and text_dim from the text encoder."""

    num_attention_heads: int = 4
    attention_head_dim: int = 64
    num_layers: int = 6
    ffn_dim: int = 768
    patch_size: tuple[int, int, int] = (1, 1, 1)
    freq_dim: int = 256
    rope_max_seq_len: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        _check_ints(self, ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim", "freq_dim",
                           "rope_max_seq_len"))
        if self.attention_head_dim % 2:
            raise ValueError(f"TransformerConfig.attention_head_dim must be even (rotary pairs), "
                             f"got {self.attention_head_dim}")
        if len(self.patch_size) != 3 or not all(isinstance(p, int) and p >= 1 for p in self.patch_size):
            raise ValueError(f"TransformerConfig.patch_size must be 3 whole numbers >= 1, got {self.patch_size!r}")


@dataclass(frozen=True)
class GenerationDefaults:
    """What `accel generate` runs the demo model with when the request leaves a field unset."""

    height: int = 128
    width: int = 128
    num_frames: int = 17
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    fps: int = 16

    def __post_init__(self) -> None:
        _check_ints(self, ("height", "width", "num_frames", "num_inference_steps", "fps"))
        if not isinstance(self.guidance_scale, (int, float)) or not self.guidance_scale >= 0:
            raise ValueError(f"GenerationDefaults.guidance_scale must be a number >= 0, got {self.guidance_scale!r}")


@dataclass(frozen=True)
class DemoModelConfig:
    """The whole demo model: its parts, the training clip shape, the flow shift and the storage dtype.

    Attributes:
        name: stored in the manifest; the loader rebuilds the model from the manifest's copy of this config.
        frames, height, width: the training clip shape (pixels); `generation` defaults to the same shape.
        shift: flow-matching time shift used in training and by the inference scheduler.
        storage_dtype: dtype of the committed safetensors ("float16", "bfloat16" or "float32").
    """

    name: str = "accel-demo"
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    frames: int = 17
    height: int = 128
    width: int = 128
    shift: float = 3.0
    storage_dtype: str = "float16"

    def __post_init__(self) -> None:
        parts = (("text", TextEncoderConfig), ("vae", VAEConfig), ("transformer", TransformerConfig),
                 ("generation", GenerationDefaults))
        for name, cls in parts:
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"DemoModelConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name))}")
        _check_ints(self, ("frames", "height", "width"))
        stride = self.vae.spatial * max(self.transformer.patch_size[1:])
        for name in ("height", "width"):
            if getattr(self, name) % max(stride, 16):
                raise ValueError(f"DemoModelConfig.{name} must be a multiple of {max(stride, 16)}, "
                                 f"got {getattr(self, name)}")
        if (self.frames - 1) % self.vae.temporal:
            raise ValueError(f"DemoModelConfig.frames must be {self.vae.temporal}k + 1, got {self.frames}")
        if not isinstance(self.shift, (int, float)) or not self.shift > 0:
            raise ValueError(f"DemoModelConfig.shift must be a number > 0, got {self.shift!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"DemoModelConfig.storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                             f"got {self.storage_dtype!r}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) of a training clip."""
        s, t = self.vae.spatial, self.vae.temporal
        return self.vae.z_dim, (self.frames - 1) // t + 1, self.height // s, self.width // s

    @property
    def video_tokens(self) -> int:
        """Transformer tokens of one training clip."""
        _, f, h, w = self.latent_shape
        pt, ph, pw = self.transformer.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    # -------------------------------------------------------------- keyword arguments of the diffusers parts

    def umt5_kwargs(self, vocab_size: int) -> dict[str, Any]:
        t = self.text
        return dict(vocab_size=vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
                    num_heads=t.num_heads, relative_attention_num_buckets=t.relative_attention_num_buckets,
                    dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

    def vae_kwargs(self) -> dict[str, Any]:
        v = self.vae
        return dict(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult), num_res_blocks=v.num_res_blocks,
                    temperal_downsample=list(v.temperal_downsample), latents_mean=[0.0] * v.z_dim,
                    latents_std=[1.0] * v.z_dim)

    def transformer_kwargs(self) -> dict[str, Any]:
        t = self.transformer
        return dict(patch_size=t.patch_size, num_attention_heads=t.num_attention_heads,
                    attention_head_dim=t.attention_head_dim, in_channels=self.vae.z_dim, out_channels=self.vae.z_dim,
                    text_dim=self.text.d_model, freq_dim=t.freq_dim, ffn_dim=t.ffn_dim, num_layers=t.num_layers,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=t.rope_max_seq_len)

    # -------------------------------------------------------------- JSON round trip (the manifest keeps a copy)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoModelConfig:
        """The config stored by `to_dict`; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"DemoModelConfig.from_dict needs a dict, got {type(data).__name__}")
        parts = {"text": TextEncoderConfig, "vae": VAEConfig, "transformer": TransformerConfig,
                 "generation": GenerationDefaults}
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kw[key] = _build(parts[key], value, f"DemoModelConfig.{key}")
            else:
                kw[key] = value
        return _build(cls, kw, "DemoModelConfig")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


DEMO = DemoModelConfig()

MICRO = DemoModelConfig(
    name="accel-demo-micro",
    text=TextEncoderConfig(d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2, max_sequence_length=12),
    vae=VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 1, 1, 1)),
    transformer=TransformerConfig(num_attention_heads=2, attention_head_dim=8, num_layers=1, ffn_dim=16, freq_dim=16),
    generation=GenerationDefaults(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=3.0),
    frames=5,
    height=32,
    width=32,
)
"""Toy sizes of the same architecture: the recipe's `--smoke` run trains and exports it in seconds on CPU."""

__all__ = ["DEMO", "MICRO", "STORAGE_DTYPES", "DemoModelConfig", "GenerationDefaults", "TextEncoderConfig",
           "TransformerConfig", "VAEConfig"]
