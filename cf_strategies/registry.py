"""Strategies by name, typed options, and composition: ``build_strategies("ewc+replay", {...})``.

A strategy's options are the keyword arguments of its ``__init__``; their type hints (with
``Annotated[..., Field(ge=0)]`` bounds, ``Literal`` choices) are the strategy's typed options
model, built here with pydantic when the class is registered. Every construction, by name or
directly, is validated through it: ``EWC(lambda_="abc")`` and ``{"ewc": {"lambda_": "abc"}}`` in a
config are the same error, naming the strategy, the option and the rule.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Mapping
from typing import Any

import pydantic

from cf_strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


class StrategyOptionError(ValueError):
    """An option of a strategy is unknown, of the wrong type or out of range."""


def _options_model(cls: type[Strategy]) -> type[pydantic.BaseModel]:
    """A pydantic model whose fields are ``cls.__init__``'s keyword arguments."""
    init = cls.__init__
    hints = typing.get_type_hints(init, include_extras=True)
    fields: dict[str, Any] = {}
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    return pydantic.create_model(
        f"{cls.__name__}Options",
        __config__=pydantic.ConfigDict(
            extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False
        ),
        **fields,
    )


def parse_options(
    name: str, options: Mapping[str, Any] | None, strict: bool = False
) -> dict[str, Any]:
    """The options of strategy ``name`` checked and converted by its typed model (``"1e3"`` →
    1000.0, unless ``strict``: then a value must have its option's type, as in a config file);
    numbers are finite. Raises :class:`StrategyOptionError` naming each bad option and the
    valid ones."""
    model = STRATEGIES[name].options_model
    if not isinstance(options, Mapping | None):
        raise StrategyOptionError(
            f"strategy {name!r}: options must be a mapping of option: value, "
            f"got {type(options).__name__}"
        )
    try:
        parsed = model.model_validate(dict(options or {}), strict=strict)
    except pydantic.ValidationError as err:
        problems = []
        for e in err.errors():
            option = ".".join(str(x) for x in e["loc"]) or "(options)"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown option {option!r}")
            else:
                got = repr(e["input"])
                got = got if len(got) <= 80 else f"{got[:80]}... ({len(got)} characters)"
                problems.append(f"option {option!r}: {e['msg']} (got {got})")
        valid = ", ".join(sorted(model.model_fields)) or "(none)"
        raise StrategyOptionError(
            f"strategy {name!r}: {'; '.join(problems)}; valid options: {valid}"
        ) from None
    return {k: getattr(parsed, k) for k in model.model_fields if k in parsed.model_fields_set}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy buildable by its ``name``, its options typed."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise TypeError(f"two strategies are named {cls.name!r}")
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def validated_init(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = {k: v for k, v in bound.arguments.items() if k != "self"}
        init(self, **parse_options(cls.name, given))

    STRATEGIES[cls.name] = cls
    cls.options_model = _options_model(cls)
    cls.__init__ = validated_init
    return cls


def strategy_options(name: str) -> dict[str, Any]:
    """The keyword arguments a strategy accepts, with their defaults."""
    fields = STRATEGIES[name].options_model.model_fields
    return {k: (None if f.is_required() else f.default) for k, f in fields.items()}


def split_spec(spec: str | list[str]) -> list[str]:
    """``"ewc+replay"`` or ``["ewc", "replay"]`` -> ``["ewc", "replay"]``."""
    names = spec.split("+") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise ValueError("empty strategy spec; valid strategies: " + ", ".join(sorted(STRATEGIES)))
    return names


def validate_spec(
    spec: str | list[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    strict: bool = False,
):
    """Raise a ValueError naming the valid choices for a misspelt strategy, or an unknown or
    invalid option (checked by the strategy's typed options model; see :func:`parse_options`
    for ``strict``)."""
    names = split_spec(spec)
    for name in names:
        if name not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"strategy spec {spec!r} names a strategy twice")
    replacing = [n for n in names if STRATEGIES[n].replaces_task_loss]
    adding = [n for n in names if STRATEGIES[n].augment_batch is not Strategy.augment_batch]
    if replacing and len(adding) > 1:
        raise ValueError(
            f"strategy spec {spec!r}: {replacing[0]} replaces the task loss, so the rows that "
            f"{', '.join(n for n in adding if n not in replacing)} add would not be trained; "
            f"combine {replacing[0]} with regularisers (l2, ewc, si, hlr, wise) instead"
        )
    for name, options in (params or {}).items():
        # Options may wait for a strategy not in the spec (switching strategies keeps them),
        # but must name a real strategy and valid options.
        if name not in STRATEGIES:
            raise ValueError(
                f"options given for unknown strategy {name!r}; valid strategies: "
                + ", ".join(sorted(STRATEGIES))
            )
        parse_options(name, options, strict=strict)
    return names


def build_strategies(
    spec: str | list[str], params: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Strategy]:
    """Build the strategies of ``spec`` with their options from ``params[name]``."""
    names = validate_spec(spec, params)
    params = params or {}
    return [STRATEGIES[name](**dict(params.get(name, {}))) for name in names]
