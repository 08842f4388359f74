"""Build the demo `WanPipeline` from its config, export its weights, and load the committed weights offline.

A weights folder holds ``text_encoder.safetensors``, ``vae.safetensors``, ``transformer.safetensors`` and
``manifest.json``: per file its size in bytes, sha256, tensor dtype and parameter count, plus the model config
(`DemoModelConfig.to_dict`), the vocabulary, the VAE's latent statistics, the recipe and the git commit that
made it. `load_demo_pipeline` rebuilds the modules from the manifest's config, checks every file against the
manifest before reading it, and loads safetensors only (never pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from accel.demo.config import DEMO, DemoModelConfig
from accel.demo.tokenizer import build_tokenizer, vocabulary

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
PARTS = ("text_encoder", "vae", "transformer")
FORMAT = "accel-demo/1"
RETRAIN = "python recipes/demo/train_demo.py --config recipes/demo/config.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class DemoWeightsError(ValueError):
    """The demo weights folder is incomplete, altered or from another format; the message says how to retrain."""


class MissingDemoWeightsError(DemoWeightsError, FileNotFoundError):
    """A file of the demo weights folder (or the folder itself) does not exist."""


def weight_file(part: str) -> str:
    return f"{part}.safetensors"


# ------------------------------------------------------------------------------------------------ building


def build_components(config: DemoModelConfig = DEMO, *, vocab: tuple[str, ...] | None = None,
                     latents_mean: list[float] | None = None, latents_std: list[float] | None = None,
                     seed: int | None = None) -> dict[str, Any]:
    """Fresh (seeded random) WanPipeline components for `config`: tokenizer, text_encoder, vae, transformer, scheduler.

    The text encoder is seeded with ``config.text.seed`` and the VAE and transformer with `seed` (default the same),
    inside a forked RNG so the caller's global RNG is untouched. `latents_mean`/`latents_std` go into the VAE config
    (WanPipeline de-normalises latents with them before decoding).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    vocab = vocabulary() if vocab is None else tuple(vocab)
    z = config.vae.z_dim
    for name, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
        if stats is not None and len(stats) != z:
            raise ValueError(f"{name} must hold z_dim={z} numbers, got {len(stats)}")
    vae_kwargs = config.vae_kwargs()
    if latents_mean is not None:
        vae_kwargs["latents_mean"] = [float(v) for v in latents_mean]
    if latents_std is not None:
        vae_kwargs["latents_std"] = [float(v) for v in latents_std]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.text.seed)
        text_encoder = UMT5EncoderModel(UMT5Config(**config.umt5_kwargs(len(vocab)))).eval()
        torch.manual_seed(config.text.seed if seed is None else seed)
        vae = AutoencoderKLWan(**vae_kwargs).eval()
        transformer = WanTransformer3DModel(**config.transformer_kwargs()).eval()
    text_encoder.requires_grad_(False)
    return {
        "tokenizer": build_tokenizer(vocab, model_max_length=config.text.max_sequence_length),
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=config.shift),
    }


def build_pipeline(config: DemoModelConfig = DEMO, **kwargs: Any) -> Any:
    """A `WanPipeline` of `build_components(config, **kwargs)` (random weights unless loaded afterwards)."""
    from diffusers import WanPipeline

    return WanPipeline(**build_components(config, **kwargs))


def parameter_counts(pipe: Any) -> dict[str, int]:
    """Parameters of each learned part (tied weights counted once)."""
    out = {}
    for part in PARTS:
        seen = {p.data_ptr(): p.numel() for p in getattr(pipe, part).parameters()}
        out[part] = int(sum(seen.values()))
    return out


def call_defaults(config: DemoModelConfig) -> dict[str, Any]:
    """`WanPipeline.__call__` keywords of the default generation (size, frames, steps, guidance, text length)."""
    g = config.generation
    return {"height": g.height, "width": g.width, "num_frames": g.num_frames,
            "num_inference_steps": g.num_inference_steps, "guidance_scale": g.guidance_scale,
            "max_sequence_length": config.text.max_sequence_length}


# ------------------------------------------------------------------------------------------------ export


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _storage_state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's state dict in `dtype` (floats only), each tied tensor once (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
    return out


