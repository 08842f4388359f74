"""Benchmarks: attention fidelity (`fidelity`), generation quality (`eval`) and video metrics (`metrics`).

This package holds the helpers the benchmark modules share: turning method specs such as
``"radial:decay=0.2,spatial=disk"`` into `AttentionMethod` configs, and labelling configs.
Importing it is cheap; the benchmark modules load torch, diffusers and matplotlib themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accel.methods.base import AttentionMethod

SCHEDULE_KEYS = ("dense_steps", "dense_last_steps", "dense_layers")
"""Spec keys that configure the `Schedule` rather than the method (used by `accel eval`)."""


def method_registry() -> dict[str, type[AttentionMethod]]:
    """Every method config class exported by `accel.methods`, keyed by its stable ``name``."""
    import accel.methods as methods
    from accel.methods.base import AttentionMethod

    registry: dict[str, type[AttentionMethod]] = {}
    for attr in getattr(methods, "__all__", dir(methods)):
        obj = getattr(methods, attr, None)
        if isinstance(obj, type) and issubclass(obj, AttentionMethod) and obj is not AttentionMethod:
            registry[obj.name] = obj
    return registry


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


@dataclass(frozen=True)
class MethodSpec:
    """A method config parsed from a spec string, with its label and schedule overrides."""

    label: str
    method: AttentionMethod
    schedule: dict[str, Any] = field(default_factory=dict)


def parse_method_spec(spec: str, *, allow_schedule: bool = True) -> MethodSpec:
    """Parse ``name[:key=value,key=value...]``, e.g. ``"dense"``, ``"radial:decay=0.5,spatial=disk"``.

    Keys are the method's dataclass fields; with ``allow_schedule``, ``dense_steps``,
    ``dense_last_steps`` and ``dense_layers`` go to the schedule instead. Values parse as bool
    (true/false), None, int, float, then str. The method validates its own values.
    """
    if not isinstance(spec, str):
        raise TypeError(f"method spec must be a str, got {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    registry = method_registry()
    if name not in registry:
        raise ValueError(f"unknown method {name!r} in spec {spec!r}; known methods: {', '.join(sorted(registry))}")
    cls = registry[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    schedule: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"method spec items must be key=value, got {item!r} in {spec!r}")
        if allow_schedule and key in SCHEDULE_KEYS:
            schedule[key] = _parse_value(value)
        elif key in fields:
            kwargs[key] = _parse_value(value)
        else:
            known = sorted(fields | (set(SCHEDULE_KEYS) if allow_schedule else set()))
            raise ValueError(f"{name} has no option {key!r} (spec {spec!r}); options: {', '.join(known)}")
    method = cls(**kwargs)
    label = method_label(method)
    if schedule:
        label += "|" + ",".join(f"{k}={v}" for k, v in schedule.items())
    return MethodSpec(label, method, schedule)


def method_label(method: AttentionMethod, *, exclude: tuple[str, ...] = ()) -> str:
    """``name`` plus the config fields that differ from their defaults, in spec syntax."""
    parts = []
    if dataclasses.is_dataclass(method):
        for f in dataclasses.fields(method):
            if not f.init or f.name in exclude:
                continue
            value = getattr(method, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )
            if value != default:
                parts.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}")
    return method.name + (":" + ",".join(parts) if parts else "")


def git_commit() -> str | None:
    """Current commit of the checkout holding this package (with ``-dirty``), else $ACCEL_GIT_COMMIT
    (for copies without .git, e.g. on a remote GPU machine), else None."""
    import os
    import subprocess
    from pathlib import Path

    fallback = os.environ.get("ACCEL_GIT_COMMIT") or None

    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def environment() -> dict[str, Any]:
    """Versions and device facts every benchmark JSON records."""
    import platform

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    from importlib import metadata

    for dist in ("triton", "diffusers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


__all__ = ["SCHEDULE_KEYS", "MethodSpec", "environment", "git_commit", "method_label", "method_registry",
           "parse_method_spec"]
