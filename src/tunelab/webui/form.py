"""Web UI: the Train form, generated from the config schema (tunelab.config.schema).

Each field of the model, data, method and train sections becomes one input whose label is the YAML key and whose
hint is the Field description, so a new schema field appears in the UI without UI code. Form values turn into the
same nested dict a YAML file holds and are validated by the same `config_from_dict`, so the UI and the CLI accept
and reject exactly the same configs.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.config import schema
from tunelab.config.load import ConfigError, config_from_dict, dump_config
from tunelab.config.schema import RunConfig

FORM_SECTIONS = ("model", "data", "method", "train")
# The run's own top-level fields (stage: sft, dpo, ...) come first as the pseudo-section "run"; the alignment
# section (align) follows train when the schema has it. Both are read from RunConfig, like every other input.
RUN_SECTION = "run"
OPTIONAL_SECTIONS = ("align",)
UNSET = ""  # what an empty optional input means: leave the field out (the schema default applies)
DEFAULT_METHOD: str = schema.DEFAULT_METHOD


@dataclass
class FieldSpec:
    """One input of the form."""

    section: str
    name: str
    kind: Literal["text", "int", "float", "bool", "choice", "list", "yaml"]
    default: Any
    description: str
    optional: bool = False
    choices: tuple | None = None
    methods: tuple[str, ...] = ()  # method section only: the method names that have this field

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def top_level(self) -> bool:
        return self.section == RUN_SECTION


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    args = get_args(annotation)
    if get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return functools.reduce(operator.or_, rest), True
    return annotation, False


def _kind(annotation: Any) -> tuple[str, tuple | None]:
    if get_origin(annotation) is Literal:
        return "choice", get_args(annotation)
    if annotation is bool:
        return "bool", None
    if annotation is int:
        return "int", None
    if annotation is float:
        return "float", None
    if annotation is str:
        return "text", None
    if get_origin(annotation) is list and get_args(annotation) in ((str,),):
        return "list", None
    union = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if union and all(get_origin(a) in (list, Literal) for a in union):  # list[str] | Literal["all-linear"]
        return "list", None
    return "yaml", None  # nested sections, lists of datasets, dicts


def _default(field) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        value = field.default_factory()
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return None


def _spec(section: str, name: str, field, methods: tuple[str, ...] = ()) -> FieldSpec:
    annotation, optional = _strip_optional(field.annotation)
    kind, choices = _kind(annotation)
    registry = (field.json_schema_extra or {}).get("registry") if isinstance(field.json_schema_extra, dict) else None
    if registry and kind == "text":  # a name from a registry (schema.Registered): its names, read now
        kind, choices = "choice", tuple(schema.registered(registry))
    if kind == "bool" and optional:
        kind, choices = "choice", (True, False)
    return FieldSpec(section, name, kind, _default(field), field.description or "", optional, choices, methods)


def section_specs(section: str) -> list[FieldSpec]:
    """The inputs of one config section, in schema order."""
    if section == "method":
        return method_specs()
    if section == RUN_SECTION:
        return [_with_registry_choices(_spec(RUN_SECTION, name, field)) for name, field in
                RunConfig.model_fields.items() if not isinstance(_default(field), dict)]  # sections: dumped models
    model = RunConfig.model_fields[section].annotation
    return [_spec(section, name, field) for name, field in model.model_fields.items()]


def _with_registry_choices(spec: FieldSpec) -> FieldSpec:
    """`stage` is a free string validated against the stage registry: offer the registered stages."""
    if spec.name == "stage" and spec.kind == "text":
        try:
            from tunelab.training.stages import known_stages
        except ImportError:
            return spec
        spec.kind, spec.choices = "choice", tuple(known_stages())
    return spec


def method_specs() -> list[FieldSpec]:
    """`name` (a choice of every registered method) followed by the union of the methods' fields, each tagged with
    the methods that have it so the UI shows only the selected method's fields."""
    from tunelab.methods import get_method

    sections = schema.registered_method_sections()
    names = tuple(m.model_fields["name"].default for m in sections)
    hint = "Tuning method: " + "; ".join(f"{n}: {get_method(n).description}" for n in names) + "."
    specs = [FieldSpec("method", "name", "choice", DEFAULT_METHOD, hint, choices=names)]
    seen: dict[str, FieldSpec] = {}
    for member in sections:
        tag = member.model_fields["name"].default
        for name, field in member.model_fields.items():
            if name == "name":
                continue
            if name in seen:
                seen[name].methods += (tag,)
            else:
                seen[name] = _spec("method", name, field, (tag,))
    return specs + list(seen.values())


def form_sections() -> tuple[str, ...]:
    """The sections the form shows, in order: the run's top-level fields, the fixed sections, then alignment."""
    return (RUN_SECTION, *FORM_SECTIONS, *(s for s in OPTIONAL_SECTIONS if s in RunConfig.model_fields))


