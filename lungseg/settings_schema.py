"""Settings declared once, as dataclass fields: ``name: type = field(default=..., metadata=setting(help=...))``.

A settings class (``lungseg.gate_options.GateOptions``, ``lungseg.edge_runtime.config.EdgeConfig``)
declares each setting once: its name and type (the field), its default, and in :class:`Setting`
its help text, choices, TOML section and sample value. Everything else is derived from that:

- :func:`coerce_mapping`: the TOML loader's type checks (unknown keys rejected, the key named);
- :func:`add_arguments`: the command-line flags (``--name-with-dashes``), whose help ends with the
  real default (``default_text`` where the default is not a constant, e.g. the bundle's value);
- :func:`sample_toml`: the commented sample configuration file;
- :func:`drift`: what a committed sample file or a parser says that the declaration does not.

Standard library only: command-line ``--help`` must stay instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import textwrap
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from lungseg.errors import LungsegError

_KIND_OF = {Path: "path", bool: "bool", int: "int", float: "float", str: "str"}
_METAVARS = {"path": "PATH", "int": "N", "float": "X", "str": "TEXT", "list": "A,B"}
_WIDTH = 100  # sample file comment width
NOT_GIVEN: Any = type("NotGiven", (), {"__repr__": lambda self: "NOT_GIVEN"})()  # ``Setting.sample`` unset


class SettingError(LungsegError, ValueError):
    """A setting value of the wrong type, or an unknown setting name."""


@dataclass(frozen=True)
class Setting:
    """How one setting is explained and offered (the field itself holds its name, type and default)."""

    help: str  # one sentence, no trailing period: the flag's help and the sample file's comment
    section: str = ""  # the sample file's section and the ``--help`` group
    choices: tuple[str, ...] | None = None
    default_text: str | None = None  # the default in words, where it is not a constant (required for None)
    sample: Any = NOT_GIVEN  # the sample file's value, where it differs from the default
    commented: bool = False  # the sample file shows the line commented out (an optional feature)
    flag: bool = True  # offered as ``--name`` (``--name/--no-name`` for booleans)
    short: str | None = None  # e.g. ``-v``
    count: bool = False  # an int counted by repeating the flag (``-vv``)
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # the flag's argument parser (default: from the type)


def setting(**meta: Any) -> dict[str, Setting]:
    """A field's metadata declaring it a setting: ``x: int = field(default=4, metadata=setting(help=...))``."""
    return {"setting": Setting(**meta)}


@dataclass(frozen=True)
class Spec:
    """One setting as derived from its field: name, kind (``path``, ``bool``, ``int``, ``float``, ``str`` or
    ``list``: of strings), default, explanation (``None`` is allowed where the field's type says so)."""

    name: str
    kind: str
    default: Any
    meta: Setting

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default_words(self) -> str:
        """The default as the flag's help and the sample file say it."""
        if self.meta.default_text is not None:
            return self.meta.default_text
        if self.default is None:
            raise SettingError(f"setting {self.name!r} defaults to None but says nothing in default_text")
        return cli_value(self.default)

    @property
    def sample(self) -> Any:
        return self.default if self.meta.sample is NOT_GIVEN else self.meta.sample

    def help_text(self) -> str:
        """The flag's help: what it does, then ``(default: ...)`` - generated, never hand-copied."""
        return f"{self.meta.help} (default: {self.default_words})".replace("%", "%%")


def _kind(name: str, hint: Any) -> str:
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not NoneType]
        if len(args) != 1:
            raise TypeError(f"setting {name!r}: one type (or one type | None), not {hint}")
        hint = args[0]
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        return "list"
    if hint not in _KIND_OF:
        raise TypeError(f"setting {name!r}: type {hint} is not one of Path, bool, int, float, str, list[str]")
    return _KIND_OF[hint]


