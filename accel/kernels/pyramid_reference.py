"""Pyramid sparse attention (PSA): pooling, block importance, level assignment, reference and chunked PyTorch path.

Triton-free. Li, Gu, Lin, Wang, Zhuang, "PSA: Pyramid Sparse Attention for Efficient Video Understanding and
Generation" (arXiv 2512.04025); reference code ziplab/Pyramid-Sparse-Attention.

Video tokens are cut into blocks of ``block_size`` consecutive tokens (query and key blocks alike; the last block
may be partial). Each (query block, KV block) pair has a level p in {1, 2, 4, 8}, or 0 (skipped). Inside a KV
block, level p groups the tokens ``[j*b + g*p, j*b + (g+1)*p)`` (g = 0 .. b/p - 1) and replaces each group by the
mean of its keys and of its values; a pooled key's logit gets ``+ln(count)`` where count is the number of real
tokens in its group. That is exactly dense attention in which every token of the group is replaced by the group
mean (the "dense-equivalent" formula). Groups never cross a block boundary. The last partial block: its last group
may hold fewer than p tokens (mean over the real ones, bias ln of their number); groups past the end are empty and
are not keys.
"""

from __future__ import annotations

import math

import torch

from ._common import resolve_key_parts, text_visibility

LEVELS = (1, 2, 4, 8)

__all__ = [
    "LEVELS",
    "brute_force_pyramid_attention",
    "cap_levels",
    "estimate_block_importance",
    "level_density",
    "pool_levels",
    "reference_pyramid_attention",
    "sample_offsets",
    "sample_positions",
    "similarity_cap",
    "threshold_levels",
    "topk_levels",
    "torch_pyramid_attention",
]


