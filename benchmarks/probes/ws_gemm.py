import re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def gemm(A, B, C, M, N, K, WS: tl.constexpr):
    pid_m = tl.program_id(0); pid_n = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[K, 1], block_shape=[128, 64])
    b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[K, 1], block_shape=[128, 64])
    acc = tl.zeros([128, 128], dtype=tl.float32)
    for k in tl.range(0, K, 64, warp_specialize=WS):
        a = a_desc.load([pid_m * 128, k]); b = b_desc.load([pid_n * 128, k])
        acc = tl.dot(a, b.T, acc)
    c_desc = tl.make_tensor_descriptor(C, shape=[M, N], strides=[N, 1], block_shape=[128, 128])
    c_desc.store([pid_m * 128, pid_n * 128], acc.to(tl.bfloat16))

def _main():
    for ws in (False, True):
      for warps in (4, 8):
          src = ASTSource(fn=gemm, signature={"A": "*bf16", "B": "*bf16", "C": "*bf16", "M": "i32", "N": "i32", "K": "i32", "WS": "constexpr"}, constexprs={(6,): ws})
          try:
              k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
              ptx = k.asm["ptx"]
              print(ws, warps, k.metadata.num_warps, "setmaxnreg", ptx.count("setmaxnreg"), "ttgir ws:", "warp_specialize" in k.asm["ttgir"])
          except Exception as e:
              print(ws, warps, "FAIL", str(e)[:300])

if __name__ == '__main__':
    _main()
