"""Head-perturbation guidance: the output-space SoftPAG edit against the explicit map, and the guidance formula
in tiny SD3, Flux and Wan pipelines against an explicit three-pass computation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_patching import _call_kwargs

import accel
from accel.geometry import TokenLayout
from accel.guidance.loop import guidance_branch, layer_sites
from accel.guidance.perturbation import (
    HeadPerturbation,
    PerturbationEdit,
    reference_soft_perturbation,
)
from accel.methods.base import Attended, AttentionMethod
from accel.methods.dense import Dense
from accel.pipelines.context import Branch, ForwardContext, TransformerState
from accel.pipelines.families import adapter_for
from accel.pipelines.runtime import AttentionRuntime
from accel.pipelines.tiny import build_tiny

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3}


def _edit(heads: dict[int, tuple[int, ...]], n_heads: int, **config) -> PerturbationEdit:
    pairs = [(layer, h) for layer, hs in heads.items() for h in hs]
    return PerturbationEdit(HeadPerturbation(heads=pairs, **config), heads, dict.fromkeys(heads, n_heads))


def _attend(runtime, layout, q, k, v, edit=None, rows=None, kpm=None, layer=0):
    state = TransformerState(grid=layout.grid)
    branch = None if edit is None else Branch("p", {}, lambda m, b, c: b, edit=edit)
    state.context = ForwardContext(grid=layout.grid, branch=branch, branch_rows=rows)
    if kpm is not None:
        state.context.text_visible = kpm[:, layout.text_slice]
        from accel.methods.base import padding_facts

        state.context.text_facts = padding_facts(state.context.text_visible)
    return runtime.attend(state, layer, q, k, v, text_tokens=layout.text_tokens, text_position=layout.text_position,
                          key_padding_mask=kpm)


CASES = [  # batch, frames, height, width, text, position, dtype, padded
    (1, 1, 3, 5, 0, "none", torch.float32, False),
    (2, 1, 4, 3, 5, "before", torch.float32, True),
    (2, 2, 3, 3, 7, "after", torch.float32, True),
    (3, 1, 3, 7, 4, "after", torch.float16, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("target", ["identity", "uniform", "mean_query"])
@pytest.mark.parametrize("scope", ["joint", "image"])
def test_edit_equals_the_explicit_soft_map(case, target, scope) -> None:
    batch, f, h, w, text, pos, dtype, padded = case
    layout = TokenLayout(batch, f, h, w, text, pos)
    heads, d = 3, 16
    q, k, v = (torch.randn(batch, layout.total_tokens, heads, d).to(dtype) for _ in range(3))
    kpm = None
    if padded:
        kpm = torch.ones(batch, layout.total_tokens, dtype=torch.bool)
        kpm[-1, layout.text_slice.stop - 2:layout.text_slice.stop] = False
    runtime = AttentionRuntime(Dense(), None, "error")
    edit = _edit({0: (0, 2)}, heads, strength=0.3, target=target, scope=scope)
    out = _attend(runtime, layout, q, k, v, edit, kpm=kpm)
    ref = reference_soft_perturbation(q, k, v, (0, 2), strength=0.3, target=target, scope=scope,
                                      text_tokens=text, text_position=pos, keys_visible=kpm)
    visible_rows = slice(None) if kpm is None else kpm[:, :, None, None].expand_as(q)
    err = (out.double() - ref.double()).abs()[visible_rows].max().item()
    print(f"{case} {target} {scope}: max abs err {err:.2e}")
    assert out.shape == q.shape and out.dtype == dtype
    assert err < TOLERANCE[dtype] * 10


def test_full_strength_on_one_head_is_the_identity_map_and_other_heads_are_unchanged() -> None:
    layout = TokenLayout(2, 1, 4, 4, 5, "before")
    q, k, v = (torch.randn(2, layout.total_tokens, 4, 8) for _ in range(3))
    runtime = AttentionRuntime(Dense(), None, "error")
    plain = _attend(runtime, layout, q, k, v)
    out = _attend(runtime, layout, q, k, v, _edit({0: (2,)}, 4, strength=1.0))
    assert torch.equal(out[:, :, 2], v[:, :, 2])  # identity: every token (text too) outputs its own value
    assert torch.equal(out[:, :, [0, 1, 3]], plain[:, :, [0, 1, 3]])
    other_layer = _attend(runtime, layout, q, k, v, _edit({0: (2,)}, 4, strength=1.0), layer=1)
    assert torch.equal(other_layer, plain)
    image_only = _attend(runtime, layout, q, k, v, _edit({0: (2,)}, 4, strength=1.0, scope="image"))
    assert torch.equal(image_only[:, :5, 2], plain[:, :5, 2]) and torch.equal(image_only[:, 5:, 2], v[:, 5:, 2])


def test_strength_zero_edit_changes_nothing_and_batched_rows_touch_only_the_branch() -> None:
    layout = TokenLayout(4, 1, 3, 3, 2, "after")
    q, k, v = (torch.randn(4, layout.total_tokens, 2, 8) for _ in range(3))
    runtime = AttentionRuntime(Dense(), None, "error")
    plain = _attend(runtime, layout, q, k, v)
    assert torch.equal(_attend(runtime, layout, q, k, v, _edit({0: (1,)}, 2, strength=0.0)), plain)
    rows = _attend(runtime, layout, q, k, v, _edit({0: (1,)}, 2, strength=1.0), rows=slice(2, 4))
    assert torch.equal(rows[:2], plain[:2])
    assert torch.equal(rows[2:, :, 1], v[2:, :, 1]) and torch.equal(rows[2:, :, 0], plain[2:, :, 0])


@pytest.mark.parametrize("text,pos", [(0, "none"), (6, "after")])
def test_perturbed_and_sparse_together_equal_the_explicit_computation(text, pos) -> None:
    layout = TokenLayout(2, 4, 4, 4, text, pos)
    method = accel.Radial(decay=0.5, block_size=16, sink=True)
    runtime = AttentionRuntime(method, None, "error")
    q, k, v = (torch.randn(2, layout.total_tokens, 2, 16) for _ in range(3))
    out = _attend(runtime, layout, q, k, v, _edit({0: (1,)}, 2, strength=0.6))
    mask = method.token_mask(layout, method.build_plan(layout, 2, q.device))
    assert not bool(mask.all()), "the radial mask must be sparse for this test to mean something"
    ref = reference_soft_perturbation(q, k, v, (1,), strength=0.6, text_tokens=text, text_position=pos,
                                      attn_mask=mask)
    sparse_only = reference_soft_perturbation(q, k, v, (1,), strength=0.0, attn_mask=mask)
    err = (out - ref).abs().max().item()
    print(f"radial + SoftPAG vs explicit masked map: {err:.2e}")
    assert err < 1e-4
    assert (out[:, :, 0] - sparse_only[:, :, 0]).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class ExplicitSoftPAG(AttentionMethod):
    """Reference for the perturbed pass: the chosen heads' explicit (1 - u)A + uP map (a branch override)."""

    name: ClassVar[str] = "explicit-softpag"
    registered: ClassVar[bool] = False
    strength: float = 1.0
    target: str = "identity"
    scope: str = "joint"

    def run(self, q, k, v, layout, plan, call):
        out = reference_soft_perturbation(q, k, v, None, strength=self.strength, target=self.target,
                                          scope=self.scope, text_tokens=layout.text_tokens,
                                          text_position=layout.text_position, keys_visible=call.key_padding_mask)
        return Attended(out, 1.0)


