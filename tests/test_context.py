"""The per-forward context hook: built once per forward, sync-free step tracking, branches, stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_patching import _call_kwargs

import accel
from accel.methods.base import Attended, AttentionMethod
from accel.pipelines import context as context_module
from accel.pipelines.context import Branch, ForwardContext, StepTracker, first_tensor, replace_first_tensor
from accel.pipelines.patching import patch_handle
from accel.pipelines.runtime import AttentionRuntime
from accel.pipelines.tiny import build_tiny


@dataclass(frozen=True)
class ValueCopy(AttentionMethod):
    """Test method: every query returns its own value (an identity attention map)."""

    name: ClassVar[str] = "value-copy"
    registered: ClassVar[bool] = False

    def run(self, q, k, v, layout, plan, call):
        return Attended(v.clone(), 0.5)


def _pipe(name: str):
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, name: str, steps: int | None = None):
    kwargs = _call_kwargs(name)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    out = pipe(prompt="a red car", generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def test_context_is_built_once_per_forward(monkeypatch) -> None:
    pipe = _pipe("tiny-hunyuan-video")
    calls = {"facts": 0}
    real = context_module.padding_facts

    def counting(mask):
        calls["facts"] += 1
        return real(mask)

    monkeypatch.setattr(context_module, "padding_facts", counting)
    handle = accel.patch(pipe, accel.Dense())
    _generate(pipe, "tiny-hunyuan-video", steps=2)
    layers = len(handle.stats.per_layer_density())
    assert layers >= 2
    forwards = sum(1 for _ in handle.stats.steps)  # steps seen
    print(f"padding analyses {calls['facts']} for {handle.stats.calls} attention calls, {forwards} steps")
    assert calls["facts"] == handle.stats.calls // layers  # one per forward, not per layer
    accel.unpatch(pipe)


def test_step_tracker_reads_the_scheduler_without_matching_timesteps() -> None:
    pipe = _pipe("tiny-wan")
    seen = []

    class Spy(AttentionRuntime):
        def begin_forward(self, ctx: ForwardContext) -> None:
            seen.append((ctx.step, ctx.total_steps))

    handle = accel.patch(pipe, accel.Dense())
    spy = Spy(accel.Dense(), None, "error")
    spy.stats = handle.runtime.stats
    handle.runtime.begin_forward = spy.begin_forward  # observe only
    _generate(pipe, "tiny-wan", steps=3)
    accel.unpatch(pipe)
    steps = [s for s, _ in seen]
    assert sorted(set(steps)) == [0, 1, 2] and all(total == 3 for _, total in seen)
    assert steps == sorted(steps)


def test_step_tracker_outside_a_pipeline_is_none() -> None:
    assert StepTracker(None).current({}) == (None, None)


def test_branch_without_overrides_reproduces_the_main_pass() -> None:
    pipe = _pipe("tiny-wan")
    reference = _generate(pipe, "tiny-wan")
    handle = accel.patch(pipe, accel.Dense())
    seen = []

    def take_branch(main, branch, ctx):
        seen.append(torch.equal(first_tensor(main), first_tensor(branch)))
        return branch

    handle.add_branch(Branch("copy", {}, take_branch))
    out = _generate(pipe, "tiny-wan")
    accel.unpatch(pipe)
    assert seen and all(seen)
    assert torch.equal(out, reference)
    assert handle.stats.branch_calls > 0


def test_branch_override_changes_only_the_chosen_heads() -> None:
    runtime = AttentionRuntime(accel.Dense(), None, "error")
    state = context_module.TransformerState(grid=(1, 2, 4))
    q, k, v = (torch.randn(2, 8, 3, 16) for _ in range(3))
    main = runtime.attend(state, 0, q, k, v, text_tokens=0, text_position="none")
    state.context = ForwardContext(grid=(1, 2, 4), branch=Branch("p", {0: (ValueCopy(), (1,))}, lambda m, b, c: b))
    out = runtime.attend(state, 0, q, k, v, text_tokens=0, text_position="none")
    assert torch.equal(out[:, :, [0, 2]], main[:, :, [0, 2]])
    assert torch.equal(out[:, :, 1], v[:, :, 1])
    other_layer = runtime.attend(state, 1, q, k, v, text_tokens=0, text_position="none")
    assert torch.equal(other_layer, main)


def test_branch_combine_sees_both_outputs_and_can_mix_them() -> None:
    pipe = _pipe("tiny-wan")
    handle = accel.patch(pipe, accel.Dense())
    pairs = []

    def mix(main, branch, ctx):
        pairs.append(ctx.branch.name)
        a, b = first_tensor(main), first_tensor(branch)
        return replace_first_tensor(main, a + 2.0 * (a - b))

    handle.add_branch(Branch("perturbed", {0: (ValueCopy(), None), 1: (ValueCopy(), (0,))}, mix,
                             active=lambda step, total: step is not None and step >= 1))
    out = _generate(pipe, "tiny-wan", steps=2)
    handle.remove_branch("perturbed")
    plain = _generate(pipe, "tiny-wan", steps=2)
    accel.unpatch(pipe)
    assert pairs and set(pairs) == {"perturbed"}
    assert len(pairs) == 2  # step 1 only, cond and uncond passes of CFG
    assert not torch.equal(out, plain)


def test_unpatch_on_an_unpatched_pipeline_says_so(caplog) -> None:
    pipe = _pipe("tiny-wan")
    with caplog.at_level("WARNING", logger="accel"):
        assert accel.unpatch(pipe) is False
    assert "not patched by accel" in caplog.text
    assert patch_handle(pipe) is None


def test_add_branch_checks_its_argument() -> None:
    pipe = _pipe("tiny-wan")
    handle = accel.patch(pipe, accel.Dense())
    with pytest.raises(TypeError, match="Branch"):
        handle.add_branch(lambda m, b: m)  # type: ignore[arg-type]
    accel.unpatch(pipe)
