"""Kernel selection for the Triton backend: pipelined vs warp-specialised, TMA, register cap, in one place.

:func:`select_forward` and :func:`select_backward` return what will run and why the faster variants were
skipped; every skip reason is logged at DEBUG on the "accel" logger. Triton-free at import (the TMA check
imports ``triton.language`` only for CUDA tensors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ._common import KeyParts, resolve_key_parts
from .configs import KernelConfig, KernelConfigs, head_dim_pad, pick_config
from .layout import BlockLayout

logger = logging.getLogger("accel")

PIPELINED = "pipelined"
WARP_SPECIALIZED = "warp_specialized"


@dataclass(frozen=True)
class KernelChoice:
    """One kernel to launch: ``variant`` ("pipelined" or "warp_specialized"), its fitted config, and why
    faster variants were skipped. A warp-specialised choice carries the pipelined one to run if it fails
    to build (``fallback``)."""

    variant: str
    config: KernelConfig
    reasons: tuple[str, ...] = ()
    fallback: KernelChoice | None = None


ForwardChoice = KernelChoice


@dataclass(frozen=True)
class BackwardChoice:
    """The dK/dV and dQ kernels of one backward."""

    dkdv: KernelChoice
    dq: KernelChoice

    @property
    def reasons(self) -> tuple[str, ...]:
        """Both kernels' skip reasons."""
        return self.dkdv.reasons + self.dq.reasons


def tma_problem(t: torch.Tensor, name: str) -> str | None:
    """Why ``t`` cannot go through a Hopper tensor descriptor (None: it can).

    Descriptors need Hopper+, 16-bit data, unit last stride and 16-byte aligned rows/heads.
    """
    if not t.is_cuda:
        return f"{name} not on CUDA"
    if t.dtype not in (torch.float16, torch.bfloat16):
        return f"{name} is {t.dtype} (TMA needs 16-bit data)"
    if t.stride(-1) != 1:
        return f"{name} last stride {t.stride(-1)} != 1"
    import triton.language as tl
    if torch.cuda.get_device_capability(t.device)[0] < 9 or not hasattr(tl, "make_tensor_descriptor"):
        return "no tensor descriptors (needs sm_90+ and a Triton with make_tensor_descriptor)"
    es = t.element_size()
    if t.data_ptr() % 16 != 0 or any((st * es) % 16 != 0 for st in t.stride()[:-1]):
        return f"{name} not 16-byte aligned (strides {tuple(t.stride())})"
    return None


def lse_tma_problem(lse: torch.Tensor | None) -> str | None:
    """Why the LSE (or Delta) rows cannot be stored through a 1-D descriptor (None: they can)."""
    if lse is None or (lse.stride(-1) == 1 and lse.data_ptr() % 16 == 0
                       and all(st % 4 == 0 for st in lse.stride()[:-1])):
        return None
    return f"lse rows not 16-byte aligned (strides {tuple(lse.stride())})"


def _device_problems(q: torch.Tensor) -> list[str]:
    if not q.is_cuda:
        return [f"not CUDA (device={q.device})"]
    major, minor = torch.cuda.get_device_capability(q.device)
    return [] if major == 9 else [f"not sm_90 (sm_{major}{minor})"]


def _tma_problems(named: list[tuple[torch.Tensor, str]]) -> list[str]:
    return [p for p in (tma_problem(t, n) for t, n in named if t is not None) if p]


def _log(kernel: str, choice: KernelChoice) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        for r in choice.reasons:
            logger.debug(r)
        logger.debug("%s: %s kernel, %s", kernel, choice.variant, choice.config)


def _pipelined_fwd(cfg: KernelConfig, q: torch.Tensor, kv: list[tuple[torch.Tensor, str]],
                   reasons: list[str]) -> KernelChoice:
    """The pipelined forward's config: TMA for the video K/V where they allow it, else no register cap."""
    cfg = cfg.pipelined()
    use_tma = False
    if cfg.tma:
        problems = _tma_problems(kv)
        use_tma = not problems
        reasons += [f"TMA loads off: {p}" for p in problems]
    if not use_tma and cfg.maxnreg and q.is_cuda:
        # The register cap is tuned for the descriptor loads; pointer loads would spill under it.
        reasons.append(f"register cap {cfg.maxnreg} dropped: tuned for TMA loads")
        cfg = KernelConfig(cfg.block_m, min(cfg.block_n, 64), cfg.num_warps, 3)
    return KernelChoice(PIPELINED, replace(cfg, tma=use_tma), tuple(reasons))