@functools.cache
def specs(cls: type) -> tuple[Spec, ...]:
    """The settings of a dataclass, in field order (fields without :class:`Setting` metadata are not settings)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("setting")
        if meta is None:
            continue
        kind = _kind(f.name, hints[f.name])
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if meta.choices is not None and default is not None and default not in meta.choices:
            raise TypeError(f"setting {f.name!r}: default {default!r} is not one of its choices")
        spec = Spec(f.name, kind, default, meta)
        _ = spec.default_words  # raises now for a None default without words
        out.append(spec)
    return tuple(out)


def spec_map(cls: type) -> dict[str, Spec]:
    return {s.name: s for s in specs(cls)}


# --- values ------------------------------------------------------------------------------------------------
def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def coerce(spec: Spec, value: Any, base: Path | None = None) -> Any:
    """A TOML value checked against the setting's type (relative paths resolved against ``base``)."""
    name, kind = spec.name, spec.kind
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise SettingError(f"{name} must be a non-empty path string")
        path = Path(value).expanduser()
        return (base / path) if (base is not None and not path.is_absolute()) else path
    if kind == "bool":
        if not isinstance(value, bool):
            raise SettingError(f"{name} must be true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"{name} must be an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"{name} must be a number")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise SettingError(f"{name} must be a string")
        return value
    if isinstance(value, str):  # a list: a TOML array, or one comma-separated string (as the flag takes it)
        value = _comma_list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingError(f"{name} must be a list of strings")
    return list(value)


