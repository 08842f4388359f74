"""The model families accel supports: the explicit list `FAMILIES`, and look-ups into it.

Each family module (`accel.pipelines.wan`, ...) defines `FACTS` (a `FamilyFacts`) and `ADAPTER` (its
`FamilyAdapter`); nothing registers itself. To add a family, write its module and add it to
`_MODULES` below. Imports go one way: this module -> family modules -> `adapter` / `family`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accel.pipelines import cogvideox, flux, hunyuan_video, ltx, sd3, wan
from accel.pipelines.adapter import FamilyAdapter
from accel.pipelines.family import FamilyFacts

__all__ = [
    "FAMILIES",
    "Family",
    "adapter_for",
    "adapters",
    "family",
    "family_for_pipeline",
    "family_for_transformer",
    "family_names",
]


@dataclass(frozen=True)
class Family:
    """One supported model family: its facts and its adapter."""

    facts: FamilyFacts
    adapter: FamilyAdapter

    @property
    def name(self) -> str:
        return self.facts.name

    def __post_init__(self) -> None:
        if (self.adapter.family, tuple(self.adapter.transformer_classes)) != (
            self.facts.name, self.facts.transformer_classes
        ):
            raise ValueError(f"{type(self.adapter).__name__} does not match the facts of family {self.facts.name!r}")


# Alphabetical, the order the self-registering adapters used to have.
_MODULES = (cogvideox, flux, hunyuan_video, ltx, sd3, wan)

FAMILIES: tuple[Family, ...] = tuple(Family(m.FACTS, m.ADAPTER) for m in _MODULES)

_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def family_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def family(name: str) -> Family:
    """The family called `name` ("wan", ...); ValueError listing the families if there is none."""
    found = _BY_NAME.get(name)
    if found is None:
        raise ValueError(f"unknown model family {name!r}; families: {', '.join(_BY_NAME)}")
    return found


def family_for_transformer(transformer: torch.nn.Module) -> Family | None:
    """The family of a diffusers transformer, by class name along its MRO; None if unsupported."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for fam in FAMILIES:
        if names.intersection(fam.facts.transformer_classes):
            return fam
    return None


def family_for_pipeline(pipe: Any) -> Family | None:
    """The family of a pipeline: by its class name (``WanImageToVideoPipeline`` -> wan), else by its
    transformer's class; None if neither is known."""
    name = type(pipe).__name__
    for fam in FAMILIES:
        if name.startswith(fam.facts.pipeline_prefixes):
            return fam
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            fam = family_for_transformer(module)
            if fam is not None:
                return fam
    return None


def adapter_for(transformer: torch.nn.Module) -> FamilyAdapter | None:
    """The adapter of a transformer's family, or None if accel does not support it."""
    fam = family_for_transformer(transformer)
    return None if fam is None else fam.adapter


def adapters() -> dict[str, FamilyAdapter]:
    """Family name -> adapter, for every supported family."""
    return {f.name: f.adapter for f in FAMILIES}
