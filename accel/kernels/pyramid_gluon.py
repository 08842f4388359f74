"""Pyramid forward for Hopper (sm_90) in Gluon: every K/V tile full, pooled blocks packed into it by TMA.

The Triton forward (`pyramid.py`) pays a tile's fixed cost for every pooled block: Triton cannot load several
descriptor boxes into one shared-memory tile (benchmarks/NOTES.md, pyramid items 9-11). Here, with the same
inputs, level lists and results:

- A tile of level p holds p pooled blocks of b/p rows each: p TMA loads into row slices of one (b, D)
  shared-memory tile, so a level-8 block costs 1/8 of a tile's matmuls. Level-1 and text tiles are one load.
  The row's tiles run in one loop: level 1, then 2, 4, 8 (packed), then text. A tile whose entries are all
  listed and full needs no per-column work (bias log2(p) for all); only a level's last tile and text tiles
  build a per-column bias (`_tile_column_bias`), exactly the keys and biases of `pyramid._pooled_lanes`.
- The block indices of a tile are loaded one tile before its loads are issued (`_tile_entries`), so no warp
  waits on a global load inside the loop; K runs two tiles ahead in three slots, V one tile ahead in three
  (224 KB with Q). A slot is refilled once both warpgroups are past it (one CTA barrier per tile).
- ``ws=True`` (block 128): the same work warp-specialised, FA3's split: one load warp and two consumer
  warpgroups of 64 query rows, synchronised through mbarriers only (`_pyramid_fwd_gluon_ws_kernel`), and
  persistent: one program per SM; its load warp takes the next (query block, batch x head) item from an atomic
  counter, hands it to the consumers through shared memory and starts its loads while they finish the item
  before. Items in index order, so a head's query blocks run together and its K/V stay in L2. Measured against
  a grid of one program per item, a static deal (`_ws_pos`) and cost-sorted orders (`work_order`), which stay
  launch options for the probes (benchmarks/NOTES.md, pyramid items 27-29).
- Descriptors are built on the host, once per call: (batch, row, head x dim column) views of the inputs, a head
  addressed by its column offset, so no program builds its own (a launch without tiles cost 0.29 ms with 11
  device-side descriptors per program). Rows past a batch's last token read as zeros; the pooled buffers share
  one row axis (`_flat_rows_desc`).

Tried and removed: issuing the next tile's QK^T before this tile's softmax (FA3's intra-warpgroup overlap):
ptxas serialises the wgmmas anyway (C7514) and the second accumulator spills at block 128: 3.36 vs 2.67 ms.

Only for sm_90, 16-bit inputs, head dims 64/128 and blocks 64/128 with descriptor-friendly strides, heads side by
side inside a row (`gluon_fwd_problem`); everything else, and any build failure, runs the Triton kernel. Gluon
does not run under TRITON_INTERPRET, so its tests are on the GPU (tests/test_gpu_sparse_methods.py) and,
offline, an sm_90 compile in CI (tests/test_pyramid_sm90_fit.py).
"""

# No `from __future__ import annotations`: Gluon reads constexpr annotations as objects.
import torch
from torch import Tensor

try:  # Gluon is experimental: a Triton without it (or with another API) runs the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # names that moved between releases (3.6: the first of each pair; later: the second)
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "gluon_fwd_problem", "launch_fwd_gluon"]

K_SLOTS = 3  # K tiles in shared memory: tiles t+1 and t+2 load while tile t computes
WS_CONSUMER_REGS = 240  # registers per thread of each consumer warpgroup (FA3's split of the 64K)
WS_PRODUCER_REGS = 24  # of the load warp's warpgroup
V_SLOTS = 3  # V tiles: tile t+1 loads while t computes and P.V(t-1) may still read its slot

