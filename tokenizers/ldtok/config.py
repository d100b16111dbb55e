"""Typed configs: YAML files merged with dotted ``key=value`` overrides into dataclasses, validated.

A config is a tree of plain ``@dataclass`` classes.
``load_config(RunConfig, "configs/demo-kl.yaml", ["train.max_steps=4"])`` reads the YAML, applies the overrides
(values are parsed as YAML scalars, so ``4`` is an int and ``[32, 64]`` a list), and builds the dataclasses.
Every key must exist and every value must have the declared type; a mistake is a
:class:`ConfigError` that names the dotted key. Nothing is silently defaulted or ignored.

A dataclass may declare presets with a class attribute ``presets: ClassVar[dict[str, dict]]``; a ``preset: NAME`` key in
its section then fills in that preset's values first, and the section's other keys override them. A dataclass may
declare ``inherit: ClassVar[dict[str, str]]`` (child section -> parent section): a child section that is given starts
from every key of its parent (``RunConfig``'s ``val_data`` inherits ``data``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .atomic import write_text_atomic
from .errors import LdtokError

T = TypeVar("T")


class ConfigError(LdtokError, ValueError):
    """A config file or override does not fit the config's schema; the message names the key (exit code 2)."""

    exit_code = 2
    label = "config error"


class ConfigValueError(ConfigError):
    """A value out of its range or an unknown choice, raised by a config dataclass's `__post_init__`.

    `field` is the key relative to the section (`"kl_weight"`); `from_dict` prefixes the section's dotted path, so the
    user reads `loss.kl_weight: must be >= 0, got -1.0`. Raise it through `invalid`, `check_range` or `check_choice`.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


def invalid(field: str, message: str) -> ConfigValueError:
    """The error for section key `field` (relative to its section): `raise invalid("betas", "needs 2 values")`."""
    return ConfigValueError(field, message)


def check_range(section: Any, field: str, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None) -> None:
    """Raise a `ConfigValueError` naming `field` when `getattr(section, field)` is outside the given bounds."""
    value = getattr(section, field)
    for bound, ok, text in ((ge, lambda v, b: v >= b, ">="), (gt, lambda v, b: v > b, ">"),
                            (le, lambda v, b: v <= b, "<="), (lt, lambda v, b: v < b, "<")):
        if bound is not None and value is not None and not ok(value, bound):
            raise invalid(field, f"must be {text} {bound}, got {value!r}")


def check_choice(section: Any, field: str, allowed) -> None:
    """Raise a `ConfigValueError` naming `field` and the allowed values when the value is not one of them."""
    value = getattr(section, field)
    if value not in allowed:
        raise invalid(field, f"unknown choice {value!r} (allowed: {', '.join(map(str, allowed))})")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Build a config of type `cls` from a YAML file and `key=value` overrides.

    Args:
        cls (`type`): the root dataclass.
        path (`str`, *optional*): a YAML file whose mapping matches `cls`.
        overrides (`list[str]`, *optional*): dotted assignments such as `"train.max_steps=4"`, applied after the file.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _assign(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return from_dict(cls, raw)


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `--config PATH key=value ...` from the command line into a config of type `cls`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(f"usage: --config FILE.yaml [key=value ...]\n\nkeys of {cls.__name__}:\n{describe(cls)}")
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path")
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --config FILE or key=value")
        i += 1
    return load_config(cls, path, overrides)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    presets = getattr(cls, "presets", None)
    if "preset" in data and isinstance(presets, dict):
        name = data.pop("preset")
        if name not in presets:
            raise ConfigError(f"{prefix}preset: unknown preset {name!r} (known: {', '.join(sorted(presets))})")
        data = _deep_merge(presets[name], data)
    for child, parent in getattr(cls, "inherit", {}).items():
        # e.g. RunConfig's val_data: every key of `data`, overridden only where the child section gives one
        if isinstance(data.get(child), dict) and isinstance(data.get(parent, {}), dict):
            data[child] = _deep_merge(data.get(parent) or {}, data[child])
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} (valid keys in {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(fields)})"
        )
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigValueError as e:  # raised by the section's __post_init__: name the full dotted key
        raise ConfigError(f"{prefix}{e.field}: {e.detail}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML-serializable) dict of a config."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type, prefix: str = "", *, inherits_from: str | None = None) -> str:
    """One line per key: `dotted.key: type = default  # description`, the description being the first sentence of
    the key's entry in its dataclass's docstring `Args:` section. Optional sections (`val_data`) are expanded too;
    a section that inherits another (`RunConfig.inherit`) shows `inherits <parent>.<key>` as its default."""
    lines = []
    hints = get_type_hints(cls)
    docs = arg_descriptions(cls)
    inherit = getattr(cls, "inherit", {})
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        section = _section_type(tp)
        if section is not None:
            if section is not tp:  # optional: say what leaving it out means, then its keys
                lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {_default(f)!r}{_comment(docs.get(f.name))}")
            parent = inherit.get(f.name)
            lines.append(describe(section, prefix + f.name + ".", inherits_from=prefix + parent if parent else None))
            continue
        default = f"inherits {inherits_from}.{f.name}" if inherits_from else repr(_default(f))
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {default}{_comment(docs.get(f.name))}")
    return "\n".join(lines)


def arg_descriptions(cls: type) -> dict[str, str]:
    """`name -> first sentence` of each entry of `cls`'s docstring `Args:` section (diffusers style:
    `name (`type`, ...): text`, continued on more-indented lines; `a, b: text` documents two names)."""
    doc = cls.__doc__ or ""
    lines = doc.expandtabs().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return {}
    entries: list[tuple[list[str], list[str]]] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        level = len(line) - len(line.lstrip())
        if indent is None:
            indent = level
        if level < indent:
            break
        match = _ARG_LINE.match(line.strip()) if level == indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            entries.append((names, [match.group(3)]))
        elif entries:
            entries[-1][1].append(line.strip())
    out = {}
    for names, text in entries:
        sentence = _first_sentence(" ".join(text))
        out.update({name: sentence for name in names})
    return out


_ARG_LINE = re.compile(r"^([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*(\(.*?\))?\s*:\s*(.*)$")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.search(r"(?<!e\.g\.)(?<!i\.e\.)(?<!al\.)(?<!vs\.)(?<=[.;])\s", text)
    return text[: match.start()].rstrip(".;") if match else text.rstrip(".")


def _comment(text: str | None) -> str:
    return f"  # {text}" if text else ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "required"


def _section_type(tp: Any) -> type | None:
    """The dataclass of a (possibly optional) config section, else `None`."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        classes = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        if len(classes) == 1:
            return classes[0]
    return None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`; nested mappings are merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list[{_type_name(args[0])}]" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against type `tp`; return it converted (int -> float, list -> tuple, mapping -> dataclass)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: a value is required ({_type_name(tp)})")
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):  # a section: its own error names the key
                return _convert(arg, value, key)
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        converted = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-6" (no dot) as a string; accept it when it parses as a number.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")
