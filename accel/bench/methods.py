"""Attention-method benchmark: any registered method at a model's shape vs dense cuDNN SDPA and flex_attention.

For each case (a token grid, heads, head dim, a method spec such as ``neighborhood:kernel_size=18x24x24``) and
dtype, on one GPU and in one run, with `triton.testing.do_bench` medians:
- dense: cuDNN SDPA over the whole sequence (forward; forward+backward with ``--bwd``);
- the method's kernel on tokens already in its order (`run`: for pyramid this includes the per-call importance
  estimate and level assignment, pooling and the kernel); the token permutation in and out (gathers of q, k, v
  and the inverse on the output) timed alone; and the total of both, which is what a layer pays in a family that
  reorders around each attention call;
- for cases with ``layers`` (Wan and HunyuanVideo shapes): their token stream reorders once per forward instead
  (the hidden states and rotary tables in before the first block, the hidden states out after the last;
  `accel.pipelines.wan`, `accel.pipelines.hunyuan_video`), so every attention call sees tokens already in
  order: ``model_ms`` = kernel + that permutation / layers;
- compiled `flex_attention` with the same mask when the method can state it as a mask_mod
  (`AttentionMethod.flex_mask_mod`: neighborhood), over the same token order.
Efficiency = density x dense time / kernel time, where density is the share of token pairs the kernel computes
(neighborhood: tiles visited; pyramid: FLOP-equivalent sum of 1/p per block pair).

    accel bench methods --out $OUT [--cases natten-hunyuan,...] [--dtypes bf16,fp16] [--bwd]
"""

# ruff: noqa: B023  (closures are timed immediately, inside their loop iteration)
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accel.bench.plotting import save_figure
from accel.geometry import TokenLayout


@dataclass(frozen=True)
class MethodCase:
    """One benchmark shape: the grid of video tokens, attention heads and the method spec."""

    name: str
    grid: tuple[int, int, int]
    heads: int
    spec: str
    head_dim: int = 128
    text_tokens: int = 0
    reference: str = ""  # what the research system reported on this case, if anything
    reference_speedup: float | None = None
    inputs: str = "random"  # "random": i.i.d. normal q, k, v; "local": attention concentrated on nearby tokens
    layers: int | None = None  # blocks of the Wan / HunyuanVideo model of this shape (its token stream: `model_ms`)


