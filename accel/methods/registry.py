"""The one registry of attention methods: names, config options and the spec strings built from them.

Every `AttentionMethod` subclass in a module of `accel.methods` with a ``name`` (and ``registered = True``,
the default) is found here; the CLI flags, the UI controls, the ``name:key=value`` specs of `accel bench`
and `accel eval`, and the presets all read this registry. Adding a method is one new module in
`accel/methods/` (plus its kernel): nothing in `cli.py` or `ui/` changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from accel.methods.base import AttentionMethod
from accel.options import Option, options_of
from accel.schedule import SCHEDULE_OPTIONS, Schedule

_NOT_METHODS = {"base", "registry"}


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, config class, one-line summary and options."""

    name: str
    cls: type[AttentionMethod]
    summary: str
    options: tuple[Option, ...] = field(default_factory=tuple)

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        known = ", ".join(o.name for o in self.options) or "none"
        raise ValueError(f"{self.name} has no option {name!r}; its options: {known}")

    def build(self, values: dict[str, Any] | None = None) -> AttentionMethod:
        """The method config from option values (unknown keys and bad values raise, naming the field)."""
        values = dict(values or {})
        for key in values:
            self.option(key)
        return self.cls(**values)


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else cls.name


def methods() -> dict[str, MethodInfo]:
    """Every registered method by name: dense first, then the others in alphabetical order."""
    import accel.methods as package

    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name not in _NOT_METHODS and not mod.name.startswith("_"):
            importlib.import_module(f"accel.methods.{mod.name}")
    found: dict[str, MethodInfo] = {}
    stack = list(AttentionMethod.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not cls.__module__.startswith("accel.methods.") or not getattr(cls, "registered", True):
            continue
        name = getattr(cls, "name", None)
        if not name or name == AttentionMethod.name:
            continue
        if name in found and found[name].cls is not cls:
            raise RuntimeError(f"two attention methods share the name {name!r}: {found[name].cls} and {cls}")
        found[name] = MethodInfo(name, cls, _summary(cls), options_of(cls))
    order = sorted(found, key=lambda n: (n != "dense", n))
    return {n: found[n] for n in order}


def method_info(name: str) -> MethodInfo:
    """The registered method called `name` (ValueError listing the known names otherwise)."""
    registry = methods()
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(registry)}")
    return registry[name]


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def _parse_items(spec: str, rest: str) -> list[tuple[str, str]]:
    items = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method spec items must be key=value, got {item!r} in {spec!r}")
        items.append((key.strip(), value))
    return items


@dataclass(frozen=True)
class MethodSpec:
    """A method config parsed from a spec string, with its label and schedule."""

    label: str
    method: AttentionMethod
    schedule: dict[str, Any] = field(default_factory=dict)  # Schedule fields the spec (or its preset) sets

    def schedule_over(self, base: Schedule | None = None) -> Schedule:
        """`base` (default `Schedule()`) with this spec's schedule fields applied."""
        return dataclasses.replace(base or Schedule(), **self.schedule)


def parse_method_spec(spec: str, *, allow_schedule: bool = True) -> MethodSpec:
    """Parse ``name[:key=value,...]`` or ``preset:NAME[,key=value...]``.

    Keys are the method's options (``radial:decay=0.5,spatial=disk``); with ``allow_schedule`` the
    schedule's options (``dense_steps``, ``dense_last_steps``, ``dense_layers``) too. Values are parsed and
    checked by the option, so errors name the field and its range.
    """
    if not isinstance(spec, str):
        raise TypeError(f"method spec must be a str, got {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    sched: dict[str, Any] = {}
    if name == "preset":
        from accel.presets import preset

        preset_name, _, rest = rest.partition(",")
        p = preset(preset_name.strip())
        method = p.method
        sched = {f.name: getattr(p.schedule, f.name) for f in dataclasses.fields(p.schedule)}
        info = method_info(method.name)
    else:
        info = method_info(name)
        method = None
    schedule_options = {o.name: o for o in SCHEDULE_OPTIONS}
    values: dict[str, Any] = {}
    for key, text in _parse_items(spec, rest):
        if allow_schedule and key in schedule_options:
            sched[key] = schedule_options[key].parse(text)
        elif any(o.name == key for o in info.options):
            values[key] = info.option(key).parse(text)
        else:
            known = [o.name for o in info.options] + (list(schedule_options) if allow_schedule else [])
            raise ValueError(f"{info.name} has no option {key!r} (spec {spec!r}); options: {', '.join(known)}")
    method = dataclasses.replace(method, **values) if method is not None else info.build(values)
    Schedule(**sched)  # validate the schedule fields now, naming the field
    label = method_label(method)
    if sched:
        label += "|" + ",".join(f"{k}={v}" for k, v in sched.items())
    return MethodSpec(label, method, sched)


def method_label(method: AttentionMethod, *, exclude: tuple[str, ...] = ()) -> str:
    """``name`` plus the config fields that differ from their defaults, in spec syntax."""
    parts = []
    if dataclasses.is_dataclass(method):
        for f in dataclasses.fields(method):
            if not f.init or f.name in exclude:
                continue
            value = getattr(method, f.name)
            if f.default is not dataclasses.MISSING and value != f.default:
                parts.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}")
    return method.name + (":" + ",".join(parts) if parts else "")


__all__ = ["MethodInfo", "MethodSpec", "method_info", "method_label", "method_names", "methods",
           "parse_method_spec"]