def export_weights(pipe: Any, config: DemoModelConfig, out: str | Path, *,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write the pipeline's text encoder, VAE and transformer as safetensors in ``config.storage_dtype`` + manifest.

    `extra` (recipe, training summary, git commit) is stored under the manifest's ``"training"`` key. Files are
    written to temporary names and renamed, the manifest last, so a killed export never leaves a valid-looking
    folder with a half-written file. Returns the folder.
    """
    from safetensors.torch import save_file

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    dtype = _DTYPES[config.storage_dtype]
    files: dict[str, Any] = {}
    for part in PARTS:
        module = getattr(pipe, part)
        state = _storage_state(module, dtype)
        path = root / weight_file(part)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            # One metadata key: safetensors writes metadata in hash-map order, so two keys would make the bytes
            # (and the sha256) of identical weights differ from run to run.
            save_file(state, tmp, metadata={"format": FORMAT})
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        files[path.name] = {"part": part, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                            "dtype": config.storage_dtype, "tensors": len(state),
                            "parameters": int(sum(t.numel() for t in state.values()))}
    vae_cfg = pipe.vae.config
    manifest = {
        "format": FORMAT,
        "model": config.to_dict(),
        "vocabulary": list(pipe.tokenizer.convert_ids_to_tokens(list(range(len(pipe.tokenizer))))),
        "latents_mean": [float(v) for v in vae_cfg.latents_mean],
        "latents_std": [float(v) for v in vae_cfg.latents_std],
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "retrain": RETRAIN,
        "training": extra or {},
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)
    return root


# ------------------------------------------------------------------------------------------------ loading


def _fail(cls: type[DemoWeightsError], root: Path, what: str) -> DemoWeightsError:
    return cls(f"demo model weights in {root}: {what}. Retrain and export them with `{RETRAIN}` "
               f"(or pass the folder that holds them)")


def read_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """The manifest of a weights folder (default: the committed `DEFAULT_WEIGHTS`), checked for shape only."""
    root = Path(path) if path is not None else DEFAULT_WEIGHTS
    file = root / MANIFEST
    if not root.is_dir():
        raise _fail(MissingDemoWeightsError, root, "the folder does not exist")
    if not file.is_file():
        raise _fail(MissingDemoWeightsError, root, f"{MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(DemoWeightsError, root, f"{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise _fail(DemoWeightsError, root, f"{MANIFEST} has format {got!r}, expected {FORMAT!r}")
    for key in ("model", "vocabulary", "latents_mean", "latents_std", "files"):
        if key not in manifest:
            raise _fail(DemoWeightsError, root, f"{MANIFEST} has no {key!r} entry")
    return manifest


def verify_weights(path: str | Path | None = None) -> dict[str, Any]:
    """Check every weight file of a folder against its manifest: present, same size, same sha256, same dtype.

    Returns the manifest. Raises `MissingDemoWeightsError` for a missing file and `DemoWeightsError` for a size,
    hash or dtype mismatch, each naming the file and the retrain command.
    """
    from safetensors import safe_open

    root = Path(path) if path is not None else DEFAULT_WEIGHTS
    manifest = read_manifest(root)
    entries = manifest["files"]
    for part in PARTS:
        name = weight_file(part)
        entry = entries.get(name)
        if not isinstance(entry, dict):
            raise _fail(DemoWeightsError, root, f"{MANIFEST} does not list {name}")
        file = root / name
        if not file.is_file():
            raise _fail(MissingDemoWeightsError, root, f"{name} is missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise _fail(DemoWeightsError, root, f"{name} has {size} bytes, the manifest says {entry.get('bytes')} "
                                                f"(truncated or replaced)")
        digest = sha256_file(file)
        if digest != entry.get("sha256"):
            raise _fail(DemoWeightsError, root, f"{name} has sha256 {digest[:16]}..., the manifest says "
                                                f"{str(entry.get('sha256'))[:16]}... (corrupted or replaced)")
        want = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if want is None:
            raise _fail(DemoWeightsError, root, f"{MANIFEST} gives {name} the unknown dtype {entry.get('dtype')!r}")
        try:
            with safe_open(str(file), framework="pt") as f:
                dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise _fail(DemoWeightsError, root, f"{name} is not a readable safetensors file ({err})") from None
        if dtypes - {want, "I64", "I32", "BOOL"}:
            raise _fail(DemoWeightsError, root, f"{name} holds {sorted(dtypes)} tensors, the manifest says {want}")
    return manifest


def load_demo_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> Any:
    """The learned demo `WanPipeline` from a weights folder (default: the committed one), offline.

    Args:
        path: folder with the three safetensors files and ``manifest.json`` (default `DEFAULT_WEIGHTS`).
        device: where the pipeline runs.
        dtype: compute dtype (default float32 on CPU, bfloat16 on CUDA); weights are stored in the manifest's dtype.

    Every file is verified against the manifest first (`verify_weights`); missing or altered files raise
    `DemoWeightsError` naming the file and the command that retrains them.
    """
    from safetensors.torch import load_file

    root = Path(path) if path is not None else DEFAULT_WEIGHTS
    manifest = verify_weights(root)
    try:
        config = DemoModelConfig.from_dict(manifest["model"])
    except (TypeError, ValueError) as err:
        raise _fail(DemoWeightsError, root, f"{MANIFEST} holds an invalid model config ({err})") from None
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from diffusers import WanPipeline

    parts = build_components(config, vocab=tuple(manifest["vocabulary"]), latents_mean=manifest["latents_mean"],
                             latents_std=manifest["latents_std"])
    for part in PARTS:
        module = parts[part]
        state = load_file(str(root / weight_file(part)))
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise _fail(DemoWeightsError, root, f"{weight_file(part)} does not fit the manifest's model config "
                                                f"({first})") from None
        own = module.state_dict()
        stored = {own[m].data_ptr() for m in state if m in own}
        tied = {n for n in missing if own[n].data_ptr() in stored}  # e.g. UMT5's embed_tokens = shared
        if unexpected or set(missing) - tied:
            raise _fail(DemoWeightsError, root, f"{weight_file(part)} does not fit the manifest's model config "
                                                f"(missing {sorted(set(missing) - tied)[:3]}, unexpected "
                                                f"{sorted(unexpected)[:3]})")
        if dtype != torch.float32:  # loaded into float32 parameters; .to() only when another dtype is asked for
            module.to(dtype=dtype)
        module.to(device).eval()
    pipe = WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["DEFAULT_WEIGHTS", "MANIFEST", "PARTS", "RETRAIN", "DemoWeightsError", "MissingDemoWeightsError",
           "build_components", "build_pipeline", "call_defaults", "export_weights", "load_demo_pipeline",
           "parameter_counts", "read_manifest", "sha256_file", "verify_weights", "weight_file"]
