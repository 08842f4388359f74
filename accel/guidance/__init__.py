"""Head-perturbation guidance (SoftPAG on chosen attention heads) and HeadHunter's head search.

`perturbation` holds the config (`HeadPerturbation`) and the output-space edit, `loop` wires it into the
denoising loop through the patch's branch hook, `preset` reads and writes preset files, `search` and
`scorers` run the greedy head search, `cli` adds `accel heads`.
"""

from accel.guidance.perturbation import HeadPerturbation

__all__ = ["HeadPerturbation"]