def coerce_mapping(cls: type, data: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """Check and convert ``{name: value}`` (dashes accepted for underscores); an unknown name is an error."""
    known = spec_map(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise SettingError(f"unknown setting {key!r} (known: {', '.join(sorted(known))})")
        out[name] = coerce(known[name], value, base)
    return out


def check_choices(obj: Any) -> None:
    """Raise :class:`SettingError` naming the first setting of ``obj`` whose value is not one of its choices."""
    cls: type = type(obj)
    for spec in specs(cls):
        value = getattr(obj, spec.name)
        if spec.meta.choices is not None and value is not None and value not in spec.meta.choices:
            raise SettingError(f"{spec.name} must be one of {spec.meta.choices}, not {value!r}")


def cli_value(value: Any) -> str:
    """A value as the flag's help says it: ``on``/``off``, ``2`` for 2.0, ``a,b`` for a list."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(value) if value else "none"
    return str(value)


def toml_value(value: Any) -> str:
    """A value in TOML syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    raise SettingError(f"no TOML form for {value!r}")


# --- command line ------------------------------------------------------------------------------------------
def _flag_parser(spec: Spec) -> Callable[[str], Any]:
    if spec.meta.parse is not None:
        return spec.meta.parse
    parsers: dict[str, Callable[[str], Any]] = {"path": Path, "int": int, "float": float, "str": str,
                                                "list": _comma_list}
    return parsers[spec.kind]


def add_arguments(parser: Any, cls: type, *, unset: bool,
                  names: Iterable[str] | None = None) -> list[argparse.Action]:
    """Add the flags of ``cls``'s settings (those in ``names``, else all) to ``parser``.

    ``unset``: every flag defaults to ``None``, so only flags actually given override a config file (the
    help still states the setting's real default).
    """
    wanted = None if names is None else set(names)
    actions = []
    for spec in specs(cls):
        if not spec.meta.flag or (wanted is not None and spec.name not in wanted):
            continue
        default = None if unset else spec.default
        options = [spec.meta.short, spec.flag] if spec.meta.short else [spec.flag]
        if spec.kind == "bool":
            action = parser.add_argument(*options, action=argparse.BooleanOptionalAction, default=default)
        elif spec.meta.count:
            action = parser.add_argument(*options, action="count", default=default)
        else:
            action = parser.add_argument(*options, type=_flag_parser(spec), choices=spec.meta.choices,
                                         default=default, metavar=spec.meta.metavar or _metavar(spec))
        action.help = spec.help_text()  # set after: Python 3.10's BooleanOptionalAction appends its own default
        actions.append(action)
    return actions


def _metavar(spec: Spec) -> str | None:
    return None if spec.meta.choices else _METAVARS[spec.kind]


def set_flags(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags in ``args`` (those left ``None`` are not given)."""
    return {s.name: getattr(args, s.name) for s in specs(cls)
            if s.meta.flag and getattr(args, s.name, None) is not None}


# --- sample file -------------------------------------------------------------------------------------------
def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in textwrap.wrap(text, _WIDTH - 2)] if text else []


def sample_toml(cls: type, header: str, sections: Sequence[tuple[str, str]]) -> str:
    """The commented sample file: ``header``, then each section (title, explanation) with its settings.

    A setting's line holds its default unless it is commented out or its comment names the default.
    """
    by_section: dict[str, list[Spec]] = {}
    for spec in specs(cls):
        by_section.setdefault(spec.meta.section, []).append(spec)
    unknown = set(by_section) - {title for title, _ in sections}
    if unknown:
        raise SettingError(f"settings in sections with no place in the sample file: {sorted(unknown)}")
    lines = [line.rstrip() for line in header.strip("\n").splitlines()]
    for title, about in sections:
        lines += ["", f"# --- {title} " + "-" * max(3, _WIDTH - 7 - len(title)), *_comment(about)]
        for spec in by_section.get(title, []):
            text = spec.meta.help[:1].upper() + spec.meta.help[1:] + "."
            if spec.meta.commented or spec.sample != spec.default:  # else the line itself is the default
                text += f" Default: {_toml_default_words(spec)}."
            lines += ["", *_comment(text)]
            line = f"{spec.name} = {toml_value(spec.sample)}"
            lines.append(f"# {line}" if spec.meta.commented else line)
    return "\n".join(lines) + "\n"


def _toml_default_words(spec: Spec) -> str:
    if spec.meta.default_text is not None:
        return spec.meta.default_text
    return toml_value(spec.default)


def sample_values(cls: type) -> dict[str, Any]:
    """What loading the sample file gives: the values of its lines not commented out."""
    return {s.name: s.sample for s in specs(cls) if not s.meta.commented}


# --- drift -------------------------------------------------------------------------------------------------
def drift(cls: type, *, committed: str | None = None, expected: str | None = None,
          loaded: dict[str, Any] | None = None, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Where a committed sample file, what the loader made of it, or a parser disagrees with ``cls``.

    ``committed`` is compared with ``expected`` (the freshly generated sample); ``loaded`` (the loader's
    result for the committed file) with the sample values; ``parser``'s flags with the settings' flags,
    help texts and defaults. An empty list: no drift.
    """
    problems: list[str] = []
    if committed is not None and expected is not None and committed != expected:
        ours, theirs = committed.splitlines(), expected.splitlines()
        line = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        where = (f"line {line + 1}: {ours[line]!r}, generated {theirs[line]!r}" if line is not None
                 else f"{len(ours)} lines, generated {len(theirs)}")
        problems.append(f"the sample file differs from the generated one ({where})")
    if loaded is not None:
        want = sample_values(cls)
        for name in sorted(set(want) | set(loaded)):
            if name not in loaded:
                problems.append(f"sample file: {name} missing")
            elif name not in want:
                problems.append(f"sample file: {name} = {loaded[name]!r} should be commented out or absent")
            elif loaded[name] != want[name] and not _same_path(loaded[name], want[name]):
                problems.append(f"sample file: {name} = {loaded[name]!r}, the schema says {want[name]!r}")
    if parser is not None:
        problems += _parser_drift(cls, parser)
    return problems


def _same_path(loaded: Any, wanted: Any) -> bool:
    return isinstance(loaded, Path) and isinstance(wanted, str) and loaded == Path(wanted)


def _parser_drift(cls: type, parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    actions = {a.dest: a for a in parser._actions}  # argparse has no public accessor
    for spec in specs(cls):
        action = actions.get(spec.name)
        if not spec.meta.flag:
            if action is not None:
                problems.append(f"{spec.name}: a flag, but declared as file-only")
            continue
        if action is None:
            problems.append(f"{spec.flag}: declared but missing from the parser")
            continue
        if spec.flag not in action.option_strings:
            problems.append(f"{spec.name}: flag {action.option_strings}, declared {spec.flag}")
        if action.help != spec.help_text():
            problems.append(f"{spec.flag}: help {action.help!r} is not the declared {spec.help_text()!r}")
        if action.default is not None and action.default != spec.default:
            problems.append(f"{spec.flag}: parser default {action.default!r}, declared {spec.default!r}")
        if tuple(action.choices or ()) != tuple(spec.meta.choices or ()):
            problems.append(f"{spec.flag}: choices {action.choices}, declared {spec.meta.choices}")
    return problems
