import triton, triton.language as tl

@triton.jit
def attn3(Q, K, V, O, Off, Idx, S, H, qk_scale, LO_ZERO: tl.constexpr, DESC_STORE: tl.constexpr,
          NO_EMPTY: tl.constexpr, PER_BH: tl.constexpr, D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if PER_BH:
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        base = off_b * (S * H * D) + off_h * D
    else:
        base = 0
    offs_m = pid_m * 128 + tl.arange(0, 128)
    offs_d = tl.arange(0, D)
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    q = q_desc.load([pid_m * 128, 0])
    m_i = tl.full([128], float("-inf"), tl.float32)
    l_i = tl.zeros([128], tl.float32)
    acc = tl.zeros([128, D], tl.float32)
    lo = tl.load(Off + pid_m)
    hi = tl.load(Off + pid_m + 1)
    if LO_ZERO:
        row = Idx + lo
        n = hi - lo
        for it in tl.range(0, n, warp_specialize=True):
            start_n = tl.load(row + it) * 128
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
            qk = tl.dot(q, k)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(tl.bfloat16), v, acc)
            m_i = m_new
    else:
        for it in tl.range(lo, hi, warp_specialize=True):
            start_n = tl.load(Idx + it) * 128
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
            qk = tl.dot(q, k)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(tl.bfloat16), v, acc)
            m_i = m_new
    if NO_EMPTY:
        acc = acc / l_i[:, None]
    else:
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DESC_STORE:
        o_desc = tl.make_tensor_descriptor(O + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
        o_desc.store([pid_m * 128, 0], acc.to(tl.bfloat16))
    else:
        tl.store(O + base + offs_m[:, None].to(tl.int64) * (H * D) + offs_d[None, :], acc.to(tl.bfloat16),
                 mask=(offs_m < S)[:, None])