class Recorder:
    """The transformer's inputs and (guided) outputs of every call of a pipeline run."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls: list[list] = []
        self.handles = [
            transformer.register_forward_pre_hook(self.pre, with_kwargs=True),
            transformer.register_forward_hook(self.post, with_kwargs=True),
        ]

    def pre(self, module, args, kwargs):
        self.calls.append([args, dict(kwargs), None])

    def post(self, module, args, kwargs, output):
        self.calls[-1][2] = (output[0] if isinstance(output, tuple) else output.sample).clone()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _perturbed_pass(pipe, transformer, guidance: HeadPerturbation, args, kwargs) -> torch.Tensor:
    """The transformer output with the chosen heads' explicit soft map (independent of the guidance edit)."""
    adapter = adapter_for(transformer)
    sites = layer_sites(adapter, transformer)
    from accel.guidance.perturbation import resolve_heads

    heads = resolve_heads(guidance.heads, sites)
    ref = ExplicitSoftPAG(guidance.strength, guidance.target, guidance.scope)
    handle = accel.patch(transformer, Dense())
    handle.add_branch(Branch("explicit", {layer: (ref, hs) for layer, hs in heads.items()}, lambda m, b, c: b))
    try:
        with torch.no_grad():
            return _sample(transformer(*args, **kwargs)).clone()
    finally:
        accel.unpatch(transformer)


