"""Named (method, schedule) settings, for every method, in one place.

Each preset reproduces a setting a research release ships, so that `--preset NAME` (CLI), the UI's preset
menu and ``preset:NAME`` specs (`accel eval`/`bench`) run what the paper's scripts run.
"""

from __future__ import annotations

from dataclasses import dataclass

from accel.methods.base import AttentionMethod
from accel.methods.neighborhood import Neighborhood
from accel.methods.pyramid import Pyramid
from accel.methods.radial import Radial
from accel.schedule import Schedule


@dataclass(frozen=True)
class Preset:
    """A named method config and schedule, with where it comes from."""

    name: str
    method: AttentionMethod
    schedule: Schedule
    source: str

    @property
    def method_name(self) -> str:
        return self.method.name


def _radial(name: str, decay: float, block: int, schedule: Schedule, source: str, sink: bool = True) -> Preset:
    return Preset(name, Radial(decay=decay, block_size=block, sink=sink), schedule, source)


# Radial: settings shipped in mit-han-lab/radial-attention `scripts/*.sh`. The block size is the reference's
# (128 for Wan2.1 and HunyuanVideo, 64 for Wan2.2) so that masks and densities match the paper's code; use
# dataclasses.replace(preset.method, block_size=None) for the kernel's fastest block instead.
_PRESETS: tuple[Preset, ...] = (
    _radial("wan2.1-14b", 0.2, 128, Schedule(dense_steps=12, dense_layers=1),
            "wan_t2v_inference.sh (768x1280, 69 frames, 50 steps)"),
    _radial("wan2.1-1.3b", 0.2, 128, Schedule(dense_steps=12, dense_layers=1),
            "ours: the reference ships no 1.3B script, so the 14B rule is reused"),
    _radial("wan2.1-14b-lightx2v", 0.2, 128, Schedule(dense_steps=1, dense_layers=1),
            "wan_t2v_inference_lightx2v.sh (4 steps, Lightx2v step-distillation LoRA)"),
    _radial("wan2.1-14b-fusionx", 0.2, 128, Schedule(dense_steps=2, dense_layers=1),
            "wan_t2v_inference_fusionx.sh (8 steps, FusionX LoRA)"),
    _radial("wan2.1-2x", 0.2, 128, Schedule(dense_steps=2, dense_layers=2),
            "commented 2x-length settings in wan_t2v_inference.sh (720x1280, 161 frames, with a length LoRA)"),
    _radial("wan2.1-4x", 0.2, 128, Schedule(dense_steps=2, dense_layers=2),
            "commented 4x-length settings in wan_t2v_inference.sh (with a length-extension LoRA)"),
    _radial("wan2.2", 0.8, 64, Schedule(dense_steps=11, dense_layers=1),
            "wan_22_t2v_inference.sh (768x1280, 77 frames, 40 steps; Wan22SparseAttnProcessor uses block 64)"),
    _radial("hunyuan-video", 0.95, 128, Schedule(dense_steps=12, dense_layers=0),
            "hunyuan_t2v_inference.sh (768x1280, 117 frames; no sink since commit 2f61c30)", sink=False),
    _radial("hunyuan-video-4x", 0.95, 128, Schedule(dense_steps=2, dense_layers=2),
            "commented 4x preset in hunyuan_t2v_inference.sh (720x1280, 509 frames, with a length LoRA)",
            sink=False),
)
# Neighborhood: Sliding Tile Attention as its special case (kernel = tiles x tile, stride = tile). STA's HunyuanVideo
# tile is (6, 8, 8); a 3x3x3-tile window is GNA window (18, 24, 24), stride (6, 8, 8). STA searches windows per
# (step, layer, head); this preset is one uniform window, without that search.
_PRESETS += (
    Preset("sta-hunyuan-video", Neighborhood.sta(tile=(6, 8, 8), tiles=(3, 3, 3)), Schedule(),
           "Sliding Tile Attention (arXiv 2502.04507): tile (6, 8, 8), window 3x3x3 tiles, uniform"),
)


