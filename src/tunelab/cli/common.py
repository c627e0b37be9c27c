"""The one config dialect of every command: a run config, `a.b=c` overrides, and flags that are short aliases of
config keys, their help text and default read from the schema's `Field(description=...)`.

Precedence (config/load.py, README "Configuration"): schema default < environment variable < config file < flag
< a.b=c override. A flag is None unless given, so a config file's value is kept when the flag is absent.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tunelab.config import RunConfig, load_config
from tunelab.config.load import Added

_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)+")


@dataclass(frozen=True)
class Setting:
    """`--flag VALUE` as a short alias of the config key `key` (e.g. --port for serve.port)."""

    flag: str
    key: str
    extend: bool = False  # list keys: each value is added to the config's list instead of replacing it
    parse: Callable[[str], Any] | None = None  # text -> value, for a flag written differently (f16,q8_0 -> list)
    metavar: str | None = None
    note: str = ""  # what the flag adds to the schema's description (e.g. "comma-separated")
    const: Any = True  # the value a flag of a bool key sets (False: --no-table for export.table)

    @property
    def dest(self) -> str:  # argparse's own name for the flag: args.port, args.max_queue
        return self.flag.lstrip("-").replace("-", "_")


# how chat and eval load a model for generation (serve has its own notes on them)
LOADING = (
    Setting("--device", "model.device"),
    Setting("--dtype", "model.dtype"),
    Setting("--quantize", "model.quantize"),
    Setting("--threads", "train.threads", note="CPU threads of generation; a run's own train.threads when MODEL is "
            "a run"),
)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("config", nargs=None if required else "?", help="run config YAML")
    add_override_argument(parser)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as train.lr=1e-4 or serve.port=9000 (applied last)")


def add_settings(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """One flag per Setting, with the schema's type, choices, description and default in its help."""
    for s in settings:
        field = schema_field(s.key)
        kwargs: dict[str, Any] = {"dest": s.dest, "default": None, "help": setting_help(s, field)}
        kind, choices = _flag_type(field.annotation)
        if kind is not bool and not choices:
            kwargs["metavar"] = s.metavar or s.key.rsplit(".", 1)[-1].upper()
        if s.parse is not None:
            kwargs["type"] = s.parse
        elif kind is bool:
            kwargs.update(action="store_const", const=s.const)
        elif kind is list:
            kwargs.update(action="append", type=str)
        else:
            kwargs.update(type=kind, choices=choices)
        parser.add_argument(s.flag, **kwargs)
    parser.set_defaults(_settings=tuple(settings) + tuple(parser.get_default("_settings") or ()))


def setting_help(s: Setting, field: FieldInfo) -> str:
    text = (field.description or "").rstrip(".")
    if s.note:
        text = f"{text} ({s.note})" if text else s.note
    return f"{text}. Config key {s.key}; default: {_format_default(field)}".replace("%", "%%")


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, as dotted config key -> value (None: not given)."""
    values: dict[str, Any] = {}
    for s in getattr(args, "_settings", ()):
        value = getattr(args, s.dest, None)
        if value is None:
            continue
        values[s.key] = Added(value) if s.extend else value
    return values


def config_from_args(args: argparse.Namespace, model: str | None = None) -> RunConfig:
    """The run config of a command: `config` (else the config.yaml of `model` when it is a run folder), then the
    flags, then the overrides."""
    path = getattr(args, "config", None) or run_config_file(model)
    return load_config(path, getattr(args, "overrides", None), flags=flag_values(args))


def run_config_file(model: str | None) -> Path | None:
    """The resolved config.yaml of a run folder (commands given a run start from it); None for anything else."""
    from tunelab.runs.rundir import RunDir, is_run_dir

    path = Path(model).expanduser() if model else None
    return RunDir(path).config_file if path is not None and is_run_dir(path) else None


def comma_list(text: str) -> list[str]:
    """`f16, q8_0` -> ["f16", "q8_0"] (flags that take a list in one word)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def is_override(text: str) -> bool:
    """`serve.port=9000` (a dotted key, '=', a value), as opposed to a model, a path or a hub id."""
    key, sep, _ = text.partition("=")
    return bool(sep) and _OVERRIDE_KEY.fullmatch(key) is not None


# ----------------------------------------------------------------------------------------------- the schema
def schema_field(key: str) -> FieldInfo:
    """The pydantic field of a dotted config key such as serve.port (sections and the default method)."""
    model: type[BaseModel] = RunConfig
    parts = key.split(".")
    for part in parts[:-1]:
        inner = _model_in(model.model_fields[part].annotation)
        if inner is None:
            raise KeyError(f"{key}: {part} is not a config section")
        model = inner
    return model.model_fields[parts[-1]]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Annotated[Union[...], ...] (method): its first member, the default method
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _flag_type(annotation: Any) -> tuple[Any, list | None]:
    """(argparse type or bool/list, choices) of a field annotation; Optional is unwrapped."""
    origin = get_origin(annotation)
    if origin is Literal:
        values = list(get_args(annotation))
        return type(values[0]), values
    if origin is list:
        return list, None
    if origin is Union or (origin is not None and type(None) in get_args(annotation)):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _flag_type(members[0])
    if annotation in (int, float, str, bool):
        return annotation, None
    return str, None


def _format_default(field: FieldInfo) -> str:
    value = field.default_factory() if field.default is PydanticUndefined and field.default_factory else field.default
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
