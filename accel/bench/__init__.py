"""Benchmarks: attention fidelity (`fidelity`), generation quality (`eval`) and video metrics (`metrics`).

This package holds the helpers the benchmark modules share: turning method specs such as
``"radial:decay=0.2,spatial=disk"`` into `AttentionMethod` configs, and labelling configs.
Importing it is cheap; the benchmark modules load torch, diffusers and matplotlib themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accel.methods.base import AttentionMethod

from accel.methods.registry import MethodSpec, method_label, methods, parse_method_spec  # noqa: E402

SCHEDULE_KEYS = ("dense_steps", "dense_last_steps", "dense_layers")
"""Spec keys that configure the `Schedule` rather than the method (used by `accel eval`)."""


def method_registry() -> dict[str, type[AttentionMethod]]:
    """Every registered method config class, keyed by its stable ``name`` (see `accel.methods.registry`)."""
    return {name: info.cls for name, info in methods().items()}


def git_commit() -> str | None:
    """$ACCEL_GIT_COMMIT when set (a remote GPU machine gets a copy of the working tree whose .git may still
    name an older commit), else the commit of the checkout holding this package (with ``-dirty``), else None."""
    import os
    import subprocess
    from pathlib import Path

    fallback = os.environ.get("ACCEL_GIT_COMMIT") or None
    if fallback:
        return fallback

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
