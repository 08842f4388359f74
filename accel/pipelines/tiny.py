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
:func:`valid_size`, :func:`size_rules` and :func:`size_limits` (the latter two also work for real hub
pipelines).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.pipelines.families import FAMILIES, family_for_pipeline
from accel.pipelines.family import FamilyFacts, Geometry

__all__ = [
    "TinySpec",
    "TINY_MODELS",
    "build_tiny",
    "example_image",
    "valid_size",
    "size_rules",
    "size_limits",
    "GENERIC_LIMITS",
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
    # eval() like ``from_pretrained`` does (dropout would make runs non-deterministic); parameters keep
    # requires_grad as loaded hub models do, so LoRA/fine-tuning code sees the same thing.
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
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
        rope_max_seq_len=64,  # >= every latent grid axis we generate (diffusers' test config has 32)
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


def _wan_i2v_image_parts(image_size: int = 32):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=8,
        projection_dim=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        intermediate_size=16,
        patch_size=8,
    )
    encoder = CLIPVisionModel(cfg).eval()
    processor = CLIPImageProcessor(
        crop_size={"height": image_size, "width": image_size},
        size={"shortest_edge": image_size},
        do_center_crop=True,
        do_resize=True,
    )
    return encoder, processor


def _ftfy_shim() -> None:
    """diffusers 0.42's ``pipeline_wan_i2v.basic_clean`` calls ``ftfy.fix_text`` even when ftfy is not
    installed (``pipeline_wan.py`` guards it with ``is_ftfy_available()``). ftfy is not one of our
    dependencies, so give that module the same no-op behaviour as the T2V pipeline has without ftfy."""
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        pipeline_wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


@_seeded
def wan_i2v():
    """Tiny Wan 2.1 I2V ``WanImageToVideoPipeline`` (adds a CLIP vision encoder + image processor)."""
    from diffusers import WanImageToVideoPipeline

    _ftfy_shim()
    encoder, processor = _wan_i2v_image_parts()
    pipe = WanImageToVideoPipeline(
        tokenizer=_tokenizer(512),
        text_encoder=_umt5(32),
        vae=_wan_vae(),
        scheduler=_wan_scheduler(),
        image_processor=processor,
        image_encoder=encoder,
        # 16 noise channels + 16 image-latent channels + 4 mask channels; image tokens via added k/v.
        transformer=_wan_transformer(in_channels=36, image_dim=8),
    )
    return _finish(pipe)


