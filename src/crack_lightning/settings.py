"""Settings: the signature of the code that takes a config node is its schema.

conf/ gives each setting's name, default and meaning; the class or function that receives
it (the node's `_target_`, or the one a command names) gives its type, as the parameter's
annotation, and its allowed range, as `Annotated[type, Rule(...)]` metadata. Before
anything slow runs, `check_settings` compares the node with that signature: an unknown
key (with the nearest known one), a missing one, a wrong type or a value out of range
stops with one line naming the setting. What no single setting can say (two fractions
that must leave images to train on) a target states in a `check_together(settings,
section)` static method, which the check calls last.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from hydra.utils import get_method
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from crack_lightning.errors import ConfigError, CrackLightningError

S = TypeVar("S")
# index = class label: Negative (no crack) = 0, Positive (crack) = 1
CLASS_NAMES = ("Negative", "Positive")
# Hydra's own keys of an instantiable node: never a parameter of its target
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


@dataclass(frozen=True)
class Rule:
    """What one setting allows, beyond its type: `allowed` says it in the message
    "SETTING=VALUE must be ALLOWED."; `ok` tells whether a value is."""

    allowed: str
    ok: Callable[[Any], bool]
    shown: Callable[[Any], str] = str  # how the message writes the value
    verb: str = "be"  # "SETTING=VALUE must VERB ALLOWED."


def require(rule: Rule, value: Any, setting: str, error: type[Exception]) -> None:
    """The rule's one message unless `value` meets it: for the start-up check, and for a
    library function that is also called directly."""
    if not rule.ok(value):
        raise error(f"{setting}={rule.shown(value)} must {rule.verb} {rule.allowed}.")


def at_least(low: float, what: str = "an integer") -> Rule:
    """A number at or above `low` ("an integer >= 1")."""
    return Rule(f"{what} >= {low}", lambda value: value >= low)


def at_most(high: float, what: str = "an integer", why: str = "") -> Rule:
    """A number at or below `high` ("an integer <= 1024 (why)")."""
    return Rule(f"{what} <= {high}" + (f" ({why})" if why else ""), lambda value: value <= high)


def above(low: float, what: str = "a number") -> Rule:
    """A number strictly above `low` ("a number > 0")."""
    return Rule(f"{what} > {low}", lambda value: value > low)


def within(low: float, high: float, what: str = "") -> Rule:
    """A number in [low, high]."""
    return Rule(f"in [{low}, {high}]" + (f" {what}" if what else ""), lambda v: low <= v <= high)


# a probability-like share strictly inside (0, 1), e.g. a decision threshold
OPEN_UNIT = Rule("strictly between 0 and 1", lambda value: 0 < value < 1)
# a count where 0 turns the thing off
NONE_IS_OFF = Rule("an integer >= 0 (0: none)", lambda value: value >= 0)


def plain(value: Any) -> Any:
    """A config value with its interpolations resolved, containers as dicts and lists."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _unannotated(hint: Any) -> tuple[Any, list[Rule]]:
    """The type of an `Annotated[type, Rule, ...]` hint and its rules."""
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        return base, [extra for extra in extras if isinstance(extra, Rule)]
    return hint, []


def _checkable(hint: Any) -> Any:
    """The nearest type OmegaConf can check a value against (Any where it has none)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, bool, str, Path, Any) or (
        isinstance(hint, type) and issubclass(hint, enum.Enum)
    ):
        return hint
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _checkable(rest[0]) if len(rest) == 1 else Any
        return Any if inner is Any or len(rest) == len(args) else inner | None
    if origin is list and args:
        return list[_checkable(args[0])]
    if origin is dict and len(args) == 2 and args[0] in (str, int):
        return dict[args[0], _checkable(args[1])]
    return Any


def _literals(hint: Any) -> tuple | None:
    """The values a hint allows when it is made of `Literal[...]`s (and None) alone."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    values: list = []
    for arg in typing.get_args(hint):
        inner = (None,) if arg is type(None) else _literals(arg)
        if inner is None:
            return None
        values += inner
    return tuple(values)


def describe(hint: Any) -> str:
    """What a parameter's type allows, in a user's words."""
    if (values := _literals(hint)) is not None:
        named = [str(v).lower() for v in values if v is not None]
        return "one of " + ", ".join(named) + (" or null" if None in values else "")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return "a list, each item " + describe(args[0])
    if typing.get_origin(hint) is dict:
        return "a mapping, each value " + describe(args[1])
    if args:  # X | None
        return describe(args[0]) + " or null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(m.value for m in hint)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    return words.get(hint, "a path" if hint is Path else str(hint))


