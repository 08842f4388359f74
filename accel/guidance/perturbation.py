"""`HeadPerturbation`: SoftPAG on chosen (layer, head) pairs, and the output-space edit that applies it.

Per chosen head the attention map becomes (1 - u)·A + u·P (Ahn et al., "Where and How to Perturb",
arXiv 2506.10978, Eq. 7). For P = I (identity) and P = U (uniform) this is linear in the map, so the head output is
(1 - u)·attention + u·V (or u·mean(V)): the edit runs after any kernel, dense or sparse, and never builds the map.
P = mean-query (SoftSEG's sigma -> inf limit) is one extra attention row per head: O(S) memory.
`reference_soft_perturbation` builds the map explicitly; it is the specification tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from accel.options import check_options, option

TARGETS = ("identity", "uniform", "mean_query")
SCOPES = ("joint", "image")

Layer = int | str


def _check_steps(steps: Any) -> tuple | None:
    if steps is None:
        return None
    if isinstance(steps, str) or not isinstance(steps, (tuple, list)) or len(steps) != 2:
        raise TypeError(f"HeadPerturbation.steps must be None or (start, end), got {steps!r}")
    start, end = steps
    numbers = [x for x in (start, end) if x is not None]
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in numbers) or start is None:
        raise TypeError(f"HeadPerturbation.steps must be (start, end) numbers (end may be None), got {steps!r}")
    fractions = any(isinstance(x, float) for x in numbers)
    if fractions and not all(isinstance(x, float) for x in numbers):
        raise TypeError("HeadPerturbation.steps must be two step indices (ints) or two fractions of the run "
                        f"(floats in [0, 1]), not a mix, got {steps!r}")
    if fractions and not all(0.0 <= x <= 1.0 and math.isfinite(x) for x in numbers):
        raise ValueError(f"HeadPerturbation.steps fractions must lie in [0, 1], got {steps!r}")
    if not fractions and start < 0:
        raise ValueError(f"HeadPerturbation.steps start must be a step index >= 0, got {steps!r}")
    if end is not None and end <= start:
        raise ValueError(f"HeadPerturbation.steps must have end > start, got {steps!r}")
    return (start, end)


def _check_heads(heads: Any) -> tuple[tuple[Layer, int], ...]:
    if isinstance(heads, (str, bytes)) or not isinstance(heads, (tuple, list)):
        raise TypeError(f"HeadPerturbation.heads must be a list of (layer, head) pairs, got {heads!r}")
    out: list[tuple[Layer, int]] = []
    for i, pair in enumerate(heads):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
            raise TypeError(f"HeadPerturbation.heads[{i}] must be (layer, head) or (stack, block, head), got {pair!r}")
        if len(pair) == 3:  # (stack, block, head): "single_transformer_blocks", 3, 5
            stack, block, head = pair
            if not isinstance(stack, str) or isinstance(block, bool) or not isinstance(block, int):
                raise TypeError(f"HeadPerturbation.heads[{i}] as (stack, block, head) needs a str stack and an int "
                                f"block, got {pair!r}")
            layer: Layer = f"{stack}.{block}"
        else:
            layer, head = pair
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise TypeError(f"HeadPerturbation.heads[{i}] layer must be an int index or a block path, got {layer!r}")
        if isinstance(head, bool) or not isinstance(head, int):
            raise TypeError(f"HeadPerturbation.heads[{i}] head must be an int, got {head!r}")
        if (isinstance(layer, int) and layer < 0) or head < 0:
            raise ValueError(f"HeadPerturbation.heads[{i}] indices must be >= 0, got {pair!r}")
        if (layer, head) not in out:
            out.append((layer, head))
    if not out:
        raise ValueError("HeadPerturbation.heads must name at least one (layer, head) pair")
    return tuple(out)


@dataclass(frozen=True)
class HeadPerturbation:
    """Perturbation guidance on chosen attention heads: v = v_u + w_cfg (v_c - v_u) + w_p (v_c - v_p).

    Attributes:
        heads: (layer, head) pairs, 0-indexed. ``layer`` is the index of the self-attention layer in the order
            accel numbers them (Flux: 19 double-stream blocks 0-18, then single-stream 19-56, HeadHunter's flat
            numbering), or an exact block path such as ``"single_transformer_blocks.3"`` (also given as
            ``("single_transformer_blocks", 3, head)``). Paths match exactly: ``blocks.1`` never means ``blocks.10``.
        strength: SoftPAG's u: 0 is the unperturbed model, 1 plain PAG (identity map).
        scale: the perturbation guidance weight w_p.
        steps: (start, end) step indices (end exclusive, None: to the last step) or fractions of the run
            (floats); w_p acts only there. None: every step.
        target: the map P blended in: identity (PAG), uniform (maximum entropy) or mean_query (SoftSEG).
        scope: joint perturbs the whole text+image sequence (the paper); image only image queries over image
            keys (text tokens untouched).
        cfg_scale: the true-CFG scale for pipelines that do not expose theirs (Flux, HunyuanVideo:
            ``true_cfg_scale``); needed only when they run true CFG.
        batched: run the perturbed pass in the same transformer call as the conditional one (one call; its
            activations grow by the branch's rows). False: a separate call.
    """

    heads: tuple[tuple[Layer, int], ...]
    strength: float = option(1.0, "SoftPAG strength u: 0 leaves the heads as they are, 1 is plain PAG "
                             "(the paper searches at 1, then uses about 0.5)", minimum=0.0, maximum=1.0)
    scale: float = option(3.0, "perturbation guidance weight w_p (paper: 3 for SD3, 8 for FLUX.1-dev)",
                          minimum=0.0, maximum=100.0)
    steps: tuple | None = None
    target: str = option("identity", "the map blended into the chosen heads: identity (PAG), uniform, or "
                         "mean_query (SoftSEG)", choices=TARGETS)
    scope: str = option("joint", "joint perturbs text and image tokens (the paper); image only image tokens",
                        choices=SCOPES)
    cfg_scale: float | None = option(None, "true-CFG scale of pipelines that do not expose it (Flux, HunyuanVideo "
                                     "true_cfg_scale)", minimum=1.0, exclusive_minimum=True,
                                     none_means="read from the pipeline, or no true CFG")
    batched: bool = option(True, "run the perturbed pass batched with the conditional one (faster, more memory)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _check_heads(self.heads))
        object.__setattr__(self, "steps", _check_steps(self.steps))
        check_options(self)

    @property
    def no_op(self) -> bool:
        """u = 0 or w_p = 0: guidance adds nothing (patch installs no branch, so the result is exactly CFG's)."""
        return self.strength == 0.0 or self.scale == 0.0

    def active(self, step: int | None, total: int | None) -> bool:
        """Whether w_p acts at `step` of `total` (outside a pipeline loop, step None: always)."""
        if self.steps is None or step is None:
            return True
        start, end = self.steps
        if isinstance(start, float):
            if total is None:
                return True
            return start * total <= step < (total if end is None else end * total)
        return start <= step and (end is None or step < end)


def parse_heads(text: str) -> tuple[tuple[Layer, int], ...]:
    """Heads from text: ``"11:15, 1:10"`` or ``"single_transformer_blocks.3:5"`` (layer:head, comma separated)."""
    if not isinstance(text, str):
        raise TypeError(f"heads must be text like '11:15,1:10', got {type(text).__name__}")
    pairs: list[tuple[Layer, int]] = []
    for item in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        layer, sep, head = item.rpartition(":")
        if not sep or not layer.strip() or not head.strip().isdigit():
            raise ValueError("heads items must be layer:head (e.g. 11:15 or single_transformer_blocks.3:5), "
                             f"got {item!r}")
        layer = layer.strip()
        pairs.append((int(layer) if layer.isdigit() else layer, int(head)))
    if not pairs:
        raise ValueError(f"heads must list at least one layer:head pair, got {text!r}")
    return tuple(pairs)


def format_heads(heads: tuple[tuple[Layer, int], ...]) -> str:
    return ", ".join(f"{layer}:{head}" for layer, head in heads)


@dataclass(frozen=True)
class LayerSite:
    """One self-attention layer as head selection sees it: its index, module path and head count."""

    index: int
    name: str
    heads: int


def resolve_heads(heads: tuple[tuple[Layer, int], ...], sites: list[LayerSite]) -> dict[int, tuple[int, ...]]:
    """Layer index -> sorted chosen heads; ValueError naming the pair for a layer or head out of range."""
    by_path: dict[str, list[LayerSite]] = {}
    for site in sites:
        by_path.setdefault(site.name, []).append(site)
        by_path.setdefault(site.name.rpartition(".")[0], []).append(site)
    out: dict[int, set[int]] = {}
    for layer, head in heads:
        if isinstance(layer, int):
            if layer >= len(sites):
                raise ValueError(f"HeadPerturbation.heads: layer {layer} is out of range: this model has "
                                 f"{len(sites)} self-attention layers (0-{len(sites) - 1}){_stacks(sites)}")
            site = sites[layer]
        else:
            found = by_path.get(layer, [])
            if len(found) != 1:
                what = "matches no" if not found else "matches several"
                raise ValueError(f"HeadPerturbation.heads: layer {layer!r} {what} self-attention module (exact "
                                 f"block paths, e.g. {sites[0].name.rpartition('.')[0]!r} or {sites[-1].name!r})")
            site = found[0]
        if head >= site.heads:
            raise ValueError(f"HeadPerturbation.heads: head {head} is out of range: layer {site.index} "
                             f"({site.name}) has {site.heads} heads (0-{site.heads - 1})")
        out.setdefault(site.index, set()).add(head)
    return {layer: tuple(sorted(h)) for layer, h in sorted(out.items())}


def _stacks(sites: list[LayerSite]) -> str:
    stacks: dict[str, list[int]] = {}
    for site in sites:
        stacks.setdefault(site.name.split(".")[0] + "." + site.name.rsplit(".", 1)[-1], []).append(site.index)
    if len(stacks) < 2:
        return ""
    return "; " + ", ".join(f"{name.replace('.', '.*.')} = {v[0]}-{v[-1]}" for name, v in stacks.items())


def _token_slice(seq: int, text_tokens: int, text_position: str, scope: str) -> slice:
    if scope == "joint" or text_tokens == 0 or text_position == "none":
        return slice(0, seq)
    return slice(text_tokens, seq) if text_position == "before" else slice(0, seq - text_tokens)


def _target(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor, target: str,
            visible: torch.Tensor | None) -> torch.Tensor:
    """P·V on (B, S, h, D) tensors of the chosen heads: (B, S, h, D) for identity, (B, 1, h, D) otherwise."""
    if target == "identity":
        return v
    weight = None if visible is None else visible[:, :, None, None].to(torch.float32)

    def mean(t: torch.Tensor) -> torch.Tensor:
        if weight is None:
            return t.float().mean(1, keepdim=True)
        return (t.float() * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1.0)

    if target == "uniform":
        return mean(v)
    from accel.methods.dense import sdpa_bshd

    q_mean = mean(q).to(q.dtype)
    return sdpa_bshd(q_mean, k, v, key_padding_mask=visible)


class PerturbationEdit:
    """The branch edit of one patch: blends the chosen heads of the branch's rows after a layer's attention.

    Attributes:
        layers: the layer indices it edits; the runtime calls `apply` only for these.
    """

    def __init__(self, config: HeadPerturbation, heads: dict[int, tuple[int, ...]], head_counts: dict[int, int]):
        self.config = config
        self.heads = heads
        self.head_counts = head_counts
        self.layers = frozenset(heads)
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _index_for(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self._index:  # made once per layer and device, not per step
            self._index[key] = torch.tensor(self.heads[layer], dtype=torch.long, device=device)
        return self._index[key]

    def apply(self, layer: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              rows: slice | None, text_tokens: int, text_position: str,
              keys_visible: torch.Tensor | None) -> torch.Tensor:
        """`out` (B, S, H, D) with the chosen heads of `rows` (None: all) blended toward the target map."""
        if q.shape[2] != self.head_counts[layer]:
            raise NotImplementedError(
                f"head-perturbation guidance needs all {self.head_counts[layer]} heads of layer {layer} in one "
                f"attention call, got {q.shape[2]} (context parallelism splits heads; run guidance without it)")
        rows = rows if rows is not None else slice(0, q.shape[0])
        tokens = _token_slice(q.shape[1], text_tokens, text_position, self.config.scope)
        idx = self._index_for(layer, q.device)
        vs = v[rows, tokens].index_select(2, idx)
        qs = ks = None
        if self.config.target == "mean_query":  # only this target reads queries and keys
            qs, ks = (t[rows, tokens].index_select(2, idx) for t in (q, k))
        visible = None
        if keys_visible is not None and self.config.scope == "joint":
            visible = keys_visible[rows]
        target = _target(qs, ks, vs, self.config.target, visible)
        if out.requires_grad:
            out = out.clone()
        view = out[rows, tokens]
        current = view.index_select(2, idx)
        view.index_copy_(2, idx, torch.lerp(current, target.to(current.dtype).expand_as(current), self.config.strength))
        return out


def reference_soft_perturbation(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: tuple[int, ...] | None, *, strength: float,
    target: str = "identity", scope: str = "joint", text_tokens: int = 0, text_position: str = "none",
    keys_visible: torch.Tensor | None = None, scale: float | None = None, attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(1 - u)·A + u·P applied to V with the explicit (B, H, S, S) map, on (B, S, H, D) tensors (small sizes only).

    ``heads`` None perturbs every head. Scope image: only image-query rows change, P covers image keys only.
    ``attn_mask`` (S, S) bool restricts A (a sparse method's `token_mask`); P is as defined, unmasked.
    """
    b, s, h, d = q.shape
    qf, kf, vf = (t.double().permute(0, 2, 1, 3) for t in (q, k, v))
    logits = qf @ kf.transpose(-1, -2) * (scale if scale is not None else d ** -0.5)
    if keys_visible is not None:
        logits = logits.masked_fill(~keys_visible[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask.to(q.device), float("-inf"))
    attn = logits.softmax(-1)
    tokens = _token_slice(s, text_tokens, text_position, scope)
    image = torch.zeros(s, dtype=torch.bool)
    image[tokens] = True
    keys = image[None, :].expand(b, s) if scope == "image" else (
        keys_visible.cpu() if keys_visible is not None else torch.ones(b, s, dtype=torch.bool))
    keys = keys.to(q.device)
    if target == "identity":
        p = torch.eye(s, dtype=torch.float64, device=q.device).expand(b, h, s, s)
    elif target == "uniform":
        p = (keys.double() / keys.double().sum(1, keepdim=True))[:, None, None, :].expand(b, h, s, s)
    elif target == "mean_query":
        w = keys.double()[:, None, :, None]
        q_mean = (qf * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)
        mean_logits = (q_mean @ kf.transpose(-1, -2) * (scale if scale is not None else d ** -0.5))
        p = mean_logits.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(-1).expand(b, h, s, s)
    else:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    chosen = torch.zeros(h, dtype=torch.bool, device=q.device)
    chosen[list(range(h)) if heads is None else list(heads)] = True
    row = image.to(q.device)[:, None]
    mix = (chosen[:, None, None] & row[None]).double() * strength  # (h, S, 1)
    soft = (1 - mix) * attn + mix * p
    return (soft @ vf).permute(0, 2, 1, 3).to(q.dtype)


__all__ = ["SCOPES", "TARGETS", "HeadPerturbation", "LayerSite", "PerturbationEdit", "format_heads",
           "parse_heads", "reference_soft_perturbation", "resolve_heads"]
