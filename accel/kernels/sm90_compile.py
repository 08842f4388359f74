"""Compile a Triton kernel for sm_90 (H100/H200) without a GPU, its integer arguments specialised as a launch does.

Triton compiles for a target without a driver. Used by `benchmarks/probes/sm90_resources.py` (registers, spills)
and the CI test that the pyramid kernels' default knobs fit the chip's shared memory. Needs the regular
(non-interpreted) JIT functions: run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

__all__ = ["SM90_SHARED_BYTES", "compile_sm90", "desc_type"]

SM90_SHARED_BYTES = 232448  # opt-in shared memory per block on an H100/H200 (227 KB)


def compile_sm90(fn, constexprs: dict, pointers: dict[str, str], floats: tuple[str, ...] = (),
                 descs: dict[str, str] | None = None, **options):
    """The compiled kernel (``.metadata.shared``, ``.asm``) of ``fn`` for sm_90.

    ``pointers``: argument name -> Triton pointer type (e.g. ``"*bf16"``); ``floats``: fp32 scalar arguments;
    ``descs``: argument name -> host tensor-descriptor type (`desc_type`); the other non-constexpr arguments are
    i32. Unit strides (names ``stride_*d``) become constants and the other
    strides multiples of 16, as at real shapes: without this the compiler cannot vectorise and reports ~35 more
    registers than the kernel really uses. ``options``: num_warps, num_stages, ...
    """
    import triton
    from triton.backends.compiler import GPUTarget

    consts = dict(constexprs)
    consts.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    descs = descs or {}
    sig = {n: "constexpr" if n in consts else pointers.get(n) or descs.get(n) or ("fp32" if n in floats else "i32")
           for n in fn.arg_names}
    aligned = [n for n in fn.arg_names if n in pointers or (n.startswith("stride_") and n not in consts)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = triton.compiler.ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    return triton.compile(source(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def desc_type(dtype: str, block_shape: list[int], layout) -> str:
    """The signature type of a Gluon host tensor descriptor (``dtype`` e.g. ``"bf16"``, its box and its
    NVMMASharedLayout), as a launch specialises it."""
    return f"tensordesc<{dtype}{list(block_shape)},{layout!r}>"
