"""Command-line flags declared on config dataclass fields, and the parser built from them.

A field whose default is `flag(...)` is a flag (winnow/config.py says how to declare one). From
the field come the flag's name (`--` and the field's name, unless given), its converter (the
field's type: `int`, `float`, `str`, `bool`, `list[...]`, each optionally `| None`), its choices
(a `Literal[...]` type) and its environment variable (`env_name` of the flag's name).

The command line wins over the environment. Variables are read after the command line is parsed,
with the same converter, choices and check as the flag, so that a bad value in the environment
fails `winnow serve` (never `winnow --help`) the way a bad flag does: one line from
`parser.error`, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

_KEY = "winnow.flag"
_POSITIONAL = ":positional"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

ConfigT = TypeVar("ConfigT")


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line (see `flag`)."""

    help: str
    name: str | None = None
    aliases: tuple[str, ...] = ()
    positional: str | None = None
    inverted: bool = False
    repeat: bool = False
    check: Callable[[Any], Any] | None = None


def flag(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    positional: str | None = None,
    inverted: bool = False,
    repeat: bool = False,
    check: Callable[[Any], Any] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a `winnow serve` flag.

    `name`: the flag (default `--field-name`); `aliases`: other spellings (`-tp`).
    `positional`: the value may also come as the positional argument of this metavar.
    `inverted` (bool fields): the flag turns the field off (`--no-cpu-kernels`).
    `repeat` (list fields): one value per use (`--api-key a --api-key b`) instead of several
    after one flag. `check`: value -> value as served; a ValueError's message refuses it.
    """
    metadata = {_KEY: Flag(help, name, aliases, positional, inverted, repeat, check)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def env_name(flag_name: str) -> str:
    """`--max-num-seqs` -> `WINNOW_MAX_NUM_SEQS`."""
    return "WINNOW_" + flag_name.lstrip("-").upper().replace("-", "_")


@dataclasses.dataclass(frozen=True)
class Option:
    """A flagged field, resolved: what the parser and the environment reader need."""

    field: str
    flag: Flag
    names: tuple[str, ...]
    kind: Literal["value", "switch", "list"]
    convert: Callable[[str], Any]
    choices: tuple[Any, ...] | None
    default: Any

    @property
    def env(self) -> str:
        return env_name(self.names[0])

    @property
    def positional_dest(self) -> str:
        return self.field + _POSITIONAL


def options(config: type) -> Iterator[Option]:
    """The flagged fields of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        declared = field.metadata.get(_KEY)
        if declared is not None:
            yield _option(field, declared, hints[field.name])


def _option(field: dataclasses.Field[Any], declared: Flag, hint: Any) -> Option:
    base = _without_none(hint)
    kind: Literal["value", "switch", "list"] = "value"
    if typing.get_origin(base) is list:
        kind, base = "list", typing.get_args(base)[0]
    elif base is bool:
        kind = "switch"
    choices = None
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        base = type(choices[0])
    default = field.default
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    names = (declared.name or "--" + field.name.replace("_", "-"), *declared.aliases)
    return Option(field.name, declared, names, kind, base, choices, default)


def _without_none(hint: Any) -> Any:
    """`X | None` -> `X`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type) -> None:
    """One argument per flagged field of `config`. Nothing has a parser default: what the
    command line leaves out is read from the environment by `read_flags`, else the field's."""
    for option in options(config):
        help_text = option.flag.help.replace("%", "%%")
        if option.flag.positional is not None:
            parser.add_argument(
                option.positional_dest,
                nargs="?",
                metavar=option.flag.positional,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            help_text = f"the {option.flag.positional}, as the positional argument"
        common: dict[str, Any] = {
            "dest": option.field,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if option.kind == "switch":
            if option.flag.inverted:
                action: Any = "store_false"
            elif option.default:
                action = argparse.BooleanOptionalAction
            else:
                action = "store_true"
            parser.add_argument(*option.names, action=action, **common)
            continue
        if option.choices is None:
            common["metavar"] = option.names[0].lstrip("-").upper().replace("-", "_")
        if option.kind == "list":
            common["action" if option.flag.repeat else "nargs"] = (
                "append" if option.flag.repeat else "+"
            )
        parser.add_argument(*option.names, type=option.convert, choices=option.choices, **common)


def read_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, config: type[ConfigT]
) -> ConfigT:
    """The config from parsed arguments, then WINNOW_* variables, then the fields' defaults.

    Every refusal (a bad environment value, a check that fails, a value given twice) ends the
    program through `parser.error`."""
    given = vars(args)
    values: dict[str, Any] = {}
    for option in options(config):
        found = _given_value(option, given, parser)
        if found is None:
            continue
        value, source = found
        if option.flag.check is not None:
            try:
                value = option.flag.check(value)
            except ValueError as exc:
                parser.error(f"{source}: {exc}")
        values[option.field] = value
    return config(**values)


def _given_value(
    option: Option, given: dict[str, Any], parser: argparse.ArgumentParser
) -> tuple[Any, str] | None:
    """(value, where it came from as the user wrote it), or None when nothing set it."""
    flagged = given.get(option.field)
    positional = given.get(option.positional_dest)
    if positional is not None:
        if flagged is not None and flagged != positional:
            parser.error(
                f"two values given for {option.flag.positional}: {positional!r} and "
                f"{option.names[0]} {flagged!r}; give one"
            )
        return positional, f"{option.flag.positional} {positional}"
    if option.field in given:
        shown = " ".join(map(str, flagged)) if isinstance(flagged, list) else flagged
        return flagged, f"{option.names[0]} {shown}"
    raw = os.environ.get(option.env, "")
    if not raw:
        return None
    try:
        return from_env(option, raw), f"{option.env}={raw}"
    except ValueError as exc:
        parser.error(f"{option.env}={raw!r}: {exc}")


def from_env(option: Option, raw: str) -> Any:
    """The field's value from its variable: a switch takes 1/0, true/false, yes/no, on/off; a
    list takes comma-separated items. ValueError says what is wrong."""
    if option.kind == "switch":
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError("expected 1/0, true/false, yes/no or on/off")
        return (word in _TRUE) != option.flag.inverted
    if option.kind == "list":
        return [_convert(option, item) for item in raw.split(",") if item]
    return _convert(option, raw)


def _convert(option: Option, text: str) -> Any:
    """The flag's own conversion and choices, with argparse's wording."""
    try:
        value = option.convert(text)
    except ValueError:
        raise ValueError(f"invalid {option.convert.__name__} value: {text!r}") from None
    if option.choices is not None and value not in option.choices:
        raise ValueError(f"invalid choice: {text!r} (choose from {_listed(option.choices)})")
    return value


def _listed(choices: Sequence[Any]) -> str:
    return ", ".join(repr(choice) for choice in choices)