# rank quotas: 9% of each row full, then 5% at 2x, 8% at 4x, 8% at 8x: 0.09 + 0.025 + 0.02 + 0.01 = 0.145
PYRAMID_15 = "pyramid:mode=topk,t1=0.09,t2=0.14,t3=0.22,t4=0.30"
CASES: dict[str, MethodCase] = {c.name: c for c in (
    MethodCase("natten-hunyuan", (30, 48, 80), 24, "neighborhood:kernel_size=18x24x24",
               reference="NATTEN docs, H100, fwd", reference_speedup=3.6, layers=60),
    MethodCase("natten-hunyuan-gna", (30, 48, 80), 24, "neighborhood:kernel_size=18x24x24,stride=16x8x8",
               reference="NATTEN GNA, H100, fwd (9.7x with the permutation)", reference_speedup=12.1, layers=60),
    MethodCase("natten-flux-4k", (1, 256, 256), 24, "neighborhood:kernel_size=80x80,stride=16x16",
               reference="NATTEN GNA Flux-4K, H100, fwd", reference_speedup=12.3),
    MethodCase("sta-hunyuan", (30, 48, 80), 24, "neighborhood:kernel_size=18x24x24,stride=6x8x8,tile=2x8x8",
               reference="tile-aligned window (STA-like): efficiency target >= 0.85", layers=60),
    MethodCase("nbhd-hunyuan-third", (30, 48, 80), 24, "neighborhood:kernel_size=10x16x26",
               reference="a window of about a third of each axis (the e2e setting)", layers=60),
    MethodCase("nbhd-hunyuan-720p-129f-third", (33, 45, 80), 24, "neighborhood:kernel_size=11x15x27",
               reference="HunyuanVideo 720p 129f, a third of each axis (partial tiles: 45 rows)", layers=60),
    MethodCase("nbhd-wan14b-720p-81f-third", (21, 45, 80), 40, "neighborhood:kernel_size=7x15x27",
               reference="Wan2.1-14B 720p 81f, a third of each axis (partial tiles: 45 rows)", layers=40),
    # Pyramid's levels depend on the data: i.i.d. random q/k give flat importance (nearly everything kept), so
    # the default thresholds run on "local" inputs; the topk quotas give a fixed 15% FLOP density on any input.
    MethodCase("pyramid-wan1.3b-480p-81f", (21, 30, 52), 12, "pyramid", inputs="local",
               reference="PSA default thresholds (density depends on the inputs)", layers=30),
    MethodCase("pyramid-b64-wan1.3b-480p-81f", (21, 30, 52), 12, "pyramid:block_size=64", inputs="local",
               reference="PSA default thresholds, 64-token blocks (the reference's PSAConfig default)", layers=30),
    MethodCase("pyramid-topk15-wan1.3b-480p-81f", (21, 30, 52), 12, PYRAMID_15,
               reference="PSA target >= 4x at ~85% FLOP sparsity", reference_speedup=4.0, layers=30),
    MethodCase("pyramid-b64-topk15-wan1.3b-480p-81f", (21, 30, 52), 12, PYRAMID_15 + ",block_size=64",
               reference="PSA target >= 4x at ~85% FLOP sparsity; 64-token blocks", reference_speedup=4.0, layers=30),
    MethodCase("pyramid-wan14b-720p-81f", (21, 45, 80), 40, "pyramid", inputs="local",
               reference="PSA default thresholds (density depends on the inputs)", layers=40),
    MethodCase("pyramid-topk15-wan14b-720p-81f", (21, 45, 80), 40, PYRAMID_15,
               reference="PSA target >= 4x at ~85% FLOP sparsity", reference_speedup=4.0, layers=40),
    MethodCase("pyramid-b64-topk15-wan14b-720p-81f", (21, 45, 80), 40, PYRAMID_15 + ",block_size=64",
               reference="PSA target >= 4x at ~85% FLOP sparsity; 64-token blocks", reference_speedup=4.0, layers=40),
)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def local_qkv(layout: TokenLayout, heads: int, head_dim: int, dtype: torch.dtype, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v whose attention falls mostly on nearby tokens: q = k = smooth random Fourier features of each
    token's (t, h, w) position plus noise (text tokens: noise). Stands in for a trained model's local maps."""
    dev = generator.device
    T, H, W = layout.grid
    t, h, w = torch.meshgrid(*(torch.arange(n, device=dev, dtype=torch.float32) for n in (T, H, W)), indexing="ij")
    pos = torch.stack([t / 3.0, h / 6.0, w / 6.0], -1).reshape(-1, 1, 3)  # (V, 1, 3), about a window per radian
    freq = torch.randn(1, heads, 3, head_dim // 2, device=dev, generator=generator)
    phase = torch.einsum("vxc,xhcd->vhd", pos, freq)
    feat = torch.cat([phase.cos(), phase.sin()], -1)  # (V, H, D), unit-variance entries
    S = layout.total_tokens
    vs = layout.video_slice
    base = torch.randn(1, S, heads, head_dim, device=dev, generator=generator) * 0.5
    base[:, vs] += feat[None]
    q = base + 0.3 * torch.randn(base.shape, device=dev, generator=generator)
    k = base + 0.3 * torch.randn(base.shape, device=dev, generator=generator)
    v = torch.randn(base.shape, device=dev, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


MIN_REPS = 10


def _bench(fn, rep: int = 100) -> float:
    """do_bench median over at least `MIN_REPS` repetitions. do_bench sizes its repetitions by ``rep`` ms, which
    gave a 50-200 ms call (Wan2.1-14B 720p, dense or sparse) one or two, so no median at all; the two protocols
    agreed within noise where compared (benchmarks/NOTES.md, pyramid item 33)."""
    import time

    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) / 3 * 1e3
    return float(do_bench(fn, warmup=25, rep=max(rep, int(MIN_REPS * once_ms) + 1), return_mode="median"))


def _dense_ms(q, k, v, bwd: bool, dout) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out: dict[str, float] = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out["cudnn_fwd"] = _bench(lambda: sdpa(qt, kt, vt))
        if bwd:
            qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
            out["cudnn_fwdbwd"] = _bench(lambda: sdpa(qg, kg, vg).backward(dout.transpose(1, 2)))
    return out


@dataclass
class CaseSetup:
    """One case's inputs on the GPU: the method and its plan, q/k/v in raster order and in the method's order,
    and the timed closures (what `run_case` measures; probes reuse them)."""

    method: Any
    layout: TokenLayout
    plan: Any
    call: Any
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ordered: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    plan_s: float
    perm: torch.Tensor | None  # video position -> raster index (None: the method keeps raster order)
    inverse: torch.Tensor | None  # raster index -> video position (the stream's inverse, cached per geometry)
    index: torch.Tensor | None  # the same over the joint sequence
    inv_index: torch.Tensor | None

    def kernel(self) -> torch.Tensor:
        """The method on tokens already in its order (what a layer inside a token stream runs)."""
        a, b, c = self.ordered
        return self.method.run(a, b, c, self.layout, self.plan, self.call).out

    def permute(self) -> tuple:
        """The per-layer permutation alone: q, k, v into the method's order and an output back."""
        return (tuple(t.index_select(1, self.index) for t in (self.q, self.k, self.v)),
                torch.empty_like(self.q).index_select(1, self.inv_index))

    def total(self) -> torch.Tensor:
        """Permutation in, the method, permutation out: what a layer pays where a family reorders per layer."""
        if self.perm is None:
            return self.method.run(self.q, self.k, self.v, self.layout, self.plan, self.call).out
        a, b, c = (t.index_select(1, self.index) for t in (self.q, self.k, self.v))
        return self.method.run(a, b, c, self.layout, self.plan, self.call).out.index_select(1, self.inv_index)

    def stream_tensors(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Stand-ins for what a token stream reorders once per forward: the (B, S, H*D) hidden states and two
        (1, S, 1, D) fp32 rotary tables (Wan's; HunyuanVideo's are (S, D), the same bytes)."""
        B, S, H, D = self.q.shape
        dev = self.q.device
        hidden = torch.randn(B, S, H * D, device=dev, dtype=self.q.dtype, generator=generator)
        return hidden, *(torch.randn(1, S, 1, D, device=dev, generator=generator) for _ in range(2))

    def stream(self, tensors: tuple[torch.Tensor, ...]) -> tuple:
        """One forward's token-stream permutation: hidden states and rotary tables in, hidden states out."""
        from accel.pipelines.context import permute_tokens

        vs = self.layout.video_slice
        hidden, *tables = tensors
        into = [permute_tokens(t, self.perm, 1, vs) for t in (hidden, *tables)]
        return into, permute_tokens(into[0], self.inverse, 1, vs)


def prepare_case(case: MethodCase, dtype: torch.dtype, generator: torch.Generator) -> CaseSetup:
    """Build one case's inputs (seeded by ``generator``), plan and token order on the GPU."""
    from accel.methods.base import AttentionCall, split_joint
    from accel.methods.registry import parse_method_spec

    dev = generator.device
    method = parse_method_spec(case.spec).method
    text = case.text_tokens
    layout = TokenLayout(1, *case.grid, text_tokens=text, text_position="before" if text else "none")
    H, D, S = case.heads, case.head_dim, layout.total_tokens
    if case.inputs == "local":
        q, k, v = local_qkv(layout, H, D, dtype, generator)
    else:
        q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=dtype, generator=generator) for _ in range(3))
    start = time.perf_counter()
    plan = method.build_plan(layout, H, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    plan_s = time.perf_counter() - start
    perm = method.token_order(layout, dev)
    inverse = index = inv_index = None
    if perm is not None:
        vs, _ = split_joint(layout)
        inverse = torch.argsort(perm)
        head, tail = torch.arange(vs.start, device=dev), torch.arange(vs.stop, S, device=dev)
        index = torch.cat([head, perm + vs.start, tail])
        inv_index = torch.cat([head, inverse + vs.start, tail])
    ordered = tuple(t.index_select(1, index) for t in (q, k, v)) if perm is not None else (q, k, v)
    return CaseSetup(method, layout, plan, AttentionCall(), q, k, v, ordered, plan_s, perm, inverse, index, inv_index)


def run_case(case: MethodCase, dtype: torch.dtype, bwd: bool, flex: bool, log) -> dict[str, Any]:
    """Time one case at one dtype; returns the JSON row."""
    gen = torch.Generator(device=torch.device("cuda")).manual_seed(0)
    setup = prepare_case(case, dtype, gen)
    method, layout, plan, call, perm = setup.method, setup.layout, setup.plan, setup.call, setup.perm
    q = setup.q
    qo, ko, vo = setup.ordered
    S = layout.total_tokens
    text = case.text_tokens
    dout = torch.randn_like(q)
    row: dict[str, Any] = {"case": case.name, "spec": case.spec, "grid": list(case.grid), "heads": case.heads,
                           "head_dim": case.head_dim, "tokens": S, "dtype": str(dtype).removeprefix("torch."),
                           "reference": case.reference, "reference_speedup": case.reference_speedup,
                           "inputs": case.inputs, "layers": case.layers}
    row["dense"] = _dense_ms(q, setup.k, setup.v, bwd, dout)
    row["plan_s"] = setup.plan_s
    result = method.run(qo, ko, vo, layout, plan, call)
    density = float(result.density)
    row["density"] = density
    row["kernel_ms"] = _bench(setup.kernel)
    row["permute_ms"] = _bench(setup.permute) if perm is not None else 0.0
    row["total_ms"] = _bench(setup.total)
    dense = row["dense"]["cudnn_fwd"]
    row["speedup_kernel"] = dense / row["kernel_ms"]
    row["speedup_total"] = dense / row["total_ms"]
    if case.layers and perm is not None and not text:  # a token stream: one permutation per forward
        tensors = setup.stream_tensors(gen)
        row["stream_permute_ms"] = _bench(lambda: setup.stream(tensors))
        del tensors
        row["model_ms"] = row["kernel_ms"] + row["stream_permute_ms"] / case.layers
        row["speedup_model"] = dense / row["model_ms"]
    row["efficiency"] = density * dense / row["kernel_ms"]
    if bwd:
        qg, kg, vg = (t.detach().requires_grad_() for t in (qo, ko, vo))
        row["kernel_fwdbwd_ms"] = _bench(lambda: method.run(qg, kg, vg, layout, plan, call).out.backward(dout))
        row["speedup_fwdbwd"] = row["dense"]["cudnn_fwdbwd"] / row["kernel_fwdbwd_ms"]
        row["efficiency_fwdbwd"] = density * row["dense"]["cudnn_fwdbwd"] / row["kernel_fwdbwd_ms"]
    mask_mod = method.flex_mask_mod(layout, plan, q.device) if flex and not text else None
    if mask_mod is not None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        start = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, S, S, device=q.device, BLOCK_SIZE=128, _compile=True)
        torch.cuda.synchronize()
        row["flex_block_mask_s"] = time.perf_counter() - start
        fn = torch.compile(flex_attention, dynamic=False)
        qt, kt, vt = (t.transpose(1, 2) for t in (qo, ko, vo))
        flex_out = fn(qt, kt, vt, block_mask=block_mask).transpose(1, 2)
        ref = result.out.float()
        row["flex_vs_ours_rel_err"] = float((flex_out.float() - ref).norm() / ref.norm())
        row["flex_ms"] = _bench(lambda: fn(qt, kt, vt, block_mask=block_mask))
        row["vs_flex"] = row["flex_ms"] / row["kernel_ms"]
    log(f"{case.name} {row['dtype']}: density {density:.3f} | cuDNN {dense:.2f} ms, kernel {row['kernel_ms']:.2f} ms "
        f"({row['speedup_kernel']:.2f}x, eff {row['efficiency']:.2f}), permute {row['permute_ms']:.2f} ms, total "
        f"{row['total_ms']:.2f} ms ({row['speedup_total']:.2f}x)"
        + (f", stream permutation {row['stream_permute_ms']:.2f} ms per forward, model {row['model_ms']:.2f} ms "
           f"({row['speedup_model']:.2f}x)" if "model_ms" in row else "")
        + (f", flex {row['flex_ms']:.2f} ms (ours {row['vs_flex']:.2f}x faster)" if "flex_ms" in row else "")
        + (f" | fwd+bwd {row['kernel_fwdbwd_ms']:.1f} ms ({row['speedup_fwdbwd']:.2f}x, eff "
           f"{row['efficiency_fwdbwd']:.2f})" if bwd else ""))
    return row


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars of speed-up over dense cuDNN per case: kernel alone, with either permutation, flex, the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4))
    x = range(len(rows))
    width = 0.16
    ax.bar([i - 2 * width for i in x], [r["speedup_kernel"] for r in rows], width, label="ours (kernel)")
    ax.bar([i - width for i in x], [r.get("speedup_model", 0) for r in rows], width,
           label="ours + the token stream's once-per-forward permutation / layers")
    ax.bar(list(x), [r["speedup_total"] for r in rows], width, label="ours + permutation around each call")
    ax.bar([i + width for i in x], [r["dense"]["cudnn_fwd"] / r["flex_ms"] if "flex_ms" in r else 0
                                    for r in rows], width, label="flex_attention, same mask")
    ax.bar([i + 2 * width for i in x], [r["reference_speedup"] or 0 for r in rows], width,
           label="reported by the research system (H100)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xticks(list(x), [f"{r['case']}\n{r['dtype']} d={r['density']:.2f}" for r in rows], fontsize=7,
                  rotation=20, ha="right")
    ax.set_ylabel("forward speed-up vs dense cuDNN SDPA")
    ax.legend(fontsize=7)
    env = result["environment"]
    ax.set_title(f"{env['device']}, torch {env['torch']}, triton {env['triton']}", fontsize=9)
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accel bench methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16")
    parser.add_argument("--bwd", action="store_true", help="also time forward+backward")
    parser.add_argument("--no-flex", dest="flex", action="store_false", help="skip the flex_attention baseline")
    parser.add_argument("--out", default="outputs/bench",
                        help="output folder for methods.json/png (default: %(default)s; the committed results "
                             "change only with --out benchmarks/results)")
    parser.add_argument("--tag", default="methods", help="file name stem of the JSON and PNG")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if unknown or bad:
        print(f"unknown cases {unknown} or dtypes {bad}; cases: {', '.join(CASES)}; dtypes: bf16, fp16",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("accel bench methods needs a CUDA GPU; none is visible (CPU timings mean nothing here).",
              file=sys.stderr)
        return 3
    from accel.bench.e2e import _environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    result: dict[str, Any] = {"environment": _environment(),
                              "protocol": f"do_bench median of >= {MIN_REPS} repetitions, B=1", "rows": []}
    for name in names:
        for d in dtypes:
            try:
                result["rows"].append(run_case(CASES[name], DTYPES[d], args.bwd, args.flex, log))
            except Exception as err:  # one failing case must not lose the others' numbers
                log(f"{name} {d}: FAILED {type(err).__name__}: {err}")
                result.setdefault("failures", []).append({"case": name, "dtype": d, "error": repr(err)})
            (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
            torch.cuda.empty_cache()
    if result["rows"]:
        try:
            plot(result, out / f"{args.tag}.png")
        except ImportError as err:
            log(f"no plot: {err}")
    return 0 if not result.get("failures") else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CASES", "CaseSetup", "MethodCase", "main", "prepare_case", "run_case"]
