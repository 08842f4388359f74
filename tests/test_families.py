"""The explicit family list: complete, imported without cycles, and one token geometry everywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import accel.pipelines
from accel.pipelines import families as families_module
from accel.pipelines.adapter import FamilyAdapter
from accel.pipelines.families import (
    FAMILIES,
    adapter_for,
    adapters,
    family,
    family_for_pipeline,
    family_for_transformer,
)
from accel.pipelines.family import FamilyFacts
from accel.pipelines.models import layout_for_model
from accel.pipelines.tiny import TINY_MODELS, build_tiny, example_image, size_limits, size_rules
from accel.ui.engine import pipeline_token_grid

PIPELINES = Path(accel.pipelines.__file__).parent
MODULES = sorted(p.stem for p in PIPELINES.glob("*.py") if p.stem != "__init__")
NAMES = [f.name for f in FAMILIES]
EXPECTED = {"wan", "hunyuan_video", "cogvideox", "ltx", "flux", "sd3"}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------ the list
def _defines_a_family(path: Path) -> bool:
    """The module subclasses FamilyAdapter or declares FACTS (by its source, without importing it)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and any(
            getattr(b, "id", getattr(b, "attr", None)) == "FamilyAdapter" for b in node.bases
        ):
            return True
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FACTS" for t in node.targets):
            return True
    return False


def test_family_list_is_explicit_and_complete() -> None:
    assert set(NAMES) == EXPECTED and len(NAMES) == len(set(NAMES))
    # Every module that defines a family is in the list (a new family module cannot be forgotten).
    defining = {m for m in MODULES if _defines_a_family(PIPELINES / f"{m}.py")} - {"adapter"}
    assert defining == {m.__name__.rsplit(".", 1)[1] for m in families_module._MODULES} == EXPECTED
    for fam in FAMILIES:
        module = sys.modules[f"accel.pipelines.{fam.name}"]
        assert module.FACTS is fam.facts and module.ADAPTER is fam.adapter
        assert isinstance(fam.facts, FamilyFacts) and isinstance(fam.adapter, FamilyAdapter)
        assert fam.adapter.family == fam.name and fam.adapter.transformer_classes == fam.facts.transformer_classes
        assert fam.facts.tiny_models, f"{fam.name} has no tiny model"
        for name in fam.facts.tiny_models:
            assert name in TINY_MODELS and TINY_MODELS[name].family == fam.name
            assert TINY_MODELS[name].is_video == fam.facts.is_video
        assert family(fam.name) is fam
    owners = {name: [f.name for f in FAMILIES if name in f.facts.tiny_models] for name in TINY_MODELS}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert list(adapters()) == NAMES and all(adapters()[f.name] is f.adapter for f in FAMILIES)
    with pytest.raises(ValueError, match="unknown model family 'mochi'.*wan"):
        family("mochi")


def test_adapter_module_has_no_registry() -> None:
    from accel.pipelines import adapter

    for name in ("register_adapter", "adapter_for", "adapters"):  # the family list lives in families.py only
        assert not hasattr(adapter, name), name


