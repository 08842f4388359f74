"""Attention kernels: block-sparse flash attention (Triton) with a PyTorch fallback and a reference.

Imports nothing from diffusers, peft or gradio.
"""

from .block_sparse import block_sparse_attention, default_block_size
from .layout import BlockLayout
from .reference import reference_block_sparse_attention

__all__ = ["BlockLayout", "block_sparse_attention", "default_block_size", "reference_block_sparse_attention"]
