"""Training checkpoints: atomic, verified, with a fallback to the previous one when the latest is corrupt.

A checkpoint is a folder ``step-NNNNNNNN`` holding ``state.safetensors`` (trainable weights, optimizer moments,
RNG states) and ``state.json`` (step, data position, LR schedule, optimizer hyper-parameters, Python/numpy RNG
and the sha256 of the tensor file). It is written into a hidden temp folder, fsynced and renamed into place, so a
kill -9 at any moment leaves either the old set of checkpoints or the new one; nothing pickled is ever loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accel.lora.cache import file_digest

logger = logging.getLogger("accel.lora")

STEP_DIR = re.compile(r"^step-(\d{8})$")
TENSORS = "state.safetensors"
META = "state.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint folder whose files are missing, truncated or fail their checksum."""


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


_sha256 = file_digest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write checkpoint `step` under `root` atomically and keep the newest `keep` (>= 2, so a fallback exists)."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
        with open(tmp / TENSORS, "rb+") as f:
            os.fsync(f.fileno())
        body = dict(meta, step=step, sha256=_sha256(tmp / TENSORS))
        with open(tmp / META, "w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-max(2, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (temp folders of interrupted saves are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint folder; CorruptCheckpointError saying what is wrong."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"checkpoint {path.name}: {META} is missing or not JSON ({err})") from None
    tensor_file = path / TENSORS
    if not tensor_file.exists():
        raise CorruptCheckpointError(f"checkpoint {path.name}: {TENSORS} is missing")
    digest = _sha256(tensor_file)
    if digest != meta.get("sha256"):
        raise CorruptCheckpointError(f"checkpoint {path.name}: {TENSORS} fails its checksum (sha256 {digest[:12]}... "
                                     f"!= recorded {str(meta.get('sha256'))[:12]}...)")
    try:
        tensors = load_file(tensor_file)
    except Exception as err:
        raise CorruptCheckpointError(f"checkpoint {path.name}: {TENSORS} is unreadable ({err})") from None
    return Checkpoint(path, int(meta["step"]), tensors, meta)


def load_latest(root: str | Path) -> Checkpoint | None:
    """The newest checkpoint under `root` that verifies; corrupt newer ones are reported (warning) and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CorruptCheckpointError as err:
            logger.warning("%s; falling back to the previous checkpoint", err)
    return None


# ------------------------------------------------------------------------------------- optimizer state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as flat tensors (``optim.<param>.<key>``) plus its JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ------------------------------------------------------------------------------------- RNG state


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The training generator, torch's global CPU (and CUDA) RNG, Python's and numpy's, as tensors + JSON."""
    import random

    import numpy as np

    tensors = {"rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(generator: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    import random

    import numpy as np

    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


__all__ = ["Checkpoint", "CorruptCheckpointError", "list_checkpoints", "load_checkpoint", "load_latest",
           "optimizer_tensors", "restore_optimizer", "restore_rng", "rng_state", "save_checkpoint"]
