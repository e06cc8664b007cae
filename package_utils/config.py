"""YAML configs with inheritance and typed ``a.b=c`` overrides.

A config file may name a parent with ``_base_: other.yaml`` (path relative to the file); the child
says only what differs. Keys are checked against the defaults: an unknown key or a value of the wrong
type is an error that names the key and the file it came from.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

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
    if value is None:
        return
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


def format_summary(stage: str, summary: dict) -> str:
    """Two readable lines: the stage's counts, and the file it wrote."""
    parts = ", ".join(f"{key} {value}" for key, value in summary.items() if key != "index")
    return f"[{stage}] {parts}\n[{stage}] index: {summary.get('index')}"


def run_stage(stage: str, parser, defaults: Mapping, flag_to_key: Mapping[str, str], run, argv=None) -> int:
    """The shared ``main`` of a stage: defaults <- --config <- overrides <- flags, run, print the summary.

    Returns 0 on success, 1 when some videos failed, 2 for a usage or input error, a busy, read-only or full
    output (logged, no traceback).
    """
    import logging

    from package_utils.io_utils import OutputBusyError

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(defaults, args.config, args.overrides)
        for flag, key in flag_to_key.items():
            set_if_given(config, key, getattr(args, flag))
        summary = run(config)
    except (ValueError, OSError, OutputBusyError) as error:
        logging.getLogger(f"package_utils.{stage}").error("%s", error)
        return 2
    print(format_summary(stage, summary))
    return 0 if summary.get("failed", 0) == 0 else 1
