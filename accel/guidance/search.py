"""HeadHunter's greedy iterative top-k head search (Ahn et al., arXiv 2506.10978, Alg. 1).

Each round scores every candidate head c by the mean objective over M prompt/seed pairs of images made with
guidance on ``selected + {c}``, then adds the best k to ``selected``; R rounds. Every candidate's score is
appended to a JSON-lines log as soon as it is known, so a killed search resumes where it stopped and ends
with the same result. Ranks split each round's candidates (``pool[rank::world]``, each rank its own log file)
and meet at the end of the round to rank them all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.guidance.loop import guidance_branch, layer_sites
from accel.guidance.perturbation import HeadPerturbation
from accel.guidance.preset import GuidancePreset
from accel.guidance.scorers import Scorer

Head = tuple[Any, int]


@dataclass(frozen=True)
class SearchConfig:
    """What one search does (written in the log header; a resumed search must match it).

    Attributes:
        prompts: the M prompt/seed pairs as (prompt, seed).
        rounds, top_k: R rounds, k heads added per round.
        strength, scale, target, scope, steps: the guidance candidates are generated with.
        candidates: the (layer, head) pool; None: every head of every self-attention layer.
    """

    prompts: tuple[tuple[str, int], ...]
    rounds: int = 1
    top_k: int = 3
    strength: float = 1.0
    scale: float = 3.0
    target: str = "identity"
    scope: str = "joint"
    steps: tuple | None = None
    candidates: tuple[Head, ...] | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("SearchConfig.prompts must list at least one (prompt, seed) pair")
        for i, pair in enumerate(self.prompts):
            if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
                    or isinstance(pair[1], bool) or not isinstance(pair[1], int)):
                raise TypeError(f"SearchConfig.prompts[{i}] must be (prompt: str, seed: int), got {pair!r}")
        object.__setattr__(self, "prompts", tuple((p, int(s)) for p, s in self.prompts))
        for name in ("rounds", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchConfig.{name} must be a whole number >= 1, got {value!r}")
        HeadPerturbation(heads=[(0, 0)], strength=self.strength, scale=self.scale, target=self.target,
                         scope=self.scope, steps=self.steps)  # validates those fields, naming them
        if self.candidates is not None:
            object.__setattr__(self, "candidates", tuple((layer, int(h)) for layer, h in self.candidates))

    def header(self, model_class: str, scorer: str) -> dict[str, Any]:
        data = asdict(self)
        data["prompts"] = [list(p) for p in self.prompts]
        data["candidates"] = None if self.candidates is None else [list(c) for c in self.candidates]
        data["steps"] = None if self.steps is None else list(self.steps)
        return {"event": "start", "model_class": model_class, "scorer": scorer, "config": data}


@dataclass
class SearchResult:
    """The heads chosen (in order) and each round's ranking."""

    selected: list[Head]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def preset(self, model_class: str, config: SearchConfig, *, strength: float | None = None) -> GuidancePreset:
        """A preset of the selected heads (``strength``: the u to use them at; default the search's)."""
        perturbation = HeadPerturbation(heads=self.selected, strength=config.strength if strength is None
                                        else strength, scale=config.scale, steps=config.steps,
                                        target=config.target, scope=config.scope)
        search = {"rounds": config.rounds, "top_k": config.top_k, "pairs": len(config.prompts),
                  "search_strength": config.strength, "ranking": self.rounds}
        return GuidancePreset(model_class, perturbation, search)


