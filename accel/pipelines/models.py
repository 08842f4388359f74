"""Token geometry of known model families without loading weights (for `accel mask` and planning).

The numbers are the families' facts (`accel.pipelines.family.FamilyFacts`): the released models' VAE
factors and patch sizes, or a tiny model's own (`TinySpec.geometry`).
"""

from __future__ import annotations

from accel.geometry import TokenLayout
from accel.pipelines.families import FAMILIES, family
from accel.pipelines.family import Geometry


def family_of(model: str) -> str:
    """The family of a tiny model name, a Hub id or a local path, by name; ValueError if unknown."""
    from accel.pipelines.tiny import TINY_MODELS

    if model in TINY_MODELS:
        return TINY_MODELS[model].family
    names = [f.name for f in FAMILIES]
    if model in names:
        return model
    lowered = model.lower()
    for fam in FAMILIES:
        if any(hint in lowered for hint in fam.facts.name_hints):
            return fam.name
    raise ValueError(
        f"cannot tell the model family of {model!r}; name a family ({', '.join(names)}) "
        "or a model id containing one"
    )


def model_geometry(model: str) -> Geometry:
    """VAE factors and patch of `model`: a tiny model's own, else its family's released models'."""
    from accel.pipelines.tiny import TINY_MODELS

    if model in TINY_MODELS:
        return TINY_MODELS[model].geometry
    return family(family_of(model)).facts.default_geometry()


def layout_for_model(model: str, frames: int, height: int, width: int, batch: int = 1) -> TokenLayout:
    """Self-attention token layout of `model` generating frames x height x width pixels."""
    facts = family(family_of(model)).facts
    geometry = model_geometry(model)
    s_h, s_w = geometry.stride
    if height % s_h or width % s_w:
        stride = s_h if s_h == s_w else f"{s_h}x{s_w}"
        raise ValueError(f"height and width must be multiples of {stride} for this family, got {height}x{width}")
    return TokenLayout(batch, *geometry.token_grid(frames, height, width), facts.text_tokens, facts.text_position)
