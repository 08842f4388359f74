"""dit-accel: sparse attention, schedules and length-extension LoRA for diffusers video/image DiTs.

Subpackages: `accel.kernels` (Triton kernels, no diffusers), `accel.methods` (attention methods),
`accel.pipelines` (diffusers adapters, patching, tiny offline pipelines), `accel.lora`, `accel.ui`.
"""

from accel.geometry import TokenLayout
from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.schedule import Schedule

__version__ = "0.1.0"

__all__ = [
    "AttentionMethod",
    "Dense",
    "HeadPerturbation",
    "Neighborhood",
    "Pyramid",
    "Radial",
    "Schedule",
    "TokenLayout",
    "patch",
    "unpatch",
    "__version__",
]


def __getattr__(name: str):
    # Lazy: importing `accel` must stay cheap and must not import diffusers (or triton) until needed.
    if name in ("patch", "unpatch", "patch_handle"):
        from accel.pipelines import patching

        return getattr(patching, name)
    if name == "HeadPerturbation":
        from accel.guidance.perturbation import HeadPerturbation

        return HeadPerturbation
    if name == "Radial":
        from accel.methods.radial import Radial

        return Radial
    if name == "Pyramid":
        from accel.methods.pyramid import Pyramid

        return Pyramid
    if name == "Neighborhood":
        from accel.methods.neighborhood import Neighborhood

        return Neighborhood
    if name in ("RADIAL_PRESETS", "radial_preset", "preset", "PRESETS"):
        from accel import presets

        return getattr(presets, name)
    raise AttributeError(f"module 'accel' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names (`patch`, `unpatch`, `Radial`) are not in globals() until first use: list them anyway.
    return sorted(set(globals()) | set(__all__))
