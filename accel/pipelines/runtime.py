"""What a patched pipeline carries at run time: schedule decisions, cached plans, step state, stats.

One `AttentionRuntime` belongs to one `accel.patch` call. Processors hold a reference to it and to
the `TransformerState` of their transformer; nothing lives in class attributes or module globals.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.geometry import TokenLayout
from accel.methods.base import AttentionMethod, check_qkv
from accel.methods.dense import Dense
from accel.schedule import Schedule

logger = logging.getLogger("accel")


class UnsupportedInput(NotImplementedError):
    """A valid request the chosen method cannot serve (the runtime may fall back to dense)."""


@dataclass
class TransformerState:
    """Per-transformer facts refreshed by a forward pre-hook before each call."""

    grid: tuple[int, int, int] | None = None
    step: int | None = None
    total_steps: int | None = None


@dataclass
class LayerStats:
    sparse_calls: int = 0
    dense_calls: int = 0
    density_sum: float = 0.0

    @property
    def mean_density(self) -> float:
        calls = self.sparse_calls + self.dense_calls
        return (self.density_sum + self.dense_calls) / calls if calls else 1.0


@dataclass
class AttentionStats:
    """Counts and densities of the self-attention calls made through a patch."""

    layers: dict[int, LayerStats] = field(default_factory=lambda: defaultdict(LayerStats))
    fallbacks: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    plan_seconds: float = 0.0
    # step index (None outside a pipeline loop) -> layer indices that ran at that step
    steps: dict[int | None, set[int]] = field(default_factory=lambda: defaultdict(set))

    def record(self, layer: int, density: float, sparse: bool, step: int | None = None) -> None:
        self.steps[step].add(layer)
        entry = self.layers[layer]
        if sparse:
            entry.sparse_calls += 1
            entry.density_sum += density
        else:
            entry.dense_calls += 1

    @property
    def calls(self) -> int:
        return sum(s.sparse_calls + s.dense_calls for s in self.layers.values())

    @property
    def sparse_calls(self) -> int:
        return sum(s.sparse_calls for s in self.layers.values())

    def mean_density(self) -> float:
        """Tile density averaged over all calls, dense calls counting 1.0."""
        calls = self.calls
        if not calls:
            return 1.0
        return sum(s.density_sum + s.dense_calls for s in self.layers.values()) / calls

    def per_layer_density(self) -> dict[int, float]:
        return {layer: s.mean_density for layer, s in sorted(self.layers.items())}

    def summary(self) -> str:
        text = (
            f"attention: {self.calls} self-attention calls, {self.sparse_calls} sparse, "
            f"mean tile density {self.mean_density():.3f}"
        )
        if self.fallbacks:
            text += "; dense fallbacks: " + ", ".join(f"{k} x{v}" for k, v in self.fallbacks.items())
        return text

    def reset(self) -> None:
        self.layers.clear()
        self.fallbacks.clear()
        self.steps.clear()
        self.plan_seconds = 0.0


class AttentionRuntime:
    """Chooses the method per (step, layer), caches plans per geometry, and falls back as configured."""

    def __init__(self, method: AttentionMethod, schedule: Schedule | None, on_unsupported: str) -> None:
        if on_unsupported not in ("error", "dense"):
            raise ValueError(f"on_unsupported must be 'error' or 'dense', got {on_unsupported!r}")
        self.method = method
        self.schedule = schedule or Schedule()
        self.on_unsupported = on_unsupported
        self.dense = Dense()
        self.stats = AttentionStats()
        self._plans: dict[tuple, Any] = {}
        self._refused: dict[tuple, str] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def fallback(self, reason: str) -> None:
        """Record a dense fallback, or raise when the user asked for errors."""
        if self.on_unsupported == "error":
            raise UnsupportedInput(f"{self.method.name} attention cannot run here: {reason}")
        self.stats.fallbacks[reason] += 1
        self.warn_once(f"accel: {self.method.name} attention falls back to dense: {reason}")

    def plan_for(self, layout: TokenLayout, heads: int, head_dim: int, q: torch.Tensor) -> Any:
        """The cached plan for this geometry, or raise UnsupportedInput with the reason."""
        key = (self.method, layout.geometry_key(), heads, q.device)
        if key in self._refused:
            raise UnsupportedInput(self._refused[key])
        if key not in self._plans:
            try:
                self.method.can_run(layout, heads, head_dim, q.dtype, q.device, raise_error=True)
                start = time.perf_counter()
                self._plans[key] = self.method.build_plan(layout, heads, q.device)
                self.stats.plan_seconds += time.perf_counter() - start
            except (ValueError, NotImplementedError) as err:
                self._refused[key] = str(err)
                raise UnsupportedInput(str(err)) from err
        return self._plans[key]

    # ------------------------------------------------------------------ the call
    def attend(
        self,
        state: TransformerState,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        text_tokens: int,
        text_position: str,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
        unsupported: str | None = None,
    ) -> torch.Tensor:
        """Self-attention of one layer on (B, S, H, D) tensors; returns (B, S, H, D).

        `unsupported` names a reason the caller already knows the method cannot run (dense fallback or error).
        """
        dense_here = isinstance(self.method, Dense) or self.schedule.is_dense(
            state.step, state.total_steps, layer
        )
        if not dense_here:
            try:
                if unsupported is not None:
                    raise UnsupportedInput(unsupported)
                layout = self.layout_for(state, q, text_tokens, text_position)
                check_qkv(q, k, v, layout)
                plan = self.plan_for(layout, q.shape[2], q.shape[3], q)
                out = self.method.attend(q, k, v, layout, plan, key_padding_mask=key_padding_mask, scale=scale)
                self.stats.record(layer, self.method.plan_density(plan), sparse=True, step=state.step)
                return out
            except UnsupportedInput as err:
                self.fallback(str(err).removeprefix(f"{self.method.name} attention cannot run here: "))
            except NotImplementedError as err:
                self.fallback(str(err))
        self.stats.record(layer, 1.0, sparse=False, step=state.step)
        return self.dense.attend(q, k, v, None, None, key_padding_mask=key_padding_mask, scale=scale)

    @staticmethod
    def layout_for(state: TransformerState, q: torch.Tensor, text_tokens: int, text_position: str) -> TokenLayout:
        if state.grid is None:
            raise UnsupportedInput("the video token grid of this call is unknown")
        frames, height, width = state.grid
        video = frames * height * width
        if video + text_tokens != q.shape[1]:
            raise UnsupportedInput(
                f"sequence of {q.shape[1]} tokens is not the {frames}x{height}x{width} grid + {text_tokens} text "
                "tokens this model family lays out"
            )
        return TokenLayout(q.shape[0], frames, height, width, text_tokens, text_position if text_tokens else "none")