def form_specs() -> list[FieldSpec]:
    return [s for section in form_sections() for s in section_specs(section)]


def is_visible(spec: FieldSpec, method: str, stage: str = "sft") -> bool:
    """Method fields show for their methods; the align section for stages other than sft."""
    if spec.methods and method not in spec.methods:
        return False
    return spec.section != "align" or stage != "sft"


# --------------------------------------------------------------------------------------------- value mapping
def to_input(spec: FieldSpec, value: Any) -> Any:
    """A config value -> what the input shows."""
    if value is None:
        return UNSET
    if spec.kind in ("int", "float") and spec.optional:  # shown in a text input, so it can be left empty
        return str(value)
    if spec.kind == "list":
        return value if isinstance(value, str) else ", ".join(str(v) for v in value)
    if spec.kind == "yaml":
        value = _compact(value)
        if value in ({}, []):
            return UNSET
        return yaml.safe_dump(value, sort_keys=False, allow_unicode=True).strip()
    if spec.kind == "choice":
        return str(value).lower() if isinstance(value, bool) else value
    return value


def _compact(value: Any) -> Any:
    """Drop unset (None) and empty entries so a dataset list reads like the YAML a person writes."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v is not None and v != {} and v != []}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def from_input(spec: FieldSpec, value: Any) -> Any:
    """What the input holds -> the config value; UNSET/None means "leave it out"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if spec.kind in ("int", "float") and not spec.optional:
            # A number input sends nothing (None) both when emptied and when it holds text the browser cannot
            # read as a number ("abc", "1e"): never fall back to the default silently.
            return _BadInput(spec.key, f"expected {'an integer' if spec.kind == 'int' else 'a number'}, "
                                       "got an empty or non-numeric entry")
        if spec.kind == "list":
            return []
        return None if spec.optional else UNSET  # an emptied optional field means null, as in YAML
    if spec.kind == "list":
        items = [v.strip() for v in str(value).replace("\n", ",").split(",") if v.strip()]
        literal = [c for c in (spec.default,) if isinstance(c, str)]
        return items[0] if len(items) == 1 and items[0] in literal else items
    if spec.kind == "yaml":
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as e:
            return _BadInput(spec.key, f"not valid YAML ({str(e).splitlines()[0]})")
    if spec.kind in ("int", "float") and isinstance(value, str):  # optional numbers are text inputs
        try:
            number = float(value.strip())
        except ValueError:
            return _BadInput(spec.key, f"expected a number, got {value.strip()!r}")
        if spec.kind == "int" and not number.is_integer():
            return _BadInput(spec.key, f"expected an integer, got {value.strip()!r}")
        return int(number) if spec.kind == "int" else number
    if spec.kind == "choice" and isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _BadInput(str):
    """An input that does not parse (YAML, number); reported with the other config errors."""

    def __new__(cls, key: str, problem: str):
        return super().__new__(cls, f"{key}: {problem}")


def form_to_dict(specs: list[FieldSpec], values: list[Any], extra: dict | None = None) -> dict:
    """Form values -> the nested config dict (what a YAML file holds). `extra` keeps sections the form does not
    show (eval, export, serve) so loading and saving a YAML does not lose them."""
    shown = {s.name if s.top_level else s.section for s in specs}
    data: dict[str, Any] = {k: v for k, v in (extra or {}).items() if k not in shown}
    method = next((v for s, v in zip(specs, values) if s.key == "method.name"), None) or DEFAULT_METHOD
    stage = next((v for s, v in zip(specs, values) if s.key == f"{RUN_SECTION}.stage"), None) or "sft"
    problems = []
    for spec, raw in zip(specs, values):
        if not is_visible(spec, method, stage):
            continue
        value = from_input(spec, raw)
        if isinstance(value, _BadInput):
            problems.append(str(value))
            continue
        if isinstance(value, str) and value == UNSET:
            continue
        if spec.top_level:
            data[spec.name] = value
        else:
            data.setdefault(spec.section, {})[spec.name] = value
    if problems:
        raise ConfigError(problems, "from the form")
    return data


def config_to_values(specs: list[FieldSpec], cfg: RunConfig) -> list[Any]:
    """A validated config -> one input value per spec (fields of other methods show their defaults)."""
    dumped = cfg.model_dump(mode="json")
    out = []
    for spec in specs:
        section = dumped if spec.top_level else dumped.get(spec.section, {})
        out.append(to_input(spec, section.get(spec.name, spec.default)))
    return out


def validate_form(specs: list[FieldSpec], values: list[Any], extra: dict | None = None) -> RunConfig:
    """The RunConfig the form describes; raises ConfigError listing every problem (as `tunelab validate`)."""
    return config_from_dict(form_to_dict(specs, values, extra), "from the form")


def form_yaml(specs: list[FieldSpec], values: list[Any], extra: dict | None = None) -> str:
    return dump_config(validate_form(specs, values, extra))