def test_importing_adapter_imports_no_family_module() -> None:
    family_modules = [f"accel.pipelines.{m}" for m in [*NAMES, "families"]]
    code = (
        "import sys\nimport accel.pipelines.adapter\n"
        f"loaded = [m for m in {family_modules!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr


def test_each_pipelines_module_imports_on_its_own() -> None:
    # One interpreter; before each import every accel module is forgotten, so each module is the first
    # accel.pipelines module imported (an import cycle fails or half-initialises a module exactly then).
    code = (
        "import importlib, sys\nimport torch, diffusers  # third-party caches may stay\n"
        f"for name in {MODULES!r}:\n"
        "    for m in [m for m in sys.modules if m == 'accel' or m.startswith('accel.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module('accel.pipelines.' + name)\n"
        "import accel.pipelines.families as f\n"
        "assert len(f.FAMILIES) == 6\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-4000:]


# ------------------------------------------------------------------------------------------ no cycle
def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported accel.pipelines module, at import time?) for every import statement of `module`."""
    tree = ast.parse((PIPELINES / f"{module}.py").read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from . import x / from .x import y
                    base = ".".join(["accel", "pipelines", *([base] if base else [])])
                targets = [base] + [f"{base}.{a.name}" for a in child.names]
            for target in targets:
                parts = target.split(".")
                if parts[:2] == ["accel", "pipelines"] and len(parts) >= 3 and parts[2] in MODULES:
                    found.append((parts[2], not inner))
            visit(child, inner)

    visit(tree, False)
    return found


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_import_graph_of_pipelines_is_acyclic() -> None:
    at_import: dict[str, set[str]] = {m: set() for m in MODULES}
    every: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, eager in _imports(module):
            if target == module:
                continue
            every[module].add(target)
            if eager:
                at_import[module].add(target)
    assert _cycle(at_import) is None, f"import cycle at import time: {' -> '.join(_cycle(at_import))}"
    assert _cycle(every) is None, f"import cycle (counting deferred imports): {' -> '.join(_cycle(every))}"
    # The direction is fixed: families -> family modules -> adapter / family; nothing imports back.
    assert not at_import["adapter"] & {*NAMES, "families"}
    assert set(NAMES) <= at_import["families"]
    assert at_import["family"] == set()


def test_family_facts_module_needs_no_diffusers() -> None:
    tree = ast.parse((PIPELINES / "family.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module or "")
    third_party = {r for r in roots if r.split(".")[0] not in sys.stdlib_module_names}
    assert third_party <= {"torch", "accel.geometry"}, third_party


# ------------------------------------------------------------------------------------------ one geometry
# The released models' token geometry (pixels per token side, pixel frames per latent frame, text tokens
# and where they sit), as accel has always planned with it.
RELEASED = {
    "wan": (16, 4, 0, "none"),
    "hunyuan_video": (16, 4, 256, "after"),
    "cogvideox": (16, 4, 226, "before"),
    "ltx": (32, 8, 0, "none"),
    "flux": (16, 1, 512, "before"),
    "sd3": (16, 1, 333, "after"),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_model_layouts_are_unchanged(name: str) -> None:
    stride, temporal, text, position = RELEASED[name]
    frames = 81 if temporal > 1 else 1
    layout = layout_for_model(name, frames, 480, 832)
    latent = 1 if temporal == 1 else (frames - 1) // temporal + 1
    assert (layout.frames, layout.height, layout.width) == (latent, 480 // stride, 832 // stride)
    assert (layout.text_tokens, layout.text_position) == (text, position)
    with pytest.raises(ValueError, match=f"multiples of {stride}"):
        layout_for_model(name, frames, 480 + stride // 2, 832)


@pytest.mark.parametrize("model, name", [
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan"), ("hunyuanvideo-community/HunyuanVideo", "hunyuan_video"),
    ("THUDM/CogVideoX-5b", "cogvideox"), ("Lightricks/LTX-Video", "ltx"), ("black-forest-labs/FLUX.1-dev", "flux"),
    ("stabilityai/stable-diffusion-3.5-medium", "sd3"),
])
def test_model_ids_name_their_family(model: str, name: str) -> None:
    assert layout_for_model(model, 1, 512, 512) == layout_for_model(name, 1, 512, 512)


def test_unknown_model_id_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot tell the model family"):
        layout_for_model("someone/mochi-1", 1, 512, 512)


def _run_once(pipe, name: str, frames: int, height: int, width: int) -> set[tuple[int, int, int]]:
    """Grids the family adapter reads off every transformer forward of a one-step generation."""
    spec = TINY_MODELS[name]
    seen: set[tuple[int, int, int]] = set()
    modules = [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]
    adapter = adapter_for(modules[0])

    def hook(module, args, kwargs):
        seen.add(adapter.grid(module, args, kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    kwargs = dict(spec.call_defaults, height=height, width=width, num_inference_steps=1, output_type="latent")
    if spec.is_video:
        kwargs["num_frames"] = frames
    if spec.needs_image:
        kwargs["image"] = example_image(height, width)
    try:
        pipe(prompt="a dog running", generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", sorted(n for n, s in TINY_MODELS.items() if not s.learned))  # accel-demo: own test
def test_token_grid_agrees_with_the_adapter_on_a_real_forward(name: str) -> None:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    spec = TINY_MODELS[name]
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    fam = family(spec.family)
    assert family_for_pipeline(pipe) is fam and family_for_transformer(pipe.transformer) is fam
    assert adapter_for(pipe.transformer) is fam.adapter
    assert fam.facts.geometry(pipe) == spec.geometry
    assert size_rules(pipe) == spec.rules
    assert size_limits(pipe) == spec.limits
    assert fam.facts.context_parallel == (getattr(pipe.transformer, "_cp_plan", None) is not None)
    spatial, tmul, _ = spec.rules
    sizes = [(spec.num_frames, spec.height, spec.width),
             (spec.num_frames + (tmul or 0), spec.height + spatial, spec.width)]  # longer, not square
    for frames, height, width in sizes:
        seen = _run_once(pipe, name, frames, height, width)
        layout = layout_for_model(name, frames, height, width)
        expected = pipeline_token_grid(pipe, frames, height, width)
        assert seen == {expected}, (name, (frames, height, width), seen, expected)
        assert (layout.frames, layout.height, layout.width) == expected
        assert (layout.text_position, layout.text_tokens) == (fam.facts.text_position, fam.facts.text_tokens)
