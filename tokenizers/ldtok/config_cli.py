"""Command-line flags generated from the config dataclasses, so `ldtok` commands and YAML configs share one schema.

```python
add_config_arguments(parser, EvalOptions)                  # --batch-size, --fid {auto,off}, --progress/--no-progress
options = config_from_args(EvalOptions, parser.parse_args())
```

One flag per dataclass field: `--field-name` (nested sections `--section-key`; `prefix="data"` gives `--data-key`),
its type from the annotation (`Literal` -> choices; `bool` -> `--x/--no-x`, a field `no_x` -> `--no-x/--x`; lists and
tuples take values separated by spaces or commas, the flag may repeat, `none` is an empty list; `X | None` -> `X`,
left out means `None`), its default from the dataclass and its help from the field's entry in the dataclass
docstring's `Args:` section (`ldtok.config.arg_descriptions`). A field without a default is a required flag, or a
positional argument when listed in `positional`. `config_from_args` builds the dataclass back through
`ldtok.config.from_dict`, so values are checked exactly as a YAML file's are; its one-line `ConfigError` (exit code 2)
names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .config import ConfigError, _assign, _section_type, arg_descriptions, from_dict

T = TypeVar("T")
_METAVARS = {str: "NAME", int: "N", float: "X"}


def add_config_arguments(parser, cls: type, *, prefix: str = "", rename: dict[str, str] | None = None,
                         exclude: Iterable[str] = (), only: Iterable[str] | None = None,
                         positional: Iterable[str] = (), defaults: dict[str, Any] | None = None,
                         help: dict[str, str] | None = None):
    """Add one flag per field of dataclass `cls` to `parser` (an `ArgumentParser` or an argument group).

    Args:
        parser: where the flags go; returned, so a command can add its own flags next to them.
        cls (`type`): the config dataclass.
        prefix (`str`, defaults to `""`): flag prefix: `"data"` turns field `path` into `--data-path`.
        rename (`dict[str, str]`, *optional*): dotted field -> flag name without dashes, where the flag is not the
            field's name (`{"source": "data-source"}`); the flag's namespace attribute follows the flag.
        exclude (*iterable of str*): dotted fields that get no flag (they keep their dataclass default).
        only (*iterable of str*, *optional*): flags for these dotted fields only.
        positional (*iterable of str*): fields without a default that are positional arguments, in this order.
        defaults (`dict[str, Any]`, *optional*): dotted field -> default of the flag, instead of the dataclass's.
        help (`dict[str, str]`, *optional*): dotted field -> help text, instead of the docstring's description.
    """
    defaults, help = dict(defaults or {}), dict(help or {})
    flags = list(_flags(cls, prefix, rename, exclude, only))
    order = {key: i for i, key in enumerate(positional)}
    for key, tp, field, doc, flag, dest in sorted(flags, key=lambda f: order.get(f[0], -1)):
        default = defaults.get(key, _field_default(field))
        kwargs = _argument_kwargs(key, tp, default, help.get(key, doc))
        if kwargs.get("action") is argparse.BooleanOptionalAction and flag.startswith("no-"):
            kwargs["action"] = _NegatedBoolAction  # `--no-progress/--progress`, not `--no-progress/--no-no-progress`
        if key in order:
            parser.add_argument(dest, **kwargs)
        elif default is dataclasses.MISSING:
            parser.add_argument(f"--{flag}", dest=dest, required=True, **kwargs)
        else:
            parser.add_argument(f"--{flag}", dest=dest, default=default, **kwargs)
    return parser


def config_from_args(cls: type[T], namespace: argparse.Namespace, *, prefix: str = "",
                     rename: dict[str, str] | None = None, exclude: Iterable[str] = (),
                     only: Iterable[str] | None = None, positional: Iterable[str] = (),
                     overrides: dict[str, Any] | None = None) -> T:
    """The `cls` that the flags of `add_config_arguments(parser, cls, ...)` describe.

    Args:
        cls (`type`): the config dataclass.
        namespace (`argparse.Namespace`): the parsed command line.
        prefix, rename, exclude, only, positional: the same as given to `add_config_arguments` (they say which
            attribute holds which field).
        overrides (`dict[str, Any]`, *optional*): dotted field -> value, set after the flags (values a command
            computes, e.g. a default that depends on another flag).

    Raises:
        `ConfigError` (exit code 2): a value the dataclass rejects, as one line naming the flag.
    """
    data: dict[str, Any] = {}
    names = {}
    positional = set(positional)
    for key, _, _, _, flag, dest in _flags(cls, prefix, rename, exclude, only):
        _assign(data, key, getattr(namespace, dest))
        names[key] = dest if key in positional else f"--{flag}"
    for key, value in (overrides or {}).items():
        _assign(data, key, value)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(_name_flag(str(e), names)) from None


def _flags(cls: type, prefix: str, rename, exclude, only):
    """`(dotted key, type, field, description, flag, dest)` of every field of `cls` that gets a flag."""
    rename, exclude = dict(rename or {}), set(exclude)
    only = None if only is None else set(only)
    for key, tp, field, doc in _leaves(cls, ""):
        if key in exclude or (only is not None and key not in only):
            continue
        flag = rename.get(key) or "-".join(p for p in (prefix, key.replace(".", "-").replace("_", "-")) if p)
        yield key, tp, field, doc, flag, flag.replace("-", "_")


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors are one line (`ldtok eval: error: argument --fid: invalid
    choice: 'x' (choose from auto, off) (see ldtok eval --help)`), exit code 2; its subparsers are the same."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _name_flag(message: str, flags: dict[str, str]) -> str:
    """`"batch_size: must be > 0"` -> `"--batch-size: must be > 0"` (the longest dotted key that starts it)."""
    for key in sorted(flags, key=len, reverse=True):
        if message.startswith(f"{key}:") or message.startswith(f"{key}["):
            return flags[key] + message[len(key):]
    return message


def _leaves(cls: type, prefix: str):
    """`(dotted key, type, field, description)` of every non-section field of `cls`, sections expanded; an optional
    section (`DataConfig | None`) gets no flags (it stays unset)."""
    hints = get_type_hints(cls)
    docs = arg_descriptions(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        section = _section_type(tp)
        if section is not None and section is tp:
            yield from _leaves(section, f"{prefix}{field.name}.")
        elif section is None:
            yield f"{prefix}{field.name}", tp, field, docs.get(field.name, "")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argument_kwargs(key: str, tp: Any, default: Any, doc: str) -> dict[str, Any]:
    """`add_argument` keywords for a field of type `tp`: `type`, `choices` or `action`, and `help`."""
    tp = _strip_optional(tp)
    origin = get_origin(tp)
    doc = doc.replace("%", "%%")  # argparse %-formats help strings
    shown = "" if default is dataclasses.MISSING else f" (default: {_show(default)})"
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction, "help": f"{doc}{shown}"}
    if origin is Literal:
        choices = list(get_args(tp))
        return {"type": type(choices[0]), "choices": choices, "help": f"{doc}{shown}"}
    if origin in (list, tuple):
        item = _strip_optional(next((a for a in get_args(tp) if a is not Ellipsis), str))
        if item not in (str, int, float):
            raise TypeError(f"config field {key!r}: no command-line form for lists of {item!r}; exclude it")
        return {"nargs": "+", "action": _ListAction, "item": item, "metavar": _METAVARS[item],
                "help": f"{doc}; values separated by spaces or commas, 'none' for an empty list{shown}"}
    if tp in (str, int, float):
        return {"type": tp, "help": f"{doc}{shown}"}
    raise TypeError(f"config field {key!r}: no command-line form for {tp!r}; exclude it")


class _NegatedBoolAction(argparse.Action):
    """A bool field named `no_x`: `--no-x` sets it, `--x` clears it (`BooleanOptionalAction` would add `--no-no-x`)."""

    def __init__(self, option_strings, dest, default=None, required=False, help=None):
        positive = [f"--{s[len('--no-'):]}" for s in option_strings if s.startswith("--no-")]
        super().__init__([*option_strings, *positive], dest, nargs=0, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _ListAction(argparse.Action):
    """A list flag: `--x a b`, `--x a,b` and `--x a --x b` all give `[a, b]`; `--x none` gives `[]`."""

    def __init__(self, *args, item: type = str, **kwargs):
        super().__init__(*args, **kwargs)
        self.item = item

    def __call__(self, parser, namespace, values, option_string=None):
        parts = [p.strip() for v in values for p in v.split(",") if p.strip()]
        try:
            items = [] if parts == ["none"] else [self.item(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentError(self, f"expected {self.item.__name__} values, got {values!r}") from None
        current = getattr(namespace, self.dest, None)
        given = current is not self.default and isinstance(current, list)  # repeated flag: extend
        setattr(namespace, self.dest, (current if given else []) + items)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)
