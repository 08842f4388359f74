"""Test setup: run Triton kernels through the interpreter when there is no GPU, and stay offline."""

import hashlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the imports that need it
        return False


if not _has_cuda():
    # Must be set before triton is imported anywhere; the interpreter runs kernels on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


COMMITTED_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def committed_results_unchanged():
    """A check that no file under benchmarks/results/ was created, removed or changed since the test began."""
    before = _snapshot(COMMITTED_RESULTS)

    def check() -> None:
        after = _snapshot(COMMITTED_RESULTS)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"files under benchmarks/results/ changed: {changed}"

    return check