def _plain_pass(transformer, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return _sample(transformer(*args, **kwargs)).clone()


def _rows(kwargs: dict, args: tuple, rows: slice) -> tuple[tuple, dict]:
    from accel.pipelines.context import map_batch

    batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
    return map_batch(args, kwargs, batch, lambda t: t[rows])


FORMULA_CASES = [  # tiny model, pipeline kwargs turning CFG on/off, guidance extras, batched branch
    ("tiny-sd3", {"guidance_scale": 4.0}, {}, True),
    ("tiny-sd3", {"guidance_scale": 4.0}, {"target": "uniform", "scope": "image"}, False),
    ("tiny-sd3", {"guidance_scale": 1.0}, {}, True),
    ("tiny-wan", {"guidance_scale": 3.0}, {"target": "mean_query"}, True),
    ("tiny-wan", {"guidance_scale": 1.0}, {}, False),
    ("tiny-flux", {}, {}, True),
    ("tiny-flux", {"true_cfg_scale": 2.5, "negative_prompt": "blurry"}, {"cfg_scale": 2.5}, False),
    ("tiny-hunyuan-video", {}, {"scope": "image"}, True),  # padded text (encoder_attention_mask)
]


@pytest.mark.parametrize("case", FORMULA_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-batched{c[3]}")
def test_guidance_formula_against_explicit_three_passes(case) -> None:
    name, call_kwargs, extra, batched = case
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    layers = len(layer_sites(adapter_for(transformer), transformer))
    guidance = HeadPerturbation(heads=[(0, 1), (layers - 1, 0)], strength=0.7, scale=2.0, steps=(1, None),
                                batched=batched, **extra)
    kwargs = {**_call_kwargs(name, copies=2), **call_kwargs}
    cfg = call_kwargs.get("guidance_scale", call_kwargs.get("true_cfg_scale", 1.0))
    cfg_on = cfg > 1.0 and not (name == "tiny-flux" and "true_cfg_scale" not in call_kwargs)
    accel.patch(pipe, Dense(), guidance=guidance)
    rec = Recorder(transformer)
    pipe(prompt="a red car", generator=torch.Generator().manual_seed(0), **kwargs)
    rec.remove()
    accel.unpatch(pipe)

    separate = name != "tiny-sd3"
    per_step = 2 if (separate and cfg_on) else 1
    assert len(rec.calls) == per_step * kwargs["num_inference_steps"]
    worst = 0.0
    for step in range(kwargs["num_inference_steps"]):
        w_p = guidance.scale if guidance.active(step, kwargs["num_inference_steps"]) else 0.0
        group = rec.calls[step * per_step:(step + 1) * per_step]
        if separate:
            (c_args, c_kwargs, c_out) = group[0]
            v_c = _plain_pass(transformer, c_args, c_kwargs)
            v_p = _perturbed_pass(pipe, transformer, guidance, c_args, c_kwargs)
            if cfg_on:
                u_args, u_kwargs, u_out = group[1]
                v_u = _plain_pass(transformer, u_args, u_kwargs)
                got = u_out + cfg * (c_out - u_out)
                want = v_u + cfg * (v_c - v_u) + w_p * (v_c - v_p)
            else:
                got, want = c_out, v_c + w_p * (v_c - v_p)
        else:
            args, kw, out = group[0]
            both = _plain_pass(transformer, args, kw)
            if cfg_on:
                half = both.shape[0] // 2
                cond_args, cond_kw = _rows(kw, args, slice(half, None))
                v_u, v_c = both[:half], both[half:]
                v_p = _perturbed_pass(pipe, transformer, guidance, cond_args, cond_kw)
                got = out[:half] + cfg * (out[half:] - out[:half])
                want = v_u + cfg * (v_c - v_u) + w_p * (v_c - v_p)
            else:
                v_c = both
                v_p = _perturbed_pass(pipe, transformer, guidance, args, kw)
                got, want = out, v_c + w_p * (v_c - v_p)
        assert got.shape[0] == 2, "batch 2 (two images per prompt)"
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        worst = max(worst, err)
        if w_p:
            assert (v_c - v_p).abs().max() > 1e-4, "the perturbation must change the prediction"
    print(f"{case}: worst relative error {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-wan"])
def test_strength_zero_gives_exactly_the_cfg_only_result(name) -> None:
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    kwargs = _call_kwargs(name, copies=2)

    def run():
        out = pipe(prompt="a red car", generator=torch.Generator().manual_seed(0), **kwargs)
        return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)

    reference = run()
    zero = HeadPerturbation(heads=[(0, 0), (1, 1)], strength=0.0, scale=3.0)
    handle = accel.patch(pipe, Dense(), guidance=zero)
    assert not handle.runtime.branches  # a no-op guidance installs nothing
    assert torch.equal(run(), reference)
    # the branch machinery itself, forced on at u = 0 in a separate pass, reproduces CFG to float rounding: the
    # extra pass changes batch shapes, and the CPU BLAS may then round differently (SD3 with transformers 5.24:
    # 1.4e-6 on a [0, 1] image), so this is a tolerance check, not bit equality
    adapter = adapter_for(pipe.transformer)
    forced = HeadPerturbation(heads=[(0, 0), (1, 1)], strength=0.0, scale=3.0, batched=False)
    handle.add_branch(guidance_branch(forced, adapter.family, layer_sites(adapter, pipe.transformer), pipe))
    torch.testing.assert_close(run(), reference, rtol=0, atol=1e-5)
    assert handle.stats.branch_calls > 0
    accel.unpatch(pipe)


