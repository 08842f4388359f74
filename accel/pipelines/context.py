"""The per-forward context: what every self-attention layer of one transformer call shares.

A diffusers hook (`diffusers.hooks.ModelHook`, registered through `HookRegistry`) on each patched transformer
builds a `ForwardContext` once per forward, before the first layer: the token grid, the denoising step, the
schedule's decision for this step, and the text padding facts (one host check per forward, never per layer).
Processors read it; they never inspect masks or the scheduler themselves.

The same hook is the branch hook point: `Branch`es run the transformer again within the same call with a
per-(layer, head) method override and combine their output with the main one (head-perturbation guidance).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from accel.methods.base import AttentionCall, AttentionMethod, padding_facts

HOOK_NAME = "accel_forward_context"


@dataclass(frozen=True)
class TokenStream:
    """Where a family's video tokens can be put into a method's order once per forward.

    Attributes:
        blocks: the transformer blocks, in order, whose ``hidden_states`` carry the (video) tokens.
        permute_inputs: (args, kwargs, permute, first) -> (args, kwargs): applies ``permute`` (a function of a
            tensor and its token dim) to a block's per-token inputs: hidden states on the first block only,
            per-token side inputs (rotary tables, per-token timestep embeddings) on every block.
        video_slice: (seq_len) -> slice of the video tokens inside ``hidden_states``.
        entries: blocks after the first that also take raster-order inputs from outside the stream (``first`` is
            true for them too), e.g. Wan VACE's first main block after its hint blocks.
    """

    blocks: list[torch.nn.Module]
    permute_inputs: Callable[[tuple, dict, Callable[[torch.Tensor, int], torch.Tensor], bool], tuple[tuple, dict]]
    video_slice: Callable[[int], slice] = lambda seq: slice(0, seq)
    entries: tuple[torch.nn.Module, ...] = ()


def permute_tokens(t: torch.Tensor, perm: torch.Tensor, dim: int, video: slice) -> torch.Tensor:
    """``t`` with its video tokens along ``dim`` reordered: position i takes raster token ``perm[i]``."""
    if video == slice(0, t.shape[dim]) or (video.start == 0 and video.stop >= t.shape[dim]):
        return t.index_select(dim, perm)
    out = t.clone()
    index = [slice(None)] * t.dim()
    index[dim] = video
    out[tuple(index)] = t[tuple(index)].index_select(dim, perm)
    return out


def permute_named_inputs(args: tuple, kwargs: dict, permute: Callable[[torch.Tensor, int], torch.Tensor],
                         first: bool, *, names: tuple[str, ...],
                         per_token: dict[str, tuple[int, int]]) -> tuple[tuple, dict]:
    """`TokenStream.permute_inputs` for blocks whose input ``hidden_states`` (B, S, C) carries the video tokens
    (the text, if any, rides apart) and whose per-token side inputs are named in ``per_token``.

    ``names``: the block's leading parameters in order (positional arguments are matched to them; any beyond pass
    through); ``per_token``: name -> (token dim, fewest dims) of its tensor or of each tensor of its tuple, which is
    per-token only when it has that many dims and S along that dim: e.g. Wan's timestep embedding is per-token as
    (B, S, 6, C), not as (B, 6, C) even when S is 6; HunyuanVideo's rotary tables are (S, D), token dim 0.
    """
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    hidden = values["hidden_states"]
    seq = hidden.shape[1]
    if first:
        values["hidden_states"] = permute(hidden, 1)

    def side(t: Any, dim: int, ndim: int) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= max(ndim, dim + 1) and t.shape[dim] == seq:
            return permute(t, dim)
        return t

    for name, (dim, ndim) in per_token.items():
        value = values.get(name)
        if isinstance(value, (tuple, list)):
            values[name] = tuple(side(t, dim, ndim) for t in value)
        elif value is not None:
            values[name] = side(value, dim, ndim)
    positional = tuple(values.pop(name) for name in names[: len(args)]) + tuple(args[len(names):])
    return positional, values


def install_token_stream(stream: TokenStream, state: TransformerState) -> list[Any]:
    """Forward hooks that permute the video tokens before the first block (and each entry) and restore them after
    the last.

    The permutation (`ForwardContext.token_order`) is set per forward by the context hook; with none set the
    hooks do nothing. Returns the hook handles (removed by `accel.unpatch`).
    """
    first, last = stream.blocks[0], stream.blocks[-1]

    def pre(block: torch.nn.Module, args: tuple, kwargs: dict):
        ctx = state.context
        perm = ctx.token_order
        if perm is None or not ctx.order_in_stream:
            return None

        def permute(t: torch.Tensor, dim: int) -> torch.Tensor:
            key = id(t)
            if key not in ctx._permuted or ctx._permuted[key][0] is not t:
                ctx._permuted[key] = (t, permute_tokens(t, perm, dim, stream.video_slice(t.shape[dim])))
            return ctx._permuted[key][1]

        return stream.permute_inputs(args, kwargs, permute, block is first or any(block is e for e in stream.entries))

    def post(block: torch.nn.Module, args: tuple, kwargs: dict, output: Any):
        ctx = state.context
        perm = ctx.token_order
        if perm is None or not ctx.order_in_stream:
            return None
        inverse = ctx.token_inverse
        ctx._permuted.clear()
        if isinstance(output, torch.Tensor):
            return permute_tokens(output, inverse, 1, stream.video_slice(output.shape[1]))
        return (permute_tokens(output[0], inverse, 1, stream.video_slice(output[0].shape[1])), *output[1:])

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True) for block in stream.blocks]
    handles.append(last.register_forward_hook(post, with_kwargs=True))
    return handles


@dataclass(frozen=True)
class Branch:
    """An extra transformer pass run inside each patched forward, e.g. a perturbed-attention branch.

    Attributes:
        name: label (stats, logs).
        overrides: layer index -> (method, heads): on this branch those heads of that layer run `method`
            (heads=None: every head); other heads and layers run as in the main pass.
        combine: (main output, branch output, context) -> output the transformer returns. Outputs are what the
            transformer's forward returns (a tuple or a diffusers output object); `first_tensor` helps. The
            branch output covers only the rows the branch took (``context.source_rows`` of the main output).
        active: (step, total_steps) -> whether the branch runs at this call (default: always).
        edit: an output-space edit of chosen layers on the branch's rows (`BranchEdit`), applied after the
            layer's attention ran (head-perturbation guidance blends there, so every kernel keeps working).
        select: (context, batch) -> the rows of this forward's batch the branch re-runs, or None to skip this
            forward (e.g. the unconditional pass of CFG). Default: every row.
        batched: run the branch in the same transformer call as the main pass, its rows appended to the batch
            (one call instead of two; more activation memory). False: a separate call after the main one.
    """

    name: str
    overrides: dict[int, tuple[AttentionMethod, tuple[int, ...] | None]]
    combine: Callable[[Any, Any, ForwardContext], Any]
    active: Callable[[int | None, int | None], bool] | None = None
    edit: Any = None
    select: Callable[[ForwardContext, int], slice | None] | None = None
    batched: bool = False

    def runs_at(self, step: int | None, total: int | None) -> bool:
        return self.active is None or bool(self.active(step, total))

    def rows_for(self, ctx: ForwardContext, batch: int) -> slice | None:
        """The rows of a forward with `batch` rows this branch re-runs (None: it skips this forward)."""
        return slice(0, batch) if self.select is None else self.select(ctx, batch)


@dataclass
class ForwardContext:
    """Facts of one transformer forward, computed once before its first layer.

    Attributes:
        grid: (frames, height, width) of the video tokens in this call, or None when it cannot be told.
        step, total_steps: the denoising step (from the pipeline's scheduler) and the number of steps.
        text_visible: (B, T) bool text-padding mask as the model received it (None: no padding known).
        call: `AttentionCall` padding facts for the joint sequences of this forward (built once).
        branch: the branch this pass belongs to (None: the main pass).
        condition: the name diffusers' ``cache_context`` gave this call ("cond", "uncond"), None outside one.
        branch_rows: in a batched branch call, the rows of the batch that belong to the branch (the others
            are the main pass); None in a separate branch call (every row is the branch) and in the main pass.
        source_rows: the rows of the main batch a branch pass copies (None in the main pass).
        inputs: the names of the forward's keyword arguments that are not None (e.g. SD3's ``skip_layers``).
        densities: per-layer densities the methods reported in this pass (float or 0-dim tensor).
    """

    grid: tuple[int, int, int] | None = None
    step: int | None = None
    total_steps: int | None = None
    text_visible: torch.Tensor | None = None
    text_facts: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
    branch: Branch | None = None
    condition: str | None = None
    branch_rows: slice | None = None
    source_rows: slice | None = None
    inputs: frozenset[str] = frozenset()
    densities: list[tuple[int, Any]] = field(default_factory=list)
    token_order: torch.Tensor | None = None
    token_inverse: torch.Tensor | None = None
    order_in_stream: bool = False
    _calls: dict[tuple, AttentionCall] = field(default_factory=dict)
    _permuted: dict[int, Any] = field(default_factory=dict)

    def call_for(self, batch: int, video_tokens: int, text_tokens: int, text_position: str, device: torch.device,
                 scale: float | None = None) -> AttentionCall | None:
        """The `AttentionCall` for a joint sequence of this forward, or None when the padding is unknown here."""
        key = (batch, video_tokens, text_tokens, text_position, scale)
        if key in self._calls:
            return self._calls[key]
        if self.text_visible is None:
            call = AttentionCall(scale=scale)
        elif text_tokens != self.text_visible.shape[1] or batch != self.text_visible.shape[0]:
            return None
        elif self.text_facts is None:
            call = AttentionCall(scale=scale)  # nothing hidden
        else:
            lengths, text_mask = self.text_facts
            visible = self.text_visible.to(device)
            ones = torch.ones(batch, video_tokens, dtype=torch.bool, device=device)
            parts = [visible, ones] if text_position == "before" else [ones, visible]
            call = AttentionCall(scale=scale, text_lengths=lengths, text_mask=text_mask,
                                 key_padding_mask=torch.cat(parts, 1))
        self._calls[key] = call
        return call


class StepTracker:
    """The denoising step of the current transformer call, read from the pipeline's scheduler.

    Schedulers with a ``step_index`` (every flow-matching and multistep scheduler diffusers' video pipelines
    use) give it without touching the GPU: None before the first `scheduler.step`, then the index of the step
    about to run. Other schedulers: the loop's timestep is looked up in ``scheduler.timesteps`` (one host
    sync per forward).
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
        total = len(timesteps)
        if hasattr(scheduler, "step_index") and hasattr(scheduler, "begin_index"):
            index = scheduler.step_index
            if index is None:
                index = scheduler.begin_index or 0
            return (int(index) if index < total else None), total
        return self._lookup(pipe, timesteps, kwargs), total

    def _lookup(self, pipe: Any, timesteps: torch.Tensor, kwargs: dict) -> int | None:
        t = getattr(pipe, "_current_timestep", None)
        if t is None:
            t = kwargs.get("timestep")
        if t is None:
            return None
        t = torch.as_tensor(t).reshape(-1)[:1].to(device=timesteps.device, dtype=timesteps.dtype)
        matches = (timesteps == t).nonzero().flatten().tolist()
        if not matches:
            return None
        later = [m for m in matches if self._last_step is not None and m >= self._last_step]
        step = later[0] if later else matches[0]
        self._last_step = step
        return step


