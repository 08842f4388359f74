"""Typed, self-describing config fields: help text, range and choices that the CLI, the UI and spec strings share.

A method or schedule declares each field with `option(...)`; `options_of(cls)` reads them back as `Option`s.
`Option.check(value)` is the one validation every front end uses, so an error always names the field and
states its allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_META_KEY = "accel"


@dataclass(frozen=True)
class Option:
    """One config field as the front ends see it.

    Attributes:
        name: the dataclass field name (CLI flag ``--name-with-dashes``, spec key ``name``).
        kind: ``bool``, ``int``, ``float`` or ``str``.
        default: the field's default (None: "auto" / "model default", see ``none_means``).
        help: one line saying what the field does and why one would change it.
        minimum, maximum: inclusive bounds for numbers (None: unbounded); ``exclusive_minimum`` makes the
            lower bound strict (e.g. decay > 0).
        choices: allowed values (for str and int fields with a fixed set).
        none_means: when set, None is allowed and means this (e.g. "per-GPU default").
        owner: the config class name, for messages ("Radial.decay").
    """

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[Any, ...] | None = None
    none_means: str | None = None
    owner: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """Human label for the UI: 'dense_last_steps' -> 'Dense last steps'."""
        text = self.name.replace("_", " ")
        return text[:1].upper() + text[1:]

    @property
    def qualified(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name

    def range_text(self) -> str:
        """The allowed values in words, for help texts and error messages."""
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind is bool:
            text = "true or false"
        elif self.kind in (int, float):
            noun = "a whole number" if self.kind is int else "a number"
            lo = None if self.minimum is None else f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
            hi = None if self.maximum is None else f"<= {self.maximum:g}"
            text = noun + (" " + " and ".join(x for x in (lo, hi) if x) if lo or hi else "")
        else:
            text = "text"
        if self.none_means:
            text += f" (empty: {self.none_means})"
        return text

    def check(self, value: Any) -> Any:
        """Return ``value`` normalised to ``kind`` (1.0 -> 1 for ints), or raise naming the field.

        TypeError for the wrong kind of value, ValueError for a value out of range.
        """
        if value is None:
            if self.none_means is not None:
                return None
            raise TypeError(f"{self.qualified} must be {self.range_text()}, got None")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{self.qualified} must be true or false, got {value!r}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{self.qualified} must be {self.range_text()}, got {value!r}")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"{self.qualified} must be {self.range_text()}, got {value!r}")
                value = int(value)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{self.qualified} must be {self.range_text()}, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{self.qualified} must be {self.range_text()}, got {value!r}")
        elif self.kind is str:
            if not isinstance(value, str):
                raise TypeError(f"{self.qualified} must be {self.range_text()}, got {value!r}")
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{self.qualified} must be {self.range_text()}, got {value!r}")
            return value
        if self.kind in (int, float):
            too_low = self.minimum is not None and (
                value <= self.minimum if self.exclusive_minimum else value < self.minimum
            )
            too_high = self.maximum is not None and value > self.maximum
            if too_low or too_high:
                raise ValueError(f"{self.qualified} must be {self.range_text()}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """Value from a CLI or spec string ('0.2', 'true', 'auto'/'none'/'' for None), then `check`."""
        raw = text.strip()
        if raw.lower() in ("", "none", "null", "auto") and self.none_means is not None:
            return None
        if self.kind is bool:
            low = raw.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError(f"{self.qualified} must be true or false, got {text!r}")
        if self.kind in (int, float):
            try:
                number = float(raw)
            except ValueError:
                raise ValueError(f"{self.qualified} must be {self.range_text()}, got {text!r}") from None
            if self.kind is int and number.is_integer() and "." not in raw and "e" not in raw.lower():
                return self.check(int(raw))
            return self.check(number)
        if self.choices is not None and all(isinstance(c, int) for c in self.choices):
            try:
                return self.check(int(raw))
            except ValueError:
                raise ValueError(f"{self.qualified} must be {self.range_text()}, got {text!r}") from None
        return self.check(raw)


def option(
    default: Any,
    help: str,
    *,
    kind: type | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    choices: tuple[Any, ...] | None = None,
    none_means: str | None = None,
) -> Any:
    """A dataclass field with front-end metadata; use as ``decay: float = option(1.0, "...", minimum=0)``."""
    meta = {
        "help": help, "kind": kind, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum,
        "choices": choices, "none_means": none_means,
    }
    return dataclasses.field(default=default, metadata={_META_KEY: meta})


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}


def _kind_of(field: dataclasses.Field, meta: dict) -> type:
    if meta.get("kind") is not None:
        return meta["kind"]
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    for token in annotation.replace("|", " ").replace("[", " ").replace("]", " ").split():
        if token in _KINDS:
            return _KINDS[token]
        if token.startswith("Literal"):
            return str
    return str


def options_of(cls: type) -> tuple[Option, ...]:
    """The `Option`s of a config dataclass, in field order (fields declared without `option` are skipped)."""
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META_KEY)
        if meta is None or not f.init:
            continue
        found.append(Option(
            name=f.name, kind=_kind_of(f, meta), default=f.default, help=meta["help"], minimum=meta["minimum"],
            maximum=meta["maximum"], exclusive_minimum=meta["exclusive_minimum"], choices=meta["choices"],
            none_means=meta["none_means"], owner=cls.__name__,
        ))
    return tuple(found)


def check_options(instance: Any) -> None:
    """Validate (and normalise in place) every `option` field of a frozen dataclass instance."""
    for opt in options_of(type(instance)):
        value = opt.check(getattr(instance, opt.name))
        object.__setattr__(instance, opt.name, value)


__all__ = ["Option", "check_options", "option", "options_of"]