def _psa(name: str, thresholds: tuple[float, float, float, float], mode: str, block: int, dense_steps: int,
         source: str, *, reorder: bool = True, sim_cap: bool = False) -> Preset:
    t1, t2, t3, t4 = thresholds
    method = Pyramid(block_size=block, mode=mode, t1=t1, t2=t2, t3=t3, t4=t4, reorder=reorder, sim_cap=sim_cap)
    return Preset(name, method, Schedule(dense_steps=dense_steps), source)


# Pyramid (PSA): ziplab/Pyramid-Sparse-Attention `configs/attention_config.yaml` at be122cf (thresholds, mode,
# warm-up steps; /work/shared/reference/psa.md section 3). Our query and KV blocks share one size: the preset
# takes the reference's KV block (block_n), so levels are chosen at its granularity (its query blocks are 128).
# The reference's Gilbert-curve reorder is our 3-D tile reorder; its presets marked "no reorder" set reorder=False.
# The sim cap keeps our (= the reference generation preset's) thresholds 0.70 / 0.65 / 0.60.
_PRESETS += (
    _psa("psa-wan2.1-14b", (0.4, 0.5, 0.6, 0.8), "threshold", 128, 15,
         "PSA Wan2.1-14B (thresholdbound, block_n 128, 15 of 50 steps dense)"),
    _psa("psa-wan2.1-1.3b", (0.5, 0.6, 0.7, 0.8), "threshold", 128, 15,
         "PSA Wan2.1-1.3B psa_balanced (thresholdbound, block 128, similarity cap, 15 of 50 steps dense)",
         sim_cap=True),
    _psa("psa-wan2.1-1.3b-topk", (0.05, 0.1, 0.15, 0.25), "topk", 32, 15,
         "PSA Wan2.1-1.3B psa_topk (topk quotas, block_n 32, 15 of 50 steps dense)"),
    _psa("psa-wan2.2-a14b", (0.5, 0.6, 0.6, 0.8), "threshold", 32, 12,
         "PSA Wan2.2-T2V-A14B (thresholdbound, block_n 32, 12 of 40 steps dense)"),
    _psa("psa-wan2.2-5b", (0.6, 0.7, 0.7, 0.8), "threshold", 32, 15,
         "PSA Wan2.2-TI2V-5B (thresholdbound, block_n 32, 15 of 50 steps dense)"),
    _psa("psa-cogvideox1.5-5b", (0.1, 0.15, 0.15, 0.35), "topk", 32, 15,
         "PSA CogVideoX1.5-5B (topk quotas, block_n 32, 15 of 50 steps dense)"),
    _psa("psa-cogvideox-5b", (0.1, 0.15, 0.15, 0.35), "topk", 128, 15,
         "PSA CogVideoX-5B psa_balanced (topk quotas, block_n 128, no reorder, 15 of 50 steps dense)",
         reorder=False),
    _psa("psa-cogvideox-5b-4steps", (0.05, 0.15, 0.25, 0.5), "topk", 128, 0,
         "PSA CogVideoX-5B psa_4steps with the PSA+TDM 4-step LoRA (topk quotas, block 128, no reorder, "
         "no warm-up)", reorder=False),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def preset(name: str) -> Preset:
    """The preset called `name` (ValueError listing the known presets otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"preset name must be a str, got {type(name).__name__}")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def presets_for(method_name: str) -> dict[str, Preset]:
    """The presets of one method, by name."""
    return {n: p for n, p in PRESETS.items() if p.method.name == method_name}


RADIAL_PRESETS: dict[str, tuple[Radial, Schedule]] = {
    n: (p.method, p.schedule) for n, p in PRESETS.items() if isinstance(p.method, Radial)
}
"""Radial presets as (method, schedule) pairs (the 0.1 API)."""


def radial_preset(name: str) -> tuple[Radial, Schedule]:
    """The (Radial, Schedule) of a shipped reference setting, e.g. ``radial_preset("wan2.1-14b")``."""
    p = preset(name)
    if not isinstance(p.method, Radial):
        raise ValueError(f"preset {name!r} is a {p.method.name} preset, not a radial one")
    return p.method, p.schedule


__all__ = ["PRESETS", "RADIAL_PRESETS", "Preset", "preset", "presets_for", "radial_preset"]
