"""Guidance preset files: the result of `accel heads search`, loaded by `accel.patch`, the CLI and the UI.

A preset is JSON: ``{"format": "accel-guidance-preset", "version": 1, "model_class": "SD3Transformer2DModel",
"heads": [[11, 15], ...], "strength": 0.5, "scale": 3.0, "steps": null, "target": "identity", "scope": "joint"}``
plus an optional ``"search"`` record (how it was found). Every field is checked on load; errors name the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.guidance.perturbation import HeadPerturbation

FORMAT = "accel-guidance-preset"
VERSION = 1
_FIELDS = ("heads", "strength", "scale", "steps", "target", "scope")


class PresetError(ValueError):
    """A guidance preset file that cannot be used (malformed, or made for another model)."""


@dataclass(frozen=True)
class GuidancePreset:
    """Head-perturbation settings found for one transformer class."""

    model_class: str
    perturbation: HeadPerturbation
    search: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        p = self.perturbation
        data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model_class": self.model_class,
                                "heads": [list(h) for h in p.heads], "strength": p.strength, "scale": p.scale,
                                "steps": list(p.steps) if p.steps is not None else None, "target": p.target,
                                "scope": p.scope}
        if self.search:
            data["search"] = self.search
        return data


def save_preset(preset: GuidancePreset, path: str | os.PathLike) -> Path:
    """Write `preset` as JSON (atomically: a killed write never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(preset.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def preset_from_json(data: Any, where: str = "preset") -> GuidancePreset:
    """A `GuidancePreset` from parsed JSON; `PresetError` naming the field otherwise."""
    if not isinstance(data, dict):
        raise PresetError(f"{where}: a guidance preset is a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise PresetError(f"{where}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise PresetError(f"{where}: 'version' must be {VERSION}, got {data.get('version')!r}")
    model_class = data.get("model_class")
    if not isinstance(model_class, str) or not model_class:
        raise PresetError(f"{where}: 'model_class' must name a transformer class, got {model_class!r}")
    unknown = sorted(set(data) - {"format", "version", "model_class", "search", *_FIELDS})
    if unknown:
        raise PresetError(f"{where}: unknown fields {unknown}; a preset has {', '.join(_FIELDS)}")
    if "heads" not in data:
        raise PresetError(f"{where}: 'heads' is missing (a list of [layer, head] pairs)")
    values = {k: data[k] for k in _FIELDS if k in data}
    heads = values["heads"]
    if isinstance(heads, list):
        values["heads"] = [tuple(h) if isinstance(h, list) else h for h in heads]
    if isinstance(values.get("steps"), list):
        values["steps"] = tuple(values["steps"])
    try:
        perturbation = HeadPerturbation(**values)
    except (TypeError, ValueError) as err:
        raise PresetError(f"{where}: {err}") from None
    search = data.get("search", {})
    if not isinstance(search, dict):
        raise PresetError(f"{where}: 'search' must be an object, got {type(search).__name__}")
    return GuidancePreset(model_class, perturbation, search)


def load_preset(path: str | os.PathLike) -> GuidancePreset:
    """Read a preset file; `PresetError` for a missing, non-JSON or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"guidance preset {str(path)!r} does not exist or is not a file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PresetError(f"guidance preset {str(path)!r} is not valid JSON: {err}") from None
    return preset_from_json(data, where=f"guidance preset {str(path)!r}")


def as_guidance(value: Any) -> HeadPerturbation | GuidancePreset:
    """A `HeadPerturbation`, a `GuidancePreset`, or a preset file path, as what `accel.patch` takes."""
    if isinstance(value, (HeadPerturbation, GuidancePreset)):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_preset(value)
    raise TypeError("guidance must be an accel.HeadPerturbation, a GuidancePreset or a preset file path, "
                    f"got {type(value).__name__}")


def check_model_class(guidance: Any, transformer: torch.nn.Module) -> None:
    """A preset made for another transformer class is an error (its head indices mean other heads)."""
    if isinstance(guidance, GuidancePreset) and guidance.model_class != type(transformer).__name__:
        raise PresetError(f"this guidance preset was made for {guidance.model_class}, not for "
                          f"{type(transformer).__name__}: its heads would perturb unrelated heads")


__all__ = ["FORMAT", "GuidancePreset", "PresetError", "as_guidance", "check_model_class", "load_preset",
           "preset_from_json", "save_preset"]
