"""The UI's guidance section: controls from HeadPerturbation's options, form -> guidance, a guided job."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio", reason="the UI needs gradio (a core dependency)")

from accel.guidance.perturbation import HeadPerturbation  # noqa: E402
from accel.guidance.preset import GuidancePreset, save_preset  # noqa: E402
from accel.guidance.ui import guidance_controls, guidance_from_form, preset_form_values  # noqa: E402
from accel.options import options_of  # noqa: E402


def test_controls_come_from_the_option_fields() -> None:
    keys = [c.key for c in guidance_controls()]
    for opt in options_of(HeadPerturbation):
        assert f"perturb_{opt.name}" in keys
    assert keys[:3] == ["perturb_heads", "perturb_preset", "perturb_steps"]
    target = next(c for c in guidance_controls() if c.key == "perturb_target")
    assert target.choices == ("identity", "uniform", "mean_query") and "SoftSEG" in target.info


def test_form_values_to_guidance(tmp_path) -> None:
    assert guidance_from_form({"perturb_heads": "", "perturb_strength": 0.5}) is None
    got = guidance_from_form({"perturb_heads": "0:1, 1:0", "perturb_strength": 0.5, "perturb_scale": 2,
                              "perturb_steps": "1:", "perturb_target": "uniform", "perturb_batched": False})
    assert got == HeadPerturbation(heads=[(0, 1), (1, 0)], strength=0.5, scale=2.0, steps=(1, None),
                                   target="uniform", batched=False)
    with pytest.raises(ValueError, match="Guidance: heads items must be layer:head"):
        guidance_from_form({"perturb_heads": "0-1"})
    with pytest.raises(ValueError, match="Strength"):
        guidance_from_form({"perturb_heads": "0:1", "perturb_strength": 3})
    path = save_preset(GuidancePreset("SD3Transformer2DModel", HeadPerturbation(heads=[(1, 1)], strength=0.25,
                                                                              steps=(0.0, 0.5))), tmp_path / "p.json")
    values = preset_form_values(str(path))
    assert values["perturb_heads"] == "1:1" and values["perturb_strength"] == 0.25
    assert values["perturb_steps"] == "0.0:0.5"
    from_preset = guidance_from_form({**values, "perturb_heads": "", "perturb_preset": str(path)})
    assert isinstance(from_preset, GuidancePreset) and from_preset.model_class == "SD3Transformer2DModel"
    assert from_preset.perturbation.heads == ((1, 1),) and from_preset.perturbation.steps == (0.0, 0.5)


def test_a_guided_job_from_the_form(tmp_path) -> None:
    from accel.ui.app import UiController

    controller = UiController(tmp_path)
    controls = {"perturb_heads": "0:1", "perturb_strength": 0.5, "perturb_scale": 2.0}
    job = controller.make_job("tiny-sd3", "a red car", "", 0, 0, 0, 0, 0, None, "dense", False, False, "", 1.0,
                              controls)
    assert job.guidance == HeadPerturbation(heads=[(0, 1)], strength=0.5, scale=2.0)
    out = job.run(controller.cache)
    assert out.video.is_file() and "guidance: SoftPAG identity/joint on heads 0:1" in out.stats_markdown
    assert out.result.stats.branch_calls > 0


def test_the_app_builds_with_the_guidance_section(tmp_path) -> None:
    from accel.ui.app import build_app

    demo = build_app(tmp_path)
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert "Perturbed heads" in labels or "Heads" in labels
