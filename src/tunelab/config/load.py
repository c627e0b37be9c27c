"""Read a run config: YAML file + flags + `a.b=c` overrides -> validated RunConfig, every error reported at once.

The one precedence rule, lowest first (README, "Configuration"):

    schema default < environment variable < config file < command-line flag < a.b=c override

An environment variable only stands in for a setting nobody wrote (`from_environment`); a flag is a short alias
of one config key (cli/common.py) and an override names the key itself, so the most explicit one wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import RunConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem with its dotted path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid config {source}" if source else "invalid config"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


# environment variable -> the setting it stands in for when neither the config nor the command line gives one
ENVIRONMENT: dict[str, str] = {
    "TUNELAB_DATA_CACHE": "data.cache_dir",
    "TUNELAB_CACHE": "model.cache_dir (also where the GGUF converter and llama-quantize are cached)",
    "OMP_NUM_THREADS": "train.threads (and the threads of chat, eval, serve and the web UI)",
    "TUNELAB_WEBUI_PASSWORD": "webui.password (tunelab webui --password)",
    "TUNELAB_API_KEY": "serve.api_key_env's default: more accepted API keys, added to serve.api_keys",
}


def from_environment(value: Any, variable: str) -> Any:
    """`value` when it was set (config file, flag or override), else the environment variable, else None."""
    if value is not None and value != "":
        return value
    return os.environ.get(variable) or None


class Added(list):
    """A flag value that extends the config's list instead of replacing it (`tunelab serve --api-key`)."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not of the form key.path=value"])
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError([f"override {text!r} has an empty key"])
    value = yaml.safe_load(raw) if raw.strip() else ""
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if k.isdigit() and isinstance(node, list):
                node = node[int(k)]
                continue
            child = node.get(k)
            if not isinstance(child, (dict, list)):
                child = node[k] = {}
            node = child
        last = keys[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at the parent of `loc`, following nested sections and discriminated unions."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return []
        if part in fields:
            current = _inner_model(fields[part].annotation)
        else:  # a method name such as 'lora' in method.lora.rr (the registered section it selected)
            current = _method_section(part)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _inner_model(annotation: Any) -> Any:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _method_section(tag: str) -> Any:
    from tunelab.config.schema import registered_method_sections

    return next((s for s in registered_method_sections() if s.model_fields["name"].default == tag), None)


def format_errors(error: ValidationError) -> list[str]:
    problems = []
    for err in error.errors():
        loc = tuple(err["loc"])
        # the method union puts the method name in the path: method.lora.r -> method.r
        tagged = len(loc) > 1 and loc[0] == "method" and isinstance(loc[1], str) and _method_section(loc[1])
        shown = [str(p) for i, p in enumerate(loc) if not (tagged and i == 1)]
        path = ".".join(shown) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(RunConfig, loc)
            problems.append(f"{path}: unknown key; valid keys here: {', '.join(valid)}")
        elif err["type"] == "union_tag_invalid":
            problems.append(f"{path}: {err['msg']}")
        else:
            problems.append(f"{path}: {err['msg']} (got {err.get('input')!r})")
    return problems


def config_from_dict(data: dict, source: str | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e), source) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                flags: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when path is None), then `flags` (dotted key -> value, already typed;
    an `Added` list extends the config's list), then the `a.b=c` overrides: later layers win."""
    data: dict = {}
    source = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p}"])
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"expected a mapping of sections at the top level, got {type(loaded).__name__}"], source)
        data = loaded or {}
        data = _resolve_relative_paths(data, p.parent)
    data = apply_settings(data, dict(flags or {}))
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data, source)


def apply_settings(data: dict, settings: dict[str, Any]) -> dict:
    """Set dotted keys to typed values (no YAML parsing: `--model-name 123` stays the string "123")."""
    for key, value in settings.items():
        keys = key.split(".")
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if isinstance(value, Added):
            value = [*(node.get(keys[-1]) or []), *value]
        node[keys[-1]] = list(value) if isinstance(value, list) else value
    return data


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Dataset paths and dataset_dir in a config file are relative to that file, as users expect."""
    sections = [data.get("data") or {}, data.get("eval") or {}]
    for section in sections:
        if not isinstance(section, dict):
            continue
        if isinstance(section.get("dataset_dir"), str) and not Path(section["dataset_dir"]).is_absolute():
            section["dataset_dir"] = str((base / section["dataset_dir"]).resolve())
        for spec in section.get("datasets") or []:
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                candidate = base / spec["path"]
                if not Path(spec["path"]).is_absolute() and (candidate.exists() or any(c in spec["path"] for c in "*?")):
                    spec["path"] = str(candidate.resolve()) if candidate.exists() else str(candidate)
    return data


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML (a run's config.yaml); the web UI's password is left out: it is no run's setting."""
    data = cfg.model_dump(mode="json", exclude={"webui": {"password"}})
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
