"""Command-line options made from a config model's fields, so a job's defaults and help are the model's.

A job that restates a default drifts from its config model; here the option's default, its
parsing (type, choices, flag) and its help all come from the field.
"""

from __future__ import annotations

import argparse
import typing

from pydantic import BaseModel

_NO_DEFAULT = object()


def shown(value) -> str:
    """A default as a user would type it: tuples comma-separated, None as 'none'."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _parsing(annotation, default) -> dict:
    """argparse's action, type or choices for a field's annotation."""
    if annotation is bool:
        return {"action": "store_true"} if default is False else {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": typing.get_args(annotation)}
    types = [t for t in typing.get_args(annotation) or (annotation,) if t is not type(None)]
    if len(types) == 1 and typing.get_origin(types[0]) is typing.Literal:
        return {"choices": typing.get_args(types[0])}
    return {"type": types[0]} if len(types) == 1 and types[0] in (int, float, str) else {}


def field_option(parser: argparse.ArgumentParser, model: type[BaseModel], name: str, *flags: str,
                 help: str | None = None, default=_NO_DEFAULT, **kwargs) -> argparse.Action:
    """Add the option for ``model``'s field ``name``: ``--field-name`` unless ``flags`` are given, a
    positional for a required field. The default is the field's; pass ``default=None`` where the
    model fills in its own default when the value is left out. ``help`` is the field's description
    unless given (for fields that have none); the field's default is appended to it."""
    info = model.model_fields[name]
    field_default = None if info.is_required() else info.get_default(call_default_factory=True)
    text = help or info.description or name.replace("_", " ")
    if field_default is not None and field_default is not False:
        text += f" (default {shown(field_default)})"
    text = text.replace("%", "%%")
    if not ({"action", "type", "choices"} & kwargs.keys()):
        kwargs.update(_parsing(info.annotation, field_default))
    if info.is_required() and not flags:
        return parser.add_argument(name, metavar=name.upper(), help=text, **kwargs)
    return parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), dest=name, help=text,
                               default=field_default if default is _NO_DEFAULT else default, **kwargs)
