"""``torch.library`` custom ops around both backends, so ``torch.compile`` sees one opaque node per call.

``accel::block_sparse_fwd`` / ``accel::block_sparse_fwd_out`` / ``accel::block_sparse_bwd``: the Triton
backend (imported lazily, inside the implementations). ``accel::block_sparse_torch_fwd`` /
``accel::block_sparse_torch_bwd``: the chunked PyTorch backend, whose data-dependent block loop dynamo
cannot trace (with a chunked analytic backward). Layouts travel as their CSR tensors,
configs as :meth:`KernelConfigs.encode` strings. Triton-free at import.
"""

# No `from __future__ import annotations`: torch.library reads the schema from real annotation objects.
import torch
from torch import Tensor

from ._common import KeyParts, alloc_lse
from .configs import decode_configs
from .layout import BlockLayout


def _layouts(offsets, indices, t_offsets, t_indices, block_m, block_n, nq, nk):
    lay = BlockLayout(offsets, indices, block_m, block_n, nq, nk)
    t = BlockLayout(t_offsets, t_indices, block_n, block_m, nk, nq) if t_offsets is not None else None
    return lay, t


def _lse_or_empty(q: Tensor, write_lse: bool) -> Tensor:
    B, Sq, H, _ = q.shape
    return alloc_lse(B, H, Sq, q.device) if write_lse else torch.empty(0, dtype=torch.float32, device=q.device)


# ------------------------------------------------------------------------------------------ Triton backend
@torch.library.custom_op("accel::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, indices: Tensor,
    t_offsets: Tensor | None, t_indices: Tensor | None, text_lengths: Tensor | None, text_mask: Tensor | None,
    block_m: int, block_n: int, num_q_blocks: int, num_k_blocks: int,
    video_start: int, video_len: int, text_start: int, text_len: int,
    scale: float, write_lse: bool, configs: str,
) -> tuple[Tensor, Tensor]:
    """Triton forward: (out, lse); lse is empty unless ``write_lse``. t_offsets/t_indices (the transposed
    layout) are only kept for the backward."""
    from . import triton_impl

    lay, _ = _layouts(offsets, indices, None, None, block_m, block_n, num_q_blocks, num_k_blocks)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _lse_or_empty(q, write_lse)
    triton_impl.forward(q, k, v, lay, KeyParts(video_start, video_len, text_start, text_len), text_lengths,
                        text_mask, scale, out, lse if write_lse else None, decode_configs(configs))
    return out, lse


@block_sparse_fwd.register_fake
def _(q, k, v, offsets, indices, t_offsets, t_indices, text_lengths, text_mask, block_m, block_n, num_q_blocks,
      num_k_blocks, video_start, video_len, text_start, text_len, scale, write_lse, configs):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), _lse_or_empty(q, write_lse)


@torch.library.custom_op("accel::block_sparse_fwd_out", mutates_args=("out",))
def block_sparse_fwd_out(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, offsets: Tensor, indices: Tensor,
    text_lengths: Tensor | None, text_mask: Tensor | None,
    block_m: int, block_n: int, num_q_blocks: int, num_k_blocks: int,
    video_start: int, video_len: int, text_start: int, text_len: int,
    scale: float, write_lse: bool, configs: str,
) -> Tensor:
    """Triton forward into a preallocated (possibly strided) ``out``, inference only; returns lse (or empty)."""
    from . import triton_impl

    lay, _ = _layouts(offsets, indices, None, None, block_m, block_n, num_q_blocks, num_k_blocks)
    lse = _lse_or_empty(q, write_lse)
    triton_impl.forward(q, k, v, lay, KeyParts(video_start, video_len, text_start, text_len), text_lengths,
                        text_mask, scale, out, lse if write_lse else None, decode_configs(configs))
    return lse


@block_sparse_fwd_out.register_fake
def _(q, k, v, out, offsets, indices, text_lengths, text_mask, block_m, block_n, num_q_blocks, num_k_blocks,
      video_start, video_len, text_start, text_len, scale, write_lse, configs):
    return _lse_or_empty(q, write_lse)


