"""`accel.patch` / `accel.unpatch`: install our processors on a pipeline's self-attention modules.

Only public mechanisms are used: `set_processor` on each self-attention module and a forward
pre-hook on each transformer that tells the processors the token grid and the denoising step.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.pipelines.adapter import FamilyAdapter, adapter_for, adapters
from accel.pipelines.runtime import AttentionRuntime, AttentionStats, TransformerState
from accel.schedule import Schedule

logger = logging.getLogger("accel")

TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")
_PATCH_ATTRIBUTE = "_accel_patch"


class UnsupportedModelError(NotImplementedError):
    """The pipeline or transformer is not one of the families accel knows."""


class StepTracker:
    """Finds the denoising step of the current transformer call from the pipeline's scheduler.

    diffusers pipelines store the loop's timestep in `pipe._current_timestep` (or pass it as the
    transformer's `timestep`); its index in `pipe.scheduler.timesteps` is the step index.
    """

    def __init__(self, pipe: Any) -> None:
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self._last_step: int | None = None

    def current(self, kwargs: dict) -> tuple[int | None, int | None]:
        pipe = self._pipe() if self._pipe is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None, None
        t = getattr(pipe, "_current_timestep", None)
        if t is None:
            t = kwargs.get("timestep")
        if t is None:
            return None, len(timesteps)
        t = torch.as_tensor(t).reshape(-1)[:1].to(device=timesteps.device, dtype=timesteps.dtype)
        matches = (timesteps == t).nonzero().flatten().tolist()
        if not matches:
            return None, len(timesteps)
        # Repeated timesteps: prefer the first match at or after the last step seen.
        later = [m for m in matches if self._last_step is not None and m >= self._last_step]
        step = later[0] if later else matches[0]
        self._last_step = step
        return step, len(timesteps)


@dataclass
class PatchHandle:
    """What `patch` changed, so `unpatch` can restore it exactly; also holds the run-time stats."""

    runtime: AttentionRuntime | None
    adapter: FamilyAdapter | None
    originals: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    states: dict[str, TransformerState] = field(default_factory=dict)

    @property
    def stats(self) -> AttentionStats:
        return self.runtime.stats if self.runtime is not None else AttentionStats()


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
) -> PatchHandle:
    """Replace the self-attention of a diffusers pipeline (or a bare transformer) with `method`.

    Args:
        pipe: a diffusers pipeline with `.transformer` (and `.transformer_2` for Wan 2.2), or a transformer.
        method: an attention method config such as `accel.Radial(decay=0.2)`; default `Dense()`.
        schedule: which steps and layers stay dense (`accel.Schedule`).
        guidance: head-perturbation guidance; not available yet (raises NotImplementedError).
        on_unsupported: "error" raises a clear error for unknown models or shapes the method cannot
            take; "dense" logs one warning and runs dense attention there instead.

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
    if guidance is not None:
        raise NotImplementedError("head-perturbation guidance is not available in this version of accel")
    if getattr(pipe, _PATCH_ATTRIBUTE, None) is not None:
        raise RuntimeError("this pipeline is already patched by accel; call accel.unpatch(pipe) first")

    transformers = _transformers(pipe)
    if not transformers:
        _unsupported(f"{type(pipe).__name__} has no `transformer` module accel can patch", on_unsupported)
        return PatchHandle(None, None)
    found = {name: adapter_for(module) for name, module in transformers.items()}
    missing = [f"{type(transformers[n]).__name__}" for n, a in found.items() if a is None]
    if missing:
        families = ", ".join(sorted(adapters()))
        _unsupported(
            f"{type(pipe).__name__} with {', '.join(missing)} is not a supported model family "
            f"(supported: {families})",
            on_unsupported,
        )
        return PatchHandle(None, None)

    runtime = AttentionRuntime(method, schedule, on_unsupported)
    handle = PatchHandle(runtime, next(iter(found.values())))
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
            handle.hooks.append(
                transformer.register_forward_pre_hook(_make_pre_hook(adapter, state, tracker), with_kwargs=True)
            )
    except Exception:
        _restore(handle)
        raise
    object.__setattr__(pipe, _PATCH_ATTRIBUTE, handle)  # bypass DiffusionPipeline's module registration
    return handle


def _make_pre_hook(adapter: FamilyAdapter, state: TransformerState, tracker: StepTracker):
    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state.grid = adapter.grid(module, args, kwargs)
        state.step, state.total_steps = tracker.current(kwargs)

    return pre_hook


def _restore(handle: PatchHandle) -> None:
    for hook in handle.hooks:
        hook.remove()
    for module, original in reversed(handle.originals):
        module.set_processor(original)
    handle.hooks.clear()
    handle.originals.clear()


def unpatch(pipe: Any) -> None:
    """Restore the processors `patch` replaced (the very same objects) and remove its hooks."""
    handle = getattr(pipe, _PATCH_ATTRIBUTE, None)
    if handle is None:
        return
    _restore(handle)
    object.__delattr__(pipe, _PATCH_ATTRIBUTE)


def patch_handle(pipe: Any) -> PatchHandle | None:
    """The handle of the active patch on `pipe`, if any."""
    return getattr(pipe, _PATCH_ATTRIBUTE, None)
