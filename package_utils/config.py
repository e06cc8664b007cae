"""YAML configs with inheritance and typed ``a.b=c`` overrides.

A config file may name a parent with ``_base_: other.yaml`` (path relative to the file); the child
says only what differs. Keys are checked against the defaults: an unknown key or a value of the wrong
type is an error that names the key and the file it came from.

The preprocessing stages declare their settings once, as a :class:`StageSpec` of :class:`Option` rows; the
defaults, the command-line flags, the flag -> key map, the keyword entry point and the list of settings that
change outputs (the stage's fingerprint) all derive from that table.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key (and file, when known)."""


def _merge(base: dict, update: Mapping, source: str, defaults: Mapping | None, prefix: str = "") -> dict:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if defaults is not None and key not in defaults:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known: {', '.join(sorted(defaults))})")
        default = None if defaults is None else defaults[key]
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            sub_defaults = default if isinstance(default, Mapping) and default else None
            base[key] = _merge(base[key], value, source, sub_defaults, prefix=f"{dotted}.")
        else:
            if defaults is not None:
                value = _coerce(value, default, dotted, source)
            base[key] = copy.deepcopy(value)
    return base


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Accept ``value`` if it fits the type of ``default`` (None defaults accept anything)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif isinstance(default, dict):
        if isinstance(value, Mapping):
            return dict(value)
    raise ConfigError(f"{source}: key '{key}' must be {_type_name(default)}, got {value!r} ({_type_name(value)})")


def read_yaml(path: str | os.PathLike, defaults: Mapping | None = None, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and everything it inherits through ``_base_`` (child keys win).

    With ``defaults``, each file's own keys and types are checked against them, so an error names the file
    the bad key is written in (a parent, not the child that inherits it).
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as handle:
        try:
            content = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                              f"{error.start}); save the file as UTF-8") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base_name = content.pop("_base_", None)
    if defaults is not None:
        _merge(copy.deepcopy(dict(defaults)), content, str(path), defaults)
    if base_name is None:
        return content
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{path}: _base_ must be a file name, got {base_name!r}")
    base = read_yaml(path.parent / base_name, defaults, _seen + (path,))
    return _merge(base, content, str(path), None)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c) with ``c`` parsed as YAML (so 3, 0.5, true, [1, 2] keep their types)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        return key.split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:  # unclosed brackets or quotes; tags such as !!python/object are refused
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"override '{text}': the value is not valid YAML ({reason}); quote it to pass a "
                          "string") from None


def build_config(defaults: Mapping, path: str | os.PathLike | None = None,
                 overrides: Iterable[str] = ()) -> dict:
    """Defaults <- YAML file (with inheritance) <- ``key=value`` overrides, all type-checked."""
    config = copy.deepcopy(dict(defaults))
    if path is not None:
        config = _merge(config, read_yaml(path, defaults), str(path), defaults)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        config = _merge(config, nested, f"override '{text}'", defaults)
    return config


def set_if_given(config: dict, dotted: str, value: Any) -> None:
    """Apply an argparse value onto ``config`` unless it is None (flag not given)."""
    if value is not None:
        set_value(config, dotted, value)


def format_summary(stage: str, summary: dict) -> str:
    """Two readable lines: the stage's counts, and the file it wrote."""
    parts = ", ".join(f"{key} {value}" for key, value in summary.items() if key != "index")
    return f"[{stage}] {parts}\n[{stage}] index: {summary.get('index')}"


@dataclass(frozen=True)
class Option:
    """One stage setting: config key, default, flag and whether it changes what the stage writes.

    Attributes:
        key: dotted config (YAML) key, e.g. ``crop.size``.
        default: the value when neither a config file, an override, a flag nor a keyword sets it.
        help: the flag's help text.
        name: keyword of the stage's ``run`` and argparse dest; the flag is ``--`` + name with dashes
            (default: the key itself, which must then have no dot).
        type: value type (str, int or float) checked for keyword values and used by argparse; default: the
            default's type.
        choices: allowed values, for argparse.
        many: a list of values (``--flag a b c``).
        switch: a flag without a value; given means True.
        flag: False for settings set only through a config file, an override or a keyword.
        output: True when the setting changes the stage's outputs, i.e. belongs to its fingerprint.
    """

    key: str
    default: Any = None
    help: str = ""
    name: str = ""
    type: type | None = None
    choices: tuple | None = None
    many: bool = False
    switch: bool = False
    flag: bool = True
    output: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            if "." in self.key:
                raise ValueError(f"option {self.key!r}: a nested key needs a name")
            object.__setattr__(self, "name", self.key)
        if self.type is None and self.default is not None and not self.many:
            object.__setattr__(self, "type", type(self.default))

    @property
    def flag_text(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, source: str) -> Any:
        """A keyword value of this option, type-checked (paths become strings, as config files hold them)."""
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if value is None:
            return None
        if self.many:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: {self.name} must be a list, got {value!r}")
            return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        if self.type is not None:
            value = _coerce(value, self.type(), self.key, source)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{source}: {self.name} must be one of {', '.join(map(str, self.choices))}, "
                              f"got {value!r}")
        return value


