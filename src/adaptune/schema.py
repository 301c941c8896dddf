"""Whether a value read from JSON or YAML fits a field's type annotation, and how to say what the
field wants: adapter configs (``config``) and ``adaptune train``'s options (``training.job``) check
what a file holds field by field, so a wrong type is one line naming the field, not a crash later.
"""

from __future__ import annotations

import enum
import math
import types
import typing
from typing import Any


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from JSON) fits the type annotation ``hint`` of a config field."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arm) for arm in args)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple, set)) and all(conforms(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple, set))
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1])
                                               for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


_HINT_NAMES = {type(None): ("null", "nulls"), bool: ("true/false", "true/false values"),
               int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}


def describe_hint(hint: Any, plural: bool = False) -> str:
    """``int | None`` -> 'an integer or null'; ``list[str]`` -> 'a list of strings'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_hint(a, plural) for a in args))
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        inner = f" of {describe_hint(args[0], plural=True)}" if args else ""
        return ("lists" if plural else "a list") + inner
    if origin is dict or hint is dict:
        inner = f" of {describe_hint(args[1], plural=True)}" if args else ""
        return ("objects" if plural else "an object") + inner
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(m.value for m in hint)
    if hint in _HINT_NAMES:
        return _HINT_NAMES[hint][plural]
    return getattr(hint, "__name__", str(hint))
