"""Ulysses context parallelism through diffusers' all-to-all, as two CPU processes on gloo.

diffusers' `enable_parallelism` needs an accelerator to build its mesh, so the test builds the same
`ContextParallelConfig` by hand on a CPU gloo mesh and drives our processor's attention directly: each
rank holds half the sequence, and the gathered output must equal the single-process result.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import accel
from accel.pipelines.adapter import AccelProcessor
from accel.pipelines.runtime import AttentionRuntime, TransformerState

GRID = (4, 4, 4)  # 64 video tokens
HEADS, DIM = 4, 16


def _inputs(text: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    seq = GRID[0] * GRID[1] * GRID[2] + text
    return tuple(torch.randn(2, seq, HEADS, DIM, generator=gen) for _ in range(3))


def _single_process(method: accel.AttentionMethod, text: int = 0) -> torch.Tensor:
    runtime = AttentionRuntime(method, None, "dense")
    state = TransformerState(grid=GRID)
    q, k, v = _inputs(text)
    return runtime.attend(state, 0, q, k, v, text_tokens=text, text_position="after" if text else "none")


def _worker(rank: int, world: int, port: int, method, text: int, queue) -> None:
    from diffusers import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
        cp = ContextParallelConfig(ulysses_degree=world)
        cp.setup(rank, world, torch.device("cpu"), mesh)
        processor = AccelProcessor(AttentionRuntime(method, None, "dense"), TransformerState(grid=GRID), 0, None)
        processor._parallel_config = ParallelConfig(context_parallel_config=cp)
        q, k, v = _inputs(text)
        chunk = q.shape[1] // world
        local = slice(rank * chunk, (rank + 1) * chunk)
        out = processor.attend(q[:, local], k[:, local], v[:, local], text_tokens=text // world,
                               text_position="after" if text else "none")
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous())
        if rank == 0:
            # numpy pickles by value: a torch tensor would be shared through memory this process frees on exit
            queue.put((torch.cat(parts, dim=1).numpy(), dict(processor.runtime.stats.fallbacks)))
        dist.barrier()
    finally:
        queue.close()
        queue.join_thread()
    # gloo's teardown can abort at interpreter exit ("terminate called without an active exception");
    # the result is already delivered, so leave without running it.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(method, text: int = 0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, method, text, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out, fallbacks = queue.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return torch.from_numpy(out), fallbacks


@pytest.mark.parametrize("method", [accel.Dense(), accel.Radial(decay=0.5, block_size=16)], ids=["dense", "radial"])
def test_ulysses_head_slicing_matches_one_process(method) -> None:
    expected = _single_process(method)
    got, fallbacks = _run_two_ranks(method)
    diff = (got - expected).abs().max().item()
    print(f"{method.name}: max abs diff two ranks vs one process {diff:.3g}")
    assert diff <= 1e-5
    assert not fallbacks


def test_ulysses_joint_sequence_falls_back_to_dense_correctly() -> None:
    # Text inside the sequence is rank-interleaved after the all-to-all: the sparse plan cannot apply,
    # and the dense fallback must still be the exact attention over the whole sequence.
    text = 8
    expected = _single_process(accel.Dense(), text)
    got, fallbacks = _run_two_ranks(accel.Radial(decay=0.5, block_size=16), text)
    assert (got - expected).abs().max().item() <= 1e-5
    assert fallbacks


def test_ring_attention_is_refused() -> None:
    from types import SimpleNamespace

    processor = AccelProcessor(AttentionRuntime(accel.Dense(), None, "error"), TransformerState(grid=GRID), 0, None)
    ring = SimpleNamespace(ring_degree=2, ulysses_degree=1)
    processor._parallel_config = SimpleNamespace(context_parallel_config=ring)
    q, k, v = _inputs()
    with pytest.raises(NotImplementedError, match="ulysses_degree"):
        processor.attend(q, k, v)
