"""Attention methods: each turns a token layout into a cached plan and runs attention with it.

Importing this package is cheap: kernels (and triton) load when a method first builds a plan or attends.
"""

from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.methods.radial import RADIAL_PRESETS, Radial, RadialPlan, radial_preset

__all__ = ["RADIAL_PRESETS", "AttentionMethod", "Dense", "Radial", "RadialPlan", "radial_preset"]
