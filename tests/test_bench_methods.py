"""`accel bench methods`: its cases parse to registered methods, its local inputs are local, CPU use is refused."""

from __future__ import annotations

import torch

from accel.bench.methods import CASES, local_qkv, main
from accel.geometry import TokenLayout
from accel.methods.registry import parse_method_spec


def test_every_case_names_a_method_that_can_plan_its_grid() -> None:
    for case in CASES.values():
        method = parse_method_spec(case.spec).method
        layout = TokenLayout(1, *case.grid)
        assert method.can_run(layout, case.heads, case.head_dim, torch.bfloat16, torch.device("cpu")), case.name


def test_local_inputs_concentrate_attention_on_neighbours() -> None:
    layout = TokenLayout(1, 4, 8, 8)
    q, k, _ = local_qkv(layout, 2, 64, torch.float32, torch.Generator().manual_seed(0))
    attn = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, -1)[0, 0]
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in layout.grid), indexing="ij")
    pos = torch.stack([t, h, w], -1).reshape(-1, 3).float()
    near = (torch.cdist(pos, pos) <= 2.0).float()
    assert float((attn * near).sum(-1).mean()) > 3 * float(near.mean())  # far more mass nearby than by chance


def test_without_a_gpu_it_refuses_and_unknown_cases_are_named(capsys) -> None:
    assert main(["--cases", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--cases", "natten-hunyuan"]) == 3
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_case_setup_closures_agree_with_each_other() -> None:
    """The timed closures compute what they claim: `total` is `kernel` with the permutation around it, and the
    token-stream permutation restores the hidden states."""
    from accel.bench.methods import MethodCase, prepare_case

    case = MethodCase("tiny-pyramid", (2, 8, 8), 2, "pyramid:block_size=16", head_dim=16, inputs="local", layers=2)
    gen = torch.Generator().manual_seed(0)
    setup = prepare_case(case, torch.float32, gen)
    assert setup.perm is not None and not torch.equal(setup.perm, torch.arange(128))
    raster = setup.kernel().index_select(1, setup.inv_index)
    torch.testing.assert_close(setup.total(), raster)
    (qp, kp, vp), _ = setup.permute()
    assert all(torch.equal(a, b) for a, b in zip((qp, kp, vp), setup.ordered, strict=True))
    tensors = setup.stream_tensors(gen)
    into, back = setup.stream(tensors)
    assert torch.equal(into[0], tensors[0].index_select(1, setup.perm))
    assert torch.equal(back, tensors[0])