def test_guidance_combines_with_radial_in_one_patch_call() -> None:
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    kwargs = _call_kwargs("tiny-wan")
    handle = accel.patch(pipe, accel.Radial(decay=0.5), guidance=HeadPerturbation(heads=[(1, 1)], scale=2.0))
    out = pipe(prompt="a red car", generator=torch.Generator().manual_seed(0), **kwargs).frames
    accel.unpatch(pipe)
    assert handle.stats.sparse_calls > 0 and handle.stats.branch_calls > 0
    assert torch.isfinite(torch.as_tensor(out)).all()


def test_wan22_uses_each_experts_cfg_scale() -> None:
    pipe = build_tiny("tiny-wan22")
    pipe.set_progress_bar_config(disable=True)
    guidance = HeadPerturbation(heads=[(1, 0)], strength=1.0, scale=2.0)
    kwargs = _call_kwargs("tiny-wan22")
    accel.patch(pipe, Dense(), guidance=guidance)
    records = {name: Recorder(getattr(pipe, name)) for name in ("transformer", "transformer_2")}
    pipe(prompt="a red car", generator=torch.Generator().manual_seed(0), **kwargs)
    for rec in records.values():
        rec.remove()
    accel.unpatch(pipe)
    scales = {"transformer": kwargs["guidance_scale"], "transformer_2": kwargs["guidance_scale_2"]}
    assert all(len(r.calls) >= 2 for r in records.values()), "both experts must run"
    for name, rec in records.items():
        model, cfg = getattr(pipe, name), scales[name]
        for (c_args, c_kw, c_out), (u_args, u_kw, u_out) in zip(rec.calls[0::2], rec.calls[1::2], strict=True):
            v_c, v_u = _plain_pass(model, c_args, c_kw), _plain_pass(model, u_args, u_kw)
            v_p = _perturbed_pass(pipe, model, guidance, c_args, c_kw)
            want = v_u + cfg * (v_c - v_u) + guidance.scale * (v_c - v_p)
            got = u_out + cfg * (c_out - u_out)
            err = ((got - want).abs().max() / want.abs().max()).item()
            print(f"{name} (cfg {cfg}): relative error {err:.2e}")
            assert err < 1e-4


@pytest.mark.parametrize("method", [accel.Pyramid()], ids=lambda m: m.name)  # neighborhood: 5 min interpreted
def test_batched_and_separate_branches_agree_with_a_dynamic_method(method) -> None:
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    kwargs = _call_kwargs("tiny-wan", copies=2)
    outs = []
    for batched in (True, False):
        guidance = HeadPerturbation(heads=[(0, 1), (1, 0)], strength=0.7, scale=2.0, batched=batched)
        handle = accel.patch(pipe, method, guidance=guidance)
        outs.append(torch.as_tensor(pipe(prompt="a red car", generator=torch.Generator().manual_seed(0),
                                         **kwargs).frames))
        accel.unpatch(pipe)
        assert handle.stats.sparse_calls > 0 and handle.stats.branch_calls > 0
    err = (outs[0] - outs[1]).abs().max().item()
    print(f"{method.name}: batched vs separate branch {err:.2e}")
    assert err < 1e-5
