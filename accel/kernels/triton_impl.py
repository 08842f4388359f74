"""The Triton backend: selection (select.py) -> launchers (fwd_*.py, bwd_*.py) on joint K/V buffers.

Imported lazily, when the Triton backend runs; ``accel.kernels`` itself never imports Triton.
"""

from __future__ import annotations

import torch

from . import bwd_pipelined, bwd_ws, fwd_pipelined, fwd_ws
from . import select as _select
from ._common import KeyParts, text_visibility
from ._triton_common import ensure_allocator, ws_compile_failed
from .configs import KernelConfigs
from .layout import BlockLayout, BoxMask
from .select import WARP_SPECIALIZED


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, parts: KeyParts,
            text_lengths: torch.Tensor | None, text_mask: torch.Tensor | None, scale: float, out: torch.Tensor,
            lse: torch.Tensor | None, configs: KernelConfigs | None = None, box: BoxMask | None = None,
            blocks: torch.Tensor | None = None, box_mask_form: str | None = None,
            box_tile: tuple[int, int, int] | None = None) -> None:
    """Write attention over the joint k, v into ``out`` (and ``lse`` when given).

    ``box``: a per-token box mask inside the layout's video tiles; ``blocks``: per-block [first row, rows] for
    blocks of unequal sizes; ``box_mask_form``, ``box_tile``: how the box mask is applied (`fwd_pipelined.launch`).
    Forward only: the caller owns the backward."""
    v0, vl, t0, tl = parts
    if not tl:
        text_lengths = text_mask = None
    choice = _select.select_forward(q, k, layout, v=v, parts=parts, text_lengths=text_lengths, text_mask=text_mask,
                                    out=out, lse=lse, configs=configs)
    if choice.variant == WARP_SPECIALIZED and box is not None:
        # Triton 3.6's warp-specialisation pass failed to build the box-masked loop (H200, 2026-12-02).
        choice = choice.fallback
    if choice.variant == WARP_SPECIALIZED:
        try:
            fwd_ws.launch(q, k, v, layout, scale, out, lse, choice.config, video_row=v0, video_len=vl,
                          text_row=t0, text_len=tl,
                          text_lengths=text_lengths.to(torch.int32) if text_lengths is not None else None)
            return
        except Exception as err:  # only a failed build falls back; anything else is re-raised
            if not ws_compile_failed(err):
                raise
        choice = choice.fallback
    emask = text_visibility(tl, text_lengths, text_mask, torch.int8) if tl else None
    fwd_pipelined.launch(q, k[:, v0:v0 + vl], v[:, v0:v0 + vl], k[:, t0:t0 + tl] if tl else None,
                         v[:, t0:t0 + tl] if tl else None, emask, layout, scale, out, lse, choice.config, box=box,
                         blocks=blocks, box_mask_form=box_mask_form, box_tile=box_tile)


def _try_ws(launch, *args) -> bool:
    """Run a warp-specialised backward launch; False if Triton could not build it (see ws_compile_failed)."""
    ensure_allocator()
    try:
        launch(*args)
    except Exception as err:  # only a failed build falls back; anything else is re-raised
        if not ws_compile_failed(err):
            raise
        return False
    return True


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, layout: BlockLayout, t: BlockLayout, parts: KeyParts,
             text_lengths: torch.Tensor | None, text_mask: torch.Tensor | None, scale: float,
             configs: KernelConfigs | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ and the gradients of the whole joint k, v (zeros on rows that are neither video nor text keys).

    ``t`` is ``layout.transpose()``.
    """
    v0, vl, t0, tl = parts
    dev = q.device
    # Delta (and dLse) share LSE's strides: the kernels index all three with one (stride_lb, stride_lh).
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=dev)
    if dlse is not None and dlse.stride() != lse.stride():
        dlse = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=dev).copy_(dlse)
    bwd_pipelined.launch_preprocess(out, do, lse, dlse, delta)
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    alloc = torch.empty if vl + tl == k.shape[1] else torch.zeros
    dk = alloc(k.shape, dtype=k.dtype, device=dev)
    dv = alloc(v.shape, dtype=v.dtype, device=dev)
    kv, vv, dkv, dvv = k[:, v0:v0 + vl], v[:, v0:v0 + vl], dk[:, v0:v0 + vl], dv[:, v0:v0 + vl]
    ek, ev, dek, dev_ = ((x[:, t0:t0 + tl] for x in (k, v, dk, dv)) if tl else (None,) * 4)
    emask = text_visibility(tl, text_lengths, text_mask, torch.int8) if tl else None

    choice = _select.select_backward(q, k, layout, v=v, parts=parts, tensors=(do, dq, dkv, dvv), lse=lse,
                                     configs=configs)
    c = choice.dkdv
    if not (c.variant == WARP_SPECIALIZED
            and _try_ws(bwd_ws.launch_dkdv, q, kv, vv, do, lse, delta, dkv, dvv, t, scale, c.config)):
        c = c.fallback or c
        bwd_pipelined.launch_dkdv(q, kv, vv, ek, ev, emask, do, lse, delta, dkv, dvv, dek, dev_, layout, t,
                                  scale, c.config)
    c = choice.dq
    if not (c.variant == WARP_SPECIALIZED
            and _try_ws(bwd_ws.launch_dq, q, kv, vv, do, lse, delta, dq, layout, scale, c.config)):
        c = c.fallback or c
        bwd_pipelined.launch_dq(q, kv, vv, ek, ev, emask, do, lse, delta, dq, layout, scale, c.config)
    return dq, dk, dv
