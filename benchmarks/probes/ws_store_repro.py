"""Repro (Triton 3.6, H100): under `tl.range(..., warp_specialize=True)` a pointer `tl.store` of the
accumulator after the loop writes wrong values; a tensor-descriptor store of the same tile is exact.

Seen on 2026-11-24: relative error 0.77-1.06 with pointer stores, 0.0 with descriptor stores, for every
combination of loop bounds, per-(batch, head) bases and empty-row handling we tried. This is why the
warp-specialised kernels in `accel/kernels/fwd_ws.py` and `bwd_ws.py` do all I/O through descriptors. Rerun on a
newer Triton to see whether the restriction can go: `python benchmarks/probes/ws_store_repro.py`.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _attn(Q, K, V, O, Off, Idx, S, H, qk_scale, DESC_STORE: tl.constexpr, D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    base = (pid_bh // H).to(tl.int64) * (S * H * D) + (pid_bh % H).to(tl.int64) * D
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
    q = q_desc.load([pid_m * 128, 0])
    m_i = tl.full([128], float("-inf"), tl.float32)
    l_i = tl.zeros([128], tl.float32)
    acc = tl.zeros([128, D], tl.float32)
    for it in tl.range(tl.load(Off + pid_m), tl.load(Off + pid_m + 1), warp_specialize=True):
        start_n = tl.load(Idx + it) * 128
        qk = tl.dot(q, k_desc.load([start_n, 0]).T)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(tl.bfloat16), v_desc.load([start_n, 0]), acc * alpha[:, None])
        m_i = m_new
    acc = acc / l_i[:, None]
    if DESC_STORE:
        o_desc = tl.make_tensor_descriptor(O + base, shape=[S, D], strides=[H * D, 1], block_shape=[128, D])
        o_desc.store([pid_m * 128, 0], acc.to(tl.bfloat16))
    else:
        offs_m = pid_m * 128 + tl.arange(0, 128)
        offs_d = tl.arange(0, D)
        tl.store(O + base + offs_m[:, None].to(tl.int64) * (H * D) + offs_d[None, :], acc.to(tl.bfloat16),
                 mask=(offs_m < S)[:, None])


def main() -> None:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    torch.manual_seed(0)
    B, S, H, D = 1, 2048, 2, 128
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    nb = S // 128
    mask = (torch.rand(nb, nb, device="cuda") < 0.5) | torch.eye(nb, dtype=torch.bool, device="cuda")
    offsets = torch.zeros(nb + 1, dtype=torch.int32, device="cuda")
    offsets[1:] = mask.sum(1).cumsum(0)
    indices = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    tok = mask.repeat_interleave(128, 0).repeat_interleave(128, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2).float() for x in (q, k, v)), attn_mask=tok).transpose(1, 2)
    for desc_store in (False, True):
        o = torch.zeros_like(q)
        _attn[(nb, B * H)](q, k, v, o, offsets, indices, S, H, D ** -0.5 * 1.4426950408889634,
                           DESC_STORE=desc_store, D=D, num_warps=4, num_stages=2)
        err = float((o.float() - ref).norm() / ref.norm())
        print(f"{'descriptor' if desc_store else 'pointer'} store: relative error {err:.2e}")


if __name__ == "__main__":
    main()
