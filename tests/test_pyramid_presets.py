"""Pyramid (PSA) presets: the reference's shipped configs parse, build and run; the CLI resolves them."""

from __future__ import annotations

import pytest
import torch

from accel import cli
from accel.geometry import TokenLayout
from accel.kernels.pyramid_reference import level_density, topk_levels
from accel.methods.base import AttentionCall
from accel.methods.pyramid import Pyramid
from accel.presets import PRESETS, preset, presets_for
from accel.schedule import Schedule

# (name, thresholds, mode, block, dense steps, reorder, sim cap): the table of psa.md section 3
SHIPPED = [
    ("psa-wan2.1-14b", (0.4, 0.5, 0.6, 0.8), "threshold", 128, 15, True, False),
    ("psa-wan2.1-1.3b", (0.5, 0.6, 0.7, 0.8), "threshold", 128, 15, True, True),
    ("psa-wan2.1-1.3b-topk", (0.05, 0.1, 0.15, 0.25), "topk", 32, 15, True, False),
    ("psa-wan2.2-a14b", (0.5, 0.6, 0.6, 0.8), "threshold", 32, 12, True, False),
    ("psa-wan2.2-5b", (0.6, 0.7, 0.7, 0.8), "threshold", 32, 15, True, False),
    ("psa-cogvideox1.5-5b", (0.1, 0.15, 0.15, 0.35), "topk", 32, 15, True, False),
    ("psa-cogvideox-5b", (0.1, 0.15, 0.15, 0.35), "topk", 128, 15, False, False),
    ("psa-cogvideox-5b-4steps", (0.05, 0.15, 0.25, 0.5), "topk", 128, 0, False, False),
]


def test_every_shipped_config_is_a_preset() -> None:
    assert set(presets_for("pyramid")) == {row[0] for row in SHIPPED}


@pytest.mark.parametrize("row", SHIPPED, ids=[row[0] for row in SHIPPED])
def test_preset_parses_builds_and_runs(row) -> None:
    name, thresholds, mode, block, dense_steps, reorder, sim_cap = row
    p = preset(name)
    assert p.method_name == "pyramid" and PRESETS[name] is p and p.source
    m = p.method
    assert isinstance(m, Pyramid) and m.thresholds == thresholds and (m.mode, m.block_size) == (mode, block)
    assert (m.reorder, m.sim_cap) == (reorder, sim_cap)
    assert p.schedule == Schedule(dense_steps=dense_steps)
    # builds a plan and runs a call (3 blocks, the last partial; text after the video)
    layout = TokenLayout(1, 1, 2, (5 * block) // 4, text_tokens=3, text_position="after")
    plan = m.build_plan(layout, 1, torch.device("cpu"))
    q, k, v = (torch.randn(1, layout.total_tokens, 1, 16) for _ in range(3))
    result = m.run(q, k, v, layout, plan, AttentionCall(seed=1))
    assert result.out.shape == q.shape and torch.isfinite(result.out).all() and 0 < float(result.density) <= 1


def test_four_step_preset_quotas_give_the_reference_sparsity() -> None:
    # psa.md: psa_4steps' quotas 5/15/25/50 % leave 1 - (0.05 + 0.10/2 + 0.10/4 + 0.25/8) = 0.84375 of the work
    importance = torch.rand(1, 1, 100, 100)
    levels = topk_levels(importance, preset("psa-cogvideox-5b-4steps").method.thresholds)
    assert 1 - level_density(levels).item() == pytest.approx(0.84375)


def test_cli_resolves_a_pyramid_preset_and_flags_override_it() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--preset", "psa-wan2.2-5b", "--dense-steps", "3"])
    method, schedule = cli.resolve_attention(args)
    assert method == preset("psa-wan2.2-5b").method and schedule == Schedule(dense_steps=3)
