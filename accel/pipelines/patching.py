"""`accel.patch` / `accel.unpatch`: install our processors on a pipeline's self-attention modules.

Only public mechanisms are used: `set_processor` on each self-attention module and a diffusers hook
(`diffusers.hooks.HookRegistry`) on each transformer that builds the per-forward context (token grid,
denoising step, text padding) and runs extra branches (`accel.pipelines.context.Branch`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.pipelines.context import (
    Branch,
    ForwardContextHook,
    StepTracker,
    TransformerState,
    install_context_hook,
    install_token_stream,
    remove_context_hook,
)
from accel.pipelines.families import adapter_for, adapters
from accel.pipelines.runtime import AttentionRuntime, AttentionStats
from accel.schedule import Schedule

logger = logging.getLogger("accel")

TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")
_PATCH_ATTRIBUTE = "_accel_patch"


class UnsupportedModelError(NotImplementedError):
    """The pipeline or transformer is not one of the families accel knows."""


@dataclass
class PatchHandle:
    """What `patch` changed, so `unpatch` can restore it exactly; also holds the run-time stats."""

    runtime: AttentionRuntime | None
    originals: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)
    hooked: list[torch.nn.Module] = field(default_factory=list)
    stream_hooks: list[Any] = field(default_factory=list)
    states: dict[str, TransformerState] = field(default_factory=dict)

    @property
    def stats(self) -> AttentionStats:
        return self.runtime.stats if self.runtime is not None else AttentionStats()

    def add_branch(self, branch: Branch) -> None:
        """Run `branch` inside every patched forward from now on (the branch hook point of guidance)."""
        if self.runtime is None:
            raise RuntimeError("this pipeline runs unpatched (unsupported model): it cannot take branches")
        if not isinstance(branch, Branch):
            raise TypeError(f"branch must be an accel.pipelines.context.Branch, got {type(branch).__name__}")
        self.runtime.branches.append(branch)

    def remove_branch(self, name: str) -> None:
        if self.runtime is not None:
            self.runtime.branches[:] = [b for b in self.runtime.branches if b.name != name]


def _transformers(pipe: Any) -> dict[str, torch.nn.Module]:
    if isinstance(pipe, torch.nn.Module):
        return {"transformer": pipe}
    found = {}
    for attr in TRANSFORMER_ATTRIBUTES:
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            found[attr] = module
    return found


def _unsupported(message: str, on_unsupported: str) -> None:
    if on_unsupported == "error":
        raise UnsupportedModelError(message)
    logger.warning("accel: %s; running dense attention (unpatched).", message)


def patch(
    pipe: Any,
    method: AttentionMethod | None = None,
    schedule: Schedule | None = None,
    guidance: Any = None,
    on_unsupported: str = "error",
    seed: int = 0,
) -> PatchHandle:
    """Replace the self-attention of a diffusers pipeline (or a bare transformer) with `method`.

    Args:
        pipe: a diffusers pipeline with `.transformer` (and `.transformer_2` for Wan 2.2), or a transformer.
        method: an attention method config such as `accel.Radial(decay=0.2)`; default `Dense()`.
        schedule: which steps and layers stay dense (`accel.Schedule`).
        guidance: head-perturbation guidance (`accel.HeadPerturbation`, or a preset file path / `GuidancePreset`
            made by `accel heads search`): runs its perturbed branch inside each conditional forward.
        on_unsupported: "error" raises a clear error for unknown models or shapes the method cannot
            take; "dense" logs one warning and runs dense attention there instead.
        seed: base of the per-call seeds of sampling methods (pyramid): each (step, layer) call gets its own
            seed derived from it (`accel.methods.base.call_seed`); pass the generation seed for reproducible masks.

    Returns:
        A `PatchHandle` (also stored on the pipeline) whose `.stats` reports attention calls and density.
    """
    if on_unsupported not in ("error", "dense"):
        raise ValueError(f"on_unsupported must be 'error' or 'dense', got {on_unsupported!r}")
    method = Dense() if method is None else method
    if not isinstance(method, AttentionMethod):
        raise TypeError(f"method must be an accel attention method (e.g. accel.Radial()), got {type(method).__name__}")
    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be an accel.Schedule, got {type(schedule).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if guidance is not None:
        from accel.guidance.preset import as_guidance

        guidance = as_guidance(guidance)
    if getattr(pipe, _PATCH_ATTRIBUTE, None) is not None:
        raise RuntimeError("this pipeline is already patched by accel; call accel.unpatch(pipe) first")

    transformers = _transformers(pipe)
    if guidance is not None:
        on_unsupported_model = "error"  # guidance cannot fall back to dense: an unknown model is an error
    else:
        on_unsupported_model = on_unsupported
    if not transformers:
        _unsupported(f"{type(pipe).__name__} has no `transformer` module accel can patch", on_unsupported_model)
        return PatchHandle(None)
    found = {name: adapter_for(module) for name, module in transformers.items()}
    missing = [f"{type(transformers[n]).__name__}" for n, a in found.items() if a is None]
    if missing:
        families = ", ".join(sorted(adapters()))
        _unsupported(
            f"{type(pipe).__name__} with {', '.join(missing)} is not a supported model family "
            f"(supported: {families})",
            on_unsupported_model,
        )
        return PatchHandle(None)

    runtime = AttentionRuntime(method, schedule, on_unsupported, seed=seed)
    handle = PatchHandle(runtime)
    tracker = StepTracker(pipe if not isinstance(pipe, torch.nn.Module) else None)
    try:
        for name, transformer in transformers.items():
            adapter = found[name]
            state = TransformerState()
            handle.states[name] = state
            sites = adapter.self_attention_sites(transformer)
            if not sites:
                raise UnsupportedModelError(f"found no self-attention modules in {type(transformer).__name__}")
            for site in sites:
                processor = adapter.make_processor(runtime, state, site)
                # Context parallelism enabled before patching (diffusers' enable_parallelism) carries over.
                processor._parallel_config = getattr(site.module.processor, "_parallel_config", None)
                handle.originals.append((site.module, site.module.processor))
                site.module.set_processor(processor)
            stream = adapter.token_stream(transformer)
            if stream is not None:
                handle.stream_hooks.extend(install_token_stream(stream, state))
            install_context_hook(transformer, ForwardContextHook(adapter, state, tracker, runtime, stream is not None))
            handle.hooked.append(transformer)
        if guidance is not None:
            _add_guidance(handle, guidance, pipe, transformers, found)
    except Exception:
        _restore(handle)
        raise
    object.__setattr__(pipe, _PATCH_ATTRIBUTE, handle)  # bypass DiffusionPipeline's module registration
    return handle


def _add_guidance(handle: PatchHandle, guidance: Any, pipe: Any, transformers: dict, found: dict) -> None:
    """Check `guidance` against every patched transformer and install its branch (none when it is a no-op)."""
    from accel.guidance.loop import guidance_branch, layer_sites
    from accel.guidance.preset import check_model_class

    branch = None
    for name, transformer in transformers.items():
        check_model_class(guidance, transformer)
        branch = guidance_branch(getattr(guidance, "perturbation", guidance), found[name].family,
                                 layer_sites(found[name], transformer), pipe)
    if branch is not None and not getattr(guidance, "perturbation", guidance).no_op:
        handle.add_branch(branch)


def _restore(handle: PatchHandle) -> None:
    for transformer in handle.hooked:
        remove_context_hook(transformer)
    for hook in handle.stream_hooks:
        hook.remove()
    handle.stream_hooks.clear()
    for module, original in reversed(handle.originals):
        module.set_processor(original)
    handle.hooked.clear()
    handle.originals.clear()


def unpatch(pipe: Any) -> bool:
    """Restore the processors `patch` replaced (the very same objects) and remove its hooks.

    Returns True; on a pipeline accel has not patched, logs a warning saying so and returns False.
    """
    handle = getattr(pipe, _PATCH_ATTRIBUTE, None)
    if handle is None:
        logger.warning("accel.unpatch: %s is not patched by accel; nothing to restore", type(pipe).__name__)
        return False
    _restore(handle)
    object.__delattr__(pipe, _PATCH_ATTRIBUTE)
    return True


def patch_handle(pipe: Any) -> PatchHandle | None:
    """The handle of the active patch on `pipe`, if any."""
    return getattr(pipe, _PATCH_ATTRIBUTE, None)
