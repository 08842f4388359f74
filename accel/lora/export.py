"""The trained LoRA as files others load: diffusers' format, ComfyUI's keys, and accel's JSON metadata.

`save_lora` writes ``pytorch_lora_weights.safetensors`` (keys ``transformer.<module>.lora_A/B.weight`` and the
peft LoRA config in the safetensors header, what ``pipe.load_lora_weights`` reads), ``lora_comfyui.safetensors``
(original-Wan names ``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` with ``.alpha``, what ComfyUI reads)
and ``accel_lora.json`` (base model identity, rank, alpha, targets, attention method and config, trained shape).
`check_lora_fits` refuses a LoRA made for another model with a message naming both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from accel.pipelines.lora_files import (
    DIFFUSERS_FILE,
    METADATA_FILE,
    check_lora_fits,
    check_pipeline_lora,
    identity_hash,
    read_metadata,
    transformer_identity,
)

COMFYUI_FILE = "lora_comfyui.safetensors"
METADATA_VERSION = 1

# diffusers Wan module names -> original Wan / ComfyUI names.
_WAN_TO_COMFY = (
    (r"\.attn1\.to_q\.", ".self_attn.q."), (r"\.attn1\.to_k\.", ".self_attn.k."), (r"\.attn1\.to_v\.", ".self_attn.v."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."), (r"\.attn2\.to_q\.", ".cross_attn.q."),
    (r"\.attn2\.to_k\.", ".cross_attn.k."), (r"\.attn2\.to_v\.", ".cross_attn.v."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."), (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
)


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's names (``blocks.0.attn1.to_q.lora_A.weight``), on the CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def comfyui_state_dict(lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Wan LoRA weights renamed to original-Wan keys with a ``.alpha`` per module (ComfyUI's LoRA loader)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in lora.items():
        name = "." + key
        for pattern, repl in _WAN_TO_COMFY:
            name = re.sub(pattern, repl, name)
        name = "diffusion_model" + name
        out[name] = value
        if name.endswith(".lora_A.weight"):
            out[name[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(
    out_dir: str | Path, transformer: torch.nn.Module, metadata: dict[str, Any], *, pipeline_class: Any,
    adapter_name: str = "default", comfyui: bool = True,
) -> Path:
    """Write the diffusers LoRA file, ComfyUI keys (Wan) and ``accel_lora.json`` into `out_dir`; returns it."""
    from accel.lora.cache import save_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = transformer.peft_config[adapter_name]
    lora = lora_state_dict(transformer, adapter_name)
    adapter_meta = config.to_dict()
    adapter_meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter_meta.items()}
    pipeline_class.save_lora_weights(str(out), transformer_lora_layers=lora, weight_name=DIFFUSERS_FILE,
                                     transformer_lora_adapter_metadata=adapter_meta)
    if comfyui and type(transformer).__name__ == "WanTransformer3DModel":
        save_atomic(comfyui_state_dict(lora, config.lora_alpha), out / COMFYUI_FILE)
    identity = transformer_identity(transformer)
    body = {"format": "accel-lora", "version": METADATA_VERSION, "base_model": identity,
            "base_model_hash": identity_hash(identity), "rank": config.r, "alpha": config.lora_alpha,
            "target_modules": adapter_meta.get("target_modules"), **metadata}
    write_metadata(out / METADATA_FILE, body)
    return out


def write_metadata(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


__all__ = ["COMFYUI_FILE", "DIFFUSERS_FILE", "METADATA_FILE", "check_lora_fits", "check_pipeline_lora",
           "comfyui_state_dict", "lora_state_dict", "read_metadata", "save_lora"]
