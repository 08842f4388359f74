"""Kernel launch configurations: the :class:`KernelConfig` record, the tuned tables, and how one is picked.

Pure Python (no Triton): configs are data. A caller overrides the tables for one call by passing
``configs=KernelConfigs(fwd=..., dkdv=..., dq=...)`` to :func:`accel.kernels.block_sparse_attention`
(tests, benchmarks, sweeps); the backward of that call uses the same configs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Compute tile (BLOCK_M x BLOCK_N, each dividing the layout's logical block) and launch knobs."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False  # forward only: K/V through Hopper tensor descriptors
    maxnreg: int | None = None  # register cap per thread (e.g. 128 for two 8-warp programs per SM)
    warp_specialize: bool = False  # the warp-specialised Hopper kernels (fwd_ws.py, bwd_ws.py)
    # What runs when a warp-specialised config cannot (text keys on the backward, strides TMA refuses,
    # other blocks, other GPUs); None: this config itself, through the pipelined kernel.
    fallback: KernelConfig | None = None

    def pipelined(self) -> KernelConfig:
        """The config for the pipelined kernel when the warp-specialised one does not run."""
        return self.fallback if self.fallback is not None else self

    def encode(self) -> str:
        """A compact string form (what the custom ops carry); :func:`decode_configs` reads it back."""
        fb = self.fallback.encode() if self.fallback is not None else ""
        return (f"{self.block_m},{self.block_n},{self.num_warps},{self.num_stages},{int(self.tma)},"
                f"{self.maxnreg or 0},{int(self.warp_specialize)}" + (f"/{fb}" if fb else ""))


@dataclass(frozen=True)
class KernelConfigs:
    """Per-call configs for the forward, the dK/dV and the dQ kernels; None keeps the tuned table's pick."""

    fwd: KernelConfig | None = None
    dkdv: KernelConfig | None = None
    dq: KernelConfig | None = None

    def encode(self) -> str:
        """A compact string form (custom ops take strings, not dataclasses)."""
        return ";".join(c.encode() if c is not None else "" for c in (self.fwd, self.dkdv, self.dq))


def _decode_one(s: str) -> KernelConfig | None:
    if not s:
        return None
    head, _, fb = s.partition("/")
    bm, bn, nw, ns, tma, nreg, ws = (int(x) for x in head.split(","))
    return KernelConfig(bm, bn, nw, ns, bool(tma), nreg or None, bool(ws), _decode_one(fb))


@functools.lru_cache(maxsize=256)
def decode_configs(s: str) -> KernelConfigs | None:
    """Inverse of :meth:`KernelConfigs.encode`; "" gives None."""
    if not s:
        return None
    fwd, dkdv, dq = s.split(";")
    return KernelConfigs(_decode_one(fwd), _decode_one(dkdv), _decode_one(dq))


# Forward, keyed by (compute capability major, head_dim_pad). Winners of the H100 sweeps in
# benchmarks/NOTES.md (bf16, S=32k, 25% tiles). D=128: the warp-specialised kernel (one TMA producer
# warp group, two 64-row consumer groups) 3.32 vs 3.47 ms for the pipelined 128x128/8-warp kernel.
# D=64: 128-key tiles with a 128-register cap run two programs per SM (82 KB shared each), whose
# softmax and matmuls overlap: 3.55-3.76 vs 4.08-4.12 ms; warp specialisation was slower there
# (3.96 vs 3.68 ms). sm80: untuned guesses.
FWD_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 8, 2, tma=True, maxnreg=128),
    (9, 128): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(128, 128, 8, 3, tma=True)),
    (8, 64): KernelConfig(128, 64, 4, 3),
    (8, 128): KernelConfig(128, 64, 8, 3),
}
# Backward: dK/dV key-major with narrow query tiles, dQ query-major, as in FA2. Small 4-warp tiles won
# dK/dV on H100 (fwd+bwd 15.5 ms vs 16.0-21.3 for the other tiles at D=128).
# Hopper: warp-specialised kernels (H100 probe, fwd+bwd at 25% tiles: D=128 14.8 -> 11.9 ms with dK/dV
# 64 queries x 128 keys and dQ 128 x 128; D=64 16.1 -> 14.7 ms with 128 x 128 for both).
# Fallbacks: the pipelined kernels' sweep winners (round 1-2 in NOTES).
BWD_DKDV_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(64, 64, 4, 3)),
    (9, 128): KernelConfig(64, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(32, 64, 4, 3)),
}
BWD_DQ_CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (9, 64): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(64, 64, 4, 3)),
    (9, 128): KernelConfig(128, 128, 4, 2, warp_specialize=True, fallback=KernelConfig(128, 64, 8, 2)),
}
DEFAULT_GPU_FWD = KernelConfig(64, 64, 4, 2)
DEFAULT_GPU_BWD = KernelConfig(64, 64, 4, 2)

_TABLES = {"fwd": (FWD_CONFIGS, DEFAULT_GPU_FWD), "dkdv": (BWD_DKDV_CONFIGS, DEFAULT_GPU_BWD),
           "dq": (BWD_DQ_CONFIGS, DEFAULT_GPU_BWD)}


def head_dim_pad(d: int) -> int:
    """Head dim rounded up to a power of two, at least 16 (what the kernels' tiles hold)."""
    return max(16, 1 << (d - 1).bit_length())


def fit(cfg: KernelConfig, block_q: int, block_k: int, hdp: int, is_cuda: bool) -> KernelConfig:
    """Shrink ``cfg``'s tiles to the layout's blocks (and at D=256 to 64); register caps only on CUDA."""
    bm, bn = min(cfg.block_m, block_q), min(cfg.block_n, block_k)
    if is_cuda and hdp >= 256:  # register pressure: halve the tiles
        bm, bn = min(bm, 64), min(bn, 64)
    fallback = fit(cfg.fallback, block_q, block_k, hdp, is_cuda) if cfg.fallback is not None else None
    return KernelConfig(bm, bn, cfg.num_warps, cfg.num_stages, cfg.tma, cfg.maxnreg if is_cuda else None,
                        cfg.warp_specialize, fallback)


def pick_config(kind: str, block_q: int, block_k: int, hdp: int, device: torch.device,
                dtype: torch.dtype = torch.bfloat16, configs: KernelConfigs | None = None) -> KernelConfig:
    """The config for ``kind`` ("fwd", "dkdv", "dq"): the caller's, else the tuned table's, fitted."""
    given = getattr(configs, kind) if configs is not None else None
    if given is not None:
        return fit(given, block_q, block_k, hdp, device.type == "cuda")
    if device.type != "cuda":  # interpreter: one tile per logical block
        return KernelConfig(block_q, block_k, 1, 1)
    if dtype == torch.float32:
        # The tables are tuned for 2-byte types; fp32 tiles of that size overflow shared memory
        # (128x128 at D=128 asked for 393 KB on an H100). fp32 is for checks, not speed.
        side = 64 if hdp <= 128 else 32
        return KernelConfig(min(side, block_q), min(side, block_k), 4, 2)
    table, default = _TABLES[kind]
    major, _ = torch.cuda.get_device_capability(device)
    return fit(table.get((min(major, 9), hdp), default), block_q, block_k, hdp, True)
