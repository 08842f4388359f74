"""LoRA files next to a pipeline: accel's metadata and the check that a LoRA fits the model it loads into.

Lives in `pipelines` (not `lora`) because `accel generate --lora` and the UI call the check before
``pipe.load_lora_weights``; `accel.lora.export` writes the files this module reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = "accel_lora.json"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"

# Transformer config fields that decide whether a LoRA's shapes and keys fit (the "same base model" check).
IDENTITY_FIELDS = ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels",
                   "text_dim", "ffn_dim", "patch_size", "image_dim", "cross_attn_norm", "qk_norm",
                   "num_single_layers", "patch_size_t", "text_embed_dim", "pooled_projection_dim", "mlp_ratio",
                   "guidance_embeds")


def transformer_identity(transformer: torch.nn.Module) -> dict[str, Any]:
    """Class name and the shape-deciding config fields of a transformer (JSON-able)."""
    cfg = getattr(transformer, "config", {}) or {}
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in IDENTITY_FIELDS}
    return {"class": type(transformer).__name__, "config": fields}


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """``accel_lora.json`` of a LoRA file or folder, or None when it has none (a LoRA made elsewhere)."""
    path = Path(path)
    meta = (path if path.is_dir() else path.parent) / METADATA_FILE
    if not meta.exists():
        return None
    try:
        body = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"LoRA metadata {meta} is not JSON: {err}") from None
    if body.get("format") != "accel-lora":
        raise ValueError(f"{meta} is not accel LoRA metadata (format={body.get('format')!r})")
    return body


def check_lora_fits(transformer: torch.nn.Module, path: str | Path) -> None:
    """ValueError when the LoRA at `path` was made for another model: by its metadata, or by its tensor shapes."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_metadata(path)
    mine = transformer_identity(transformer)
    if meta is not None and meta.get("base_model_hash") != identity_hash(mine):
        theirs = meta.get("base_model", {})
        diff = {k: (theirs.get("config", {}).get(k), v) for k, v in mine["config"].items()
                if theirs.get("config", {}).get(k) != v}
        detail = ", ".join(f"{k}: LoRA {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items()))
        if theirs.get("class") != mine["class"]:
            detail = f"class: LoRA {theirs.get('class')} vs model {mine['class']}" + (f", {detail}" if detail else "")
        raise ValueError(f"LoRA {path.name} was trained for another base model ({detail or 'different config'})")
    file = path if path.is_file() else path / DIFFUSERS_FILE
    if not file.exists():
        return
    modules = dict(transformer.named_modules())
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"^(?:transformer\.)?(.+)\.lora_([AB])\.weight$", key)
            if m is None:
                continue
            name, which = m.groups()
            module = modules.get(name)
            base = getattr(module, "base_layer", module)
            if not isinstance(base, torch.nn.Linear):
                raise ValueError(f"LoRA {path.name} does not fit this model: it has weights for {name!r}, which this "
                                 f"{type(transformer).__name__} has no linear layer for")
            shape = f.get_slice(key).get_shape()
            want = base.in_features if which == "A" else base.out_features
            got = shape[1] if which == "A" else shape[0]
            if got != want:
                raise ValueError(f"LoRA {path.name} does not fit this model: {key} has {got} "
                                 f"{'input' if which == 'A' else 'output'} features, {name} has {want}")


def check_pipeline_lora(pipe: Any, path: str | Path) -> None:
    """`check_lora_fits` against the transformer the LoRA loads into (Wan 2.2 low-noise LoRAs: `transformer_2`)."""
    meta = read_metadata(path)
    name = "transformer_2" if meta and meta.get("load_into_transformer_2") else "transformer"
    transformer = getattr(pipe, name, None) or getattr(pipe, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        check_lora_fits(transformer, path)


__all__ = ["DIFFUSERS_FILE", "METADATA_FILE", "check_lora_fits", "check_pipeline_lora", "identity_hash",
           "read_metadata", "transformer_identity"]
