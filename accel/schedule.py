"""Which (step, layer) runs the sparse method and which runs dense attention."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Dense warm-up and cool-down around a sparse method.

    Attributes:
        dense_steps: the first N denoising steps run dense (Radial Attention's `dense_timesteps`).
        dense_last_steps: the last M denoising steps run dense (fine detail is settled there).
        dense_layers: an int N makes layers 0..N-1 dense; a tuple lists dense layer indices.
    """

    dense_steps: int = 0
    dense_last_steps: int = 0
    dense_layers: int | tuple[int, ...] = 0

    def __post_init__(self) -> None:
        if self.dense_steps < 0 or self.dense_last_steps < 0:
            raise ValueError(
                f"dense_steps and dense_last_steps must be >= 0, got {self.dense_steps}, {self.dense_last_steps}"
            )
        if isinstance(self.dense_layers, list):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if isinstance(self.dense_layers, int):
            if self.dense_layers < 0:
                raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        elif not all(isinstance(i, int) and i >= 0 for i in self.dense_layers):
            raise TypeError(f"dense_layers must be an int or a tuple of layer indices, got {self.dense_layers!r}")

    def is_dense(self, step: int | None, total_steps: int | None, layer: int) -> bool:
        """True when (step, layer) runs dense. Unknown steps (model called outside a pipeline) are sparse."""
        if isinstance(self.dense_layers, int):
            if layer < self.dense_layers:
                return True
        elif layer in self.dense_layers:
            return True
        if step is None:
            return False
        if step < self.dense_steps:
            return True
        return total_steps is not None and step >= total_steps - self.dense_last_steps