def select_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: BlockLayout,
    *,
    v: torch.Tensor | None = None,
    video_keys: tuple[int, int] | None = None,
    text_keys: tuple[int, int] | None = None,
    text_lengths: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    configs: KernelConfigs | None = None,
    parts: KeyParts | None = None,
) -> KernelChoice:
    """Which forward kernel runs for this call (k, v: joint buffers), with the reasons others were skipped."""
    v = k if v is None else v
    parts = parts if parts is not None else resolve_key_parts(k.shape[1], video_keys, text_keys)
    v0, vl, t0, tl = parts
    cfg = pick_config("fwd", layout.block_m, layout.block_n, head_dim_pad(q.shape[-1]), q.device, q.dtype,
                      configs)
    kv = [(k[:, v0:v0 + vl], "k"), (v[:, v0:v0 + vl], "v")]
    why: list[str] = []
    if not cfg.warp_specialize:
        why.append("config not warp-specialised")
    why += _device_problems(q)
    if layout.block_m != 128:
        why.append(f"block_m={layout.block_m} != 128")
    elif cfg.block_m != 128:
        why.append(f"config block_m={cfg.block_m} != 128")
    if cfg.block_n != layout.block_n:
        why.append(f"config block_n={cfg.block_n} != layout block_n={layout.block_n}")
    if tl and text_mask is not None:
        why.append("text mask not trailing padding (text_mask given; pass text_lengths to keep this kernel)")
    if q.is_cuda:
        why += _tma_problems([(q, "q"), (out, "out"), (k, "k"), (v, "v")])
        if p := lse_tma_problem(lse):
            why.append(p)
    reasons = [f"warp-specialised forward skipped: {r}" for r in why]
    if why:
        choice = _pipelined_fwd(cfg, q, kv, reasons)
    else:
        choice = KernelChoice(WARP_SPECIALIZED, cfg, (), _pipelined_fwd(cfg, q, kv, []))
    _log("forward", choice)
    return choice


def select_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: BlockLayout,
    *,
    v: torch.Tensor | None = None,
    video_keys: tuple[int, int] | None = None,
    text_keys: tuple[int, int] | None = None,
    tensors: tuple[torch.Tensor, ...] = (),
    lse: torch.Tensor | None = None,
    configs: KernelConfigs | None = None,
    parts: KeyParts | None = None,
) -> BackwardChoice:
    """Which dK/dV and dQ kernels run for this backward, with the reasons others were skipped.

    ``tensors``: the other tensors the warp-specialised kernels address through TMA (dO, dQ, dK, dV).
    """
    v = k if v is None else v
    parts = parts if parts is not None else resolve_key_parts(k.shape[1], video_keys, text_keys)
    v0, vl, t0, tl = parts
    hdp = head_dim_pad(q.shape[-1])
    common: list[str] = []
    if tl:
        common.append("text keys (the warp-specialised backward has no text path)")
    common += _device_problems(q)
    if q.is_cuda:
        common += _tma_problems([(q, "q"), (k[:, v0:v0 + vl], "k"), (v[:, v0:v0 + vl], "v")]
                                + [(t, f"grad tensor {i}") for i, t in enumerate(tensors)])
        if p := lse_tma_problem(lse):
            common.append(p)
    choices = []
    for kind, name in (("dkdv", "dK/dV"), ("dq", "dQ")):
        cfg = pick_config(kind, layout.block_m, layout.block_n, hdp, q.device, q.dtype, configs)
        why = [] if cfg.warp_specialize else ["config not warp-specialised"]
        why += common
        if kind == "dkdv":
            if layout.block_n != 128:
                why.append(f"block_n={layout.block_n} != 128")
            elif cfg.block_n != 128:
                why.append(f"config block_n={cfg.block_n} != 128")
        elif layout.block_m != 128:
            why.append(f"block_m={layout.block_m} != 128")
        elif cfg.block_m != 128:
            why.append(f"config block_m={cfg.block_m} != 128")
        pipelined = KernelChoice(PIPELINED, cfg.pipelined(), tuple(f"warp-specialised {name} skipped: {r}"
                                                                    for r in why))
        choice = pipelined if why else KernelChoice(WARP_SPECIALIZED, cfg, (), replace(pipelined, reasons=()))
        _log(name, choice)
        choices.append(choice)
    return BackwardChoice(*choices)
