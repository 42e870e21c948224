"""Command-line flags generated from config dataclass fields, so a new option is one field.

Each field becomes `--<name>` (or its metadata `flag`), typed from its annotation, with its
metadata `help` and `choices`. No defaults are set on the parser (argparse.SUPPRESS): an absent
flag leaves the value to params.yaml or the dataclass (see schemas/params.py for precedence).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _optional(text: str):
    """`X | None` fields: '' or 'none' on the command line means None."""
    return None if text.strip().lower() in ("", "none", "null") else text


def _parse_as(kind):
    def parse(text: str):
        value = _optional(text)
        return value if value is None else kind(value)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _type_of(hint) -> tuple[type, bool]:
    """(base type, accepts None) of an annotation such as `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def add_fields(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), dest: str = "",
               helps: dict[str, str] | None = None) -> None:
    """One flag per field of `cls`; `dest` prefixes the parsed names so two configs can share
    field names (the training batch_size and the evaluation one). `helps` gives a field the
    help text of this command, where the field's own describes another command's use of it
    (EvaluationConfig's eval_set help is the pipeline's: "after every round")."""
    helps = helps or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = f.metadata.get("flag", f"--{f.name}")
        kind, nullable = _type_of(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = f" (default: {default})" if default not in (None, "", []) and kind is not bool else ""
        common = {"dest": dest + f.name, "help": (helps.get(f.name, f.metadata.get("help", "")) + shown).strip() or None}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind) or (str,)
            parser.add_argument(flag, action="append", type=item,
                                metavar="TEXT" if item is str else item.__name__.upper(), **common)
        else:
            choices = f.metadata.get("choices")
            parse = _parse_as(kind) if nullable else kind
            parser.add_argument(flag, type=parse, choices=(*choices, None) if choices and nullable
                                else choices, metavar=f"{{{','.join(choices)}}}" if choices else f.name.upper(),
                                **common)


def field_values(args: argparse.Namespace, cls, dest: str = "") -> dict:
    """The fields of `cls` that were given on the command line."""
    given = vars(args)
    return {f.name: given[dest + f.name] for f in dataclasses.fields(cls) if dest + f.name in given}
