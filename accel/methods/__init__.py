"""Attention methods: each turns a token layout into a cached plan and runs attention with it.

Importing this package is cheap: kernels (and triton) load when a method first builds a plan or attends.
`accel.methods.registry` finds every method module here; presets live in `accel.presets`.
"""

from accel.methods.base import AttentionMethod
from accel.methods.dense import Dense
from accel.methods.radial import Radial, RadialPlan

__all__ = ["AttentionMethod", "Dense", "Radial", "RadialPlan"]
