"""Evaluation stage, optional bridge: run lm-evaluation-harness (`lm_eval`) tasks on a tunelab model.

The model is loaded by tunelab's engine (so a run dir or adapter works as anywhere else) and handed to lm_eval's
HFLM wrapper. lm_eval fetches task data from the Hugging Face Hub; offline, a task runs only when its dataset is
already in the local datasets cache or when its YAML points at local files (`--lm-eval-include DIR`).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

_MISSING = ("lm-evaluation-harness is not installed, so `--lm-eval` cannot run. Install it with "
            "`pip install lm-eval` (its tasks also need their datasets: either a connection to the Hugging Face Hub "
            "or the data already in the local datasets cache / a task YAML with local data_files).")


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _task_manager(include: str | Path | None):
    from lm_eval.tasks import TaskManager

    if include is not None and not Path(include).is_dir():
        raise TunelabError(f"--lm-eval-include {include}: not a folder of lm-eval task YAML files")
    return TaskManager(include_path=str(include) if include else None)


def check_tasks(manager, tasks: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        text = "; ".join(f"{t} (did you mean {', '.join(h)}?)" if h else t for t, h in hints.items())
        raise TunelabError(f"unknown lm-eval task(s): {text}. `lm-eval ls tasks` lists them; tasks of your own go "
                           "in a folder passed with --lm-eval-include")


def _is_missing_data(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return any(s in text for s in ("offline", "connection", "couldn't reach", "not found on the hub",
                                   "doesn't exist on the hub", "datasetnotfound", "no such file", "local_files_only",
                                   "couldn't find", "cannot find"))


def run_lm_eval(model, tasks: list[str], *, limit: float | None = None, batch_size: int = 8,
                include: str | Path | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """Run lm-eval `tasks` on `model` (a path/id tunelab can load, or a loaded engine) -> {task: {metric: value}}.

    Raises TunelabError with a plain message when lm_eval is missing, a task is unknown, or its data is not
    available offline.
    """
    if not lm_eval_available():
        raise TunelabError(_MISSING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(include)
    check_tasks(manager, tasks)
    if isinstance(model, (str, Path)):
        from tunelab.inference.engine import EngineOptions
        from tunelab.inference.hf import load_engine

        model = load_engine(str(model), options=EngineOptions(merge=True))  # a merged LoRA is a plain transformers model for HFLM
    lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                         task_manager=manager)
    except Exception as e:
        if _is_missing_data(e):
            raise TunelabError(
                f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}: {e}). The datasets "
                "must be available locally when offline: download them once into the Hugging Face datasets cache, "
                "or write a task YAML with `dataset_path: json` and local `dataset_kwargs.data_files` and pass "
                "its folder with --lm-eval-include") from e
        raise
    return {task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, values in output["results"].items()}


def harness_table(results: dict[str, dict[str, Any]]) -> str:
    from tunelab.evaluation.results import render_text_table

    rows = [(task, metric, f"{value:.4f}") for task, values in results.items() for metric, value in values.items()]
    return render_text_table(["task", "metric", "value"], rows)