def _get(config: Mapping, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        node = node[key]
    return node


class StageSpec:
    """A stage's settings declared once: defaults, flags, keyword entry point and fingerprint derive from it.

    Args:
        stage: stage name (``crop``, ...), used in messages and ``prog``.
        options: the settings, in ``--help`` order.
        description: the parser's description.
        fingerprint: the stage's serialisation of its output-changing settings (what its caches are keyed
            on) from a resolved config: it reads the options marked ``output``, others only where they change
            one of those (the crop stage's DFW dataset implies detector none); default: those settings by name.
    """

    def __init__(self, stage: str, options: Sequence[Option], description: str,
                 fingerprint: Callable[[dict], Any] | None = None):
        self.stage, self.options, self.description = stage, tuple(options), description
        self._fingerprint = fingerprint
        self.by_name = {option.name: option for option in self.options}
        if len(self.by_name) != len(self.options) or len({o.key for o in self.options}) != len(self.options):
            raise ValueError(f"{stage}: option names and keys must be unique")

    @property
    def defaults(self) -> dict:
        """The nested default config (a fresh copy)."""
        config: dict = {}
        for option in self.options:
            *parents, last = option.key.split(".")
            node = config
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = copy.deepcopy(option.default)
        return config

    @property
    def flag_to_key(self) -> dict[str, str]:
        return {option.name: option.key for option in self.options if option.flag}

    @property
    def output_options(self) -> tuple[Option, ...]:
        return tuple(option for option in self.options if option.output)

    def build_parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"python -m package_utils.{self.stage}", description=self.description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", help="YAML config (configs/preprocess/ has examples); overrides and flags "
                                             "win over it")
        for option in self.options:
            if not option.flag:
                continue
            if option.switch:  # default None: a switch not given leaves the config file's value
                parser.add_argument(option.flag_text, action="store_true", default=None, help=option.help)
            else:
                parser.add_argument(option.flag_text, type=None if option.many else option.type,
                                    choices=option.choices, nargs="+" if option.many else None, help=option.help)
        parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
        return parser

    def config(self, path: str | os.PathLike | None = None, overrides: Iterable[str] = (), /,
               **settings: Any) -> dict:
        """Defaults <- YAML file <- ``key=value`` overrides <- keyword settings (named as the flags)."""
        config = build_config(self.defaults, path, overrides)
        return self.apply(config, settings)

    def apply(self, config: Mapping, settings: Mapping[str, Any]) -> dict:
        """A copy of ``config`` with keyword settings (option names) set, type-checked."""
        config = copy.deepcopy(dict(config))
        for name, value in settings.items():
            option = self.by_name.get(name)
            if option is None:
                raise TypeError(f"{self.stage}: unknown setting {name!r} (known: {', '.join(sorted(self.by_name))})")
            set_value(config, option.key, option.check(value, f"{self.stage} setting {name}"))
        return config

    def resolve(self, config: Mapping | None, settings: Mapping[str, Any]) -> dict:
        """What a stage's ``run`` works on: a full config (as ``main`` builds it) or the defaults, plus keywords."""
        return self.apply(self.defaults if config is None else config, settings)

    def output_settings(self, config: Mapping) -> dict[str, Any]:
        """The output-changing settings of ``config`` by name (the inputs of the fingerprint)."""
        return {option.name: _get(config, option.key) for option in self.output_options}

    def fingerprint(self, config: Mapping) -> Any:
        """What the stage's caches are keyed on, for a resolved ``config``."""
        if self._fingerprint is None:
            return self.output_settings(config)
        return self._fingerprint(dict(config))

    def parse(self, argv: Sequence[str] | None = None) -> dict:
        """The config a command line asks for: defaults <- --config <- overrides <- flags."""
        return self._from_args(self.build_parser().parse_args(argv))

    def _from_args(self, args: argparse.Namespace) -> dict:
        config = build_config(self.defaults, args.config, args.overrides)
        for name, key in self.flag_to_key.items():
            set_if_given(config, key, getattr(args, name))
        return config

    def main(self, run: Callable[[dict], dict], argv: Sequence[str] | None = None) -> int:
        """The stage's command line: parse, run, print the summary.

        Returns 0 on success, 1 when some videos failed, 2 for a usage or input error, a busy, read-only or full
        output (logged, no traceback).
        """
        from package_utils.io_utils import OutputBusyError

        args = self.build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            summary = run(self._from_args(args))
        except (ValueError, OSError, OutputBusyError) as error:
            logging.getLogger(f"package_utils.{self.stage}").error("%s", error)
            return 2
        print(format_summary(self.stage, summary))
        return 0 if summary.get("failed", 0) == 0 else 1


def set_value(config: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