if HAVE_GLUON:
    @gluon.jit
    def _pick(kbs, j):
        """Lane ``j`` of a tile's block indices (every thread holds all lanes: an in-thread select)."""
        lanes = gl.arange(0, 8, layout=kbs.type.layout)
        return gl.sum(gl.where(lanes == j, kbs, 0), axis=0)

    @gluon.jit
    def _issue_pooled(kbs, desc, dfull, row0, col, dst, bar, P: gl.constexpr, BS: gl.constexpr):
        """TMA loads of a level-P tile's P pooled blocks (b/P rows each) into row slices of ``dst``: one b-row box
        (``dfull``) when lane j holds block first + j for every j < P, as the pooled rows of consecutive blocks
        are consecutive, else P boxes (the lanes of a level's short last tile repeat its last block: never a
        run)."""
        PER: gl.constexpr = BS // P
        first = _pick(kbs, 0)
        lanes = gl.arange(0, 8, layout=kbs.type.layout)
        if gl.sum(gl.where((lanes < P) & (kbs != first + lanes), 1, 0), axis=0) == 0:
            _tma_load(dfull, [row0 + first * PER, col], bar, dst)
        else:
            for j in gl.static_range(P):
                _tma_load(desc, [row0 + _pick(kbs, j) * PER, col], bar, dst.slice(j * PER, PER))

    @gluon.jit
    def _issue_tile(t, kbs, c1, c2, c4, c8, side, at, R4, R8, dst, bar, BS: gl.constexpr, HEAD_DIM: gl.constexpr,
                    HAS_TEXT: gl.constexpr):
        """Start the loads of the row's tile ``t`` (of K or of V: ``side``'s descriptors say which) into ``dst``.
        ``kbs``: the tile's block indices (`_tile_entries`); ``side``: (video, levels 2/4/8 and b-row boxes of the
        pooled buffer, text) descriptors;
        ``at``: (batch, the batch's first pooled row, column of the head in the video, pooled, text rows)."""
        d1, d2, d4, d8, dpf, dt = side
        b, prow, col1, colp, colt = at
        mbarrier.expect(bar, d1.block_type.nbytes)  # every tile is BS rows, whatever its level
        if t < c1:
            _tma_load(d1, [b, _pick(kbs, 0) * BS, col1], bar, dst.reshape([1, BS, HEAD_DIM]))
        elif t < c2:
            _issue_pooled(kbs, d2, dpf, prow, colp, dst, bar, 2, BS)
        elif t < c4:
            _issue_pooled(kbs, d4, dpf, prow + R4, colp, dst, bar, 4, BS)
        elif t < c8:
            _issue_pooled(kbs, d8, dpf, prow + R8, colp, dst, bar, 8, BS)
        else:
            if HAS_TEXT:
                _tma_load(dt, [b, (t - c8) * BS, colt], bar, dst.reshape([1, BS, HEAD_DIM]))

    @gluon.jit
    def _tile_level(t, c1, c2, c4, c8, e1, e2, e4, e8):
        """(lg, first entry, level's end) of video tile ``t``: level 2**lg, entries [first, first + 2**lg)."""
        lg = gl.where(t < c1, 0, gl.where(t < c2, 1, gl.where(t < c4, 2, 3)))
        tile0 = gl.where(t < c1, 0, gl.where(t < c2, c1, gl.where(t < c4, c2, c4)))
        lo = gl.where(t < c1, 0, gl.where(t < c2, e1, gl.where(t < c4, e2, e4)))
        hi = gl.where(t < c1, e1, gl.where(t < c2, e2, gl.where(t < c4, e4, e8)))
        return lg, lo + ((t - tile0) << lg), hi

    @gluon.jit
    def _tile_entries(t, n_tiles, c1, c2, c4, c8, e1, e2, e4, e8, idx, layout: gl.constexpr):
        """The block indices of video tile ``t``'s entries as 8 lanes held by every thread (lanes past its level
        and entries past the level's end repeat its last block). Loaded one tile ahead of their use, so no
        warp waits for a global load in the loop."""
        lg, first, hi = _tile_level(t, c1, c2, c4, c8, e1, e2, e4, e8)
        j = gl.arange(0, 8, layout=layout)
        e = gl.maximum(gl.minimum(first + gl.minimum(j, (1 << lg) - 1), hi - 1), 0)
        return gl.load(idx + e, mask=(j < 8) & (t < c8) & (t < n_tiles), other=0)

    @gluon.jit
    def _lg2(x):
        """log2 on the SFU (``lg2.approx``, one instruction per value): `gl.log2` lowers to libdevice's
        polynomial, about 11 FFMAs a value, which made a tile's column bias cost 3-4x its whole softmax."""
        return gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _tile_column_bias(t, lg, first, hi, last_kb, c8, NV, T, emask, cols, BS: gl.constexpr,
                          LOG_BS: gl.constexpr, HAS_TEXT: gl.constexpr, HAS_TEXT_MASK: gl.constexpr):
        """Per-column logit bias (log2 units, -inf = hidden) of a tile that is not plain. Video tiles of level
        p = 2**lg: column c is pooled row c % (b/p) of entry first + c // (b/p), the mean of tokens
        [kb*b + r*p, +p) cut at NV (`pyramid._pooled_lanes`); entries past the level's end are hidden. Only the
        partial last KV block has groups of fewer than p tokens, and a level lists its blocks in ascending
        order, so only the level's last entry (block ``last_kb``) needs its block index: no gather. Most such
        tiles are a level's short last tile: one compare a column; the token counts only where the partial
        block sits in the tile (measured: a per-column formula for every such tile cost 25% of the kernel,
        benchmarks/NOTES.md, pyramid item 46)."""
        LOG_PER = LOG_BS - lg  # pooled rows per entry: 2**LOG_PER
        n_valid = (hi - first) << LOG_PER  # columns of listed entries
        if HAS_TEXT and t >= c8:
            tcol = (t - c8) * BS + cols
            tvalid = tcol < T
            if HAS_TEXT_MASK:
                tvalid = tvalid & (gl.load(emask + tcol, mask=tvalid, other=0) != 0)
            bias = gl.where(tvalid, 0.0, float("-inf"))
        elif (last_kb * BS + BS > NV) & (hi - first <= (1 << lg)):  # the level's partial last block is here
            full = 1 << lg
            tok = last_kb * BS + ((cols & ((1 << LOG_PER) - 1)) << lg)
            cnt = gl.where(cols >= n_valid - (1 << LOG_PER), gl.minimum(NV - tok, full), full)
            bias = gl.where((cols < n_valid) & (cnt > 0), _lg2(gl.maximum(cnt, 1).to(gl.float32)), float("-inf"))
        else:
            bias = gl.where(cols < n_valid, lg.to(gl.float32), float("-inf"))
        return bias

    @gluon.jit
    def _row_tiles(Ends, r, T, BS: gl.constexpr, HAS_TEXT: gl.constexpr):
        """Row ``r``'s level ends (entries) and tile ends: (e1, e2, e4, e8, c1, c2, c4, c8, tiles); a level-p tile
        holds p entries, text tiles follow the video ones."""
        e1 = gl.load(Ends + r * 4)
        e2 = gl.load(Ends + r * 4 + 1)
        e4 = gl.load(Ends + r * 4 + 2)
        e8 = gl.load(Ends + r * 4 + 3)
        c2 = e1 + (e2 - e1 + 1) // 2
        c4 = c2 + (e4 - e2 + 3) // 4
        c8 = c4 + (e8 - e4 + 7) // 8
        n_tiles = c8
        if HAS_TEXT:
            n_tiles = c8 + (T + BS - 1) // BS
        return e1, e2, e4, e8, e1, c2, c4, c8, n_tiles

    @gluon.jit
    def _level_lasts(idx, e1, e2, e4, e8):
        """Each level's last block: the only one that can be partial (`_tile_column_bias`)."""
        return (gl.load(idx + gl.maximum(e1 - 1, 0)), gl.load(idx + gl.maximum(e2 - 1, 0)),
                gl.load(idx + gl.maximum(e4 - 1, 0)), gl.load(idx + gl.maximum(e8 - 1, 0)))

    @gluon.jit
    def _tile_logits(s_cur, t, c1, c2, c4, c8, e1, e2, e4, e8, lasts, NV, T, emask, cols, qk_scale,
                     BS: gl.constexpr, LOG_BS: gl.constexpr, HAS_TEXT: gl.constexpr, HAS_TEXT_MASK: gl.constexpr):
        """Tile ``t``'s logits in log2 units with its keys' biases. A plain tile (all entries listed, none a
        partial block, not text) needs no per-column work: every key's bias is log2(p)."""
        lg, first, hi = _tile_level(t, c1, c2, c4, c8, e1, e2, e4, e8)
        last_kb = gl.where(lg == 0, lasts[0], gl.where(lg == 1, lasts[1], gl.where(lg == 2, lasts[2], lasts[3])))
        plain = (first + (1 << lg) <= hi) & (last_kb * BS + BS <= NV) & (t < c8)
        if plain:
            s = s_cur * qk_scale + lg.to(gl.float32)
        else:
            s = s_cur * qk_scale + _tile_column_bias(t, lg, first, hi, last_kb, c8, NV, T, emask, cols, BS,
                                                     LOG_BS, HAS_TEXT, HAS_TEXT_MASK)[None, :]
        return s

    @gluon.jit
    def _online_softmax(s, m_i, l_i, acc, rows_o: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr):
        """The online-softmax step (`_triton_common._softmax_update_masked`'s formula) up to P.V: returns P as the
        wgmma's register operand, the new row max and sum, and the rescaled accumulator (its previous P.V
        waited for)."""
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = warpgroup_mma_wait(0, deps=[acc])
        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        return gl.convert_layout(p.to(dtype), p_layout), m_new, l_i, acc

    @gluon.jit
    def _lse(m_i, l_i):
        """Natural-log LSE per row (log2 units times ln 2); -inf for a row that sees no key."""
        return gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(gl.where(l_i == 0.0, 1.0, l_i)))
                        * 0.6931471805599453)

    @gluon.jit
    def _qk_async(q_smem, k_tile, s_layout: gl.constexpr, BS: gl.constexpr):
        """Issue Q.K^T of one tile (a fresh accumulator, not waited for)."""
        return warpgroup_mma(q_smem, k_tile.permute((1, 0)), gl.zeros([BS, BS], gl.float32, layout=s_layout),
                             use_acc=False, is_async=True)

    @gluon.jit
    def _side_at(b, h, geo):
        """`_issue_tile`'s ``at`` for batch ``b``, head ``h`` from a side's ``geo``: (pooled rows per batch, head
        column stride in the video, pooled and text rows)."""
        return b, b * geo[0], h * geo[1], h * geo[2], h * geo[3]

    @gluon.jit
    def _pyramid_fwd_gluon_kernel(
        q_desc, o_desc, k1, k2, k4, k8, kpf, kt, v1, v2, v4, v8, vpf, vt, EMask, Lse, Idx, Ends,
        stride_emb, stride_lb, stride_lh, k_prow, k_col, kp_col, kt_col, v_prow, v_col, vp_col, vt_col, q_col, o_col,
        H, NV, NB, T, R4, R8, qk_scale,
        HEAD_DIM: gl.constexpr, BS: gl.constexpr, LOG_BS: gl.constexpr, KS: gl.constexpr, VS: gl.constexpr,
        HAS_TEXT: gl.constexpr, HAS_TEXT_MASK: gl.constexpr, num_warps: gl.constexpr,
    ):
        """One program per (query block, batch x head), every warp on every tile (blocks 64 and 128)."""
        dtype: gl.constexpr = q_desc.dtype
        qb = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth,
                                                  rank=2)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BS, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)

        k_side = (k1, k2, k4, k8, kpf, kt)
        v_side = (v1, v2, v4, v8, vpf, vt)
        k_at = _side_at(b, h, (k_prow, k_col, kp_col, kt_col))
        v_at = _side_at(b, h, (v_prow, v_col, vp_col, vt_col))
        emask = EMask + b.to(gl.int64) * stride_emb

        row = pid_bh.to(gl.int64) * NB + qb
        idx = Idx + row * NB
        e1, e2, e4, e8, c1, c2, c4, c8, n_tiles = _row_tiles(Ends, row, T, BS, HAS_TEXT)

        q_smem = gl.allocate_shared_memory(dtype, [BS, HEAD_DIM], smem)
        k_smem = gl.allocate_shared_memory(dtype, [KS, BS, HEAD_DIM], smem)
        v_smem = gl.allocate_shared_memory(dtype, [VS, BS, HEAD_DIM], smem)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [KS, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [VS, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(KS):
            mbarrier.init(k_bar.index(i), count=1)
        for i in gl.static_range(VS):
            mbarrier.init(v_bar.index(i), count=1)
        fence_async_shared()

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [b, qb * BS, h * q_col], q_bar, q_smem.reshape([1, BS, HEAD_DIM]))
        ent: gl.constexpr = gl.BlockedLayout(size_per_thread=[8], threads_per_warp=[32], warps_per_cta=[num_warps],
                                             order=[0])
        # K runs two tiles ahead (slots t+1, t+2 loading while t computes), V one (its slot t-1 may still be read
        # by P.V(t-1) at the top of iteration t): kbs_v/kbs_k hold the block indices of tiles t+1/t+2
        kbs = _tile_entries(0, n_tiles, c1, c2, c4, c8, e1, e2, e4, e8, idx, ent)
        kbs_v = _tile_entries(1, n_tiles, c1, c2, c4, c8, e1, e2, e4, e8, idx, ent)
        if n_tiles > 0:
            _issue_tile(0, kbs, c1, c2, c4, c8, k_side, k_at, R4, R8, k_smem.index(0), k_bar.index(0), BS, HEAD_DIM,
                        HAS_TEXT)
            _issue_tile(0, kbs, c1, c2, c4, c8, v_side, v_at, R4, R8, v_smem.index(0), v_bar.index(0), BS, HEAD_DIM,
                        HAS_TEXT)
        if n_tiles > 1:
            _issue_tile(1, kbs_v, c1, c2, c4, c8, k_side, k_at, R4, R8, k_smem.index(1), k_bar.index(1), BS,
                        HEAD_DIM, HAS_TEXT)
        kbs_k = _tile_entries(2, n_tiles, c1, c2, c4, c8, e1, e2, e4, e8, idx, ent)
        lasts = _level_lasts(idx, e1, e2, e4, e8)

        cols = gl.arange(0, BS, layout=cols_s)
        m_i = gl.full([BS], float("-inf"), gl.float32, layout=rows_s)
        l_i = gl.zeros([BS], gl.float32, layout=rows_s)
        acc = warpgroup_mma_init(gl.zeros([BS, HEAD_DIM], gl.float32, layout=o_layout))
        mbarrier.wait(q_bar, 0)
        for t in range(n_tiles):
            # both warpgroups are past QK^T(t-1) and P.V(t-2): K(t+2) goes to K slot t-1, V(t+1) to V slot t-2
            _cta_barrier()
            if t + 2 < n_tiles:
                _issue_tile(t + 2, kbs_k, c1, c2, c4, c8, k_side, k_at, R4, R8, k_smem.index((t + 2) % KS),
                            k_bar.index((t + 2) % KS), BS, HEAD_DIM, HAS_TEXT)
            if t + 1 < n_tiles:
                _issue_tile(t + 1, kbs_v, c1, c2, c4, c8, v_side, v_at, R4, R8, v_smem.index((t + 1) % VS),
                            v_bar.index((t + 1) % VS), BS, HEAD_DIM, HAS_TEXT)
            kbs_v = kbs_k
            kbs_k = _tile_entries(t + 3, n_tiles, c1, c2, c4, c8, e1, e2, e4, e8, idx, ent)
            mbarrier.wait(k_bar.index(t % KS), (t // KS) & 1)
            s_tok = _qk_async(q_smem, k_smem.index(t % KS), s_layout, BS)
            s_cur = warpgroup_mma_wait(0, deps=[s_tok])  # also retires P.V(t-1)
            s = _tile_logits(s_cur, t, c1, c2, c4, c8, e1, e2, e4, e8, lasts, NV, T, emask, cols, qk_scale, BS,
                             LOG_BS, HAS_TEXT, HAS_TEXT_MASK)
            p_op, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc, rows_o, p_layout, dtype)
            mbarrier.wait(v_bar.index(t % VS), (t // VS) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(t % VS), acc, is_async=True)

        out = warpgroup_mma_wait(0, deps=[acc])
        l_o = gl.convert_layout(l_i, rows_o)
        out = out / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
        _cta_barrier()  # every warpgroup is done reading Q: its tile takes the output
        q_smem.store(out.to(dtype))
        fence_async_shared()
        _cta_barrier()
        _tma_store(o_desc, [b, qb * BS, h * o_col], q_smem.reshape([1, BS, HEAD_DIM]))  # rows past NV are clipped
        q_rows = qb * BS + gl.arange(0, BS, layout=rows_s)
        gl.store(Lse + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + q_rows, _lse(m_i, l_i),
                 mask=q_rows < NV)
        tma.store_wait(0)
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(KS):
            mbarrier.invalidate(k_bar.index(i))
        for i in gl.static_range(VS):
            mbarrier.invalidate(v_bar.index(i))

    @gluon.jit
    def _ws_item(Order, pos, NB, H, HAS_ORDER: gl.constexpr):
        """The work item at ``pos``: row ``Order[pos]`` of the level lists, or row ``pos`` without an order;
        (row, batch, head, query block)."""
        r = pos
        if HAS_ORDER:
            r = gl.load(Order + pos).to(gl.int32)  # int64 from argsort; < 2**31 items
        bh = r // NB
        return r.to(gl.int64), bh // H, bh % H, r % NB

    @gluon.jit
    def _ws_pos(i, pid, G):
        """Round ``i``'s position of program ``pid`` in a snake order (rounds alternate direction), so over the
        cost-sorted items every program's total evens out: the costliest item of one round, the cheapest of
        the next."""
        return i * G + pid + (i % 2) * (G - 1 - 2 * pid)

    @gluon.jit
    def _ws_next(Counter, i, pid, G, DYNAMIC: gl.constexpr):
        """The load warp's next item: the next free one from the launch's counter (``DYNAMIC``: programs take
        items as they finish, like the hardware's scheduling of a grid) or round ``i``'s of the snake."""
        if DYNAMIC:
            pos = gl.atomic_add(Counter, 1)
        else:
            pos = _ws_pos(i, pid, G)
        return pos

    @gluon.jit
    def _ws_publish(sched, sched_ready, sched_empty, i, pos):
        """Hand item ``pos`` (the load warp's ``i``-th) to the consumers through slot i % 2 of ``sched``."""
        one: gl.constexpr = gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[1],
                                             order=[0])
        mbarrier.wait(sched_empty.index(i % 2), ((i // 2) & 1) ^ 1)
        sched.index(i % 2).store(gl.full([1], pos, gl.int32, layout=one))
        mbarrier.arrive(sched_ready.index(i % 2), count=1)

    @gluon.jit
    def _ws_take(sched, sched_ready, sched_empty, i, pos, DYNAMIC: gl.constexpr):
        """A consumer's ``i``-th item: the one the load warp handed over (``DYNAMIC``), else ``pos``."""
        if DYNAMIC:
            one: gl.constexpr = gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[4],
                                                 order=[0])
            mbarrier.wait(sched_ready.index(i % 2), (i // 2) & 1)
            pos = gl.sum(sched.index(i % 2).load(one), axis=0)
            mbarrier.arrive(sched_empty.index(i % 2), count=1)
        return pos

    @gluon.jit
    def _ws_producer(descs, geos, work, bufs, bars, BS: gl.constexpr, HEAD_DIM: gl.constexpr, KS: gl.constexpr,
                     VS: gl.constexpr, HAS_TEXT: gl.constexpr, HAS_ORDER: gl.constexpr, DYNAMIC: gl.constexpr):
        """The load warp: per work item its Q (once the consumers are past the last item's last QK^T), then per tile
        its K and V (p boxes each for a pooled tile) into the rings, each slot once both consumer warpgroups have
        released it. It runs into the next item while the consumers finish one; its waits stall only itself."""
        q_desc, k_side, v_side = descs
        q_col, k_geo, v_geo = geos
        Order, Ends, Idx, n_items, NB, H, T, R4, R8, Counter = work
        q_smem, k_smem, v_smem = bufs
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, sched, sched_ready, sched_empty, _ = bars
        ent: gl.constexpr = gl.BlockedLayout(size_per_thread=[8], threads_per_warp=[32], warps_per_cta=[1],
                                             order=[0])
        pid = gl.program_id(0)
        G = gl.num_programs(0)
        g = 0  # tiles issued by this program: the position in the rings
        i = 0  # items of this program so far
        pos = _ws_next(Counter, 0, pid, G, DYNAMIC)
        while pos < n_items:
            if DYNAMIC:  # tell the consumers (its slot free once both have read it)
                _ws_publish(sched, sched_ready, sched_empty, i, pos)
            r, b, h, qb = _ws_item(Order, pos, NB, H, HAS_ORDER)
            e1, e2, e4, e8, c1, c2, c4, c8, n_tiles = _row_tiles(Ends, r, T, BS, HAS_TEXT)
            idx = Idx + r * NB
            k_at = _side_at(b, h, k_geo)
            v_at = _side_at(b, h, v_geo)
            mbarrier.wait(q_empty, (i & 1) ^ 1)
            mbarrier.expect(q_ready, q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, qb * BS, h * q_col], q_ready, q_smem.reshape([1, BS, HEAD_DIM]))
            for t in range(n_tiles):
                kbs = _tile_entries(t, n_tiles, c1, c2, c4, c8, e1, e2, e4, e8, idx, ent)
                mbarrier.wait(k_empty.index(g % KS), ((g // KS) & 1) ^ 1)
                _issue_tile(t, kbs, c1, c2, c4, c8, k_side, k_at, R4, R8, k_smem.index(g % KS),
                            k_ready.index(g % KS), BS, HEAD_DIM, HAS_TEXT)
                mbarrier.wait(v_empty.index(g % VS), ((g // VS) & 1) ^ 1)
                _issue_tile(t, kbs, c1, c2, c4, c8, v_side, v_at, R4, R8, v_smem.index(g % VS),
                            v_ready.index(g % VS), BS, HEAD_DIM, HAS_TEXT)
                g += 1
            i += 1
            pos = _ws_next(Counter, i, pid, G, DYNAMIC)
        if DYNAMIC:
            _ws_publish(sched, sched_ready, sched_empty, i, n_items)  # no more items

    @gluon.jit
    def _ws_consumer(work, bufs, bars, outs, NV, qk_scale, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                     BS: gl.constexpr, LOG_BS: gl.constexpr, KS: gl.constexpr, VS: gl.constexpr,
                     HAS_TEXT: gl.constexpr, HAS_TEXT_MASK: gl.constexpr, HAS_ORDER: gl.constexpr,
                     DYNAMIC: gl.constexpr):
        """One consumer warpgroup: per work item, query rows [WG*b/2, +b/2) of its block over every tile of its
        row, releasing each K slot after its QK^T, each V slot after its P.V and Q after the last QK^T; then its
        output rows and LSE, straight from registers (Q's tile already holds the next item's queries). The two
        warpgroups take turns to issue their matmuls (``turn``, FA3's ping-pong): on the H200 the kernel alone
        was 7-9% faster than with free-running warpgroups (2.13 -> 1.96 ms at Wan2.1-1.3B 480p rank quotas 15%,
        36.1 -> 33.7 ms at 14B 720p; `benchmarks/results/pyramid_gluon_ab_pingpong*.json`)."""
        Order, Ends, Idx, n_items, NB, H, T, R4, R8, Counter = work
        q_smem, k_smem, v_smem = bufs
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, sched, sched_ready, sched_empty, turn = bars
        Out, stride_ob, stride_om, stride_oh, Lse, stride_lb, stride_lh, EMask, stride_emb = outs
        HALF: gl.constexpr = BS // 2
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BS, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols = gl.arange(0, BS, layout=gl.SliceLayout(0, s_layout))
        q_half = q_smem.slice(WG * HALF, HALF)
        pid = gl.program_id(0)
        G = gl.num_programs(0)
        g = 0  # tiles consumed by this program: the position in the rings
        i = 0  # items of this program so far
        pos = _ws_take(sched, sched_ready, sched_empty, 0, pid, DYNAMIC)
        while pos < n_items:
            r, b, h, qb = _ws_item(Order, pos, NB, H, HAS_ORDER)
            e1, e2, e4, e8, c1, c2, c4, c8, n_tiles = _row_tiles(Ends, r, T, BS, HAS_TEXT)
            lasts = _level_lasts(Idx + r * NB, e1, e2, e4, e8)
            emask = EMask + b.to(gl.int64) * stride_emb
            m_i = gl.full([HALF], float("-inf"), gl.float32, layout=rows_s)
            l_i = gl.zeros([HALF], gl.float32, layout=rows_s)
            acc = warpgroup_mma_init(gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout))
            mbarrier.wait(q_ready, i & 1)
            # FA3's ping-pong: the warpgroups take turns to issue their matmuls (P.V(t-1), then Q.K^T(t)),
            # so one's softmax runs while the other's matmuls hold the tensor cores
            p_op = gl.zeros([HALF, BS], dtype, layout=p_layout)
            for t in range(n_tiles):
                mbarrier.wait(k_ready.index(g % KS), (g // KS) & 1)
                if t > 0:
                    mbarrier.wait(v_ready.index((g - 1) % VS), ((g - 1) // VS) & 1)
                if WG == 0:
                    if g > 0:
                        mbarrier.wait(turn.index(0), (g - 1) & 1)
                else:
                    mbarrier.wait(turn.index(1), g & 1)
                if t > 0:
                    acc = warpgroup_mma(p_op, v_smem.index((g - 1) % VS), acc, is_async=True)
                s_tok = warpgroup_mma(q_half, k_smem.index(g % KS).permute((1, 0)),
                                      gl.zeros([HALF, BS], gl.float32, layout=s_layout), use_acc=False,
                                      is_async=True)
                mbarrier.arrive(turn.index(1 - WG), count=1)
                s_cur, acc = warpgroup_mma_wait(0, deps=[s_tok, acc])  # also retires P.V(t-1)
                mbarrier.arrive(k_empty.index(g % KS), count=1)
                if t > 0:
                    mbarrier.arrive(v_empty.index((g - 1) % VS), count=1)
                if t == n_tiles - 1:
                    mbarrier.arrive(q_empty, count=1)  # the next item's Q may load now
                s = _tile_logits(s_cur, t, c1, c2, c4, c8, e1, e2, e4, e8, lasts, NV, T, emask, cols,
                                 qk_scale, BS, LOG_BS, HAS_TEXT, HAS_TEXT_MASK)
                p_op, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc, rows_o, p_layout, dtype)
                acc = warpgroup_mma_init(acc)  # the loop carries an accumulator, as it starts
                g += 1
            if n_tiles > 0:  # the last tile's P.V, outside the turns (both warpgroups take as many)
                mbarrier.wait(v_ready.index((g - 1) % VS), ((g - 1) // VS) & 1)
                acc = warpgroup_mma(p_op, v_smem.index((g - 1) % VS), acc, is_async=True)
            out = warpgroup_mma_wait(0, deps=[acc])
            if n_tiles > 0:
                mbarrier.arrive(v_empty.index((g - 1) % VS), count=1)
            else:
                mbarrier.arrive(q_empty, count=1)
            l_o = gl.convert_layout(l_i, rows_o)
            out = out / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
            r_o = qb * BS + WG * HALF + gl.arange(0, HALF, layout=rows_o)
            d_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            out_base = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
            gl.store(out_base + r_o.to(gl.int64)[:, None] * stride_om + d_o[None, :], out.to(dtype),
                     mask=(r_o < NV)[:, None])
            r_s = qb * BS + WG * HALF + gl.arange(0, HALF, layout=rows_s)
            gl.store(Lse + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + r_s, _lse(m_i, l_i),
                     mask=r_s < NV)
            i += 1
            pos = _ws_take(sched, sched_ready, sched_empty, i, _ws_pos(i, pid, G), DYNAMIC)

    @gluon.jit
    def _pyramid_fwd_gluon_ws_kernel(
        q_desc, k1, k2, k4, k8, kpf, kt, v1, v2, v4, v8, vpf, vt, Out, EMask, Lse, Idx, Ends, Order, Counter,
        stride_ob, stride_om, stride_oh, stride_emb, stride_lb, stride_lh,
        k_prow, k_col, kp_col, kt_col, v_prow, v_col, vp_col, vt_col, q_col,
        H, NV, NB, T, R4, R8, n_items, qk_scale,
        HEAD_DIM: gl.constexpr, BS: gl.constexpr, LOG_BS: gl.constexpr, KS: gl.constexpr, VS: gl.constexpr,
        HAS_TEXT: gl.constexpr, HAS_TEXT_MASK: gl.constexpr, HAS_ORDER: gl.constexpr, DYNAMIC: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """The forward warp-specialised (FA3's split) and persistent: one load warp and two consumer warpgroups of
        b/2 query rows, synchronised only through mbarriers, so one warpgroup's softmax overlaps the other's
        matmuls, no CTA barrier precedes a TMA copy, and the load warp starts an item's loads while the
        consumers finish the one before. Each program walks its items of ``Order`` (`_ws_pos`)."""
        dtype: gl.constexpr = q_desc.dtype
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth,
                                                  rank=2)
        bufs = (gl.allocate_shared_memory(dtype, [BS, HEAD_DIM], smem),
                gl.allocate_shared_memory(dtype, [KS, BS, HEAD_DIM], smem),
                gl.allocate_shared_memory(dtype, [VS, BS, HEAD_DIM], smem))
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [KS, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [KS, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [VS, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [VS, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=2)  # one arrival per consumer warpgroup
        for i in gl.static_range(KS):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
        for i in gl.static_range(VS):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        sched = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        sched_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        sched_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # whose turn to issue matmuls
        for i in gl.static_range(2):
            mbarrier.init(sched_ready.index(i), count=1)
            mbarrier.init(sched_empty.index(i), count=2)
            mbarrier.init(turn.index(i), count=1)
        fence_async_shared()
        bars = (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, sched, sched_ready, sched_empty, turn)
        work = (Order, Ends, Idx, n_items, NB, H, T, R4, R8, Counter)
        outs = (Out, stride_ob, stride_om, stride_oh, Lse, stride_lb, stride_lh, EMask, stride_emb)
        descs = (q_desc, (k1, k2, k4, k8, kpf, kt), (v1, v2, v4, v8, vpf, vt))
        geos = (q_col, (k_prow, k_col, kp_col, kt_col), (v_prow, v_col, vp_col, vt_col))
        gl.warp_specialize([
            (_ws_consumer, (work, bufs, bars, outs, NV, qk_scale, 0, HEAD_DIM, BS, LOG_BS, KS, VS, HAS_TEXT,
                            HAS_TEXT_MASK, HAS_ORDER, DYNAMIC)),
            (_ws_consumer, (work, bufs, bars, outs, NV, qk_scale, 1, HEAD_DIM, BS, LOG_BS, KS, VS, HAS_TEXT,
                            HAS_TEXT_MASK, HAS_ORDER, DYNAMIC)),
            (_ws_producer, (descs, geos, work, bufs, bars, BS, HEAD_DIM, KS, VS, HAS_TEXT, HAS_ORDER, DYNAMIC)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _rows_problem(x: Tensor, name: str) -> str | None:
    """Why ``x`` (B, N, H, D) cannot be read as (batch, row, head x dim column) boxes (None: it can): the
    descriptors address a head by its column offset, so every head must lie inside a row and rows of one
    batch must not run into the next."""
    B, N, H, D = x.shape
    sb, sn, sh, _ = x.stride()
    if H > 1 and sh < D or (H - 1) * sh + D > sn:
        return f"{name}: heads do not lie side by side inside a row (strides {tuple(x.stride())})"
    if B > 1 and sb < N * sn:
        return f"{name}: one batch's rows overlap the next (strides {tuple(x.stride())})"
    return None


def gluon_fwd_problem(q: Tensor, tensors: dict[str, Tensor], block: int) -> str | None:
    """Why the Gluon forward cannot run on these inputs (None: it can). ``tensors``: name -> every tensor a
    descriptor reads or writes (q, out, the video, pooled and text K/V)."""
    from .select import tma_problem

    if not HAVE_GLUON:
        return "this Triton has no Gluon Hopper API"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not an sm_90 GPU"
    if block not in (64, 128):
        return f"block {block} (Gluon forward: 64 or 128)"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]} (Gluon forward: 64 or 128)"
    for name, t in tensors.items():
        reason = tma_problem(t, name) or _rows_problem(t, name)
        if reason is not None:
            return reason
    return None


def _batch_rows_desc(x: Tensor, rows: int) -> "TensorDescriptor":
    """Descriptor of ``x`` (B, N, H, D) as (batch, row, column) with (1, rows, D) boxes at column head * stride(2):
    rows past N of a batch read as zeros and are not written."""
    B, N, H, D = x.shape
    sb, sn, sh, _ = x.stride()
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    return TensorDescriptor(x, [B, N, (H - 1) * sh + D], [sb if B > 1 else N * sn, sn, 1], [1, rows, D], layout)


def _flat_rows_desc(x: Tensor, rows: int) -> "TensorDescriptor":
    """Descriptor of the pooled buffer ``x`` (B, R, H, D), contiguous, as (batch x row, column) with (rows, D)
    boxes: a pooled box always lies inside its batch's R rows (`pyramid_pool.pool_kv_levels` pads every level
    to whole blocks), so the batches may share one row axis, addressed at batch * R."""
    B, R, H, D = x.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return TensorDescriptor(x, [B * R, H * D], [H * D, 1], [rows, D], layout)


def _side(x: Tensor, xp: Tensor, ex: Tensor | None, block: int) -> tuple[list, list[int]]:
    """One side's (K or V) descriptors (video, levels 2/4/8, b-row boxes of the pooled buffer, text; the video one
    stands in without text) and
    its geometry for `_side_at` (pooled rows per batch, head column strides of the video, pooled, text rows)."""
    d1 = _batch_rows_desc(x, block)
    pooled = [_flat_rows_desc(xp, block // p) for p in (2, 4, 8, 1)]
    dt = _batch_rows_desc(ex, block) if ex is not None else d1
    return [d1, *pooled, dt], [xp.shape[1], x.stride(2), xp.stride(2), ex.stride(2) if ex is not None else 0]


def work_order(ends: Tensor, cost: Tensor | None = None, group: int = 0) -> Tensor:
    """Rows of the level lists (B x H x n) by decreasing cost (int64): ``cost`` as `pyramid_levels.level_lists`
    gives it, else from the ends (a level-p tile holds p entries, so a row costs e1 + (e2 - e1)/2 + (e4 - e2)/4
    + (e8 - e4)/8 tiles, times 8: 4 e1 + 2 e2 + e4 + e8). ``group`` > 0: sorted only inside consecutive groups of
    that many rows (n: one batch x head, whose K/V then stay in L2 while its rows run), groups kept in order.
    The persistent kernel deals the rows out in this order (`_ws_pos`)."""
    if cost is None:
        e = ends.view(-1, 4)
        cost = e.sum(1) + e[:, 0] * 3 + e[:, 1]
    cost = cost.view(-1).long()
    if group <= 0:
        return cost.argsort(descending=True)
    top = int(ends.shape[-2]) * 8 + 1  # cost < 8n + 1: a group's rank dominates its cost
    rows = torch.arange(cost.numel(), device=cost.device)
    return ((rows // group) * top + (top - 1 - cost)).argsort()


def launch_fwd_gluon(q: Tensor, kv: Tensor, vv: Tensor, kp: Tensor, vp: Tensor, ek: Tensor | None,
                     ev: Tensor | None, emask: Tensor | None, out: Tensor, lse: Tensor, idx: Tensor, ends: Tensor,
                     r4: int, r8: int, block: int, scale: float, ws: bool = False, programs: int | None = None,
                     order: Tensor | None = None, dynamic: bool = True) -> None:
    """Launch the Gluon forward into ``out``/``lse`` (the arguments of `pyramid.launch_fwd`; layouts as
    `gluon_fwd_problem` accepts). ``ws``: the warp-specialised form (block 128 only: each consumer warpgroup
    needs 64 query rows), persistent over the (query block, batch x head) items with ``programs`` programs
    (default one per SM) taking them in ``order`` (int64, e.g. `work_order`; default index order), each the next
    free one from an atomic counter (``dynamic``) or dealt out in a snake. The default measured best
    (benchmarks/NOTES.md, pyramid item 29): taking the next free item balances rows of unequal length as the
    hardware does for a grid, index order keeps a head's K/V in L2, and persistence lets the load warp start an
    item while the consumers finish the one before. ``programs`` >= the items with ``dynamic=False``: one
    program per item (a plain grid)."""
    from ._triton_common import LOG2E

    B, NV, H, D = q.shape
    nb = -(-NV // block)
    T = ek.shape[1] if ek is not None else 0
    k_descs, k_geo = _side(kv, kp, ek, block)
    v_descs, v_geo = _side(vv, vp, ev, block)
    q_desc = _batch_rows_desc(q, block)
    em = emask if emask is not None else idx
    common = dict(HEAD_DIM=D, BS=block, LOG_BS=block.bit_length() - 1, KS=K_SLOTS, VS=V_SLOTS, HAS_TEXT=T > 0,
                  HAS_TEXT_MASK=emask is not None)
    em_stride = emask.stride(0) if emask is not None else 0
    if not ws:
        _pyramid_fwd_gluon_kernel[(nb, B * H)](
            q_desc, _batch_rows_desc(out, block), *k_descs, *v_descs, em, lse, idx, ends, em_stride,
            lse.stride(0), lse.stride(1), *k_geo, *v_geo, q.stride(2), out.stride(2), H, NV, nb, T, r4, r8,
            scale * LOG2E, num_warps=block // 16, **common)
        return
    if block != 128:
        raise ValueError(f"the warp-specialised Gluon forward needs block 128, got {block}")
    n_items = B * H * nb
    if programs is None:
        programs = torch.cuda.get_device_properties(q.device).multi_processor_count
    grid = min(programs, n_items)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device) if dynamic else idx
    # maxnreg: the launch's per-thread share (3 warpgroups in 64K registers), so the default partition
    # (consumer 0) gets 240 like consumer 1, not more than the register file holds
    _pyramid_fwd_gluon_ws_kernel[(grid,)](
        q_desc, *k_descs, *v_descs, out, em, lse, idx, ends, order if order is not None else idx, counter,
        out.stride(0), out.stride(1), out.stride(2), em_stride, lse.stride(0), lse.stride(1), *k_geo, *v_geo,
        q.stride(2), H, NV, nb, T, r4, r8, n_items, scale * LOG2E, HAS_ORDER=order is not None, DYNAMIC=dynamic,
        CONSUMER_REGS=WS_CONSUMER_REGS, PRODUCER_REGS=WS_PRODUCER_REGS, num_warps=4, maxnreg=168, **common)
