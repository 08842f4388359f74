"""Tiny, fully offline diffusers pipelines for tests and the default demo.

Why this exists: diffusers' own test suites build their tiny pipelines from configs, but they still
download tokenizers (and the T5 config) from ``hf-internal-testing/*`` on the Hugging Face Hub. Our
tests and the offline demo must run with ``HF_HUB_OFFLINE=1`` and no network at all, so everything is
built in code here:

- tokenizers are ``tokenizers.Tokenizer(WordLevel)`` + ``Whitespace`` wrapped in
  ``transformers.PreTrainedTokenizerFast`` (any vocab works; unknown words map to ``<unk>``);
- text encoders (T5/UMT5/CLIP/Llama) are built from config objects and put in ``.eval()``;
- transformers and VAEs are small versions of the real architectures (2 heads, 2 layers, small head
  dims), sized so that the default generation still gives enough video tokens (>= 4 latent frames of
  >= 4x4 tokens) for sparse-attention mask tests, while running in seconds on a 2-core CPU.

Construction is seeded inside ``torch.random.fork_rng()`` so building a tiny pipeline never disturbs the
caller's global RNG, and two builds give identical weights.

Public API: one builder per family (``wan``, ``wan_i2v``, ``wan22``, ``hunyuan_video``, ``cogvideox``,
``ltx``, ``flux``, ``sd3``), the ``TINY_MODELS`` registry of :class:`TinySpec`, :func:`build_tiny`,
:func:`valid_size` and :func:`size_rules` (the latter also works for real hub pipelines).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "TinySpec",
    "TINY_MODELS",
    "build_tiny",
    "valid_size",
    "size_rules",
    "wan",
]

SEED = 0

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_WORDS = (
    "a an the of and in on with at to is are dog cat monkey dance dancing running walking city street "
    "forest sea sky sun moon night day red green blue white black yellow car bird fish tree flower "
    "mountain river snow rain person man woman child robot astronaut horse beach sunset video photo "
    "cinematic slow fast camera pan zoom close up wide shot"
).split()


def _seeded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` under a forked, seeded CPU RNG so the caller's global RNG state is untouched."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return fn(*args, **kwargs)

    return wrapper


def _tokenizer(model_max_length: int = 512, *, vocab_size: int = 64, eos: bool = True, bos: bool = False):
    """A WordLevel tokenizer built in code, wrapped in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in _WORDS:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = " ".join((["<s>"] if bos else []) + ["$A"] + (["</s>"] if eos else []))
    special = ([("<s>", vocab["<s>"])] if bos else []) + ([("</s>", vocab["</s>"])] if eos else [])
    if bos or eos:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=model_max_length,
    )


def _umt5(d_model: int = 32, vocab_size: int = 64):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg).eval()


def _t5(d_model: int = 32, vocab_size: int = 64):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _finish(pipe):
    # Modules are created in fp32 on CPU already; avoid ``pipe.to(dtype)`` (diffusers warns about it).
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
            comp.requires_grad_(False)
    return pipe


# --------------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2
# --------------------------------------------------------------------------------------------------


def _wan_transformer(**overrides):
    from diffusers import WanTransformer3DModel

    kw = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    kw.update(overrides)
    return WanTransformer3DModel(**kw)


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _wan_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=7.0)


@_seeded
def wan():
    """Tiny Wan 2.1 T2V ``WanPipeline`` (UMT5 text encoder, 2-layer transformer, tiny Wan VAE)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=_tokenizer(512),
        text_encoder=_umt5(32),
        vae=_wan_vae(),
        scheduler=_wan_scheduler(),
        transformer=_wan_transformer(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    name: str
    family: str
    build: Callable[[], Any]
    is_video: bool
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    call_defaults: dict = field(default_factory=dict)
    fps: int = 8


TINY_MODELS: dict[str, TinySpec] = {}


def _register(spec: TinySpec) -> None:
    TINY_MODELS[spec.name] = spec


_register(
    TinySpec(
        name="tiny-wan",
        family="wan",
        build=wan,
        is_video=True,
        height=64,
        width=64,
        num_frames=17,
        num_inference_steps=2,
        call_defaults={"max_sequence_length": 16, "guidance_scale": 5.0},
        fps=16,
    )
)


def build_tiny(name: str):
    """Build the tiny pipeline registered under ``name`` (e.g. ``"tiny-wan"``)."""
    spec = TINY_MODELS.get(name)
    if spec is None:
        raise ValueError(f"Unknown tiny model {name!r}; choose one of: {', '.join(sorted(TINY_MODELS))}")
    return spec.build()


# --------------------------------------------------------------------------------------------------
# size rules
# --------------------------------------------------------------------------------------------------


def size_rules(pipe) -> tuple[int, int | None, int]:
    """Size constraints of a pipeline instance (tiny or real).

    Returns ``(spatial_multiple, temporal_multiple, temporal_offset)``: height and width must be multiples
    of ``spatial_multiple``; for video pipelines ``num_frames % temporal_multiple == temporal_offset``
    (``temporal_multiple`` is ``None`` for image pipelines).
    """
    name = type(pipe).__name__
    tr = getattr(pipe, "transformer", None)
    tcfg = tr.config if tr is not None else None
    if name.startswith("Wan"):
        patch = tuple(tcfg.patch_size)
        spatial = pipe.vae_scale_factor_spatial * max(patch[1], patch[2])
        spatial = _lcm(spatial, 16)  # WanPipeline.check_inputs: height/width divisible by 16
        return spatial, pipe.vae_scale_factor_temporal, 1
    raise ValueError(f"size_rules: unsupported pipeline class {name}")


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)


def valid_size(name: str, height: int, width: int, num_frames: int) -> None:
    """Raise ``ValueError`` if the tiny model ``name`` cannot generate at ``height x width x num_frames``."""
    spec = TINY_MODELS.get(name)
    if spec is None:
        raise ValueError(f"Unknown tiny model {name!r}; choose one of: {', '.join(sorted(TINY_MODELS))}")
    spatial, tmul, toff = _TINY_RULES[spec.family]
    _check(name, spatial, tmul, toff, height, width, num_frames, spec.is_video)


# Per-family rules of the tiny configs (equal to size_rules(build_tiny(name)) without building).
_TINY_RULES: dict[str, tuple[int, int | None, int]] = {
    "wan": (16, 4, 1),
}


def _check(name, spatial, tmul, toff, height, width, num_frames, is_video) -> None:
    problems = []
    for label, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % spatial:
            problems.append(f"{label}={v} must be a positive multiple of {spatial}")
    if is_video:
        bad = not isinstance(num_frames, int) or num_frames <= 0
        if tmul is not None and (bad or num_frames % tmul != toff):
            problems.append(
                f"num_frames={num_frames} must satisfy num_frames % {tmul} == {toff} "
                f"(e.g. {_examples(tmul, toff)})"
            )
    elif num_frames != 1:
        problems.append(f"num_frames={num_frames} must be 1 for an image model")
    if problems:
        raise ValueError(f"{name}: invalid size {height}x{width}x{num_frames}: " + "; ".join(problems))


def _examples(tmul: int, toff: int) -> str:
    start = toff if toff > 0 else tmul
    return ", ".join(str(start + k * tmul) for k in range(4))