# ---------------------------------------------------------------------------------------- pooling
def pool_levels(x: torch.Tensor, block_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Group means of ``x`` (B, V, H, D) for p = 2, 4, 8 in one pass, and the per-row token counts.

    Returns ``(pooled, counts)``: ``pooled[i]`` is (B, n*b/p, H, D) for p = LEVELS[i + 1] (n = ceil(V/b) blocks,
    b = block_size; rows past the end are zero), ``counts[i]`` (n*b/p,) real tokens per group (0 past the
    end). Sums are built hierarchically (p=4 from p=2, p=8 from p=4), then divided by the counts. Differentiable.
    """
    B, V, H, D = x.shape
    n = -(-V // block_size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * block_size - V))
    ones = torch.zeros(n * block_size, dtype=torch.float32, device=x.device)
    ones[:V] = 1
    pooled, counts = [], []
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s, c = padded.to(acc), ones.to(acc)
    for _ in LEVELS[1:]:
        s = s.view(B, -1, 2, H, D).sum(2)
        c = c.view(-1, 2).sum(1)
        pooled.append((s / c.clamp(min=1)[None, :, None, None]).to(x.dtype))
        counts.append(c)
    return pooled, counts


def _expanded(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, V, H, D): every token replaced by the mean of its group of p (groups aligned to multiples of p)."""
    B, V, H, D = x.shape
    m = -(-V // p) * p
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    padded = torch.nn.functional.pad(x.to(acc), (0, 0, 0, 0, 0, m - V))
    count = torch.clamp(V - torch.arange(0, m, p, device=x.device), max=p).to(acc)
    mean = padded.view(B, m // p, p, H, D).sum(2) / count[None, :, None, None]
    return mean.repeat_interleave(p, 1)[:, :V]


def _text_parts(k, v, parts, text_lengths, text_mask, B, device):
    if not parts.text_len:
        return None, None, None
    t0, tl_ = parts.text_start, parts.text_len
    vis = text_visibility(tl_, text_lengths, text_mask)
    vis = torch.ones(B, tl_, dtype=torch.bool, device=device) if vis is None else vis.to(device=device,
                                                                                         dtype=torch.bool)
    return k[:, t0:t0 + tl_], v[:, t0:t0 + tl_], vis


# ---------------------------------------------------------------------------------------- reference
def reference_pyramid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, block_size: int, *,
    video_keys: tuple[int, int] | None = None, text_keys: tuple[int, int] | None = None,
    text_lengths: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense-equivalent oracle: video queries ``q`` (B, V, H, D) over the joint k/v (small shapes only).

    Key/value c of a pair at level p is the mean of c's group of p (replicated over the group), the pair is masked
    at level 0; visible text keys are plain extra keys. ``levels`` (B, H, n, n) ints in {0, 1, 2, 4, 8}. float32
    math (float64 for float64 inputs); builds (B, H, V, V + T); differentiable. With ``return_lse`` also the
    natural-log log-sum-exp (B, H, V) of the logits in the compute dtype (-inf for a row that sees nothing; the
    same as over pooled keys with the +ln(count) bias).
    """
    parts = resolve_key_parts(k.shape[1], video_keys, text_keys)
    B, V, H, D = q.shape
    if parts.video_len != V:
        raise ValueError(f"video_keys cover {parts.video_len} rows, q has {V} video tokens")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_, vv_ = (t[:, parts.video_start:parts.video_start + V] for t in (k, v))
    blk = torch.arange(V, device=q.device) // block_size
    token_levels = levels.to(q.device).long()[:, :, blk][:, :, :, blk]  # (B, H, V, V)
    qh = q.to(cdtype).transpose(1, 2)
    s = torch.full((B, H, V, V), float("-inf"), dtype=cdtype, device=q.device)
    out_v = []
    for p in LEVELS:
        kp = (_expanded(kv_, p) if p > 1 else kv_).to(cdtype).transpose(1, 2)
        s = torch.where(token_levels == p, torch.matmul(qh, kp.transpose(-1, -2)) * scale, s)
        out_v.append((_expanded(vv_, p) if p > 1 else vv_).to(cdtype).transpose(1, 2))
    tk, tv, vis = _text_parts(k, v, parts, text_lengths, text_mask, B, q.device)
    if tk is not None:
        st = torch.matmul(qh, tk.to(cdtype).permute(0, 2, 3, 1)) * scale
        s = torch.cat([s, st.masked_fill(~vis[:, None, None, :], float("-inf"))], 3)
    lse = torch.logsumexp(s, -1, keepdim=True)
    prob = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0))
    out = sum(torch.matmul(torch.where(token_levels == p, prob[..., :V], 0.0), out_v[i])
              for i, p in enumerate(LEVELS))
    if tk is not None:
        out = out + torch.matmul(prob[..., V:], tv.to(cdtype).transpose(1, 2))
    out = out.transpose(1, 2).to(q.dtype)
    return (out, lse[..., 0]) if return_lse else out


def brute_force_pyramid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Literal construction (tests only): per (b, h, query block), the kept KV blocks' pooled keys/values with a
    +ln(count) bias, one softmax. Video-only k/v (B, V, H, D); Python loops, tiny shapes."""
    B, V, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n = -(-V // block_size)
    out = torch.zeros(B, V, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(n):
                keys, values, bias = [], [], []
                for j in range(n):
                    p = int(levels[b, h, i, j])
                    if p == 0:
                        continue
                    lo, hi = j * block_size, min((j + 1) * block_size, V)
                    for g in range(lo, hi, p):
                        e = min(g + p, hi)
                        keys.append(k[b, g:e, h].double().mean(0))
                        values.append(v[b, g:e, h].double().mean(0))
                        bias.append(math.log(e - g))
                qi = q[b, i * block_size:min((i + 1) * block_size, V), h].double()
                if not keys:
                    continue
                logits = qi @ torch.stack(keys).T * scale + torch.tensor(bias, dtype=torch.float64)
                out[b, i * block_size:i * block_size + qi.shape[0], h] = torch.softmax(logits, -1) @ torch.stack(values)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------- chunked PyTorch path
def torch_pyramid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, block_size: int, *,
    video_keys: tuple[int, int] | None = None, text_keys: tuple[int, int] | None = None,
    text_lengths: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, scale: float | None = None,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Pyramid attention in chunked PyTorch: the path where Triton cannot run (plain autograd backward).

    Same arguments as `reference_pyramid_attention`. Keys are the pooled rows of every level (about 1.9 x V plus
    the text), so a chunk of query blocks costs (B, H, chunk rows, 1.9 V + T); never a V x V tensor beyond one
    chunk. Gradients flow through the pooling to q, k and v.
    """
    parts = resolve_key_parts(k.shape[1], video_keys, text_keys)
    B, V, H, D = q.shape
    if parts.video_len != V:
        raise ValueError(f"video_keys cover {parts.video_len} rows, q has {V} video tokens")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    b_ = block_size
    n = -(-V // b_)
    kv_, vv_ = (t[:, parts.video_start:parts.video_start + V] for t in (k, v))
    pk, counts = pool_levels(kv_, b_)
    pv, _ = pool_levels(vv_, b_)
    ones = torch.zeros(n * b_, dtype=torch.float32, device=q.device)
    ones[:V] = 1
    pad = n * b_ - V
    keys = [torch.nn.functional.pad(kv_, (0, 0, 0, 0, 0, pad))] + pk
    values = [torch.nn.functional.pad(vv_, (0, 0, 0, 0, 0, pad))] + pv
    counts = [ones] + counts
    # per pooled row: its level, its KV block and its bias (ln count; -inf for empty groups)
    row_level = torch.cat([torch.full((n * b_ // p,), p, device=q.device) for p in LEVELS])
    row_block = torch.cat([torch.arange(n * b_ // p, device=q.device) // (b_ // p) for p in LEVELS])
    c = torch.cat(counts)
    bias = torch.where(c > 0, torch.log(c.clamp(min=1)), float("-inf")).to(cdtype)
    keys = torch.cat(keys, 1).to(cdtype).permute(0, 2, 3, 1)  # (B, H, D, R)
    values = torch.cat(values, 1).to(cdtype).transpose(1, 2)  # (B, H, R, D)
    tk, tv, vis = _text_parts(k, v, parts, text_lengths, text_mask, B, q.device)
    if tk is not None:
        tkh, tvh = tk.to(cdtype).permute(0, 2, 3, 1), tv.to(cdtype).transpose(1, 2)
    lev = levels.to(q.device).long()
    R = keys.shape[-1] + (parts.text_len if tk is not None else 0)
    per_block = max(1, B * H * b_ * R)
    step = max(1, chunk_elements // per_block)
    qpad = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad)).to(cdtype).transpose(1, 2)  # (B, H, n*b, D)
    outs = []
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        qc = qpad[:, :, i0 * b_:i1 * b_].reshape(B, H, i1 - i0, b_, D)
        s = torch.matmul(qc, keys[:, :, None]) * scale + bias  # (B, H, c, b, R)
        keep = lev[:, :, i0:i1][..., row_block] == row_level  # (B, H, c, R)
        s = s.masked_fill(~keep[:, :, :, None, :], float("-inf"))
        if tk is not None:
            st = torch.matmul(qc, tkh[:, :, None]) * scale
            s = torch.cat([s, st.masked_fill(~vis[:, None, None, None, :], float("-inf"))], -1)
        lse = torch.logsumexp(s, -1, keepdim=True)
        prob = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0))
        o = torch.matmul(prob[..., :keys.shape[-1]], values[:, :, None])
        if tk is not None:
            o = o + torch.matmul(prob[..., keys.shape[-1]:], tvh[:, :, None])
        outs.append(o.reshape(B, H, (i1 - i0) * b_, D))
    return torch.cat(outs, 2)[:, :, :V].transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------------------------------- importance
def sample_offsets(shape: torch.Size | tuple[int, ...], block_size: int, *, seed: int = 0,
                   sample_q: int | None = None, sample_k: int | None = None, device: torch.device | str = "cpu",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The within-block positions of `sample_positions`: ((B, H, sq), (B, H, sk)) int64, sorted, drawn per
    (batch, head) from a generator seeded with ``seed`` (``sample_q``/``sample_k`` default b/4)."""
    B, _, H, _ = shape
    b_ = block_size
    sq = min(b_, sample_q if sample_q is not None else max(1, b_ // 4))
    sk = min(b_, sample_k if sample_k is not None else max(1, b_ // 4))
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    noise = torch.rand(2, B, H, b_, generator=gen, device=device)
    pos_q = noise[0].topk(sq, -1).indices.sort(-1).values  # (B, H, sq)
    pos_k = noise[1].topk(sk, -1).indices.sort(-1).values
    return pos_q, pos_k


def sample_positions(shape: torch.Size | tuple[int, ...], block_size: int, *, seed: int = 0,
                     sample_q: int | None = None, sample_k: int | None = None, device: torch.device | str = "cpu",
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices sampled per block for the importance estimate: ((B, H, n, sq), (B, H, n, sk)) int64.

    For (B, V, H, D) video rows: per (batch, head), ``sample_q`` (default b/4) within-block positions drawn once
    from a generator seeded with ``seed`` and used for every block, likewise ``sample_k``; in a partial last block
    of r tokens position x reads token x mod r. Shared by `estimate_block_importance` and the fused Triton
    estimate (`accel.kernels.pyramid_estimate`), so both see the same tokens.
    """
    B, V, H, _ = shape
    b_ = block_size
    n = -(-V // b_)
    pos_q, pos_k = sample_offsets(shape, block_size, seed=seed, sample_q=sample_q, sample_k=sample_k,
                                  device=device)
    starts = torch.arange(n, device=device) * b_
    length = torch.clamp(V - starts, max=b_)[None, None, :, None]  # the last block may be partial
    idx_q = starts[None, None, :, None] + pos_q[:, :, None, :] % length  # (B, H, n, sq)
    idx_k = starts[None, None, :, None] + pos_k[:, :, None, :] % length
    return idx_q, idx_k


def estimate_setup(q: torch.Tensor, block_size: int, *, seed: int, sample_q: int | None, sample_k: int | None,
                   scale: float | None) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """(n blocks, resolved softmax scale, idx_q, idx_k): what both importance estimates start from."""
    n = -(-q.shape[1] // block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    idx_q, idx_k = sample_positions(q.shape, block_size, seed=seed, sample_q=sample_q, sample_k=sample_k,
                                    device=q.device)
    return n, scale, idx_q, idx_k


def normalise_rows(S: torch.Tensor) -> torch.Tensor:
    """Rows of block scores divided by their sums (E_ij = S_ij / sum_j S_ij), safe for all-zero rows."""
    return S / S.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def estimate_block_importance(
    q: torch.Tensor, k: torch.Tensor, block_size: int, *, seed: int = 0, sample_q: int | None = None,
    sample_k: int | None = None, scale: float | None = None, chunk_elements: int = 1 << 27,
) -> torch.Tensor:
    """(B, H, n, n) float32 block importance E from sampled tokens (the reference's generation path).

    Per (batch, head), ``sample_q`` (default b/4) within-block positions are drawn once and used for every query
    block, likewise ``sample_k`` for the KV blocks, from a generator seeded with ``seed`` (same seed, same
    positions). With s = q.k * scale on sampled tokens: S_ij = max over sampled q of block i of
    exp(max over sampled k of block j of s - max over all sampled k of s); rows normalised, E_ij = S_ij / sum_j.
    In a partial last block of r tokens a position x reads token x mod r (repeats do not change a max), so every
    block has samples. Computed in chunks of query blocks (never the
    full sampled matrix at once), no host sync.
    """
    B, V, H, D = q.shape
    n, scale, idx_q, idx_k = estimate_setup(q, block_size, seed=seed, sample_q=sample_q, sample_k=sample_k,
                                            scale=scale)
    sq, sk = idx_q.shape[-1], idx_k.shape[-1]
    # Half inputs on a GPU: the sampled logits come from a half-precision matmul (tensor cores, fp32
    # accumulation, rounded to the input dtype before the block max: an estimate, not the attention itself).
    low = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    cdtype = q.dtype if low else (torch.float64 if q.dtype == torch.float64 else torch.float32)
    qh, kh = (t.detach().transpose(1, 2).to(cdtype) for t in (q, k))  # (B, H, V, D)
    qs = torch.gather(qh, 2, idx_q.reshape(B, H, -1, 1).expand(-1, -1, -1, D)).reshape(B * H, n * sq, D)
    # Keys sample-major (column j * n + block): the max over a block's samples is then a reduction over a
    # non-innermost dimension, which runs at memory speed (an innermost reduction of 16 did not: 7 ms at 32k).
    idx_k = idx_k.transpose(-1, -2)  # (B, H, sk, n)
    ks = torch.gather(kh, 2, idx_k.reshape(B, H, -1, 1).expand(-1, -1, -1, D)).reshape(B * H, sk * n, D)
    ks_t = ks.transpose(1, 2)  # (BH, D, sk*n): one plain batched matmul per chunk of query blocks
    step = max(1, chunk_elements // max(1, B * H * sq * n * sk))
    rows = []
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        s = torch.bmm(qs[:, i0 * sq:i1 * sq], ks_t)  # (BH, c*sq, sk*n)
        blockmax = s.view(B * H, i1 - i0, sq, sk, n).amax(3).float() * scale  # (BH, c, sq, n)
        rowmax = blockmax.amax(-1, keepdim=True)
        rows.append(torch.exp(blockmax - rowmax).amax(2))  # (BH, c, n)
    return normalise_rows(torch.cat(rows, 1).view(B, H, n, n))


# ---------------------------------------------------------------------------------------- level assignment
def _scatter_levels(importance: torch.Tensor, ends: list[torch.Tensor]) -> torch.Tensor:
    """Levels from per-row rank ends: rank r (descending importance) gets LEVELS[t] for the first t with r < ends[t]."""
    n = importance.shape[-1]
    order = importance.argsort(dim=-1, descending=True, stable=True)
    rank = torch.arange(n, device=importance.device)
    by_rank = torch.zeros(importance.shape, dtype=torch.int32, device=importance.device)
    for p, end in reversed(list(zip(LEVELS, ends, strict=True))):
        by_rank = torch.where(rank < end[..., None], p, by_rank)
    levels = torch.empty_like(by_rank)
    levels.scatter_(-1, order, by_rank)
    return levels


def threshold_levels(importance: torch.Tensor, thresholds: tuple[float, float, float, float],
                     min_full_ratio: float = 0.06) -> torch.Tensor:
    """The reference's ``thresholdbound`` rule: (…, n) importance rows -> int32 levels in {0, 1, 2, 4, 8}.

    Per row, blocks sorted by descending importance, cumulative share C_r (r = 1..n). Level t's prefix ends at
    #{r : C_r <= tau_t + 1e-6} + 1 (the block that crosses the threshold is included; if no block is under, the
    previous end), never before the previous level's end, at most n; level 1 ends at least at
    min(n, floor(n * min_full_ratio) + 1). Blocks past level 8's end are skipped (0). The reference's rounding of
    interval lengths to its hardware tile is not applied (no tiles to fill here).
    """
    n = importance.shape[-1]
    sorted_w = importance.sort(-1, descending=True).values
    cum = sorted_w.cumsum(-1)
    ratio = cum / cum[..., -1:].clamp(min=torch.finfo(cum.dtype).tiny)
    ends, last = [], torch.zeros(importance.shape[:-1], dtype=torch.long, device=importance.device)
    for t, tau in enumerate(thresholds):
        under = (ratio <= tau + 1e-6).sum(-1)
        end = torch.where(under > 0, under + 1, last).clamp(max=n)
        end = torch.maximum(end, last)
        if t == 0:
            end = torch.clamp(end, min=min(n, int(n * min_full_ratio) + 1))
        ends.append(end)
        last = end
    return _scatter_levels(importance, ends)


def topk_levels(importance: torch.Tensor, quotas: tuple[float, float, float, float]) -> torch.Tensor:
    """The reference's ``topk`` rule: rank r < floor(n * q_t) gets level LEVELS[t] (cumulative fractions q_t)."""
    n = importance.shape[-1]
    ends, last = [], 0
    for qt in quotas:
        last = max(last, min(n, int(n * qt)))
        ends.append(torch.full(importance.shape[:-1], last, dtype=torch.long, device=importance.device))
    return _scatter_levels(importance, ends)


def level_density(levels: torch.Tensor) -> torch.Tensor:
    """0-dim float32: mean over block pairs of 1/p (0 for skipped), the reference's FLOP-equivalent density."""
    lv = levels.float()
    return torch.where(lv > 0, 1.0 / lv.clamp(min=1), 0.0).mean()


def similarity_cap(k: torch.Tensor, block_size: int, thresholds: tuple[float, float, float]) -> torch.Tensor:
    """(B, H, n) int32: the coarsest level each KV block may take (the reference's cosine-similarity cap).

    For p in (2, 4, 8): sim_p(j) = mean over the p-groups of block j of the cosine between the group's first and
    last key (a partial last group: its first and last real token; a one-token group counts 1). The cap is
    max({1} U {p : sim_p(j) > thresholds[p]}) (paper supplement Alg. 3). Apply with `cap_levels`.
    """
    B, V, H, D = k.shape
    n = -(-V // block_size)
    x = torch.nn.functional.normalize(k.detach().float(), dim=-1)
    cap = torch.ones(B, H, n, dtype=torch.int32, device=k.device)
    for p, tau in zip(LEVELS[1:], thresholds, strict=True):
        first = torch.arange(0, n * block_size, p, device=k.device)
        valid = first < V
        last = torch.clamp(first + p - 1, max=V - 1)
        cos = (x[:, first.clamp(max=V - 1)] * x[:, last]).sum(-1)  # (B, groups, H)
        cos = torch.where(valid[None, :, None], cos, 0.0).view(B, n, block_size // p, H)
        groups = valid.view(n, block_size // p).sum(-1).clamp(min=1)
        sim = (cos.sum(2) / groups[None, :, None]).transpose(1, 2)  # (B, H, n)
        cap = torch.where(sim > tau, p, cap)
    return cap


def cap_levels(levels: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """min(level, cap of the KV block) on the p scale; skipped pairs stay 0."""
    return torch.where(levels > 0, torch.minimum(levels, cap[..., None, :].to(levels.dtype)), levels)
