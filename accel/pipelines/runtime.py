"""What a patched pipeline carries at run time: schedule decisions, cached plans, branches, stats.

One `AttentionRuntime` belongs to one `accel.patch` call. Processors hold a reference to it and to the
`TransformerState` of their transformer, whose `ForwardContext` (built once per forward by the context hook)
carries the grid, the step and the padding facts; nothing lives in class attributes or module globals.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.geometry import TokenLayout
from accel.methods.base import AttentionCall, AttentionMethod, call_from_padding_mask, call_seed, check_qkv
from accel.methods.dense import Dense
from accel.pipelines.context import Branch, ForwardContext, TransformerState, permute_tokens
from accel.schedule import Schedule

logger = logging.getLogger("accel")


class UnsupportedInput(NotImplementedError):
    """A valid request the chosen method cannot serve (the runtime may fall back to dense)."""


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
    branch_calls: int = 0
    # step index (None outside a pipeline loop) -> layer indices that ran at that step
    steps: dict[int | None, set[int]] = field(default_factory=lambda: defaultdict(set))

    def record(self, layer: int, density: float | torch.Tensor, sparse: bool, step: int | None = None,
               branch: bool = False) -> None:
        """Count one call; `density` is what the method reported (a 0-dim tensor stays on the device)."""
        if branch:
            self.branch_calls += 1
            return
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
        return float(sum(s.density_sum + s.dense_calls for s in self.layers.values())) / calls

    def per_layer_density(self) -> dict[int, float]:
        return {layer: float(s.mean_density) for layer, s in sorted(self.layers.items())}

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
        self.branch_calls = 0


class AttentionRuntime:
    """Chooses the method per (step, layer), caches plans per geometry, runs branches, falls back as configured."""

    def __init__(self, method: AttentionMethod, schedule: Schedule | None, on_unsupported: str,
                 branches: tuple[Branch, ...] | list[Branch] = (), seed: int = 0) -> None:
        if on_unsupported not in ("error", "dense"):
            raise ValueError(f"on_unsupported must be 'error' or 'dense', got {on_unsupported!r}")
        self.method = method
        self.schedule = schedule or Schedule()
        self.on_unsupported = on_unsupported
        self.branches: list[Branch] = list(branches)
        self.seed = seed  # base of the per-(step, layer) call seeds (`call_seed`)
        self.dense = Dense()
        self.stats = AttentionStats()
        self._plans: dict[tuple, Any] = {}
        self._orders: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._head_index: dict[tuple, torch.Tensor] = {}
        self._refused: dict[tuple, str] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def fallback(self, reason: str, method: AttentionMethod | None = None) -> None:
        """Record a dense fallback, or raise when the user asked for errors."""
        name = (method or self.method).name
        if self.on_unsupported == "error":
            raise UnsupportedInput(f"{name} attention cannot run here: {reason}")
        self.stats.fallbacks[reason] += 1
        self.warn_once(f"accel: {name} attention falls back to dense: {reason}")

    def plan_for(self, layout: TokenLayout, heads: int, head_dim: int, q: torch.Tensor,
                 method: AttentionMethod | None = None) -> Any:
        """The cached plan for this geometry, or raise UnsupportedInput with the reason."""
        method = method or self.method
        key = (method, layout.geometry_key(), heads, q.device)
        if key in self._refused:
            raise UnsupportedInput(self._refused[key])
        if key not in self._plans:
            self._plans[key] = self._build_plan(method, key, layout, heads, head_dim, q.dtype, q.device)
        return self._plans[key]

    @torch.compiler.disable
    def _build_plan(self, method, key, layout, heads, head_dim, dtype, device) -> Any:
        # Once per geometry, on the host: a compiled forward only looks the plan up.
        try:
            method.can_run(layout, heads, head_dim, dtype, device, raise_error=True)
            start = time.perf_counter()
            plan = method.build_plan(layout, heads, device)
            self.stats.plan_seconds += time.perf_counter() - start
            return plan
        except (ValueError, NotImplementedError) as err:
            self._refused[key] = str(err)
            raise UnsupportedInput(str(err)) from err

    def token_order_for(self, grid: tuple[int, int, int], device: torch.device
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(permutation, its inverse) of the method's video-token order for this grid, cached per geometry;
        (None, None) for raster order."""
        key = (self.method, grid, device)
        if key not in self._orders:
            perm = None
            if not isinstance(self.method, Dense):
                perm = self.method.token_order(TokenLayout(1, *grid), device)
                if perm is not None:
                    perm = perm.to(device=device, dtype=torch.long)
                    expected = grid[0] * grid[1] * grid[2]
                    if perm.shape != (expected,) or not torch.equal(perm.sort().values.cpu(), torch.arange(expected)):
                        raise ValueError(f"{self.method.name}.token_order must return a permutation of the {expected} "
                                         f"video tokens, got shape {tuple(perm.shape)}")
            inverse = None
            if perm is not None:
                inverse = torch.empty_like(perm)
                inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            self._orders[key] = (perm, inverse)
        return self._orders[key]

    # ------------------------------------------------------------------ per forward (called by the context hook)
    def begin_forward(self, ctx: ForwardContext) -> None:
        """Hook: a forward starts (its context is built)."""

    def end_forward(self, ctx: ForwardContext) -> None:
        """Hook: a forward ended; move the densities the layers reported into the stats."""
        separate_branch = ctx.branch is not None and ctx.branch_rows is None
        for layer, density, sparse in ctx.densities:
            self.stats.record(layer, density, sparse=sparse, step=ctx.step, branch=separate_branch)
        if ctx.branch is not None and not separate_branch:
            self.stats.branch_calls += len(ctx.densities)  # the main pass and the branch shared these calls
        ctx.densities.clear()

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
        ctx = state.context
        call = self._call(ctx, q, text_tokens, text_position, key_padding_mask, scale)
        out, density, sparse = self._run(self.method, ctx, layer, q, k, v, call, key_padding_mask, text_tokens,
                                         text_position, unsupported)
        branch = ctx.branch
        if branch is not None and layer in branch.overrides:
            method, heads = branch.overrides[layer]
            idx = None if heads is None else self._head_index_for(heads, q.device)
            pick = (lambda t: t) if idx is None else (lambda t: t.index_select(2, idx))
            sub, _, _ = self._run(method, ctx, layer, pick(q), pick(k), pick(v), call, key_padding_mask,
                                  text_tokens, text_position, unsupported)
            rows = ctx.branch_rows
            if rows is not None:  # a batched branch call: only its own rows take the override
                whole = out if idx is None else out.index_copy(2, idx, sub)
                out = torch.cat([out[: rows.start], (sub if idx is None else whole)[rows], out[rows.stop:]])
            else:
                out = sub if idx is None else out.index_copy(2, idx, sub)
        if branch is not None and branch.edit is not None and layer in branch.edit.layers:
            visible = call.key_padding_mask if call is not None else key_padding_mask
            out = branch.edit.apply(layer, out, q, k, v, rows=ctx.branch_rows, text_tokens=text_tokens,
                                    text_position=text_position, keys_visible=visible)
        ctx.densities.append((layer, density, sparse))
        return out

    def _head_index_for(self, heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The head indices of a branch override as a device tensor, made once (not per layer and step)."""
        key = (tuple(heads), device)
        if key not in self._head_index:
            self._head_index[key] = torch.tensor(heads, device=device, dtype=torch.long)
        return self._head_index[key]

    def _call(self, ctx: ForwardContext, q: torch.Tensor, text_tokens: int, text_position: str,
              key_padding_mask: torch.Tensor | None, scale: float | None) -> AttentionCall | None:
        """This call's padding facts from the forward's context (None: only the layer's own mask is known)."""
        if ctx.grid is not None:
            video = q.shape[1] - text_tokens
            call = ctx.call_for(q.shape[0], video, text_tokens, text_position, q.device, scale)
            if call is not None and (key_padding_mask is None or ctx.text_visible is not None):
                return call
        if key_padding_mask is None:
            return AttentionCall(scale=scale)
        return None

    def _run(self, method: AttentionMethod, ctx: ForwardContext, layer: int, q, k, v, call, layer_mask,
             text_tokens, text_position, unsupported) -> tuple[torch.Tensor, Any, bool]:
        """(output, density, sparse?) of `method` on this call; `call` None: padding known only from `layer_mask`."""
        dense_here = isinstance(method, Dense) or (
            method is self.method and self.schedule.is_dense(ctx.step, ctx.total_steps, layer))
        if not dense_here:
            try:
                if unsupported is not None:
                    raise UnsupportedInput(unsupported)
                layout = self.layout_for(ctx, q, text_tokens, text_position)
                check_qkv(q, k, v, layout)
                plan = self.plan_for(layout, q.shape[2], q.shape[3], q, method)
                if call is None:
                    self.warn_once("accel: this model's text padding is read per layer (one host check each)")
                    call = call_from_padding_mask(layer_mask, layout)
                call = dataclasses.replace(call, seed=call_seed(self.seed, ctx.step, layer))
                perm = ctx.token_order if method is self.method and not ctx.order_in_stream else None
                if perm is not None:  # this family has no token stream: reorder around this layer instead
                    self.warn_once(f"accel: {method.name}'s token order is applied per layer for this model")
                    vs = layout.video_slice
                    q, k, v = (permute_tokens(t, perm, 1, vs) for t in (q, k, v))
                attended = method.run(q, k, v, layout, plan, call)
                out = attended.out
                if perm is not None:
                    out = permute_tokens(out, ctx.token_inverse, 1, layout.video_slice)
                return out, attended.density, True
            except UnsupportedInput as err:
                self.fallback(str(err).removeprefix(f"{method.name} attention cannot run here: "), method)
            except NotImplementedError as err:
                self.fallback(str(err), method)
        if call is None:
            return self.dense.attend(q, k, v, key_padding_mask=layer_mask), 1.0, False
        return self.dense.run(q, k, v, None, None, call).out, 1.0, False

    @staticmethod
    def layout_for(ctx: ForwardContext, q: torch.Tensor, text_tokens: int, text_position: str) -> TokenLayout:
        if ctx.grid is None:
            raise UnsupportedInput("the video token grid of this call is unknown")
        frames, height, width = ctx.grid
        video = frames * height * width
        if video + text_tokens != q.shape[1]:
            raise UnsupportedInput(
                f"sequence of {q.shape[1]} tokens is not the {frames}x{height}x{width} grid + {text_tokens} text "
                "tokens this model family lays out"
            )
        return TokenLayout(q.shape[0], frames, height, width, text_tokens, text_position if text_tokens else "none")
