"""Neighborhood attention in chunked PyTorch (no Triton): what runs on a CPU, or where Triton is absent.

Same inputs and semantics as `accel.kernels.neighborhood.neighborhood_attention`: tile-major video queries, one
query tile at a time over the key tiles its plan lists (never an S x S tensor), the element mask from the
per-axis NATTEN tables, text keys in the same softmax. Autograd works through it.
"""

from __future__ import annotations

import torch

from ._common import KeyParts
from .neighborhood_reference import TilePlan, axis_mask, tile_major_order, unpack_index


def torch_neighborhood_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan, parts: KeyParts,
    visible: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, V, H, D), lse (B, H, V) float32) of tile-major ``q`` over the joint ``k``/``v`` (see module doc)."""
    B, V, H, D = q.shape
    T_, H_, W_ = plan.grid
    device = q.device
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    raster = tile_major_order(plan.grid, plan.tile, device)  # position -> raster index
    coords = (raster // (H_ * W_), (raster // W_) % H_, raster % W_)
    axis = [axis_mask(plan.grid[a], plan.kernel[a], plan.stride[a], plan.dilation[a], plan.causal[a]).to(device)
            for a in range(3)]
    video_k = k[:, parts.video_start:parts.video_start + V]
    video_v = v[:, parts.video_start:parts.video_start + V]
    text_k = k[:, parts.text_start:parts.text_start + parts.text_len] if parts.text_len else None
    text_v = v[:, parts.text_start:parts.text_start + parts.text_len] if parts.text_len else None
    text_vis = None
    if parts.text_len:
        text_vis = (torch.ones(B, parts.text_len, dtype=torch.bool, device=device) if visible is None
                    else visible.to(device=device, dtype=torch.bool))
    tiles = plan.tiles.cpu().tolist()
    offsets = plan.offsets.cpu().tolist()
    indices = unpack_index(plan.indices).cpu().tolist()
    outs, lses = [], []
    for i, (start, count, *_rest) in enumerate(tiles):
        rows = torch.arange(start, start + count, device=device)
        key_tiles = indices[offsets[i]:offsets[i + 1]]
        cols = torch.cat([torch.arange(tiles[j][0], tiles[j][0] + tiles[j][1], device=device) for j in key_tiles]) \
            if key_tiles else torch.zeros(0, dtype=torch.long, device=device)
        mask = axis[0][coords[0][rows]][:, coords[0][cols]] & axis[1][coords[1][rows]][:, coords[1][cols]] \
            & axis[2][coords[2][rows]][:, coords[2][cols]]
        keys, values = video_k[:, cols], video_v[:, cols]
        mask = mask[None, None].expand(B, 1, count, cols.numel())
        if text_k is not None:
            keys, values = torch.cat([keys, text_k], 1), torch.cat([values, text_v], 1)
            mask = torch.cat([mask, text_vis[:, None, None, :].expand(B, 1, count, parts.text_len)], 3)
        qh = q[:, start:start + count].to(cdtype).transpose(1, 2)  # (B, H, m, D)
        s = torch.matmul(qh, keys.to(cdtype).permute(0, 2, 3, 1)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        o = torch.matmul(p, values.to(cdtype).transpose(1, 2))
        outs.append(torch.where(torch.isfinite(lse)[..., None], o, 0.0))
        lses.append(lse)
    out = torch.cat(outs, 2).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses, 2).float()


def neighborhood_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan, *,
    video_keys: tuple[int, int] | None = None, text_keys: tuple[int, int] | None = None,
    text_lengths: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
    scale: float | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`neighborhood_attention`'s signature on the chunked PyTorch path (see the module docstring)."""
    import math

    from ._common import resolve_key_parts, text_visibility

    parts = resolve_key_parts(k.shape[1], video_keys, text_keys)
    if parts.video_len != q.shape[1]:
        raise ValueError(f"video_keys cover {parts.video_len} rows, q has {q.shape[1]} video tokens")
    visible = text_visibility(parts.text_len, text_lengths, text_mask) if parts.text_len else None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch_neighborhood_attention(q, k, v, plan, parts, visible, scale)
    return (out, lse) if return_lse else out
