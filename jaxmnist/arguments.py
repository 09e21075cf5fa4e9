"""Keyword arguments written as text, as ``--optimizer-args`` and ``--schedule-args`` take them.

``"rho=0.95,eps=1e-7,nesterov=true,milestones=[5,10]"``: comma-separated ``NAME=VALUE`` pairs whose values
are Python literals (numbers, ``True``/``False``/``None`` in any case, lists, quoted strings); a bare word
is a string. The text is what a run's settings store, so checkpoints and metrics files keep it as given.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Mapping
from typing import Any

Arguments = dict[str, Any]
_WORDS = {"true": True, "false": False, "none": None}


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for character in text:
        if quote:
            quote = "" if character == quote else quote
        elif character in "'\"":
            quote = character
        else:
            depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(character, 0)
        if character == "," and depth == 0 and not quote:
            parts.append("".join(current))
            current = []
        else:
            current.append(character)
    parts.append("".join(current))
    return parts


def _literal(text: str) -> Any:
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_arguments(text: str, argument: str) -> Arguments:
    """The keyword arguments ``text`` writes, in order.

    Args:
        text: ``NAME=VALUE`` pairs separated by commas; empty for none.
        argument: the API argument ``text`` was given as, named in errors.

    Returns:
        ``{NAME: value}``.

    Raises:
        ValueError: a pair without ``=``, a name that is not an identifier, or a name given twice.

    Example:
        >>> parse_arguments("rho=0.95,eps=1e-7,centered=true,milestones=[5, 10]", "optimizer_args")
        {'rho': 0.95, 'eps': 1e-07, 'centered': True, 'milestones': [5, 10]}
    """
    arguments: Arguments = {}
    if not text.strip():
        return arguments
    for pair in _split_top_level(text):
        name, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not name.isidentifier() or not value:
            raise ValueError(f"`{argument}`: {pair.strip()!r} is not NAME=VALUE (e.g. 'rho=0.95,eps=1e-7')")
        if name in arguments:
            raise ValueError(f"`{argument}` gives {name!r} twice")
        arguments[name] = _literal(value)
    return arguments


def format_arguments(arguments: Arguments) -> str:
    """The text ``parse_arguments`` reads back as ``arguments``.

    Example:
        >>> format_arguments({"rho": 0.95, "centered": True, "name": "x"})
        "rho=0.95,centered=True,name='x'"
    """
    return ",".join(f"{name}={value!r}" for name, value in arguments.items())


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def check_arguments(function: Callable, arguments: Arguments, argument: str,
                    given: Mapping[str, str] | tuple[str, ...] = ()) -> None:  # fmt: skip
    """Raises ``ValueError`` naming ``argument`` when ``function`` cannot take ``arguments``: a name its
    signature lacks, one of ``given`` (set elsewhere: by the setting it maps to, else by its namesake), or a
    value of another kind than the parameter's default (a number for a number, ``True``/``False`` for a flag).

    Example:
        >>> import optax
        >>> check_arguments(optax.rmsprop, {"decay": 0.9, "centered": True}, "optimizer_args", ("learning_rate",))
        >>> check_arguments(optax.rmsprop, {"rho": 0.9}, "optimizer_args")
        Traceback (most recent call last):
        ...
        ValueError: `optimizer_args`: rmsprop takes no 'rho' (it takes learning_rate, decay, eps, ...)
    """
    name = getattr(function, "__name__", repr(function))
    parameters = inspect.signature(function).parameters
    takes_any = any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values())
    for key, value in arguments.items():
        if key in given:
            setting = given[key] if isinstance(given, Mapping) else key
            raise ValueError(f"`{argument}` sets {key!r}, which `{setting}` sets")
        parameter = parameters.get(key)
        if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            if takes_any:
                continue
            named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            accepted = [each for each, known in parameters.items() if each not in given and known.kind in named]
            raise ValueError(f"`{argument}`: {name} takes no {key!r} (it takes {', '.join(accepted) or 'none'})")
        default = parameter.default
        if default is parameter.empty or default is None or value is None or callable(default):
            continue
        if _kind(value) != _kind(default):
            raise ValueError(
                f"`{argument}`: {name}'s {key!r} takes a {_kind(default)} (default {default!r}), got {value!r}"
            )
