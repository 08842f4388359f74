"""The pyramid forward's Gluon launch falls back to the Triton kernel only when Triton cannot build it."""

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
