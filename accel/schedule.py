"""Which (step, layer) runs the sparse method and which runs dense attention."""

from __future__ import annotations

from dataclasses import dataclass

from accel.options import check_options, option, options_of


@dataclass(frozen=True)
class Schedule:
    """Dense warm-up and cool-down around a sparse method.

    Attributes:
        dense_steps: the first N denoising steps run dense (Radial Attention's `dense_timesteps`).
        dense_last_steps: the last M denoising steps run dense (fine detail is settled there).
        dense_layers: an int N makes layers 0..N-1 dense; a tuple lists dense layer indices.
    """

    dense_steps: int = option(
        0, "first N denoising steps run dense: the layout of the video is decided early, sparse attention "
        "there costs the most quality", minimum=0)
    dense_last_steps: int = option(0, "last M denoising steps run dense (fine detail settles there)", minimum=0)
    dense_layers: int | tuple[int, ...] = option(
        0, "first N transformer layers always run dense (early layers attend most globally)", minimum=0)

    def __post_init__(self) -> None:
        layers = self.dense_layers
        if isinstance(layers, (list, tuple)):
            object.__setattr__(self, "dense_layers", 0)
            check_options(self)
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                    raise TypeError(f"Schedule.dense_layers must be an int or a tuple of layer indices >= 0, "
                                    f"got {layers!r}")
            object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
        else:
            check_options(self)

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

    def sparse_share(self, steps: int, layers: int) -> float:
        """Fraction of (step, layer) calls this schedule leaves to the sparse method (0: every call dense)."""
        if steps < 1 or layers < 1:
            return 0.0
        sparse = sum(not self.is_dense(s, steps, layer) for s in range(steps) for layer in range(layers))
        return sparse / (steps * layers)

    def why_all_dense(self, steps: int, layers: int) -> str | None:
        """A sentence saying why no call would run sparse over `steps` x `layers`, or None if some would."""
        if self.sparse_share(steps, layers) > 0:
            return None
        if isinstance(self.dense_layers, int):
            dense_layer_count = self.dense_layers
        else:
            dense_layer_count = len(set(self.dense_layers) & set(range(layers)))
        if dense_layer_count >= layers:
            return f"dense_layers={self.dense_layers} covers all {layers} layers of the model"
        return (f"dense_steps={self.dense_steps} + dense_last_steps={self.dense_last_steps} cover all {steps} "
                "denoising steps")


SCHEDULE_OPTIONS = options_of(Schedule)
"""The schedule's fields as front-end options (CLI flags, UI controls, spec keys)."""
