"""Checks of a run's data settings that need the file system, made before anything starts (`tunelab validate`,
the web UI's train tab): the schema cannot see an empty dataset list, a missing file, a glob that matches nothing
or a name that is not registered, and each would otherwise fail only after a training process has started."""

from __future__ import annotations

from pathlib import Path

from tunelab.config.load import ConfigError
from tunelab.config.schema import DatasetSpec, RunConfig
from tunelab.data.sources import SUFFIXES, resolve_source
from tunelab.errors import TunelabError

_PEEK = 1 << 16  # bytes read to tell an empty file from a whitespace-only one


def data_problems(cfg: RunConfig, include_eval: bool = True) -> list[str]:
    """Every problem with `data` (and `eval.datasets`), each with its dotted path; [] when the data can be read."""
    data = cfg.data
    empty = ("data.datasets: empty; add at least one dataset (a path, a folder, a glob, or a name registered in "
             "data.dataset_dir)")
    problems = [] if data.datasets else [empty]
    aligning = getattr(cfg, "stage", "sft") != "sft"  # alignment stages read preference data (data/preference.py)
    problems += _spec_problems("data.datasets", data.datasets, data.dataset_dir, aligning)
    if include_eval:
        problems += _spec_problems("eval.datasets", cfg.eval.datasets, data.dataset_dir, aligning)
    problems += _template_problems(data.template, data.enable_thinking)
    return problems


def check_data(cfg: RunConfig, source: str | None = None, include_eval: bool = True) -> None:
    """Raise ConfigError listing every data problem (see data_problems); the message names each setting and
    `source` (the config file, or "from the form")."""
    problems = data_problems(cfg, include_eval)
    if problems:
        raise ConfigError(problems, source)


def _spec_problems(where: str, specs: list[DatasetSpec], dataset_dir: str | None,
                   preference: bool = False) -> list[str]:
    problems = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}] ({spec.path if spec.path is not None else spec.name})"
        try:
            files = resolve_source(spec, dataset_dir, preference or spec.ranking).files
        except TunelabError as e:
            problems.append(f"{at}: {e}")
            continue
        problems += [f"{at}: {f}: the file is empty" for f in files if _is_empty(f)]
    return problems


def _is_empty(path: Path) -> bool:
    if not path.is_file() or path.suffix not in SUFFIXES or path.suffix == ".parquet":
        return False
    with path.open("rb") as f:
        head = f.read(_PEEK)
    return not head.removeprefix(b"\xef\xbb\xbf").strip() and path.stat().st_size <= _PEEK


def _template_problems(name: str, enable_thinking: bool | None) -> list[str]:
    """A named or file template that cannot be used ('auto' needs the tokenizer: checked when it is loaded)."""
    from tunelab.data.templates import get_template, resolve_template

    if name == "auto":
        return []
    try:
        if name.endswith(".jinja") or Path(name).expanduser().is_file():
            resolve_template(name, None, enable_thinking)
        else:
            get_template(name, enable_thinking)
    except TunelabError as e:
        return [f"data.template: {e}"]
    return []
