"""Strategies by name, and composition: ``build_strategies("ewc+replay", {"ewc": {...}})``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from cf_strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy buildable by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise TypeError(f"two strategies are named {cls.name!r}")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_options(name: str) -> dict[str, Any]:
    """The keyword arguments a strategy accepts, with their defaults."""
    sig = inspect.signature(STRATEGIES[name].__init__)
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in list(sig.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def split_spec(spec: str | list[str]) -> list[str]:
    """``"ewc+replay"`` or ``["ewc", "replay"]`` -> ``["ewc", "replay"]``."""
    names = spec.split("+") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise ValueError("empty strategy spec; valid strategies: " + ", ".join(sorted(STRATEGIES)))
    return names


def validate_spec(spec: str | list[str], params: Mapping[str, Mapping[str, Any]] | None = None):
    """Raise a ValueError naming the valid choices for a misspelt strategy or option."""
    names = split_spec(spec)
    for name in names:
        if name not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"strategy spec {spec!r} names a strategy twice")
    for name, options in (params or {}).items():
        # Options may wait for a strategy not in the spec (switching strategies keeps them),
        # but must name a real strategy and real options.
        if name not in STRATEGIES:
            raise ValueError(
                f"options given for unknown strategy {name!r}; valid strategies: "
                + ", ".join(sorted(STRATEGIES))
            )
        valid = strategy_options(name)
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"unknown option {key!r} for strategy {name!r}; valid options: "
                    + (", ".join(sorted(valid)) or "(none)")
                )
    return names


def build_strategies(
    spec: str | list[str], params: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Strategy]:
    """Build the strategies of ``spec`` with their options from ``params[name]``."""
    names = validate_spec(spec, params)
    params = params or {}
    return [STRATEGIES[name](**dict(params.get(name, {}))) for name in names]
