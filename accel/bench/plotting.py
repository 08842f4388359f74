"""Shared figure output for the benchmark reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | Path, dpi: int | None = None) -> Path:
    """Lay out ``fig`` tightly and write it to ``path`` (parent folders created); returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **({"dpi": dpi} if dpi else {}))
    return path
