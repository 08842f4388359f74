"""Head-perturbation guidance in the denoising loop, through the patch's branch hook (no pipeline `__call__` copy).

The perturbed branch re-runs the conditional rows of a forward with the chosen heads blended
(`PerturbationEdit`). Its combine returns, in place of v_c, v_c' = v_c + (w_p / w_cfg)(v_c - v_p): the
pipeline's own CFG step v_u + w_cfg (v_c' - v_u) then gives v_u + w_cfg (v_c - v_u) + w_p (v_c - v_p), and
without CFG it returns v_c' = v_c + w_p (v_c - v_p). Which rows are conditional and which CFG scale the
pipeline applies are family facts (`CFG_RULES`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accel.guidance.perturbation import HeadPerturbation, LayerSite, PerturbationEdit, resolve_heads
from accel.pipelines.context import Branch, ForwardContext, first_tensor, replace_first_tensor

BRANCH_NAME = "head-perturbation"


@dataclass(frozen=True)
class CfgRule:
    """How a family's pipelines run classifier-free guidance around the transformer.

    Attributes:
        batched: uncond and cond rows share one call ([uncond, cond], SD3); else they are separate calls,
            the unconditional one inside ``cache_context("uncond")`` (Wan, Flux, HunyuanVideo).
        scale: (pipe, guidance, ctx) -> the CFG scale the pipeline applies to this call's output, or None
            when it runs no CFG.
    """

    batched: bool
    scale: Callable[[Any, HeadPerturbation, ForwardContext], float | None]


def _pipe_cfg(pipe: Any, guidance: HeadPerturbation, ctx: ForwardContext) -> float | None:
    if pipe is None:
        return guidance.cfg_scale
    try:
        on = bool(pipe.do_classifier_free_guidance)
    except AttributeError:  # called outside the pipeline's __call__
        return guidance.cfg_scale
    return float(pipe.guidance_scale) if on else None


def _wan_cfg(pipe: Any, guidance: HeadPerturbation, ctx: ForwardContext) -> float | None:
    scale = _pipe_cfg(pipe, guidance, ctx)
    second = getattr(pipe, "_guidance_scale_2", None)
    if scale is None or second is None or second == scale or getattr(pipe, "transformer_2", None) is None:
        return scale
    ratio = getattr(pipe.config, "boundary_ratio", None)
    t = getattr(pipe, "_current_timestep", None)
    if ratio is None or t is None:
        return scale
    boundary = ratio * pipe.scheduler.config.num_train_timesteps
    # Wan 2.2: transformer_2 takes the low-noise steps (one host read of t per forward, only here)
    return scale if float(t) >= boundary else float(second)


def _user_cfg(pipe: Any, guidance: HeadPerturbation, ctx: ForwardContext) -> float | None:
    return guidance.cfg_scale


CFG_RULES: dict[str, CfgRule] = {
    "sd3": CfgRule(batched=True, scale=_pipe_cfg),
    "wan": CfgRule(batched=False, scale=_wan_cfg),
    "flux": CfgRule(batched=False, scale=_user_cfg),
    "hunyuan_video": CfgRule(batched=False, scale=_user_cfg),
}


def layer_sites(adapter: Any, transformer: torch.nn.Module) -> list[LayerSite]:
    """The self-attention layers of `transformer` in accel's layer order, with their head counts."""
    return [LayerSite(s.layer, s.name, int(s.module.heads)) for s in adapter.self_attention_sites(transformer)]


def guidance_branch(guidance: HeadPerturbation, family: str, sites: list[LayerSite], pipe: Any = None) -> Branch:
    """The `Branch` that runs `guidance` inside every conditional forward of a `family` transformer."""
    if not isinstance(guidance, HeadPerturbation):
        raise TypeError(f"guidance must be an accel.HeadPerturbation, got {type(guidance).__name__}")
    if family not in CFG_RULES:
        raise NotImplementedError(f"head-perturbation guidance supports {', '.join(CFG_RULES)} pipelines, "
                                  f"got the {family} family")
    rule = CFG_RULES[family]
    heads = resolve_heads(guidance.heads, sites)
    counts = {s.index: s.heads for s in sites}
    edit = PerturbationEdit(guidance, heads, {layer: counts[layer] for layer in heads})
    pipe_ref = weakref.ref(pipe) if pipe is not None and not isinstance(pipe, torch.nn.Module) else None

    def the_pipe() -> Any:
        return pipe_ref() if pipe_ref is not None else None

    def select(ctx: ForwardContext, batch: int) -> slice | None:
        if "skip_layers" in ctx.inputs:
            raise NotImplementedError(
                "SD3's skip-layer guidance (skip_guidance_layers) reads the conditional prediction that "
                "head-perturbation guidance replaces; use one of the two, not both")
        if ctx.condition == "uncond":
            if not rule.batched and guidance.cfg_scale is None and rule.scale is _user_cfg:
                raise ValueError(
                    f"this {family} pipeline runs true CFG (an unconditional transformer call), which it does not "
                    "expose to accel: pass HeadPerturbation(cfg_scale=<the true_cfg_scale you use>) so that "
                    "v = v_u + w_cfg (v_c - v_u) + w_p (v_c - v_p) holds")
            return None
        if rule.batched and rule.scale(the_pipe(), guidance, ctx) is not None and the_pipe() is not None:
            if batch % 2:
                raise ValueError(f"a batched CFG call has an even batch ([uncond, cond]), got {batch} rows")
            return slice(batch // 2, batch)
        return slice(0, batch)

    def combine(main: Any, branch: Any, ctx: ForwardContext) -> Any:
        rows = ctx.source_rows
        cfg = rule.scale(the_pipe(), guidance, ctx)
        if rule.batched and the_pipe() is None:
            cfg = None  # a bare transformer: its caller gets v_c + w_p (v_c - v_p) on every row
        factor = guidance.scale / cfg if cfg is not None else guidance.scale
        sample = first_tensor(main)
        cond, perturbed = sample[rows], first_tensor(branch)
        guided = (cond.float() + factor * (cond.float() - perturbed.float())).to(sample.dtype)
        return replace_first_tensor(main, torch.cat([sample[: rows.start], guided, sample[rows.stop:]]))

    return Branch(BRANCH_NAME, {}, combine, active=guidance.active, edit=edit, select=select,
                  batched=guidance.batched)


__all__ = ["BRANCH_NAME", "CFG_RULES", "CfgRule", "guidance_branch", "layer_sites"]
