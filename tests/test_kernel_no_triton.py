"""accel imports and runs (torch backend) where Triton is absent: a subprocess where `import triton` fails."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = r"""
import sys
sys.modules["triton"] = None  # any `import triton` (or triton.*) now raises ImportError
import torch
import accel
import accel.kernels
from accel.kernels import BlockLayout, block_sparse_attention, reference_block_sparse_attention
from accel.kernels import select_forward, KernelConfigs, KernelConfig  # triton-free too
assert "triton" not in [m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "triton"]
torch.manual_seed(0)
B, S, T, H, D = 2, 37, 5, 2, 16
q = torch.randn(B, S, H, D, requires_grad=True)
k, v = (torch.randn(B, S + T, H, D, requires_grad=True) for _ in range(2))
lay = BlockLayout.from_mask(torch.rand(3, 3) < 0.6, 16)
lengths = torch.tensor([5, 2], dtype=torch.int32)
out = block_sparse_attention(q, k, v, lay, text_keys=(S, T), text_lengths=lengths, backend="auto")
ref = reference_block_sparse_attention(q.double(), k.double(), v.double(), lay, text_keys=(S, T),
                                       text_lengths=lengths)
err = float((out.double() - ref).norm() / ref.norm())
assert err < 1e-5, err
out.sum().backward()
assert q.grad is not None and k.grad is not None
try:
    block_sparse_attention(q, k, v, lay, backend="triton")
except RuntimeError as e:
    assert "triton" in str(e), e
else:
    raise AssertionError("backend='triton' must raise without triton")
print("ok", err)
"""


def test_import_and_run_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")  # even with the interpreter asked for, auto must pick torch
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")