@torch.library.custom_op("accel::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    offsets: Tensor, indices: Tensor, t_offsets: Tensor, t_indices: Tensor,
    text_lengths: Tensor | None, text_mask: Tensor | None,
    block_m: int, block_n: int, num_q_blocks: int, num_k_blocks: int,
    video_start: int, video_len: int, text_start: int, text_len: int,
    scale: float, configs: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: dq and the gradients of the whole joint k, v."""
    from . import triton_impl

    lay, t = _layouts(offsets, indices, t_offsets, t_indices, block_m, block_n, num_q_blocks, num_k_blocks)
    return triton_impl.backward(dout, q, k, v, out, lse, dlse, lay, t,
                                KeyParts(video_start, video_len, text_start, text_len), text_lengths, text_mask,
                                scale, decode_configs(configs))


@block_sparse_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, *args):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, offsets, indices, t_offsets, t_indices, text_lengths, text_mask = inputs[:9]
    out, lse = output
    if t_offsets is None:
        raise RuntimeError("accel::block_sparse_fwd was called for autograd without the transposed layout")
    ctx.save_for_backward(q, k, v, out, lse, offsets, indices, t_offsets, t_indices, text_lengths, text_mask)
    ctx.meta = inputs[9:17] + (inputs[17], inputs[19])  # block/part ints, scale, configs
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, offsets, indices, t_offsets, t_indices, text_lengths, text_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.accel.block_sparse_bwd(dout, dlse, q, k, v, out, lse, offsets, indices, t_offsets,
                                                  t_indices, text_lengths, text_mask, *ctx.meta)
    return (dq, dk, dv) + (None,) * 17


torch.library.register_autograd("accel::block_sparse_fwd", _fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------- torch backend
def _torch_forward(q, k, v, offsets, indices, text_lengths, text_mask, ints, scale):
    from .torch_impl import torch_block_sparse_attention

    lay, _ = _layouts(offsets, indices, None, None, *ints[:4])
    return torch_block_sparse_attention(q, k, v, lay, KeyParts(*ints[4:]), text_lengths, text_mask, scale)


@torch.library.custom_op("accel::block_sparse_torch_fwd", mutates_args=())
def block_sparse_torch_fwd(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, indices: Tensor,
    text_lengths: Tensor | None, text_mask: Tensor | None,
    block_m: int, block_n: int, num_q_blocks: int, num_k_blocks: int,
    video_start: int, video_len: int, text_start: int, text_len: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """Chunked PyTorch forward (what torch.compile sees of the torch backend): (out, lse), contiguous."""
    ints = (block_m, block_n, num_q_blocks, num_k_blocks, video_start, video_len, text_start, text_len)
    out, lse = _torch_forward(q, k, v, offsets, indices, text_lengths, text_mask, ints, scale)
    return out.contiguous(), lse.contiguous()


@block_sparse_torch_fwd.register_fake
def _(q, k, v, offsets, indices, text_lengths, text_mask, *args):
    B, Sq, H, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(B, H, Sq, dtype=torch.float32, device=q.device))


@torch.library.custom_op("accel::block_sparse_torch_bwd", mutates_args=())
def block_sparse_torch_bwd(
    dout: Tensor | None, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, indices: Tensor,
    text_lengths: Tensor | None, text_mask: Tensor | None,
    block_m: int, block_n: int, num_q_blocks: int, num_k_blocks: int,
    video_start: int, video_len: int, text_start: int, text_len: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of the torch backend (chunked, analytic: autograd does not run inside custom ops)."""
    from .torch_impl import torch_block_sparse_backward

    lay, _ = _layouts(offsets, indices, None, None, block_m, block_n, num_q_blocks, num_k_blocks)
    return torch_block_sparse_backward(dout, dlse, q, k, v, lay, KeyParts(video_start, video_len, text_start,
                                       text_len), text_lengths, text_mask, scale)


@block_sparse_torch_bwd.register_fake
def _(dout, dlse, q, k, v, *args):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _torch_setup_context(ctx, inputs, output) -> None:
    q, k, v, offsets, indices, text_lengths, text_mask = inputs[:7]
    ctx.save_for_backward(q, k, v, offsets, indices, text_lengths, text_mask)
    ctx.meta = inputs[7:]
    ctx.set_materialize_grads(False)


def _torch_backward(ctx, dout, dlse):
    q, k, v, offsets, indices, text_lengths, text_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.accel.block_sparse_torch_bwd(dout, dlse, q, k, v, offsets, indices, text_lengths,
                                                        text_mask, *ctx.meta)
    return (dq, dk, dv) + (None,) * 13


torch.library.register_autograd("accel::block_sparse_torch_fwd", _torch_backward, setup_context=_torch_setup_context)
