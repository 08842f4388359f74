"""Triton-free block-sparse attention in PyTorch: chunked (one query block at a time), no S x S memory.

The fallback wherever Triton cannot run (no GPU without the interpreter, macOS/Windows without Triton);
autograd works through it.
"""

from __future__ import annotations

import torch

from ._common import KeyParts, text_visibility
from .layout import BlockLayout


def _torch_attention(q, k, v, layout, ek, ev, emask, scale):
    """Chunked pure-PyTorch path: one query block at a time, gathering only its key blocks.

    Peak extra memory is (B, H, block_m, keys of one row); autograd works through it.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    bm, bn = layout.block_m, layout.block_n
    offsets = layout.offsets.cpu()
    indices = layout.indices.cpu()
    arange_n = torch.arange(bn, device=q.device)
    out_rows, lse_rows = [], []
    head_groups = [slice(None)] if layout.heads == 1 else [slice(h, h + 1) for h in range(H)]
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    for qb in range(layout.num_q_blocks):
        q_blk = q[:, qb * bm:(qb + 1) * bm].to(cdtype).transpose(1, 2)  # (B, H, m, D)
        outs, lses = [], []
        for l, hs in enumerate(head_groups):
            blocks = indices[l, offsets[l, qb]:offsets[l, qb + 1]].to(q.device).long()
            tok = (blocks[:, None] * bn + arange_n[None, :]).reshape(-1)
            tok = tok[tok < Sk]
            kk = k[:, tok, hs].to(cdtype)
            vv = v[:, tok, hs].to(cdtype)
            vis = torch.ones(B, tok.numel(), dtype=torch.bool, device=q.device)
            if ek is not None:
                kk = torch.cat([kk, ek[:, :, hs].to(cdtype)], 1)
                vv = torch.cat([vv, ev[:, :, hs].to(cdtype)], 1)
                em = emask if emask is not None else torch.ones(
                    B, ek.shape[1], dtype=torch.bool, device=q.device)
                vis = torch.cat([vis, em], 1)
            qh = q_blk[:, hs]
            s = torch.matmul(qh, kk.permute(0, 2, 3, 1)) * scale  # (B, h, m, n)
            s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
            lse = torch.logsumexp(s, -1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
            finite = torch.isfinite(lse) | torch.isnan(lse)
            p = torch.exp(s - torch.where(finite, lse, 0.0)[..., None])
            o = torch.matmul(p, vv.transpose(1, 2))
            outs.append(torch.where(lse[..., None] == float("-inf"), 0.0, o))
            lses.append(lse)
        out_rows.append(torch.cat(outs, 1))
        lse_rows.append(torch.cat(lses, 1))
    out = torch.cat(out_rows, 2).transpose(1, 2).to(q.dtype) if out_rows else q.new_zeros(q.shape)
    lse = torch.cat(lse_rows, 2).float() if lse_rows else q.new_zeros(B, H, 0, dtype=torch.float32)
    return out, lse


def torch_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                 parts: KeyParts, text_lengths: torch.Tensor | None, text_mask: torch.Tensor | None,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) over joint K/V buffers: the layout's key blocks index ``parts``' video rows, plus the text."""
    v0, vl, t0, tl = parts
    ek = k[:, t0:t0 + tl] if tl else None
    ev = v[:, t0:t0 + tl] if tl else None
    emask = text_visibility(tl, text_lengths, text_mask) if tl else None
    return _torch_attention(q, k[:, v0:v0 + vl], v[:, v0:v0 + vl], layout, ek, ev, emask, scale)


def torch_block_sparse_backward(dout: torch.Tensor | None, dlse: torch.Tensor | None, q: torch.Tensor,
                                k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, parts: KeyParts,
                                text_lengths: torch.Tensor | None, text_mask: torch.Tensor | None,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`torch_block_sparse_attention`, chunked like the forward.

    dk, dv cover the whole joint k, v (zero on rows that are neither video nor text). What the torch
    backend's custom op runs under ``torch.compile`` (eager calls differentiate the forward directly).
    """
    B, Sq, H, D = q.shape
    v0, vl, t0, tl = parts
    bm, bn = layout.block_m, layout.block_n
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=cdtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdtype, device=q.device)
    if dout is None and dlse is None:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    kv, vv_, dkv, dvv = k[:, v0:v0 + vl], v[:, v0:v0 + vl], dk[:, v0:v0 + vl], dv[:, v0:v0 + vl]
    emask = text_visibility(tl, text_lengths, text_mask) if tl else None
    offsets, indices = layout.offsets.cpu(), layout.indices.cpu()
    arange_n = torch.arange(bn, device=q.device)
    head_groups = [slice(None)] if layout.heads == 1 else [slice(h, h + 1) for h in range(H)]
    for qb in range(layout.num_q_blocks):
        rows = slice(qb * bm, min((qb + 1) * bm, Sq))
        for l, hs in enumerate(head_groups):
            blocks = indices[l, offsets[l, qb]:offsets[l, qb + 1]].to(q.device).long()
            tok = (blocks[:, None] * bn + arange_n[None, :]).reshape(-1)
            tok = tok[tok < vl]
            kk, vv = kv[:, tok, hs].to(cdtype), vv_[:, tok, hs].to(cdtype)
            vis = torch.ones(B, tok.numel(), dtype=torch.bool, device=q.device)
            if tl:
                kk = torch.cat([kk, k[:, t0:t0 + tl, hs].to(cdtype)], 1)
                vv = torch.cat([vv, v[:, t0:t0 + tl, hs].to(cdtype)], 1)
                vis = torch.cat([vis, emask if emask is not None else torch.ones(
                    B, tl, dtype=torch.bool, device=q.device)], 1)
            if kk.shape[1] == 0:
                continue
            qh = q[:, rows, hs].to(cdtype).transpose(1, 2)  # (B, h, m, D)
            kh, vh = kk.transpose(1, 2), vv.transpose(1, 2)  # (B, h, n, D)
            s = (qh @ kh.transpose(-1, -2)) * scale
            s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
            lse = torch.logsumexp(s, -1)
            p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # 0 on hidden keys
            ds = torch.zeros_like(p)
            if dout is not None:
                do = dout[:, rows, hs].to(cdtype).transpose(1, 2)
                dvh = p.transpose(-1, -2) @ do
                dp = do @ vh.transpose(-1, -2)
                ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            else:
                dvh = torch.zeros_like(vh)
            if dlse is not None:
                ds = ds + p * dlse[:, hs, rows].to(cdtype)[..., None]
            dq[:, rows, hs] += (ds @ kh * scale).transpose(1, 2)
            dkh = (ds.transpose(-1, -2) @ qh * scale).transpose(1, 2)  # (B, n, h, D)
            dvh = dvh.transpose(1, 2)
            n_vid = tok.numel()
            dkv[:, :, hs].index_add_(1, tok, dkh[:, :n_vid])
            dvv[:, :, hs].index_add_(1, tok, dvh[:, :n_vid])
            if tl:
                dk[:, t0:t0 + tl, hs] += dkh[:, n_vid:]
                dv[:, t0:t0 + tl, hs] += dvh[:, n_vid:]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
