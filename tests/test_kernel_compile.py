"""The block-sparse custom ops under torch.compile: no graph break, compiled == eager (tiny CPU shapes)."""

from __future__ import annotations

import os

import pytest
import torch

from accel.kernels import BlockLayout, block_sparse_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if INTERPRET or torch.cuda.is_available() else [])
B, S, T, H, D = 2, 40, 7, 2, 16


def _inputs(grad: bool):
    torch.manual_seed(0)
    q = torch.randn(B, S, H, D, device=DEV)
    k, v = (torch.randn(B, S + T, H, D, device=DEV) for _ in range(2))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.rand(2, 3, 3) < 0.6
    mask[:, -1] = True
    lay = BlockLayout.from_mask(mask.to(DEV), 16)
    lengths = torch.tensor([T, 3], dtype=torch.int32, device=DEV)
    return q, k, v, lay, lengths


def _fn(lay, backend):
    def fn(q, k, v, lengths):
        o, lse = block_sparse_attention(q, k, v, lay, text_keys=(S, T), text_lengths=lengths, return_lse=True,
                                        backend=backend)
        return o * 2 + 1, lse
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_break(backend):
    q, k, v, lay, lengths = _inputs(grad=False)
    fn = _fn(lay, backend)
    fn(q, k, v, lengths)  # eager once (fills the layout's caches)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(q, k, v, lengths)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_matches_eager_with_grads(backend):
    q, k, v, lay, lengths = _inputs(grad=True)
    fn = _fn(lay, backend)
    o, lse = fn(q, k, v, lengths)
    fin = torch.isfinite(lse)
    g = torch.randn_like(o)
    want = torch.autograd.grad((o * g).sum() + lse[fin].sum(), (q, k, v))
    torch._dynamo.reset()
    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    co, clse = cfn(q, k, v, lengths)
    got = torch.autograd.grad((co * g).sum() + clse[fin].sum(), (q, k, v))
    assert torch.allclose(co, o, atol=1e-6) and torch.equal(clse.isinf(), lse.isinf())
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_out_view(backend):
    """Inference into a strided view of a joint output buffer (the mutating op) compiles too."""
    q, k, v, lay, lengths = _inputs(grad=False)

    def fn(q, k, v, lengths, out):
        block_sparse_attention(q, k, v, lay, text_keys=(S, T), text_lengths=lengths, out=out[:, :S],
                               backend=backend)
        return out

    want = fn(q, k, v, lengths, torch.zeros(B, S + T, H, D, device=DEV))
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, lengths,
                                                                 torch.zeros(B, S + T, H, D, device=DEV))
    assert torch.allclose(got, want, atol=1e-6) and bool((got[:, S:] == 0).all())