def rank_log(path: Path, rank: int) -> Path:
    """The log file of `rank` (rank 0 writes `path` itself)."""
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a log (a last line cut off by a kill is ignored)."""
    if not path.is_file():
        return []
    records = []
    with path.open() as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # a write interrupted by a kill
            records.append(json.loads(line))
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _trim_partial(path: Path) -> None:
    """Drop a half-written last line, so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class Distributed:
    """This process's rank and world and a barrier (single process, or `accelerate`'s `PartialState`)."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())  # CPU ranks: gloo

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state is not None else 0

    @property
    def world(self) -> int:
        return self.state.num_processes if self.state is not None else 1

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def _key(head: Sequence[Any]) -> tuple[Any, int]:
    return (head[0], int(head[1]))


def _order(head: Head) -> tuple:
    layer, h = head
    return (0, layer, "", h) if isinstance(layer, int) else (1, 0, layer, h)


def generate_images(pipe: Any, handle: Any, family: str, sites, heads: list[Head], config: SearchConfig,
                    call_kwargs: dict[str, Any]) -> list[np.ndarray]:
    """One image (or video) per prompt/seed pair with guidance on `heads` (installed on `handle`)."""
    handle.remove_branch("head-perturbation")
    if heads:
        guidance = HeadPerturbation(heads=heads, strength=config.strength, scale=config.scale, steps=config.steps,
                                    target=config.target, scope=config.scope)
        handle.add_branch(guidance_branch(guidance, family, sites, pipe))
    images = []
    for prompt, seed in config.prompts:
        kwargs = {**call_kwargs, "output_type": "np"}
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **kwargs)
        media = out.frames if hasattr(out, "frames") else out.images
        images.append(np.asarray(media[0], dtype=np.float32))
    handle.remove_branch("head-perturbation")
    return images


def search_heads(
    pipe: Any,
    config: SearchConfig,
    scorer: Scorer,
    *,
    log: str | os.PathLike,
    call_kwargs: dict[str, Any] | None = None,
    method: Any = None,
    dist: Distributed | None = None,
    progress: bool = True,
    on_candidate: Callable[[Head, float], None] | None = None,
) -> SearchResult:
    """Run (or resume) the greedy search on `pipe`, logging to `log`; returns the selected heads.

    Args:
        pipe: a diffusers pipeline of a family guidance supports (it is patched for the search and restored).
        config: prompts/seeds, rounds, top-k and the guidance candidates are scored with.
        scorer: higher is better; the mean over the pairs ranks a candidate.
        log: JSON-lines log (per rank: ``<log>.rank<i>``); an existing log of the same search is resumed.
        call_kwargs: extra pipeline call arguments (size, steps, guidance_scale, ...).
        method: attention method for the search's generations (default dense).
        on_candidate: called after each scored candidate (progress, tests).
    """
    import accel
    from accel.pipelines.families import adapter_for

    dist = dist or Distributed()
    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    if adapter is None:
        raise NotImplementedError(f"{type(transformer).__name__} is not a model family accel supports")
    sites = layer_sites(adapter, transformer)
    model_class = type(transformer).__name__
    pool_all = list(config.candidates) if config.candidates is not None else [
        (s.index, h) for s in sites for h in range(s.heads)]
    from accel.guidance.perturbation import resolve_heads

    resolve_heads(tuple(pool_all), sites)  # every candidate names a real head
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    header = config.header(model_class, scorer.name)
    mine = rank_log(log, dist.rank)
    _trim_partial(mine)
    done: dict[tuple[int, tuple], float] = {}
    for path in {rank_log(log, r) for r in range(dist.world)} | {mine}:
        for record in read_log(path):
            if record.get("event") == "start":
                if record["model_class"] != header["model_class"] or record["config"] != header["config"]:
                    raise ValueError(f"search log {str(path)!r} belongs to another search (model or settings differ); "
                                     "use another --log or delete it")
            elif record.get("event") == "candidate":
                done[(record["round"], _key(record["head"]))] = record["score"]
    if not read_log(mine):
        _append(mine, header)

    handle = accel.patch(pipe, method)
    call_kwargs = dict(call_kwargs or {})
    selected: list[Head] = []
    result = SearchResult(selected)
    try:
        for round_index in range(config.rounds):
            pool = [c for c in pool_all if _key(c) not in {_key(s) for s in selected}]
            if not pool:
                break
            todo = [c for c in pool[dist.rank::dist.world] if (round_index, _key(c)) not in done]
            bar = _progress(len(pool[dist.rank::dist.world]), round_index, config.rounds, progress, dist.rank)
            bar.update(len(pool[dist.rank::dist.world]) - len(todo))
            for cand in todo:
                images = generate_images(pipe, handle, adapter.family, sites, [*selected, cand], config, call_kwargs)
                scores = scorer.score(images, [p for p, _ in config.prompts], list(range(len(config.prompts))))
                score = float(np.mean(scores))
                if not math.isfinite(score):
                    raise ValueError(f"scorer {scorer.name} gave a non-finite score for head {cand}: {scores}")
                _append(mine, {"event": "candidate", "round": round_index, "head": list(cand), "score": score,
                               "scores": scores, "selected": [list(s) for s in selected]})
                done[(round_index, _key(cand))] = score
                bar.update(1)
                if on_candidate is not None:
                    on_candidate(cand, score)
            bar.close()
            dist.barrier()
            for r in range(dist.world):  # the other ranks' scores of this round
                for record in read_log(rank_log(log, r)):
                    if record.get("event") == "candidate":
                        done[(record["round"], _key(record["head"]))] = record["score"]
            missing = [c for c in pool if (round_index, _key(c)) not in done]
            if missing:
                raise RuntimeError(f"round {round_index}: no score for {len(missing)} candidates (e.g. {missing[0]}); "
                                   "did a rank fail?")
            ranked = sorted(pool, key=lambda c: (-done[(round_index, _key(c))], _order(c)))
            chosen = ranked[: config.top_k]
            selected.extend(chosen)
            result.rounds.append({"round": round_index, "added": [list(c) for c in chosen],
                                  "scores": [done[(round_index, _key(c))] for c in chosen]})
            if dist.rank == 0:
                _append(mine, {"event": "round", "round": round_index, "added": [list(c) for c in chosen],
                               "selected": [list(s) for s in selected]})
    finally:
        accel.unpatch(pipe)
    return result


def _progress(total: int, round_index: int, rounds: int, enabled: bool, rank: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"heads search round {round_index + 1}/{rounds}" + (f" rank {rank}" if rank else ""),
                unit="head", disable=not enabled)


__all__ = ["Distributed", "SearchConfig", "SearchResult", "generate_images", "read_log", "rank_log", "search_heads"]