class TransformerState:
    """What the processors of one transformer share: the current `ForwardContext`."""

    def __init__(self, grid: tuple[int, int, int] | None = None) -> None:
        self.context = ForwardContext(grid=grid)

    @property
    def grid(self) -> tuple[int, int, int] | None:
        return self.context.grid

    @property
    def step(self) -> int | None:
        return self.context.step

    @property
    def total_steps(self) -> int | None:
        return self.context.total_steps


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        return None


class ForwardContextHook(ModelHook):
    """Builds the `ForwardContext` before each forward and runs the registered branches after the main pass.

    Stateful in diffusers' sense only so that the pipeline's ``cache_context("cond" | "uncond")`` reaches it
    (`ForwardContext.condition`); it keeps no state of its own between calls.
    """

    _is_stateful = True

    def __init__(self, adapter: Any, state: TransformerState, tracker: StepTracker, runtime: Any,
                 has_stream: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        self.state = state
        self.tracker = tracker
        self.runtime = runtime
        self.has_stream = has_stream
        self.cache_names = StateManager(_NoState)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache_names.set_context(None)
        return module

    @torch.compiler.disable
    def _prepare(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> ForwardContext:
        # Host-side work, outside any compiled graph: compiled processors then only read plain values.
        grid = self.adapter.grid(module, args, kwargs)
        step, total = self.tracker.current(kwargs)
        visible = self.adapter.text_visible(module, args, kwargs)
        facts = padding_facts(visible) if visible is not None else None
        named = self.cache_names._context
        ctx = ForwardContext(grid=grid, step=step, total_steps=total, text_visible=visible, text_facts=facts,
                             condition=named.name if named is not None else None,
                             inputs=frozenset(k for k, v in kwargs.items() if v is not None))
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if grid is not None and device is not None:
            ctx.token_order, ctx.token_inverse = self.runtime.token_order_for(grid, device)
            ctx.order_in_stream = ctx.token_order is not None and self.has_stream
        self.runtime.begin_forward(ctx)
        return ctx

    @torch.compiler.disable
    def _finish(self, ctx: ForwardContext) -> None:
        self.runtime.end_forward(ctx)

    def _branch_context(self, ctx: ForwardContext, branch: Branch, rows: slice, batch: int,
                        batched: bool) -> ForwardContext:
        """The context of a branch pass: the main one's facts for the rows it takes (no new host sync)."""
        visible, facts = _rows_of(ctx.text_visible, rows, batch, batched), ctx.text_facts
        if facts is not None:
            facts = tuple(_rows_of(t, rows, batch, batched) for t in facts)
        own = slice(batch, batch + rows.stop - rows.start) if batched else None
        return ForwardContext(grid=ctx.grid, step=ctx.step, total_steps=ctx.total_steps, text_visible=visible,
                              text_facts=facts, branch=branch, condition=ctx.condition, branch_rows=own,
                              source_rows=rows, inputs=ctx.inputs, token_order=ctx.token_order,
                              token_inverse=ctx.token_inverse, order_in_stream=ctx.order_in_stream)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctx = self._prepare(module, args, kwargs)
        self.state.context = ctx
        hidden = args[0] if args else kwargs.get("hidden_states")
        batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else None
        runs: list[tuple[Branch, slice]] = []
        for branch in self.runtime.branches:
            if not branch.runs_at(ctx.step, ctx.total_steps):
                continue
            rows = branch.rows_for(ctx, batch) if batch is not None else None
            if batch is None and branch.select is None:
                rows = slice(None)
            if rows is not None:
                runs.append((branch, rows))
        joint = next(((b, r) for b, r in runs if b.batched and batch is not None), None)
        if joint is None:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self._finish(ctx)
        else:
            branch, rows = joint
            runs.remove(joint)
            branch_ctx = self._branch_context(ctx, branch, rows, batch, batched=True)
            self.state.context = branch_ctx
            both_args, both_kwargs = map_batch(args, kwargs, batch, lambda t, rows=rows: torch.cat([t, t[rows]]))
            both = self.fn_ref.original_forward(*both_args, **both_kwargs)
            self._finish(branch_ctx)
            sample = first_tensor(both)
            output = branch.combine(replace_first_tensor(both, sample[:batch]), sample[batch:], branch_ctx)
        for branch, rows in runs:
            whole = batch is None or (rows.start in (0, None) and rows.stop in (batch, None))
            if whole:
                rows = slice(0, batch) if batch is not None else slice(None)
                branch_ctx = self._branch_context(ctx, branch, rows, batch or 0, batched=False)
                b_args, b_kwargs = args, kwargs
            else:
                branch_ctx = self._branch_context(ctx, branch, rows, batch, batched=False)
                b_args, b_kwargs = map_batch(args, kwargs, batch, lambda t, rows=rows: t[rows])
            self.state.context = branch_ctx
            branch_output = self.fn_ref.original_forward(*b_args, **b_kwargs)
            self._finish(branch_ctx)
            output = branch.combine(output, branch_output, branch_ctx)
        self.state.context = ctx
        return output


# Forward inputs that are per token, not per sample, even when their first size happens to equal the batch.
UNBATCHED_INPUTS = frozenset({"img_ids", "txt_ids"})


def map_batch(args: tuple, kwargs: dict, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with ``fn`` applied to every per-sample tensor (first size ``batch``) of a forward."""

    def apply(name: str | None, value: Any) -> Any:
        if (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch
                and name not in UNBATCHED_INPUTS):
            return fn(value)
        return value

    return (tuple(apply(None, a) for a in args), {k: apply(k, v) for k, v in kwargs.items()})


def _rows_of(t: torch.Tensor | None, rows: slice, batch: int, batched: bool) -> torch.Tensor | None:
    if t is None or t.shape[0] != batch:
        return t
    return torch.cat([t, t[rows]]) if batched else t[rows]


def install_context_hook(transformer: torch.nn.Module, hook: ForwardContextHook) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(hook, HOOK_NAME)


def remove_context_hook(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)


def first_tensor(output: Any) -> torch.Tensor:
    """The sample tensor of a transformer output (tuple, diffusers output object or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def replace_first_tensor(output: Any, value: torch.Tensor) -> Any:
    """`output` with its sample tensor replaced (same container type)."""
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    output.sample = value
    return output


__all__ = ["Branch", "ForwardContext", "ForwardContextHook", "StepTracker", "TokenStream", "TransformerState",
           "first_tensor", "install_context_hook", "install_token_stream", "map_batch", "permute_named_inputs",
           "permute_tokens",
           "remove_context_hook", "replace_first_tensor"]
