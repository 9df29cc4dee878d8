"""One typed config per job: YAML parsed into nested dataclasses, ``key=value`` overrides on top.

    cfg = load_config(CdnsConfig, "pipelines/configs/cdns.yaml", ["cdns.mode=self-play", "scaling.actors=2"])

Values are converted to the field's declared type (so ``lr: 1e-4`` is a float, not PyYAML's
string), unknown keys are refused with the list of known ones, and every error names the full
dotted field path. Each config class validates itself in ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the field and the fix."""


def _convert(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {kind.__name__} fields, got {value!r}")
        return _build(kind, value, path)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if kind is Path:
        return Path(str(value))
    raise ConfigError(f"{path}: unsupported field type {kind!r}")


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _with_defaults(default: Any, values: dict) -> dict:
    """``values`` over the fields of ``default``, a section's default instance: a job whose section default
    differs from the section class's own (SfoConfig's ``output.name`` is "sfo", OutputConfig's "sft") keeps
    it when only some of the section's keys are given."""
    merged = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    for key, value in values.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(merged.get(key)):
            value = _with_defaults(merged[key], value)
        merged[key] = value
    return merged


def _build(cls: type[T], values: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known keys are {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, dict):
            default = _default(fields[name])
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                value = _with_defaults(default, value)
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix or cls.__name__}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a validation in __post_init__: its message names the field
        raise ConfigError(str(exc)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Builds ``cls`` from a YAML file (optional) and ``key=value`` overrides (dotted keys)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: {str(path)!r} does not exist; pass a YAML file such as pipelines/configs/*.yaml")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {str(path)!r} must hold a mapping at the top level")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write it as section.key=value, e.g. train.steps=10")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return _build(cls, tree)


def to_dict(config: Any) -> dict:
    """The config as plain YAML-able values (paths as strings)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def job_argparser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every job shares: ``--config FILE`` and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file (see pipelines/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override any field with its dotted path, e.g. train.steps=10 scaling.num_workers=2")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on (default: RAY_ADDRESS when set, as `ray job submit` sets it; "
                             "otherwise a fresh local Ray of this job's own)")
    return parser


def parse_job_args(cls: type[T], prog: str, description: str, argv: list[str] | None = None) -> T | None:
    """Parses a job's command line into its config; prints it and returns None for --print-config."""
    parser = job_argparser(prog, description)
    args = parser.parse_args(argv)
    from pipelines.common import set_ray_address

    set_ray_address(args.address)
    try:
        config = load_config(cls, args.config, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return None
    return config


def job_main(cls: type[T], prog: str, description: str, run: Callable[[T], object], argv: list[str] | None = None) -> int:
    """The body of every job's ``main``: parse the command line into ``cls``, run, exit 2 on bad input.

    Bad input found once the job looks at its files (a missing input, an output that exists) exits
    with status 2 and one line naming the field, not a traceback.
    """
    config = parse_job_args(cls, prog, description, argv)
    if config is None:
        return 0
    try:
        run(config)
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
