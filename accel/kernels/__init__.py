"""Attention kernels: block-sparse flash attention (Triton) with a PyTorch fallback and a reference.

Imports nothing from diffusers, peft or gradio, and not Triton either: the Triton kernels load when the
Triton backend first runs, so this package works (torch backend) where Triton is absent.
"""

from .block_sparse import block_sparse_attention, default_block_size
from .configs import KernelConfig, KernelConfigs
from .layout import BlockLayout
from .reference import reference_block_sparse_attention
from .select import BackwardChoice, ForwardChoice, KernelChoice, select_backward, select_forward

__all__ = [
    "BackwardChoice",
    "BlockLayout",
    "ForwardChoice",
    "KernelChoice",
    "KernelConfig",
    "KernelConfigs",
    "block_sparse_attention",
    "default_block_size",
    "reference_block_sparse_attention",
    "select_backward",
    "select_forward",
]
