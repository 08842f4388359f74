import re, sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def attn(Q, K, V, O, Idx, S, qk_scale, WS: tl.constexpr, INDIRECT: tl.constexpr, D: tl.constexpr):
    pid_m = tl.program_id(0)
    q_desc = tl.make_tensor_descriptor(Q, shape=[S, D], strides=[D, 1], block_shape=[128, D])
    k_desc = tl.make_tensor_descriptor(K, shape=[S, D], strides=[D, 1], block_shape=[128, D])
    v_desc = tl.make_tensor_descriptor(V, shape=[S, D], strides=[D, 1], block_shape=[128, D])
    q = q_desc.load([pid_m * 128, 0])
    m_i = tl.full([128], float("-inf"), tl.float32)
    l_i = tl.zeros([128], tl.float32)
    acc = tl.zeros([128, D], tl.float32)
    for it in tl.range(0, S // 128, warp_specialize=WS):
        if INDIRECT:
            start_n = tl.load(Idx + it) * 128
        else:
            start_n = it * 128
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
    acc = acc / l_i[:, None]
    o_desc = tl.make_tensor_descriptor(O, shape=[S, D], strides=[D, 1], block_shape=[128, D])
    o_desc.store([pid_m * 128, 0], acc.to(tl.bfloat16))

def comp(ws, ind, warps, stages=2, D=128):
    src = ASTSource(fn=attn, signature={"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "Idx": "*i32", "S": "i32", "qk_scale": "fp32", "WS": "constexpr", "INDIRECT": "constexpr", "D": "constexpr"}, constexprs={(7,): ws, (8,): ind, (9,): D})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
if __name__ == "__main__":
    for ws, ind, warps in [(True, False, 4), (True, True, 4), (False, False, 8)]:
        try:
            k = comp(ws, ind, warps)
            print(ws, ind, warps, k.metadata.num_warps, "shared", k.metadata.shared, "setmaxnreg", k.asm["ptx"].count("setmaxnreg"), "ws:", "warp_specialize" in k.asm["ttgir"])
        except Exception as e:
            print(ws, ind, warps, "FAIL", str(e)[:400])