@_seeded
def wan22():
    """Tiny Wan 2.2 A14B-style ``WanPipeline``: high-noise ``transformer`` + low-noise ``transformer_2``."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=_tokenizer(512),
        text_encoder=_umt5(32),
        vae=_wan_vae(),
        scheduler=_wan_scheduler(),
        transformer=_wan_transformer(),
        transformer_2=_wan_transformer(),
        boundary_ratio=0.875,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------------
# HunyuanVideo
# --------------------------------------------------------------------------------------------------


def _clip_text(hidden_size: int = 8, projection_dim: int = 8, *, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=64,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-05,
        attention_dropout=0.0,
        dropout=0.0,
        pad_token_id=0,
        eos_token_id=1,  # != 2: pooled output is taken at the first </s>, which our tokenizer appends
        bos_token_id=3,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _clip_tokenizer():
    # CLIP slots must say model_max_length=77: the pipelines pad/truncate to it, and CLIPTextModel raises
    # "Sequence length must be less than max_position_embeddings" beyond 77.
    return _tokenizer(77, bos=True, eos=True)


@_seeded
def hunyuan_video():
    """Tiny ``HunyuanVideoPipeline`` (Llama + CLIP text encoders, 2 double + 2 single stream blocks)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    llama = LlamaModel(
        LlamaConfig(
            bos_token_id=3,
            eos_token_id=1,
            pad_token_id=0,
            hidden_size=16,
            intermediate_size=37,
            max_position_embeddings=512,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=64,
            attention_dropout=0.0,
        )
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=_tokenizer(512, bos=True, eos=False),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_text(8, 8),
        tokenizer_2=_clip_tokenizer(),
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------------
# CogVideoX
# --------------------------------------------------------------------------------------------------

# Latent size the CogVideoX transformer is "trained" at. With rotary embeddings (CogVideoX 1.0 / 5B
# style) the pipeline builds RoPE from the grid with a crop region relative to sample_height/width //
# patch_size, so generating at exactly this size gives the plain grid; the sincos/learned positional
# embedding variants would recompute or reject other sizes.
_COG_SAMPLE = (8, 8, 17)  # latent height, latent width, pixel frames


@_seeded
def cogvideox():
    """Tiny ``CogVideoXPipeline`` (T5 encoder, 2-layer transformer with 3-D rotary embeddings)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # rotary: t gets head_dim//4, h and w get head_dim//8*3 each
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=2,
        sample_height=_COG_SAMPLE[0],
        sample_width=_COG_SAMPLE[1],
        sample_frames=_COG_SAMPLE[2],
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
    )
    pipe = CogVideoXPipeline(
        tokenizer=_tokenizer(226),
        text_encoder=_t5(32),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------------
# LTX-Video
# --------------------------------------------------------------------------------------------------


@_seeded
def ltx():
    """Tiny ``LTXPipeline`` (T5 encoder, 2-layer transformer, LTX VAE with 16x spatial / 4x temporal)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5(32),
        tokenizer=_tokenizer(128),
        transformer=transformer,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------------
# Flux / SD3 (images)
# --------------------------------------------------------------------------------------------------


def _image_vae(latent_channels: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # 8x spatial compression, like the real VAEs
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


@_seeded
def flux():
    """Tiny ``FluxPipeline`` (CLIP + T5 encoders, 2 double + 2 single stream blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_image_vae(4, 0.0609, 1.5035),
        text_encoder=_clip_text(8, 8),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5(32),
        tokenizer_2=_tokenizer(512),
        transformer=transformer,
    )
    return _finish(pipe)


@_seeded
def sd3():
    """Tiny ``StableDiffusion3Pipeline`` (2 CLIP-with-projection + T5 encoders, 2 joint blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=32,
        joint_attention_dim=32,  # = T5 d_model (CLIP 16 + 16 is padded up to it)
        pooled_projection_dim=32,  # = pooled CLIP 16 + 16
        out_channels=4,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(4, 0.0609, 1.5035),
        text_encoder=_clip_text(16, 16, with_projection=True),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text(16, 16, with_projection=True),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5(32),
        tokenizer_3=_tokenizer(512),
        transformer=transformer,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    """One registered tiny model: how to build it and the call arguments that work for it.

    Its family is the one whose `FamilyFacts.tiny_models` names it (``family``, ``is_video`` and the size
    rules come from there). ``vae``/``patch`` give the tiny config's VAE factors (spatial, temporal) and
    transformer patch where they differ from the family's released models, so that its token grid and
    size rules are known without building it.

    ``height``/``width``/``num_frames`` are defaults that satisfy :func:`valid_size` and give enough
    tokens for sparse-attention tests (video: 5 latent frames x 4x4 tokens = 80; image: 8x8 = 64).
    ``call_defaults`` holds extra pipeline kwargs the tiny configs need (short ``max_sequence_length``
    matching the tiny text encoders, guidance, Hunyuan's prompt template). ``learned``: the built-in learned
    demo model (`accel.demo`), built from its committed weights (a clear error when they are missing).
    """

    name: str
    build: Callable[[], Any]
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    call_defaults: dict = field(default_factory=dict)
    fps: int = 8
    needs_image: bool = False  # image-to-video: pass ``image=`` (e.g. :func:`example_image`)
    vae: tuple[int, int] | None = None  # (spatial, temporal) when the tiny VAE differs from the family's
    patch: tuple[int, int, int] | None = None  # (t, h, w) when the tiny patch differs from the family's
    learned: bool = False  # trained weights loaded from files (`accel-demo`), not a random test model

    @property
    def facts(self) -> FamilyFacts:
        for fam in FAMILIES:
            if self.name in fam.facts.tiny_models:
                return fam.facts
        raise ValueError(f"tiny model {self.name!r} is in no family's tiny_models")

    @property
    def family(self) -> str:
        return self.facts.name

    @property
    def is_video(self) -> bool:
        return self.facts.is_video

    @property
    def geometry(self) -> Geometry:
        """VAE factors and patch of the built pipeline (equal to ``facts.geometry(build_tiny(name))``)."""
        return self.facts.default_geometry(vae=self.vae, patch=self.patch)

    @property
    def rules(self) -> tuple[int, int | None, int]:
        """Equal to ``size_rules(build_tiny(name))`` without building."""
        return self.facts.size_rules(self.geometry)

    @property
    def limits(self) -> dict[str, tuple[int, str]]:
        """Largest height, width, num_frames and num_inference_steps, each with its reason.

        Equal to ``size_limits(build_tiny(name))`` without building (see :func:`size_limits`).
        """
        return {**GENERIC_LIMITS, **_TINY_LIMITS.get(self.family, {})}


TINY_MODELS: dict[str, TinySpec] = {}


def _register(spec: TinySpec) -> None:
    TINY_MODELS[spec.name] = spec


_VIDEO = dict(height=64, width=64, num_frames=17, num_inference_steps=2)
_IMAGE = dict(height=128, width=128, num_frames=1, num_inference_steps=2, fps=1)

for _spec in (
    TinySpec(
        name="tiny-wan",
        build=wan,
        call_defaults={"max_sequence_length": 16, "guidance_scale": 5.0},
        fps=16,
        **_VIDEO,
    ),
    TinySpec(
        name="tiny-wan-i2v",
        build=wan_i2v,
        needs_image=True,
        call_defaults={"max_sequence_length": 16, "guidance_scale": 5.0},
        fps=16,
        **_VIDEO,
    ),
    TinySpec(
        name="tiny-wan22",
        build=wan22,
        call_defaults={"max_sequence_length": 16, "guidance_scale": 4.0, "guidance_scale_2": 3.0},
        fps=16,
        **{**_VIDEO, "num_inference_steps": 4},  # 4 steps so both experts (boundary 0.875) run
    ),
    TinySpec(
        name="tiny-hunyuan-video",
        build=hunyuan_video,
        call_defaults={
            "max_sequence_length": 16,
            "guidance_scale": 6.0,  # embedded guidance: one transformer forward per step, no CFG batch
            "prompt_template": {"template": "{}", "crop_start": 0},
        },
        fps=24,
        **_VIDEO,
    ),
    TinySpec(
        name="tiny-cogvideox",
        build=cogvideox,
        call_defaults={"max_sequence_length": 16, "guidance_scale": 6.0},
        fps=8,
        **_VIDEO,
    ),
    TinySpec(
        name="tiny-ltx",
        build=ltx,
        vae=(16, 4),  # the tiny LTX VAE compresses 16x spatially and 4x in time (the released one 32x, 8x)
        call_defaults={"max_sequence_length": 16, "guidance_scale": 3.0},
        fps=24,
        **_VIDEO,
    ),
    TinySpec(
        name="tiny-flux",
        build=flux,
        call_defaults={"max_sequence_length": 16, "guidance_scale": 3.5},
        **_IMAGE,
    ),
    TinySpec(
        name="tiny-sd3",
        build=sd3,
        call_defaults={"max_sequence_length": 16, "guidance_scale": 5.0},
        **_IMAGE,
    ),
):
    _register(_spec)


def _demo_pipeline():
    """The learned demo model (`accel.demo.model.load_demo_pipeline`) from its committed weights, offline."""
    from accel.demo.model import load_demo_pipeline

    return load_demo_pipeline()


def _demo_spec() -> TinySpec:
    from accel.demo.config import DEMO

    g = DEMO.generation
    vae = (2 ** (len(DEMO.vae.dim_mult) - 1), 2 ** sum(DEMO.vae.temperal_downsample))
    return TinySpec(name="accel-demo", build=_demo_pipeline, height=g.height, width=g.width, num_frames=g.num_frames,
                    num_inference_steps=g.num_inference_steps, fps=g.fps, vae=vae,
                    patch=tuple(DEMO.transformer.patch_size), learned=True,
                    call_defaults={"max_sequence_length": DEMO.text.max_sequence_length,
                                   "guidance_scale": g.guidance_scale})


_register(_demo_spec())


def example_image(height: int, width: int, seed: int = 0):
    """A deterministic RGB ``PIL.Image`` (smooth colour gradient + noise) to condition I2V models."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.0 * x], axis=-1)
    img = np.clip(base * 0.8 + rng.rand(height, width, 3) * 0.2, 0.0, 1.0)
    return Image.fromarray((img * 255).astype(np.uint8))


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
    """Size constraints of a pipeline instance (tiny or real hub model).

    Returns ``(spatial_multiple, temporal_multiple, temporal_offset)``: height and width must be positive
    multiples of ``spatial_multiple``; for video pipelines ``num_frames % temporal_multiple ==
    temporal_offset`` (``temporal_multiple`` is ``None`` for image pipelines, offset 0). The rules are the
    ones the pipeline classes enforce (``check_inputs``) or silently round to, combined with the VAE
    stride times the transformer patch size so that the latent grid divides into whole patches: the
    family's `FamilyFacts.size_rules` on the pipeline's own geometry.
    """
    name = type(pipe).__name__
    tr = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    if tr is None:
        raise ValueError(f"size_rules: {name} has no transformer")
    fam = family_for_pipeline(pipe)
    if fam is None:
        known = ", ".join(f"{p}*" for f in FAMILIES for p in f.facts.pipeline_prefixes)
        raise ValueError(f"size_rules: unsupported pipeline class {name} (known: {known})")
    return fam.facts.size_rules(fam.facts.geometry(pipe))


def valid_size(name: str, height: int, width: int, num_frames: int, steps: int | None = None) -> None:
    """Raise ``ValueError`` if the tiny model ``name`` cannot generate at ``height x width x num_frames``
    (and ``steps`` denoising steps, when given): the multiples of :func:`size_rules` and the maxima of
    :attr:`TinySpec.limits`."""
    spec = TINY_MODELS.get(name)
    if spec is None:
        raise ValueError(f"Unknown tiny model {name!r}; choose one of: {', '.join(sorted(TINY_MODELS))}")
    spatial, tmul, toff = spec.rules
    _check(name, spatial, tmul, toff, height, width, num_frames, spec.is_video, limits=spec.limits, steps=steps)


# Limits every model gets, so that a typo (1e9) is refused before it reaches the allocator.
GENERIC_LIMITS: dict[str, tuple[int, str]] = {
    "height": (8192, "accel's limit: a larger frame does not fit in GPU memory"),
    "width": (8192, "accel's limit: a larger frame does not fit in GPU memory"),
    "num_frames": (2049, "accel's limit: a longer video does not fit in GPU memory"),
    "num_inference_steps": (1000, "accel's limit"),
}


def size_limits(pipe) -> dict[str, tuple[int, str]]:
    """Largest ``height``, ``width``, ``num_frames`` and ``num_inference_steps`` a pipeline instance can run,
    each as ``(maximum, reason)``.

    Read from the model's config where it bounds the size: Wan's rotary table (``rope_max_seq_len`` tokens
    per axis), SD3's positional embedding (``pos_embed_max_size`` patches), CogVideoX's learned positional
    embedding (its sample size), and the scheduler's ``num_train_timesteps``; otherwise `GENERIC_LIMITS`.
    """
    limits = dict(GENERIC_LIMITS)

    def lower(key: str, value: int, reason: str) -> None:
        if 1 <= value <= limits[key][0]:  # on a tie the model's own reason wins
            limits[key] = (int(value), reason)

    tr = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    cfg = getattr(tr, "config", None)
    fam = family_for_pipeline(pipe)
    if cfg is not None and fam is not None:
        for key, (value, reason) in fam.facts.model_limits(cfg, fam.facts.geometry(pipe)).items():
            lower(key, value, reason)
    timesteps = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    if isinstance(timesteps, int):
        lower("num_inference_steps", timesteps, f"its scheduler has {timesteps} training timesteps")
    return limits


# Per-family rules of the tiny configs (equal to size_rules(build_tiny(name)) without building).
_TINY_RULES: dict[str, tuple[int, int | None, int]] = {spec.family: spec.rules for spec in TINY_MODELS.values()}

# Per-family maxima of the tiny configs (equal to size_limits(build_tiny(name))): Wan's rotary table has
# rope_max_seq_len=64 tokens per axis (16 px each: VAE 8 x patch 2), SD3's positional embedding 32 patches.
_WAN_ROPE = "its rotary embedding table covers 1024 px"
_TINY_LIMITS: dict[str, dict[str, tuple[int, str]]] = {
    "wan": {"height": (1024, _WAN_ROPE), "width": (1024, _WAN_ROPE),
            "num_frames": (253, "its rotary embedding table covers 64 latent frames"),
            "num_inference_steps": (1000, "its scheduler has 1000 training timesteps")},
    "hunyuan_video": {"num_inference_steps": (1000, "its scheduler has 1000 training timesteps")},
    "cogvideox": {"num_inference_steps": (1000, "its scheduler has 1000 training timesteps")},
    "ltx": {"num_inference_steps": (1000, "its scheduler has 1000 training timesteps")},
    "flux": {"num_inference_steps": (1000, "its scheduler has 1000 training timesteps")},
    "sd3": {"height": (512, "its positional embedding covers 512 px"),
            "width": (512, "its positional embedding covers 512 px"),
            "num_inference_steps": (1000, "its scheduler has 1000 training timesteps")},
}


def _check(name, spatial, tmul, toff, height, width, num_frames, is_video, *, limits=None, steps=None) -> None:
    """Raise one ValueError listing every problem; each names its field and the allowed values.

    ``limits`` (``{field: (maximum, reason)}``, e.g. from :func:`size_limits`) adds maxima; ``steps`` is
    checked (a whole number >= 1, within ``limits["num_inference_steps"]``) when given.
    """
    limits = GENERIC_LIMITS if limits is None else limits
    problems = []

    def too_big(key: str, v) -> bool:
        if key in limits and isinstance(v, int) and v > limits[key][0]:
            maximum, reason = limits[key]
            problems.append(f"{key}: {v} exceeds the maximum {maximum} for {name} ({reason})")
            return True
        return False

    for label, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % spatial:
            problems.append(f"{label}={v} must be a positive multiple of {spatial}")
        else:
            too_big(label, v)
    if is_video:
        bad = isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0
        if bad or (tmul is not None and num_frames % tmul != toff):
            rule = f"num_frames % {tmul} == {toff} (e.g. {_examples(tmul, toff)})" if tmul else "num_frames >= 1"
            problems.append(f"num_frames={num_frames} must satisfy {rule}")
        else:
            too_big("num_frames", num_frames)
    elif num_frames != 1:
        problems.append(f"num_frames={num_frames} must be 1 for an image model")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            problems.append(f"num_inference_steps={steps} must be a whole number >= 1")
        else:
            too_big("num_inference_steps", steps)
    if problems:
        raise ValueError(f"{name}: invalid size {height}x{width}x{num_frames}: " + "; ".join(problems))


def _examples(tmul: int, toff: int) -> str:
    start = toff if toff > 0 else tmul
    return ", ".join(str(start + k * tmul) for k in range(4))
