"""The UI's guidance section without Gradio: controls from `HeadPerturbation`'s option fields, and the form's
values turned into the guidance `accel.patch` takes (errors name the control)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from accel.guidance.cli import guidance_options, parse_steps
from accel.guidance.perturbation import HeadPerturbation, parse_heads
from accel.options import Option

PREFIX = "perturb_"
HEADS_KEY = PREFIX + "heads"
PRESET_KEY = PREFIX + "preset"
STEPS_KEY = PREFIX + "steps"

_TEXT = {
    HEADS_KEY: ("Perturbed heads", "layer:head pairs, e.g. 11:15, 1:10 (empty: no guidance unless a preset is given)"),
    PRESET_KEY: ("Guidance preset", "a preset .json from `accel heads search` (the fields here override it)"),
    STEPS_KEY: ("Guidance steps", "start:end step indices (2:8, 5:) or fractions (0.0:0.3); empty: every step"),
}


def guidance_controls() -> list[Any]:
    """The guidance section's controls (`accel.ui.engine.Control`): heads, preset, steps, then the options."""
    from accel.ui.engine import _control

    text = [_control(key, None, Option(label, str, "", help_text, none_means="none"), "")
            for key, (label, help_text) in _TEXT.items()]
    options = []
    for opt in guidance_options():
        control = _control(PREFIX + opt.name, None, opt, opt.default)
        if control.widget == "number" and control.value is None:  # an empty number field has no API default
            control = dataclasses.replace(control, widget="text", value="")
        options.append(control)
    return [*text, *options]


def guidance_from_form(values: Mapping[str, Any]) -> Any:
    """None (no heads, no preset), a `HeadPerturbation` from the fields, or with a preset file a `GuidancePreset`
    (its model class is checked at patch time; empty heads take the preset's)."""
    from accel.guidance.preset import GuidancePreset, load_preset
    from accel.ui.engine import form_value

    heads_text = str(values.get(HEADS_KEY) or "").strip()
    preset_path = str(values.get(PRESET_KEY) or "").strip()
    if not heads_text and not preset_path:
        return None
    preset = load_preset(preset_path) if preset_path else None
    config: dict[str, Any] = {"heads": preset.perturbation.heads} if preset is not None else {}
    for opt in guidance_options():
        key = PREFIX + opt.name
        if key in values:
            config[opt.name] = form_value(opt, values[key])
    steps_text = str(values.get(STEPS_KEY) or "").strip()
    try:
        if steps_text:
            config["steps"] = parse_steps(steps_text)
        if heads_text:
            config["heads"] = parse_heads(heads_text)
    except ValueError as err:
        raise ValueError(f"Guidance: {err}") from None
    perturbation = HeadPerturbation(**config)
    if preset is not None:
        return GuidancePreset(preset.model_class, perturbation, preset.search)
    return perturbation


def preset_form_values(path: str) -> dict[str, Any]:
    """The guidance fields a preset file fills in (the Load button), by control key."""
    from accel.guidance.perturbation import format_heads
    from accel.guidance.preset import load_preset
    from accel.ui.engine import to_form

    p = load_preset(path).perturbation
    steps = "" if p.steps is None else f"{p.steps[0]}:{'' if p.steps[1] is None else p.steps[1]}"
    out: dict[str, Any] = {HEADS_KEY: format_heads(p.heads), STEPS_KEY: steps}
    for opt in guidance_options():
        out[PREFIX + opt.name] = to_form(opt, getattr(p, opt.name))
    return out


__all__ = ["HEADS_KEY", "PREFIX", "PRESET_KEY", "STEPS_KEY", "guidance_controls", "guidance_from_form",
           "preset_form_values"]
