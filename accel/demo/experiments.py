"""The four experiments of issue #17 on the learned demo model, each a JSON of raw numbers, a PNG and a table.

1. `run_fidelity`: every sparse method at its default and two other densities, each with and without a dense
   warm-up schedule, against dense on the same (prompt, seed): PSNR/SSIM, the task metric, density, time.
2. `run_length`: length extension as the radial paper does it: trained at N frames, generate 4N frames
   (Wan's 4k + 1 rule: (N - 1) * 4 + 1) dense, with radial, and with radial plus a length-extension LoRA
   (`train_length_lora`, the project's trainer in LoRA mode with radial attention).
3. `run_caches`: diffusers' FirstBlockCache and MagCache alone and with radial: transformer forwards skipped,
   time, task metric, PSNR/SSIM against dense.
4. `run_heads`: HeadHunter's head search (`accel.guidance.search.search_heads`) with the task metric as its
   scorer (`task_scorer`), then the task metric with and without guidance on the found heads.

Every number in the JSON comes from a generation made in the run; nothing is estimated. Each experiment
takes a loaded demo pipeline (`accel.demo.model.load_demo_pipeline`) and its `DemoModelConfig`;
``recipes/demo/experiments.py`` is the command line. Outputs go to ``outputs/bench`` unless told otherwise
(``benchmarks/results`` holds committed results only).

Videos are generated `RunSettings.batch` per pipeline call (`generate_videos`; the small demo model is
launch-bound on a GPU, so a batch costs about one video). Given an output folder, an experiment writes its report
after every variant (``"complete": false`` and the ``remaining`` variants until the last), so a killed run keeps
what finished; ``resume`` reuses the variants of a stored report made with the same settings, and the videos of
referenced variants are kept in ``<out>/demo_<experiment>_videos`` for the variants that compare with them.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import re
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.demo.config import DemoModelConfig
from accel.demo.evaluate import EVAL_PROMPTS, EVAL_SEED
from accel.demo.track import TrackConfig, track
from accel.lora.synthetic import clip_spec

DEFAULT_OUT = Path("outputs/bench")
EXPERIMENTS = ("fidelity", "length", "caches", "heads")
SEARCH_SEED = EVAL_SEED + 1  # captions of the head search: held out from training and from the evaluation prompts
SCHEDULE_SHARE = 0.25  # fraction of the denoising steps the schedule variants run dense


# ------------------------------------------------------------------------------------------------ settings


def _whole(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be a whole number >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RunSettings:
    """What every experiment shares.

    Attributes:
        pairs: (prompt, seed) pairs to evaluate (`prompt_pairs`): `seeds` seeds per prompt.
        seeds: seeds per prompt (0 .. seeds - 1).
        steps: denoising steps (None: the model's default generation, 20 for the demo).
        frames: frames to generate (None: the model's default; the length experiment sets its own).
        warmup: untimed chunks (of `batch` videos) per variant before the timed ones (first-call Triton compiles
            on a GPU).
        batch: videos per pipeline call (launch-bound small models run a batch for about the time of one video);
            variants with a cache run at 1 (a cache's skip decision is batch-wide).
        progress: show tqdm bars.
        track: thresholds of the task metric.
    """

    pairs: int = 32
    seeds: int = 2
    steps: int | None = None
    frames: int | None = None
    warmup: int = 0
    batch: int = 1
    progress: bool = True
    track: TrackConfig = field(default_factory=TrackConfig)

    def __post_init__(self) -> None:
        _whole("RunSettings", "pairs", self.pairs, 1)
        _whole("RunSettings", "seeds", self.seeds, 1)
        _whole("RunSettings", "warmup", self.warmup, 0)
        _whole("RunSettings", "batch", self.batch, 1)
        if self.steps is not None:
            _whole("RunSettings", "steps", self.steps, 1)
        if self.frames is not None:
            _whole("RunSettings", "frames", self.frames, 1)
        if not isinstance(self.track, TrackConfig):
            raise TypeError(f"RunSettings.track must be a TrackConfig, got {type(self.track).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (the report's ``settings``)."""
        return dataclasses.asdict(self)


def held_out_captions(count: int, seed: int = EVAL_SEED, *, exclude: Sequence[str] = ()) -> list[str]:
    """`count` distinct captions never trained on: `EVAL_PROMPTS` first (for the default seed; its repeated
    captions once), then further clips of synthetic dataset `seed`; captions in `exclude` are skipped."""
    skip = set(exclude)
    prompts = [p for p in dict.fromkeys(EVAL_PROMPTS) if p not in skip] if seed == EVAL_SEED else []
    i = len(EVAL_PROMPTS) - 1 if seed == EVAL_SEED else 0  # EVAL_PROMPTS already holds clips 0..14 of EVAL_SEED
    while len(prompts) < count:
        caption = clip_spec(seed, i).caption
        if caption not in prompts and caption not in skip:
            prompts.append(caption)
        i += 1
        if i > 100_000:
            raise ValueError(f"only {len(prompts)} distinct captions found, {count} asked for")
    return prompts[:count]


def prompt_pairs(pairs: int, seeds: int = 2, *, caption_seed: int = EVAL_SEED,
                 exclude: Sequence[str] = ()) -> list[tuple[str, int]]:
    """The first `pairs` (prompt, seed) pairs: each held-out caption with seeds 0 .. seeds - 1."""
    _whole("prompt_pairs", "pairs", pairs, 1)
    _whole("prompt_pairs", "seeds", seeds, 1)
    prompts = held_out_captions(-(-pairs // seeds), caption_seed, exclude=exclude)
    return [(p, s) for p in prompts for s in range(seeds)][:pairs]


def latent_grid(config: DemoModelConfig, frames: int, height: int | None = None,
                width: int | None = None) -> tuple[int, int, int]:
    """(frames, height, width) of the transformer's token grid for a generation of `frames` pixels frames."""
    h = config.generation.height if height is None else height
    w = config.generation.width if width is None else width
    pt, ph, pw = config.transformer.patch_size
    return (((frames - 1) // config.vae.temporal + 1) // pt, h // config.vae.spatial // ph,
            w // config.vae.spatial // pw)


def extended_frames(frames: int, factor: int = 4) -> int:
    """`factor` x the latent length of a `frames`-frame clip, in pixel frames (Wan's 4k + 1): 17 -> 65."""
    _whole("extended_frames", "frames", frames, 1)
    if (frames - 1) % 4:
        raise ValueError(f"frames must be 4k + 1 (Wan's temporal rule), got {frames}")
    return (frames - 1) * factor + 1


def call_kwargs(config: DemoModelConfig, settings: RunSettings, *, frames: int | None = None) -> dict[str, Any]:
    """`WanPipeline.__call__` keywords: the demo defaults with the run's steps and frames."""
    from accel.demo.model import call_defaults

    kwargs = call_defaults(config)
    if settings.steps is not None:
        kwargs["num_inference_steps"] = settings.steps
    if frames is not None:
        kwargs["num_frames"] = frames
    elif settings.frames is not None:
        kwargs["num_frames"] = settings.frames
    return kwargs


# ------------------------------------------------------------------------------------------------ one generation


@dataclass(frozen=True)
class Variant:
    """One row of an experiment's table.

    Attributes:
        label: the row's name.
        spec: method spec (`accel.methods.registry.parse_method_spec`; schedule keys allowed) or None (dense,
            unpatched).
        frames: pixel frames to generate (None: the run's).
        cache: "first_block", "mag" or None.
        reference: label of the variant PSNR/SSIM compare against (None: no comparison).
        guidance: an `accel.HeadPerturbation` or None.
        lora: folder or file of a LoRA to load for this variant.
    """

    label: str
    spec: str | None = None
    frames: int | None = None
    cache: str | None = None
    reference: str | None = None
    guidance: Any = None
    lora: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "spec": self.spec, "frames": self.frames, "cache": self.cache,
                               "reference": self.reference, "lora": None if self.lora is None else str(self.lora)}
        if self.guidance is not None:
            g = self.guidance
            out["guidance"] = {"heads": [list(h) for h in g.heads], "strength": g.strength, "scale": g.scale,
                               "target": g.target, "scope": g.scope}
        return out


@dataclass(frozen=True)
class Generation:
    """One generated video with what was measured while making it.

    Attributes:
        video: (F, H, W, 3) uint8.
        seconds: this video's share of its pipeline call: the call's wall seconds / `batch`.
        density, sparse_density: what the patch reported for the call (the same for every video of a batch).
        forwards, computed: transformer calls of the pipeline call and how many ran the last block; a batch
            makes one call per step and CFG branch for all its videos, so these are transformer calls per video.
        batch: videos made by the same pipeline call.
        call_seconds: wall seconds of the whole pipeline call.
    """

    video: np.ndarray
    seconds: float
    density: float | None
    sparse_density: float | None
    forwards: int
    computed: int
    batch: int = 1
    call_seconds: float | None = None


class _ForwardCounter:
    """Counts transformer forwards and how many of them ran the last block (a cache that skips does not).

    A forward pre-hook counting calls: a measurement only, nothing in diffusers is replaced.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.forwards = 0
        self.computed = 0
        last = transformer.blocks[-1].attn1
        self._hooks = [transformer.register_forward_pre_hook(self._forward),
                       last.register_forward_pre_hook(self._computed)]

    def _forward(self, module: Any, args: Any) -> None:
        self.forwards += 1

    def _computed(self, module: Any, args: Any) -> None:
        self.computed += 1

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _densities(stats: Any) -> tuple[float, float | None]:
    """(mean density over all calls, dense ones counting 1; mean over the sparse calls only or None)."""
    sparse = stats.sparse_calls
    total = float(sum(s.density_sum for s in stats.layers.values())) if sparse else 0.0
    return float(stats.mean_density()), (total / sparse if sparse else None)


def _negative_prompts(kwargs: dict[str, Any], count: int) -> dict[str, Any]:
    """`kwargs` with a list ``negative_prompt`` of `count` items where one was given as a list.

    WanPipeline repeats a string (or absent: "") negative prompt for every prompt of a list itself, but refuses
    a list whose length differs from the prompts'; a one-item list is repeated here.
    """
    negative = kwargs.get("negative_prompt")
    if not isinstance(negative, (list, tuple)) or len(negative) == count:
        return kwargs
    if len(negative) != 1:
        raise ValueError(f"negative_prompt has {len(negative)} items for a batch of {count} prompts")
    return {**kwargs, "negative_prompt": list(negative) * count}


def generate_videos(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], kwargs: dict[str, Any], *,
                    method: Any = None, schedule: Any = None, guidance: Any = None) -> list[Generation]:
    """One pipeline call making a video per (prompt, seed); patched with `method`/`guidance` for this call only.

    Each video's initial noise comes from its own ``torch.Generator().manual_seed(seed)`` (diffusers draws a
    list of generators sample by sample), so it equals the batch-1 video of that seed up to float rounding.
    Returns per video: the video, its share of the wall seconds (the pipeline returns numpy, so GPU work is
    finished), the density the patch reported and the transformer forwards made and computed
    (`_ForwardCounter`), the last two per call and so the same for every video of the batch.
    """
    from accel.pipelines.patching import patch, unpatch

    if not prompts or len(prompts) != len(seeds):
        raise ValueError(f"generate_videos needs one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds")
    count = len(prompts)
    # The patch takes one seed, the base of sampling methods' (pyramid) per-call seeds: the batch's first seed,
    # which is the video's own seed at batch 1. Later videos of a batch share the first one's sampled positions.
    handle = patch(pipe, method, schedule=schedule, guidance=guidance, seed=int(seeds[0])) \
        if method is not None or guidance is not None else None
    counter = _ForwardCounter(pipe.transformer)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            frames = pipe(prompt=list(prompts), generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                          output_type="np", **_negative_prompts(kwargs, count)).frames
        seconds = time.perf_counter() - t0
        density, sparse_density = _densities(handle.stats) if handle is not None else (None, None)
    finally:
        counter.remove()
        if handle is not None:
            unpatch(pipe)
    videos = (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)
    if len(videos) != count:
        raise RuntimeError(f"the pipeline returned {len(videos)} videos for {count} prompts")
    return [Generation(v, seconds / count, density, sparse_density, counter.forwards, counter.computed, count,
                       seconds) for v in videos]


def generate_video(pipe: Any, prompt: str, seed: int, kwargs: dict[str, Any], *, method: Any = None,
                   schedule: Any = None, guidance: Any = None) -> Generation:
    """(F, H, W, 3) uint8 video of `prompt`: `generate_videos` at batch 1."""
    return generate_videos(pipe, [prompt], [seed], kwargs, method=method, schedule=schedule, guidance=guidance)[0]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def score_row(gen: Generation, prompt: str, seed: int, reference: np.ndarray | None,
              track_config: TrackConfig) -> dict[str, Any]:
    """The JSON row of one generation: the tracker's verdict, PSNR/SSIM vs `reference`, time, density, forwards.

    ``seconds`` is the video's share of its pipeline call (``call_seconds`` / ``batch``).

    Identical videos have infinite PSNR: stored as null with ``identical: true`` (JSON has no infinity).
    """
    from accel.bench.metrics import psnr, ssim

    result = track(gen.video, prompt, track_config)
    row: dict[str, Any] = {
        "prompt": prompt, "seed": seed, "matches": result.matches, "colour_ok": result.colour_ok,
        "direction_ok": result.direction_ok, "speed_ok": result.speed_ok, "direction": result.direction,
        "speed_class": result.speed_class, "speed": result.speed, "task_score": task_score(result),
        "seconds": gen.seconds, "density": gen.density, "sparse_density": gen.sparse_density,
        "forwards": gen.forwards, "computed_forwards": gen.computed, "skipped_forwards": gen.forwards - gen.computed,
        "batch": gen.batch, "call_seconds": gen.call_seconds,
    }
    if reference is not None:
        if reference.shape != gen.video.shape:
            raise ValueError(f"reference video has shape {reference.shape}, the variant's {gen.video.shape}")
        p = psnr(gen.video, reference)
        row.update(psnr=_finite(p), identical=not math.isfinite(p), ssim=float(ssim(gen.video, reference)))
    return row


def task_score(result: Any) -> float:
    """Fraction of the caption's checks (colour, direction, speed) a `TrackResult` passes: 1.0 is a match."""
    return (int(result.colour_ok) + int(result.direction_ok) + int(result.speed_ok)) / 3.0


def task_scorer(images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
    """Head-search scorer (``accel.demo.experiments:task_scorer``): `task_score` of each video for its prompt.

    Graded (0, 1/3, 2/3, 1) rather than the 0/1 match so that a candidate head that fixes one attribute ranks
    above one that fixes none; `accel.guidance.scorers.CallableScorer` passes float videos in [0, 1].
    """
    if len(images) != len(prompts):
        raise ValueError(f"task_scorer needs one prompt per video, got {len(images)} videos and {len(prompts)}")
    return [task_score(track(np.asarray(v), p)) for v, p in zip(images, prompts, strict=True)]


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates of the task metric, PSNR/SSIM (mean and median of finite values), density, time and skips."""
    if not rows:
        raise ValueError("summarize_rows needs at least one row")
    n = len(rows)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    def median(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.median(vals)) if vals else None

    out = {"count": n, "match_rate": sum(r["matches"] for r in rows) / n,
           "colour_rate": sum(r["colour_ok"] for r in rows) / n,
           "direction_rate": sum(r["direction_ok"] for r in rows) / n,
           "speed_rate": sum(r["speed_ok"] for r in rows) / n, "mean_task_score": mean("task_score"),
           "mean_seconds": mean("seconds"), "median_seconds": median("seconds"), "mean_density": mean("density"),
           "mean_sparse_density": mean("sparse_density"), "mean_forwards": mean("forwards"),
           "mean_skipped_forwards": mean("skipped_forwards")}
    if any("ssim" in r for r in rows):
        out.update(mean_psnr=mean("psnr"), median_psnr=median("psnr"), mean_ssim=mean("ssim"),
                   median_ssim=median("ssim"), identical=sum(bool(r.get("identical")) for r in rows))
    return out


# ------------------------------------------------------------------------------------------------ running variants


def _method(spec: str | None) -> tuple[Any, Any]:
    if spec is None:
        return None, None
    from accel.methods.registry import parse_method_spec

    parsed = parse_method_spec(spec)
    return parsed.method, parsed.schedule_over()


@contextlib.contextmanager
def _cache(pipe: Any, kind: str | None, cache_config: Any) -> Any:
    if kind is None:
        yield
        return
    pipe.transformer.enable_cache(cache_config)
    try:
        yield
    finally:
        pipe.transformer.disable_cache()


@contextlib.contextmanager
def _lora(pipe: Any, path: Path | None) -> Any:
    if path is None:
        yield
        return
    from accel.pipelines.generate import load_lora

    load_lora(pipe, str(path), 1.0)
    try:
        yield
    finally:
        pipe.unload_lora_weights()


def _safe_label(label: str) -> str:
    """A file name for a variant label: its letters, digits and ``._=-`` plus a short hash (names stay distinct)."""
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_")[:80] or "variant"
    return f"{stem}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"


def videos_path(folder: str | Path, label: str) -> Path:
    """Where a referenced variant's videos are kept: ``<folder>/<safe label>.npz``."""
    return Path(folder) / f"{_safe_label(label)}.npz"


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), for comparing stored and current settings."""
    return json.loads(json.dumps(value))


def _settings_key(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings that decide the numbers: all but ``progress`` (bars only)."""
    return _plain({k: v for k, v in settings.items() if k != "progress"})


def _video_key(variant: Variant, pairs: Sequence[tuple[str, int]], settings: RunSettings) -> str:
    return json.dumps({"variant": variant.to_dict(), "pairs": [list(p) for p in pairs],
                       "settings": _settings_key(settings.to_dict())}, sort_keys=True)


def save_videos(path: str | Path, videos: Sequence[np.ndarray], key: str) -> Path:
    """``np.savez_compressed`` of the uint8 videos (``pair_0000``, ...) and `key`, what they were made with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez_compressed(f, __key__=np.array(key), **{f"pair_{i:04d}": v for i, v in enumerate(videos)})
    tmp.replace(path)
    return path


def load_videos(path: str | Path, count: int, key: str) -> list[np.ndarray] | None:
    """The `count` videos `save_videos` wrote with the same `key`; None when missing, unreadable or made otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["__key__"]) != key:
                return None
            return [data[f"pair_{i:04d}"] for i in range(count)]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _run_variant(pipe: Any, config: DemoModelConfig, settings: RunSettings, variant: Variant,
                 pairs: Sequence[tuple[str, int]], reference: Sequence[np.ndarray] | None, cache_config: Any,
                 bar: Any, keep: bool) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Rows of one variant over `pairs` (and its videos when `keep`), `settings.batch` pairs per pipeline call."""
    method, schedule = _method(variant.spec)
    kwargs = call_kwargs(config, settings, frames=variant.frames)
    size = 1 if variant.cache is not None else settings.batch  # a cache's skip decision is batch-wide
    chunks = [list(pairs[i:i + size]) for i in range(0, len(pairs), size)]

    def generate(chunk: list[tuple[str, int]]) -> list[Generation]:
        with _cache(pipe, variant.cache, cache_config):  # fresh cache state per call
            return generate_videos(pipe, [p for p, _ in chunk], [s for _, s in chunk], kwargs, method=method,
                                   schedule=schedule, guidance=variant.guidance)

    rows: list[dict[str, Any]] = []
    videos: list[np.ndarray] = []
    with _lora(pipe, variant.lora):
        for _ in range(settings.warmup):
            generate(chunks[0])
            bar.update(len(chunks[0]))
        for chunk in chunks:
            for (prompt, seed), gen in zip(chunk, generate(chunk), strict=True):
                ref = reference[len(rows)] if reference is not None else None
                rows.append(score_row(gen, prompt, seed, ref, settings.track))
                if keep:
                    videos.append(gen.video)
            bar.update(len(chunk))
    return rows, videos


def run_variants(pipe: Any, config: DemoModelConfig, settings: RunSettings, variants: Sequence[Variant],
                 pairs: Sequence[tuple[str, int]], *, cache_configs: dict[str, Any] | None = None,
                 desc: str = "variants", reuse: Mapping[str, list[dict[str, Any]]] | None = None,
                 videos: str | Path | None = None,
                 on_variant: Callable[[str, dict[str, list[dict[str, Any]]], bool], None] | None = None
                 ) -> dict[str, list[dict[str, Any]]]:
    """Generate every (variant, pair) and score it, `settings.batch` pairs per pipeline call; rows by label.

    Variants run in order, so a variant's `reference` must come before it; its videos are kept in memory only
    while needed (one per pair of each referenced variant) and, with `videos` (a folder), saved there
    (`videos_path`). Rows in `reuse` (by label, from an earlier run) are taken instead of generating; a reused
    reference whose videos a variant that runs needs is loaded from `videos`, or run again when they are missing.
    `on_variant(label, rows so far, reused)` is called after each variant (the incremental report).
    """
    from tqdm import tqdm

    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels must be unique, got {labels}")
    referenced = {v.reference for v in variants if v.reference is not None}
    for v in variants:
        if v.reference is not None and v.reference not in labels[:labels.index(v.label)]:
            raise ValueError(f"variant {v.label!r} compares against {v.reference!r}, which does not run before it")
    for v in variants:
        if v.cache is not None and (cache_configs or {}).get(v.cache) is None:
            raise ValueError(f"variant {v.label!r} needs a {v.cache!r} cache config")
    reused = {label: list(r) for label, r in (reuse or {}).items() if label in labels}
    keys = {v.label: _video_key(v, pairs, settings) for v in variants if v.label in referenced}
    kept: dict[str, list[np.ndarray]] = {}
    pending = True
    while pending:  # a reused reference that a variant to run needs: its saved videos, else it runs again
        pending = False
        for v in variants:
            if v.label in reused and v.label not in kept and any(w.reference == v.label and w.label not in reused
                                                                 for w in variants):
                loaded = load_videos(videos_path(videos, v.label), len(pairs), keys[v.label]) \
                    if videos is not None else None
                if loaded is None:
                    del reused[v.label]
                    pending = True
                else:
                    kept[v.label] = loaded
    todo = [v for v in variants if v.label not in reused]
    total = sum(len(pairs) + settings.warmup * min(1 if v.cache else settings.batch, len(pairs)) for v in todo)
    rows: dict[str, list[dict[str, Any]]] = {}
    with tqdm(total=total, desc=desc, disable=not settings.progress) as bar:
        for index, variant in enumerate(variants):
            was_reused = variant.label in reused
            if was_reused:
                rows[variant.label] = reused[variant.label]
            else:
                bar.set_postfix_str(variant.label)
                cache_config = (cache_configs or {}).get(variant.cache) if variant.cache else None
                ref = kept[variant.reference] if variant.reference is not None else None
                keep = variant.label in referenced
                rows[variant.label], made = _run_variant(pipe, config, settings, variant, pairs, ref, cache_config,
                                                         bar, keep)
                if keep:
                    kept[variant.label] = made
                    if videos is not None:
                        save_videos(videos_path(videos, variant.label), made, keys[variant.label])
            later = variants[index + 1:]
            for label in list(kept):  # free reference videos no later variant to run needs
                if not any(v.reference == label and v.label not in reused for v in later):
                    del kept[label]
            if on_variant is not None:
                on_variant(variant.label, rows, was_reused)
    return rows


# ------------------------------------------------------------------------------------------------ reports


def environment(device: str) -> dict[str, Any]:
    """Versions, git commit and the device of this run (`accel.bench.environment` plus the device)."""
    from accel.bench import environment as bench_environment

    info = bench_environment()
    info["device"] = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device
    return info


def weights_info(weights: str | Path | None) -> dict[str, Any]:
    """The weights folder, model name, total bytes, transformer sha256 and training end time from its manifest."""
    from accel.demo.model import DEFAULT_WEIGHTS, read_manifest

    root = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    manifest = read_manifest(root)
    training = manifest.get("training") or {}
    return {"path": str(root), "model": manifest["model"].get("name"), "total_bytes": manifest.get("total_bytes"),
            "transformer_sha256": manifest["files"].get("transformer.safetensors", {}).get("sha256"),
            "finished": training.get("finished"), "stage2_steps": (training.get("stage2") or {}).get("step")}


def _fmt(value: Any, kind: str = "f2") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.0%}"
    if kind == "f3":
        return f"{value:.3f}"
    if kind == "f1":
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _table(report: dict[str, Any], columns: Sequence[tuple[str, str, str]]) -> str:
    rows = []
    for v in report["variants"]:
        s = v["summary"]
        rows.append([v["label"], *(_fmt(s.get(key), kind) for _, key, kind in columns)])
    return markdown_table(["variant", *(h for h, _, _ in columns)], rows)


TABLE_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "fidelity": (("density", "mean_density", "f3"), ("PSNR mean", "mean_psnr", "f2"),
                 ("PSNR median", "median_psnr", "f2"), ("SSIM mean", "mean_ssim", "f3"),
                 ("SSIM median", "median_ssim", "f3"), ("match", "match_rate", "pct"),
                 ("colour", "colour_rate", "pct"), ("direction", "direction_rate", "pct"),
                 ("speed", "speed_rate", "pct"), ("s / video", "median_seconds", "f2")),
    "length": (("density", "mean_density", "f3"), ("match", "match_rate", "pct"), ("colour", "colour_rate", "pct"),
               ("direction", "direction_rate", "pct"), ("speed", "speed_rate", "pct"),
               ("PSNR vs dense 4N", "mean_psnr", "f2"), ("s / video", "median_seconds", "f2")),
    "caches": (("forwards", "mean_forwards", "f1"), ("skipped", "mean_skipped_forwards", "f1"),
               ("density", "mean_density", "f3"), ("s / video", "median_seconds", "f2"),
               ("match", "match_rate", "pct"), ("PSNR", "mean_psnr", "f2"), ("SSIM", "mean_ssim", "f3")),
    "heads": (("match", "match_rate", "pct"), ("task score", "mean_task_score", "f3"),
              ("colour", "colour_rate", "pct"), ("direction", "direction_rate", "pct"),
              ("speed", "speed_rate", "pct"), ("PSNR vs CFG", "mean_psnr", "f2"),
              ("s / video", "median_seconds", "f2")),
}


def _report_head(experiment: str, settings: RunSettings, config: DemoModelConfig, device: str,
                 weights: str | Path | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Everything of a report but its variants: settings, model, versions, weights and the experiment's extra."""
    env = environment(device)
    return {"experiment": experiment, "settings": settings.to_dict(), "model": config.to_dict(), "environment": env,
            "git_commit": env.get("git_commit"), "weights": weights_info(weights), "finished": None, **extra}


def _assemble(head: dict[str, Any], variants: Sequence[Variant], rows: dict[str, list[dict[str, Any]]],
              resumed: Sequence[str] = ()) -> dict[str, Any]:
    """The report of the variants in `rows`: ``complete`` when every variant ran, ``remaining`` those still to run."""
    report: dict[str, Any] = {**head, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "complete": all(v.label in rows for v in variants),
                              "remaining": [v.label for v in variants if v.label not in rows],
                              "resumed": list(resumed), "variants": []}
    for v in variants:
        if v.label in rows:
            report["variants"].append({**v.to_dict(), "summary": summarize_rows(rows[v.label]),
                                       "rows": rows[v.label]})
    report["table"] = _table(report, TABLE_COLUMNS[head["experiment"]])
    return report


def report_path(out: str | Path, experiment: str) -> Path:
    """``<out>/demo_<experiment>.json``, where both the incremental and the final report go."""
    return Path(out) / f"demo_{experiment}.json"


def _write_json(report: dict[str, Any], path: Path) -> Path:
    """Write `report` atomically (a temporary file renamed), so a kill never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def write_report(report: dict[str, Any], out: str | Path, plot: Callable[[dict[str, Any], Path], Path]) -> Path:
    """``<out>/demo_<experiment>.json`` and the figure ``demo_<experiment>.png``; returns the JSON path."""
    path = _write_json(report, report_path(out, report["experiment"]))
    plot(report, Path(out) / f"demo_{report['experiment']}.png")
    return path


_RESUME_CHECKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "settings": lambda r: _settings_key(r.get("settings") or {}),
    "model": lambda r: r.get("model"),
    "weights": lambda r: (r.get("weights") or {}).get("transformer_sha256"),
    "device": lambda r: (r.get("environment") or {}).get("device"),
    "pairs": lambda r: r.get("pairs"),
    "call": lambda r: r.get("call"),
    "cache_settings": lambda r: r.get("cache_settings"),
    "lora": lambda r: r.get("lora"),
}


def resume_mismatch(stored: dict[str, Any], head: dict[str, Any]) -> str | None:
    """Why a stored report's rows cannot stand for this run (None: they can): what differs, by field."""
    if stored.get("experiment") != head["experiment"]:
        return f"it is the {stored.get('experiment')!r} experiment"
    differ = [name for name, get in _RESUME_CHECKS.items() if _plain(get(stored)) != _plain(get(head))]
    return f"its {', '.join(differ)} differ" if differ else None


def stored_report(out: str | Path, head: dict[str, Any], echo: Callable[[str], None] = print
                  ) -> dict[str, Any] | None:
    """The report at `report_path` if it was made with the same settings, model, weights, device and pairs."""
    path = report_path(out, head["experiment"])
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        echo(f"resume: {path} is unreadable ({err}); starting over")
        return None
    reason = resume_mismatch(stored, head)
    if reason is not None:
        echo(f"resume: not reusing {path}: {reason}")
        return None
    return stored


def resumable_rows(stored: dict[str, Any] | None, variants: Sequence[Variant], pairs: int
                   ) -> dict[str, list[dict[str, Any]]]:
    """Rows of the stored variants defined exactly as now (spec, frames, cache, reference, guidance, LoRA)."""
    if stored is None:
        return {}
    by_label = {v.get("label"): v for v in stored.get("variants", [])}
    out: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        old = by_label.get(v.label)
        if old is None or len(old.get("rows") or []) != pairs:
            continue
        if _plain({k: x for k, x in old.items() if k not in ("summary", "rows")}) == _plain(v.to_dict()):
            out[v.label] = old["rows"]
    return out


def _batch_notes(settings: RunSettings, variants: Sequence[Variant]) -> list[str]:
    """Report notes on what batching means for the rows (time share, forwards, seeds, caches)."""
    notes = [f"batch: {settings.batch} videos per pipeline call; a row's seconds is its share of the call "
             "(call_seconds / batch); forwards count transformer calls, one per step and CFG branch for the whole "
             "batch, so they are transformer calls per video."]
    if settings.batch > 1 and any(v.spec is not None and v.spec.partition(":")[0] == "pyramid" for v in variants):
        notes.append("pyramid's sampled positions are seeded once per pipeline call: by the batch's first seed.")
    if any(v.cache is not None for v in variants):
        notes.append("cache variants (FirstBlockCache, MagCache) run at batch 1 whatever the batch setting: a cache's "
                     "skip decision is batch-wide.")
    return notes


def _run_experiment(pipe: Any, config: DemoModelConfig, settings: RunSettings, variants: Sequence[Variant],
                    pairs: Sequence[tuple[str, int]], head: dict[str, Any], *, out: str | Path | None,
                    resume: bool, cache_configs: dict[str, Any] | None = None,
                    stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """`run_variants` with the report written to ``<out>/demo_<experiment>.json`` after each variant.

    With `resume`, variants of a `stored_report` (read here unless given) are reused (`resumable_rows`);
    referenced variants' videos go to ``<out>/demo_<experiment>_videos``. `out` None: no files, no resume.
    """
    from tqdm import tqdm

    experiment = head["experiment"]
    head = {**head, "notes": [*head.get("notes", []), *_batch_notes(settings, variants)]}
    if out is None:
        if resume:
            raise ValueError("resume needs the output folder (out) of the earlier run")
        return _assemble(head, variants, run_variants(pipe, config, settings, variants, pairs,
                                                      cache_configs=cache_configs, desc=experiment))
    path = report_path(out, experiment)
    reuse: dict[str, list[dict[str, Any]]] = {}
    if resume:
        reuse = resumable_rows(stored if stored is not None else stored_report(out, head, tqdm.write), variants,
                               len(pairs))
        tqdm.write(f"resume: reusing {len(reuse)} of {len(variants)} variants of {path}"
                   + (f" ({', '.join(reuse)})" if reuse else ""))
    resumed: list[str] = []

    def checkpoint(label: str, rows: dict[str, list[dict[str, Any]]], was_reused: bool) -> None:
        if was_reused:
            resumed.append(label)
        report = _assemble(head, variants, rows, resumed)
        _write_json(report, path)
        if not was_reused and not report["complete"]:  # the caller prints the complete one
            tqdm.write(f"{experiment}: {len(rows)} of {len(variants)} variants done ({path})\n{report['table']}")

    rows = run_variants(pipe, config, settings, variants, pairs, cache_configs=cache_configs, desc=experiment,
                        reuse=reuse, videos=Path(out) / f"demo_{experiment}_videos", on_variant=checkpoint)
    return _assemble(head, variants, rows, resumed)


def _figure(ncols: int, width: float = 5.0, rows: int = 6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, max(3.5, 1.0 + 0.28 * rows)))
    return fig, np.atleast_1d(axes)


def _bars(ax: Any, report: dict[str, Any], key: str, title: str, xlabel: str, percent: bool = False) -> None:
    """Horizontal bars of one summary value per variant (long spec labels fit on the y axis)."""
    labels = [v["label"] for v in report["variants"]]
    values = [v["summary"].get(key) or 0.0 for v in report["variants"]]
    ax.barh(range(len(labels)), [x * 100 if percent else x for x in values], color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(title=title, xlabel=xlabel)
    if percent:
        ax.set_xlim(0, 100)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from accel.bench.plotting import save_figure

    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ 1. fidelity


def _block(tokens: int, preferred: int) -> int:
    """`preferred` block size, or a smaller one when the grid has fewer than 4 such blocks (toy models)."""
    block = preferred
    while block > 16 and tokens < 4 * block:
        block //= 2
    return block


def _window(kernel: tuple[int, int, int], grid: tuple[int, int, int]) -> str:
    return "x".join(str(max(2, min(k, g))) for k, g in zip(kernel, grid, strict=True))


def fidelity_specs(grid: tuple[int, int, int], methods: Sequence[str] = ("radial", "pyramid", "neighborhood")
                   ) -> dict[str, list[str]]:
    """Per method: its default spec and two other densities for a token grid (frames, height, width).

    For the demo's 5 x 16 x 16 grid (1,280 tokens, 256 per latent frame), measured plan densities on CPU:

    - radial: the default (decay 1.0, the device's block: 64 on CPU -> 0.945; 128 on GPUs, where two blocks per
      frame leave nothing to drop at 5 latent frames -> 1.0), then block 16 with decay 0.5 (0.807) and 0.2
      (0.705). Five latent frames cap radial's sparsity: adjacent frames and the sink frame are always dense.
    - pyramid: the default thresholds (0.5/0.6/0.7/0.8) at block 64 (density chosen per call), and top-k rank
      quotas 0.25/0.4/0.55/0.75 (about 0.39) and 0.1/0.2/0.3/0.5 (about 0.2).
    - binary (only when asked for): pyramid's rank rule with one quota for every level, so each block pair is
      level 1 or skipped: block top-k at 0.2, 0.35 and 0.5 of the blocks, to set against pyramid's multi-level
      quotas at about the same FLOP density.
    - neighborhood: the default window 3x3x3 (0.113 with CPU tiles of 16), 3x7x7 (0.234) and 3x11x11 (0.459);
      reported density counts the tiles the kernel computes, so it is higher on GPU tiles of 128.

    Windows and blocks shrink to fit toy grids (the tests' micro model; specs that become equal are kept once);
    the JSON records the specs used.
    """
    tokens = grid[0] * grid[1] * grid[2]
    pyr = _block(tokens, 64)  # the demo's results were measured at block 64 (the default is 128): pinned
    pyr_block = f",block_size={pyr}"
    table = {
        "radial": ["radial", "radial:decay=0.5,block_size=16", "radial:decay=0.2,block_size=16"],
        "pyramid": [f"pyramid:block_size={pyr}",
                    f"pyramid:mode=topk,t1=0.25,t2=0.4,t3=0.55,t4=0.75{pyr_block}",
                    f"pyramid:mode=topk,t1=0.1,t2=0.2,t3=0.3,t4=0.5{pyr_block}"],
        # pyramid's rank rule with one quota for all levels: binary block top-k (level 1 or skipped), the
        # baseline of the reference's claim that multi-level beats binary at equal compute (not in the default)
        "binary": [f"pyramid:mode=topk,t1={t},t2={t},t3={t},t4={t}{pyr_block}" for t in (0.2, 0.35, 0.5)],
        "neighborhood": [f"neighborhood:kernel_size={_window((3, 3, 3), grid)}",
                         f"neighborhood:kernel_size={_window((3, 7, 7), grid)}",
                         f"neighborhood:kernel_size={_window((3, 11, 11), grid)}"],
    }
    unknown = sorted(set(methods) - set(table))
    if unknown:
        raise ValueError(f"fidelity methods must be among {', '.join(table)}, got {', '.join(unknown)}")
    if any(g < 2 for g in grid):
        raise ValueError(f"fidelity needs a token grid of at least 2 on every axis, got {grid}")
    return {m: list(dict.fromkeys(table[m])) for m in methods}  # a toy grid can clamp two windows to one


def _method_label(spec: str) -> str:
    """The plot's name of a fidelity spec: its method, or "binary top-k" for pyramid rank quotas all equal."""
    from accel.methods.registry import parse_method_spec

    name = spec.partition(":")[0]
    if name == "pyramid":
        method = parse_method_spec(spec).method
        if method.mode == "topk" and len(set(method.thresholds)) == 1:
            return "binary top-k"
    return name


def _with_schedule(spec: str, dense_steps: int) -> str:
    return spec + ("," if ":" in spec else ":") + f"dense_steps={dense_steps}"


def fidelity_variants(config: DemoModelConfig, settings: RunSettings,
                      methods: Sequence[str] = ("radial", "pyramid", "neighborhood")) -> list[Variant]:
    """Dense, then per method its three specs (`fidelity_specs`) alone and with ``dense_steps`` = 25% of steps."""
    kwargs = call_kwargs(config, settings)
    grid = latent_grid(config, kwargs["num_frames"], kwargs["height"], kwargs["width"])
    dense_steps = max(1, round(SCHEDULE_SHARE * kwargs["num_inference_steps"]))
    variants = [Variant("dense")]
    for specs in fidelity_specs(grid, methods).values():
        for spec in specs:
            variants.append(Variant(spec, spec, reference="dense"))
        for spec in specs:
            scheduled = _with_schedule(spec, dense_steps)
            variants.append(Variant(scheduled, scheduled, reference="dense"))
    return variants


def run_fidelity(pipe: Any, config: DemoModelConfig, settings: RunSettings = RunSettings(), *,
                 methods: Sequence[str] = ("radial", "pyramid", "neighborhood"), device: str = "cpu",
                 weights: str | Path | None = None, out: str | Path | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """Experiment 1: every method's specs with and without schedule against dense over `settings.pairs` pairs.

    With `out`, the report so far is written there after each variant (`_run_experiment`); `resume` reuses it.
    """
    variants = fidelity_variants(config, settings, methods)
    pairs = prompt_pairs(settings.pairs, settings.seeds)
    kwargs = call_kwargs(config, settings)
    extra = {"call": kwargs, "grid": list(latent_grid(config, kwargs["num_frames"], kwargs["height"],
                                                      kwargs["width"])),
             "pairs": [list(p) for p in pairs],
             "notes": ["PSNR/SSIM compare each variant's video with the dense video of the same prompt and seed.",
                       "density: the patch's mean over all self-attention calls, dense calls (schedule) counting 1; "
                       "sparse_density: over the sparse calls only.",
                       f"schedule variants run the first {SCHEDULE_SHARE:.0%} of the steps dense (dense_steps)."]}
    head = _report_head("fidelity", settings, config, device, weights, extra)
    return _run_experiment(pipe, config, settings, variants, pairs, head, out=out, resume=resume)


def plot_fidelity(report: dict[str, Any], path: Path) -> Path:
    """PSNR vs density per variant (one colour per method, hollow = with schedule) and match rates."""
    fig, (a, b) = _figure(2, 6.5, len(report["variants"]))
    colours = {"radial": "tab:blue", "pyramid": "tab:orange", "binary top-k": "tab:red", "neighborhood": "tab:green"}
    for v in report["variants"][1:]:
        s = v["summary"]
        name = _method_label(v["spec"])
        scheduled = "dense_steps=" in v["spec"]
        if s.get("mean_density") is None or s.get("mean_psnr") is None:
            continue
        a.scatter(s["mean_density"], s["mean_psnr"], color=colours.get(name, "grey"),
                  facecolors="none" if scheduled else colours.get(name, "grey"), s=40,
                  label=f"{name}{' + schedule' if scheduled else ''}")
    handles, labels = a.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    a.legend(unique.values(), unique.keys(), fontsize=7)
    a.set(title="fidelity vs dense", xlabel="mean attention density", ylabel="mean PSNR vs dense (dB)")
    _bars(b, report, "match_rate", "task metric: caption match", "match rate (%)", percent=True)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ 2. length


def length_radial_spec(config: DemoModelConfig, steps: int, frames: int) -> str:
    """Radial at 4N frames: the ``wan2.1-4x`` preset's decay 0.2 with dense warm-up and dense first layers.

    The preset runs 2 of 50 steps and 2 of 40 layers dense with block 128; here block 64 (4 blocks per latent
    frame of 256 tokens; 128 would leave 2), dense_steps = 10% of the steps and a third of the layers dense
    (2 of 6 for the demo).
    """
    grid = latent_grid(config, frames)
    block = _block(grid[0] * grid[1] * grid[2], 64)
    spec = f"radial:decay=0.2,block_size={block},dense_steps={max(1, steps // 10)}"
    layers = config.transformer.num_layers // 3
    return spec + (f",dense_layers={layers}" if layers else "")


def length_variants(config: DemoModelConfig, settings: RunSettings, *, radial: str | None = None,
                    lora: str | Path | None = None) -> tuple[list[Variant], list[str]]:
    """dense@N, dense@4N, radial@4N and (with a LoRA) radial@4N + LoRA; the notes say what was left out."""
    n = config.frames
    long = extended_frames(n)
    steps = call_kwargs(config, settings)["num_inference_steps"]
    spec = radial or length_radial_spec(config, steps, long)
    variants = [Variant(f"dense@{n}", None, frames=n), Variant(f"dense@{long}", None, frames=long),
                Variant(f"radial@{long}", spec, frames=long, reference=f"dense@{long}")]
    notes = [f"N = {n} (the model's training frames), 4N = {long} ((N - 1) * 4 + 1 frames, Wan's 4k + 1 rule).",
             f"radial spec: {spec}.", f"PSNR/SSIM of the radial rows compare with dense@{long} (same prompt, seed)."]
    if lora is None:
        notes.append(f"radial@{long} + LoRA skipped: no --lora given (train one with "
                     "`python recipes/demo/experiments.py length --train-lora --run-train`).")
    else:
        path = Path(lora)
        if not path.exists():
            raise FileNotFoundError(f"--lora {path} does not exist")
        variants.append(Variant(f"radial@{long}+lora", spec, frames=long, reference=f"dense@{long}", lora=path))
    return variants, notes


def run_length(pipe: Any, config: DemoModelConfig, settings: RunSettings = RunSettings(), *,
               radial: str | None = None, lora: str | Path | None = None, device: str = "cpu",
               weights: str | Path | None = None, out: str | Path | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Experiment 2: length extension to 4N frames: task metric and time per variant (`out`, `resume`: as fidelity)."""
    variants, notes = length_variants(config, settings, radial=radial, lora=lora)
    pairs = prompt_pairs(settings.pairs, settings.seeds)
    extra: dict[str, Any] = {"pairs": [list(p) for p in pairs], "notes": notes,
                             "call": call_kwargs(config, settings)}
    if lora is not None:
        from accel.pipelines.lora_files import read_metadata

        extra["lora"] = {"path": str(lora), "metadata": read_metadata(lora)}
    head = _report_head("length", settings, config, device, weights, extra)
    return _run_experiment(pipe, config, settings, variants, pairs, head, out=out, resume=resume)


def plot_length(report: dict[str, Any], path: Path) -> Path:
    fig, (a, b) = _figure(2, 5.0, len(report["variants"]))
    _bars(a, report, "match_rate", "task metric: caption match", "match rate (%)", percent=True)
    _bars(b, report, "median_seconds", "time per video", "seconds (median)")
    return _save(fig, path)


@dataclass(frozen=True)
class LengthLoRAConfig:
    """The length-extension LoRA: radial attention, LoRA on self-attention, synthetic clips of 4N frames.

    Attributes:
        clips: training clips (plus `null_fraction` of copies captioned ``<null>``, as the base model's recipe).
        data_seed: `accel.demo.recipe.DataConfig.seed` of the clips (the base model used 0).
        steps, batch_size, lr, warmup, rank, alpha: trainer settings.
        attention: method spec trained with (None: `length_radial_spec`, what the experiment generates with).
        frames: clip frames (None: 4N).
        mixed_precision: on CUDA ("no" on CPU).
    """

    clips: int = 256
    data_seed: int = 1
    null_fraction: float = 0.1
    steps: int = 600
    batch_size: int = 8
    lr: float = 2e-4
    warmup: int = 20
    rank: int = 16
    alpha: float = 16.0
    attention: str | None = None
    frames: int | None = None
    mixed_precision: str = "bf16"
    save_every: int = 100

    def __post_init__(self) -> None:
        for name, low in (("clips", 1), ("data_seed", 0), ("steps", 1), ("batch_size", 1), ("warmup", 0),
                          ("rank", 1), ("save_every", 0)):
            _whole("LengthLoRAConfig", name, getattr(self, name), low)
        if self.frames is not None:
            _whole("LengthLoRAConfig", "frames", self.frames, 5)
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LengthLoRAConfig.{name} must be a number > 0, got {value!r}")


def train_length_lora(weights: str | Path | None, run: str | Path, config: LengthLoRAConfig = LengthLoRAConfig(),
                      *, device: str = "cpu", progress: bool = True) -> Path:
    """Train the length-extension LoRA on the demo model; returns the LoRA folder (``<run>/lora``).

    `accel train-lora --model` loads tiny-* names, diffusers folders and Hub ids; the demo model is a manifest
    folder that only `load_demo_pipeline` reads, so this calls the same trainer (`accel.lora.train.train`) with
    the loaded pipeline. Clips come from `accel.demo.recipe.make_training_data` at 4N frames (npz); the run
    resumes from its checkpoints when repeated.
    """
    from accel.demo.model import load_demo_pipeline
    from accel.demo.recipe import DataConfig, make_training_data
    from accel.lora.dataset import Bucket
    from accel.lora.train import TrainConfig, train

    run = Path(run)
    pipe = load_demo_pipeline(weights, device="cpu", dtype=torch.float32)  # the trainer moves it and autocasts
    model = demo_config(weights)
    frames = config.frames or extended_frames(model.frames)
    long_model = dataclasses.replace(model, frames=frames)
    make_training_data(run / "data", long_model, DataConfig(count=config.clips, seed=config.data_seed,
                                                            null_fraction=config.null_fraction,
                                                            shards=min(16, config.clips)), progress=progress)
    steps = model.generation.num_inference_steps
    attention = config.attention or length_radial_spec(model, steps, frames)
    attention = ",".join(p for p in attention.split(",") if not p.startswith("dense_steps="))  # training: no steps
    cfg = TrainConfig(
        model=model.name, data=run / "data", out=run, cache_dir=run / "cache", mode="lora", rank=config.rank,
        alpha=config.alpha, attention=attention, buckets=(Bucket(frames, model.height, model.width),),
        on_bad_data="error", steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        warmup=config.warmup, mixed_precision=config.mixed_precision if device == "cuda" else "no",
        gradient_checkpointing=False, shift=float(model.shift), max_sequence_length=model.text.max_sequence_length,
        save_every=config.save_every, keep=2, validate_every=0, log_every=10, resume=True, device=device,
        progress=progress)
    result = train(cfg, pipe=pipe)
    if result.interrupted or result.output is None:
        raise KeyboardInterrupt(f"LoRA training stopped at step {result.step} (checkpoint saved); rerun to resume")
    return Path(result.output)


def demo_config(weights: str | Path | None) -> DemoModelConfig:
    """The model config stored in a weights folder's manifest (default: the committed weights)."""
    from accel.demo.model import read_manifest

    return DemoModelConfig.from_dict(read_manifest(weights)["model"])


def train_lora_commands(weights: str | Path | None, run: str | Path, device: str, config: LengthLoRAConfig
                        ) -> list[str]:
    """The shell commands that train the length LoRA and run the length experiment with it."""
    w = "" if weights is None else f" --weights {weights}"
    base = f"python recipes/demo/experiments.py length{w} --device {device}"
    train_flags = (f" --lora-run {run} --lora-steps {config.steps} --lora-clips {config.clips} "
                   f"--lora-batch {config.batch_size}")
    return [f"{base} --train-lora --run-train{train_flags}", f"{base} --lora {Path(run) / 'lora'}"]


# ------------------------------------------------------------------------------------------------ 3. caches


@dataclass(frozen=True)
class CacheSettings:
    """Thresholds of the two diffusers caches (diffusers' defaults)."""

    first_block_threshold: float = 0.05
    mag_threshold: float = 0.06
    mag_max_skip_steps: int = 3
    mag_retention_ratio: float = 0.2

    def __post_init__(self) -> None:
        for name in ("first_block_threshold", "mag_threshold", "mag_retention_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"CacheSettings.{name} must be a number >= 0, got {value!r}")
        _whole("CacheSettings", "mag_max_skip_steps", self.mag_max_skip_steps, 1)


def calibrate_mag_cache(pipe: Any, prompt: str, seed: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """MagCache's magnitude ratios of this model, diffusers' documented way: one dense run with ``calibrate=True``.

    diffusers prints the ratios of each cache context at the end of the run (WanPipeline's CFG has two:
    ``cond`` then ``uncond``); the returned ``mag_ratios`` are their per-step mean, with each list kept.
    """
    from diffusers import MagCacheConfig

    steps = kwargs["num_inference_steps"]
    buffer = io.StringIO()
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(buffer):
            generate_video(pipe, prompt, seed, kwargs)
    finally:
        pipe.transformer.disable_cache()
    lists = []
    for line in buffer.getvalue().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and "MagCache" not in line:
            values = ast.literal_eval(line)
            if isinstance(values, list) and len(values) == steps:
                lists.append([float(x) for x in values])
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios of {steps} steps (diffusers' output changed?): "
                           f"{buffer.getvalue()[:300]!r}")
    ratios = [float(np.mean(col)) for col in zip(*lists, strict=True)]
    return {"mag_ratios": ratios, "per_context": lists, "prompt": prompt, "seed": seed}


def _calibration_fits(calibration: Any, pair: tuple[str, int], steps: int) -> bool:
    """Whether a stored MagCache calibration was made on `pair` with `steps` steps."""
    return isinstance(calibration, dict) and [calibration.get("prompt"), calibration.get("seed")] == list(pair) \
        and len(calibration.get("mag_ratios") or []) == steps


def run_caches(pipe: Any, config: DemoModelConfig, settings: RunSettings = RunSettings(), *,
               radial: str | None = None, caches: CacheSettings = CacheSettings(), device: str = "cpu",
               weights: str | Path | None = None, out: str | Path | None = None,
               resume: bool = False) -> dict[str, Any]:
    """Experiment 3: dense, radial, FirstBlockCache and MagCache alone and with radial.

    `out`, `resume`: as `run_fidelity`; a resumed run also reuses the stored MagCache calibration, which the
    stored MagCache rows were made with.
    """
    from diffusers import FirstBlockCacheConfig, MagCacheConfig
    from tqdm import tqdm

    kwargs = call_kwargs(config, settings)
    grid = latent_grid(config, kwargs["num_frames"], kwargs["height"], kwargs["width"])
    spec = radial or fidelity_specs(grid, ("radial",))["radial"][-1]
    pairs = prompt_pairs(settings.pairs, settings.seeds)
    steps = kwargs["num_inference_steps"]
    extra = {"call": kwargs, "pairs": [list(p) for p in pairs], "cache_settings": dataclasses.asdict(caches),
             "notes": [f"radial spec: {spec}.",
                       "forwards: transformer calls per video (CFG: two per step); skipped: calls whose last block "
                       "did not run (a forward pre-hook counts calls of the last block's self-attention).",
                       "MagCache ratios: calibrated once on the first pair with dense attention "
                       "(MagCacheConfig(calibrate=True)), the mean of the cond and uncond contexts; the radial "
                       "variant reuses them."]}
    head = _report_head("caches", settings, config, device, weights, extra)
    if resume and out is None:
        raise ValueError("resume needs the output folder (out) of the earlier run")
    stored = stored_report(out, head, tqdm.write) if resume else None
    calibration = stored.get("mag_calibration") if stored is not None else None
    if not _calibration_fits(calibration, pairs[0], steps):
        calibration = calibrate_mag_cache(pipe, *pairs[0], kwargs)
    head["mag_calibration"] = calibration
    cache_configs = {
        "first_block": FirstBlockCacheConfig(threshold=caches.first_block_threshold),
        "mag": MagCacheConfig(threshold=caches.mag_threshold, max_skip_steps=caches.mag_max_skip_steps,
                              retention_ratio=caches.mag_retention_ratio, num_inference_steps=steps,
                              mag_ratios=calibration["mag_ratios"]),
    }
    variants = [Variant("dense"), Variant("radial", spec, reference="dense"),
                Variant("FirstBlockCache", None, cache="first_block", reference="dense"),
                Variant("FirstBlockCache+radial", spec, cache="first_block", reference="dense"),
                Variant("MagCache", None, cache="mag", reference="dense"),
                Variant("MagCache+radial", spec, cache="mag", reference="dense")]
    return _run_experiment(pipe, config, settings, variants, pairs, head, out=out,
                           resume=resume and stored is not None, cache_configs=cache_configs, stored=stored)


def plot_caches(report: dict[str, Any], path: Path) -> Path:
    fig, (a, b, c) = _figure(3, 4.5, len(report["variants"]))
    _bars(a, report, "mean_skipped_forwards", "transformer forwards skipped", "per video (mean)")
    _bars(b, report, "median_seconds", "time per video", "seconds (median)")
    _bars(c, report, "match_rate", "task metric: caption match", "match rate (%)", percent=True)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ 4. heads


@dataclass(frozen=True)
class HeadSearchSettings:
    """The head search's budget and the guidance it searches with.

    Attributes:
        pairs: (prompt, seed) pairs each candidate is scored on (captions of `SEARCH_SEED`, held out from the
            evaluation prompts so the comparison is not scored on the prompts the heads were chosen on).
        candidates: (layer, head) pool (None: every head of every layer, 24 for the demo).
        rounds, top_k, strength, scale: HeadHunter's R, k, u and w_p.
        eval_strengths: u values the found heads are evaluated at (the paper searches at 1, uses about 0.5).
        control_seed: seed of the random-heads control (same number of heads, drawn from the pool).
    """

    pairs: int = 4
    candidates: tuple[tuple[int, int], ...] | None = None
    rounds: int = 1
    top_k: int = 2
    strength: float = 1.0
    scale: float = 3.0
    eval_strengths: tuple[float, ...] = (1.0, 0.5)
    control_seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("pairs", 1), ("rounds", 1), ("top_k", 1), ("control_seed", 0)):
            _whole("HeadSearchSettings", name, getattr(self, name), low)
        if self.candidates is not None:
            object.__setattr__(self, "candidates", tuple((int(a), int(b)) for a, b in self.candidates))
            if not self.candidates:
                raise ValueError("HeadSearchSettings.candidates must name at least one (layer, head) pair")
        object.__setattr__(self, "eval_strengths", tuple(float(s) for s in self.eval_strengths))
        if not self.eval_strengths or not all(0 < s <= 1 for s in self.eval_strengths):
            raise ValueError(f"HeadSearchSettings.eval_strengths must be numbers in (0, 1], got {self.eval_strengths}")


def run_heads(pipe: Any, config: DemoModelConfig, settings: RunSettings = RunSettings(),
              search: HeadSearchSettings = HeadSearchSettings(), *, out: str | Path = DEFAULT_OUT,
              device: str = "cpu", weights: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Experiment 4: head search scored by `task_scorer`, then CFG alone vs CFG + guidance on the found heads.

    The search log (``<out>/demo_heads_search.jsonl``) resumes a killed search; a control row perturbs the same
    number of randomly drawn heads. The evaluation variants write ``<out>/demo_heads.json`` after each one and,
    with `resume`, reuse its variants whose heads, strength and scale are the same (`run_fidelity`).
    """
    from accel.guidance.loop import layer_sites
    from accel.guidance.perturbation import HeadPerturbation
    from accel.guidance.scorers import CallableScorer
    from accel.guidance.search import SearchConfig, search_heads
    from accel.pipelines.families import adapter_for

    kwargs = call_kwargs(config, settings)
    pairs = prompt_pairs(settings.pairs, settings.seeds)
    search_pairs = prompt_pairs(search.pairs, 1, caption_seed=SEARCH_SEED, exclude=[p for p, _ in pairs])
    search_config = SearchConfig(prompts=tuple(search_pairs), rounds=search.rounds, top_k=search.top_k,
                                 strength=search.strength, scale=search.scale, candidates=search.candidates)
    log = Path(out) / "demo_heads_search.jsonl"
    t0 = time.perf_counter()
    result = search_heads(pipe, search_config, CallableScorer("accel.demo.experiments:task_scorer"), log=log,
                          call_kwargs=kwargs, progress=settings.progress)
    search_seconds = time.perf_counter() - t0
    found = [(int(a), int(b)) for a, b in result.selected]
    sites = layer_sites(adapter_for(pipe.transformer), pipe.transformer)
    pool = list(search.candidates) if search.candidates is not None else [(s.index, h) for s in sites
                                                                          for h in range(s.heads)]
    rest = [h for h in pool if h not in found]
    rng = np.random.default_rng(search.control_seed)
    control = [rest[i] for i in sorted(rng.choice(len(rest), size=min(len(found), len(rest)), replace=False))] \
        if rest else []
    variants = [Variant("cfg")]
    for u in search.eval_strengths:
        variants.append(Variant(f"cfg+heads u={u:g}", guidance=HeadPerturbation(heads=found, strength=u,
                                                                                 scale=search.scale),
                                reference="cfg"))
    if control:
        variants.append(Variant(f"cfg+random heads u={search.strength:g}", reference="cfg",
                                guidance=HeadPerturbation(heads=control, strength=search.strength,
                                                          scale=search.scale)))
    candidates = [{"round": r["round"], "head": r["head"], "score": r["score"], "scores": r["scores"]}
                  for r in _read_jsonl(log) if r.get("event") == "candidate"]
    extra = {"call": kwargs, "pairs": [list(p) for p in pairs], "search": {
        "settings": {**dataclasses.asdict(search), "candidates": None if search.candidates is None
                     else [list(c) for c in search.candidates]},
        "pairs": [list(p) for p in search_pairs], "selected": [list(h) for h in found], "rounds": result.rounds,
        "control_heads": [list(h) for h in control], "seconds": search_seconds, "log": str(log),
        "candidates": candidates},
        "notes": ["scorer: accel.demo.experiments:task_scorer, the fraction of colour/direction/speed checks passed.",
                  f"search prompts: captions of synthetic seed {SEARCH_SEED} that are not evaluation prompts.",
                  "PSNR/SSIM compare with the CFG-only video of the same pair."]}
    head = _report_head("heads", settings, config, device, weights, extra)
    return _run_experiment(pipe, config, settings, variants, pairs, head, out=out, resume=resume)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from accel.guidance.search import read_log

    return read_log(path)


def plot_heads(report: dict[str, Any], path: Path) -> Path:
    """Candidate scores of the search (first round) and the task metric with and without guidance."""
    fig, (a, b) = _figure(2, 6.0, len(report["variants"]))
    cands = [c for c in report["search"]["candidates"] if c["round"] == 0]
    cands.sort(key=lambda c: -c["score"])
    selected = {tuple(h) for h in report["search"]["selected"]}
    a.bar(range(len(cands)), [c["score"] for c in cands],
          color=["tab:red" if tuple(c["head"]) in selected else "tab:grey" for c in cands])
    a.set_xticks(range(len(cands)), [f"{c['head'][0]}:{c['head'][1]}" for c in cands], rotation=90, fontsize=7)
    a.set(title="head search, round 1 (red: selected)", xlabel="layer:head", ylabel="mean task score")
    _bars(b, report, "mean_task_score", "evaluation pairs", "mean task score")
    return _save(fig, path)


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "fidelity": plot_fidelity, "length": plot_length, "caches": plot_caches, "heads": plot_heads}


__all__ = ["CacheSettings", "DEFAULT_OUT", "EXPERIMENTS", "Generation", "HeadSearchSettings", "LengthLoRAConfig",
           "PLOTS", "RunSettings", "SEARCH_SEED", "Variant", "calibrate_mag_cache", "call_kwargs", "demo_config",
           "extended_frames", "fidelity_specs", "fidelity_variants", "generate_video", "generate_videos",
           "held_out_captions", "latent_grid", "length_radial_spec", "length_variants", "load_videos",
           "markdown_table", "plot_caches", "plot_fidelity", "plot_heads", "plot_length", "prompt_pairs",
           "report_path", "resumable_rows", "resume_mismatch", "run_caches", "run_fidelity", "run_heads",
           "run_length", "run_variants", "save_videos", "score_row", "stored_report", "summarize_rows", "task_score",
           "task_scorer", "train_length_lora", "train_lora_commands", "videos_path", "weights_info", "write_report"]
