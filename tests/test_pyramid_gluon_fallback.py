"""The pyramid forward's Gluon launch on the host, without a GPU: it falls back to the Triton kernel only when
Triton cannot build it; the input layouts its descriptors accept; the work orders of its persistent form."""

from __future__ import annotations

import pytest

from accel.kernels import pyramid as pk


def test_a_failed_gluon_build_warns_and_falls_back(monkeypatch) -> None:
    from triton.runtime.errors import OutOfResources

    def fail(*args, ws):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(pk, "launch_fwd_gluon", fail)
    with pytest.warns(RuntimeWarning, match="Gluon pyramid forward did not build"):
        assert pk._launch_gluon_or_warn((), ws=True) is False


def test_other_gluon_errors_are_raised(monkeypatch) -> None:
    def broken(*args, ws):
        raise ValueError("a real bug")

    monkeypatch.setattr(pk, "launch_fwd_gluon", broken)
    with pytest.raises(ValueError, match="a real bug"):
        pk._launch_gluon_or_warn((), ws=False)


def test_the_gluon_launch_is_used_when_it_builds(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(pk, "launch_fwd_gluon", lambda *args, ws: seen.setdefault("ws", ws))
    assert pk._launch_gluon_or_warn((), ws=True) is True
    assert seen == {"ws": True}


def test_descriptor_layouts_the_gluon_forward_accepts() -> None:
    """Its descriptors address a head by column offset: heads side by side in a row, batches not overlapping.
    A slice of a joint video+text buffer is fine; a (B, H, N, D) tensor seen as (B, N, H, D) is refused."""
    import torch

    from accel.kernels.pyramid_gluon import _rows_problem

    joint = torch.zeros(2, 100 + 20, 3, 64)
    assert _rows_problem(joint[:, :100], "k") is None
    assert _rows_problem(joint[:, 100:], "text k") is None
    assert _rows_problem(torch.zeros(1, 50, 4, 64), "q") is None
    reason = _rows_problem(torch.zeros(2, 3, 100, 64).transpose(1, 2), "q")
    assert reason is not None and reason.startswith("q: heads")
    overlapping = torch.zeros(250 * 3 * 64).as_strided((2, 150, 3, 64), (100 * 3 * 64, 3 * 64, 64, 1))
    assert _rows_problem(overlapping, "v").startswith("v: one batch")


def test_work_order_puts_the_costliest_rows_first() -> None:
    """A row costs e1 + (e2-e1)/2 + (e4-e2)/4 + (e8-e4)/8 tiles (a level-p tile holds p entries)."""
    import torch

    from accel.kernels.pyramid_gluon import work_order

    ends = torch.tensor([[[[1, 1, 1, 9], [4, 4, 4, 4], [0, 8, 8, 8], [2, 2, 6, 6]]]], dtype=torch.int32)
    cost = [1 + 8 / 8, 4, 8 / 2, 2 + 4 / 4]  # 2, 4, 4, 3
    order = work_order(ends).tolist()
    assert [cost[i] for i in order] == sorted(cost, reverse=True)
    assert sorted(order) == [0, 1, 2, 3]


def test_work_order_inside_groups_keeps_the_groups_in_order() -> None:
    import torch

    from accel.kernels.pyramid_gluon import work_order

    ends = torch.tensor([[[[0, 0, 0, 8], [3, 3, 3, 3], [1, 1, 1, 1]], [[2, 2, 2, 2], [0, 0, 0, 0], [3, 3, 3, 3]]]],
                        dtype=torch.int32)  # (1, 2, 3, 4): costs x 8 = 8, 24, 8 | 16, 0, 24
    assert work_order(ends, group=3).tolist()[:1] == [1] and work_order(ends, group=3).tolist()[3:] == [5, 3, 4]
    assert sorted(work_order(ends, group=3).tolist()[:3]) == [0, 1, 2]
    assert work_order(ends).tolist()[:2] in ([1, 5], [5, 1])
