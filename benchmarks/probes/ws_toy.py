import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def attn2(Q, K, V, O, Off, Idx, S, H, qk_scale, WS: tl.constexpr, TAIL: tl.constexpr, QPTR: tl.constexpr, D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    sb = S * H * D
    base = off_b * sb + off_h * D
    offs_m = pid_m * 128 + tl.arange(0, 128)
    offs_d = tl.arange(0, D)
    if QPTR:
        q = tl.load(Q + base + offs_m[:, None].to(tl.int64) * (H * D) + offs_d[None, :], mask=(offs_m < S)[:, None], other=0.0)
    else:
        q_desc = tl.make_tensor_descriptor(Q + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
        q = q_desc.load([pid_m * 128, 0])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    m_i = tl.full([128], float("-inf"), tl.float32)
    l_i = tl.zeros([128], tl.float32)
    acc = tl.zeros([128, D], tl.float32)
    lo = tl.load(Off + pid_m)
    hi = tl.load(Off + pid_m + 1)
    n_full = hi
    if TAIL:
        if hi > lo:
            last = tl.load(Idx + hi - 1)
            if (last + 1) * 128 > S:
                n_full = hi - 1
    for it in tl.range(lo, n_full, warp_specialize=WS):
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
    if TAIL:
        offs_n = tl.arange(0, 128)
        for it in range(n_full, hi):
            start_n = tl.load(Idx + it) * 128
            n_valid = start_n + offs_n < S
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
            qk = tl.dot(q, k)
            qk = tl.where(n_valid[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(tl.bfloat16), v, acc)
            m_i = m_new
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + base + offs_m[:, None].to(tl.int64) * (H * D) + offs_d[None, :], acc.to(tl.bfloat16), mask=(offs_m < S)[:, None])

SIG = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "Off": "*i32", "Idx": "*i32", "S": "i32", "H": "i32", "qk_scale": "fp32", "WS": "constexpr", "TAIL": "constexpr", "QPTR": "constexpr", "D": "constexpr"}
def comp(ws, tail, qptr, warps, stages=2, D=128):
    src = ASTSource(fn=attn2, signature=SIG, constexprs={(9,): ws, (10,): tail, (11,): qptr, (12,): D})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
if __name__ == "__main__":
    for ws, tail, qptr in [(True, False, False), (True, False, True), (True, True, False), (True, True, True)]:
        try:
            k = comp(ws, tail, qptr, 4)
            print(ws, tail, qptr, k.metadata.num_warps, "shared", k.metadata.shared, "setmaxnreg", k.asm["ptx"].count("setmaxnreg"))
        except Exception as e:
            print(ws, tail, qptr, "FAIL", str(e)[:400])