@dataclass(frozen=True)
class Parameter:
    """One setting as the signature states it."""

    name: str
    hint: Any  # the annotation without its rules
    rules: list[Rule]
    required: bool


def parameters_of(target: Callable) -> list[Parameter] | None:
    """The settings `target` takes (None when it takes any keyword: **kwargs)."""
    function = target.__init__ if isinstance(target, type) else target
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # annotations naming what this module cannot resolve: types unchecked
        hints = {}
    found = []
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            return None
        if param.kind is param.VAR_POSITIONAL or name == "self":
            continue
        hint, rules = _unannotated(hints.get(name, Any))
        found.append(Parameter(name, hint, rules, param.default is param.empty))
    return found


def nearest(key: str, known: list[str], prefix: str) -> str:
    """The hint at the known name nearest a misspelt one ("Did you mean data.x?"), or "";
    a name spelt out whose short form is known (learning_rate for lr) counts too."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    initials = "".join(word[0] for word in key.split("_") if word)
    close = close or [name for name in known if name == initials]
    return f" Did you mean {prefix}{close[0]}?" if close else ""


def check_settings(
    values: Mapping | DictConfig,
    target: Callable | str,
    section: str,
    error: type[CrackLightningError] | None = None,
    others: Collection[str] = (),
    rules: Mapping[str, Rule] | None = None,
) -> dict[str, Any]:
    """Check a config node against the signature of what takes it; return its settings as
    plain values. `others`: the node's keys checked on their own (its sub-sections) and
    the target's parameters that are no settings (what the caller passes itself).
    `rules`: ranges for the parameters of a target this project does not own."""
    if isinstance(target, str):
        try:
            target = get_method(target)
        except (OmegaConfBaseException, ImportError, ValueError, AttributeError, TypeError):
            raise (error or ConfigError)(
                f"{section}._target_={target} cannot be imported."
            ) from None
    error = error or getattr(target, "settings_error", ConfigError)
    prefix = f"{section}." if section else ""
    given = {
        str(k): values[k]
        for k in values
        if k not in HYDRA_KEYS and k not in others and not _missing(values, k)
    }
    params = parameters_of(target)
    if params is None:
        return {k: plain(v) for k, v in given.items()}
    params = [p for p in params if p.name not in others]
    names = [p.name for p in params]
    if unknown := sorted(set(given) - set(names)):
        close = nearest(unknown[0], names, prefix)
        if not section:  # a command's own settings
            raise error(
                f"Unknown setting {unknown[0]!r}; this command takes "
                f"{', '.join(f'{n}=' for n in names)} and the sections "
                f"{', '.join(sorted(set(others) - {'task_name'}))} (see --help).{close}"
            )
        name = values.get("_target_") or getattr(target, "__qualname__", str(target))
        raise error(
            f"{section}: {name} takes no setting {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(names)}.{close}"
        )
    partial = bool(values.get("_partial_"))  # the caller passes the rest
    if missing := [p.name for p in params if p.required and p.name not in given and not partial]:
        raise error(f"missing setting(s): {', '.join(prefix + n for n in missing)}.")
    settings, foreign = {}, rules or {}
    for param in (p for p in params if p.name in given):
        settings[param.name] = value = _typed(given[param.name], param, prefix, error)
        own = param.rules + ([foreign[param.name]] if param.name in foreign else [])
        for rule in own if value is not None else ():
            require(rule, value, prefix + param.name, error)
    if together := getattr(target, "check_together", None):
        together(settings, section)
    return settings


def _missing(values: Mapping | DictConfig, key: Any) -> bool:
    """A required setting left ??? in conf/."""
    return isinstance(values, DictConfig) and OmegaConf.is_missing(values, key)


def _typed(raw: Any, param: Parameter, prefix: str, error: type[Exception]) -> Any:
    """The value as the parameter's type has it (OmegaConf's conversions), or the error."""
    value = plain(raw)
    refusal = f"{prefix}{param.name}={value} must be {describe(param.hint)}."
    if (allowed := _literals(param.hint)) is not None:
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise error(refusal)
        return value
    kind = _checkable(param.hint)
    if kind is Any:
        return value
    holder = dataclasses.make_dataclass("Setting", [("value", kind, MISSING)])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(holder), {"value": value})
    except ValidationError:
        raise error(refusal) from None
    return OmegaConf.to_object(merged).value


def settings_of(
    values: Mapping | DictConfig, cls: type[S], section: str, others: Collection[str] = ()
) -> S:
    """A settings class (a dataclass the code reads) built from its checked config node."""
    return cls(**check_settings(values, cls, section, others=others))
