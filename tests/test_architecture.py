"""Rules of the code's shape, checked over src/tunelab with ast (docs/architecture.md, "Rules")."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"
MAX_PARAMETERS = 6

# functions whose signature a library dictates; each is called by that library, never by tunelab's code
SIGNATURE_OWNED_BY_A_LIBRARY = {
    "training/speed.py:packed_sdpa_attention",  # transformers' AttentionInterface (module, query, key, value, ...)
    "patches/attention.py:packed_mask",  # transformers' mask interface (sdpa_mask's keywords)
}


def modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(SRC)), ast.parse(p.read_text(), str(p))) for p in sorted(SRC.rglob("*.py"))]


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional and keyword parameters, self/cls excluded; *args and **kwargs count one each."""
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")]) + (a.vararg is not None) + (a.kwarg is not None)


def too_many_parameters() -> list[str]:
    found = []
    for rel, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > MAX_PARAMETERS:
                found.append(f"{rel}:{node.name}")
    return found


def test_parameter_count_matches_the_rule():
    tree = ast.parse("def f(self, a, b=1, *args, c, **kw): pass\ndef g(x, /, y): pass")
    assert [parameter_count(fn) for fn in tree.body] == [5, 2]


def test_no_function_takes_more_than_six_parameters():
    """More than six: group them in a small dataclass named for what they mean (EngineOptions, EncodeSettings,
    ExportForm...) or reuse the config section that already holds them."""
    offenders = [f for f in too_many_parameters() if f not in SIGNATURE_OWNED_BY_A_LIBRARY]
    assert offenders == [], f"functions with more than {MAX_PARAMETERS} parameters: {offenders}"


def test_the_allow_list_names_existing_functions():
    assert SIGNATURE_OWNED_BY_A_LIBRARY <= set(too_many_parameters())


# ------------------------------------------------------------------------------------------ the run-folder layout
# names of a run folder's files that only tunelab.runs spells (runs/rundir.py); a reader elsewhere calls RunDir,
# checkpoint_name, complete_checkpoints, adapter_folder or run_folder_config. Not listed: names with other meanings
# too ("export", "eval": commands and config sections; loss.png and chat_template.jinja: also the files of an eval
# report and of every Hugging Face folder).
RUN_FILE_NAMES = {"run.json", "config.yaml", "env.json", "data.json", "metrics.jsonl", "final", "checkpoints",
                  "trainer_state.json"}
RUN_FILE_PREFIXES = ("checkpoint-",)

# literals that are not a run folder's files, though spelled the same
NOT_A_RUN_FILE = {
    ("cli/demo.py", "config.yaml"),  # examples/demo/config.yaml: a config in the repository
}


def run_file_names_in(tree: ast.AST) -> list[tuple[str, int]]:
    """(literal, line) of every string that is a run file's name, or starts an f-string like f"checkpoint-{n}"."""
    found = set()  # a set: an f-string's first part is also a Constant of its own
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = str(node.values[0].value)
        else:
            continue
        if text in RUN_FILE_NAMES or (text.startswith(RUN_FILE_PREFIXES) and " " not in text):
            found.add((text, node.lineno))
    return sorted(found, key=lambda item: item[1])


def run_file_literals() -> list[tuple[str, str, int]]:
    return [(rel, text, line) for rel, tree in modules() if not rel.startswith("runs/")
            for text, line in run_file_names_in(tree)]


def test_only_tunelab_runs_spells_the_run_folder_layout():
    offenders = [f"{rel}:{line} {text!r}" for rel, text, line in run_file_literals()
                 if (rel, text) not in NOT_A_RUN_FILE]
    assert offenders == [], f"run-folder names spelled outside tunelab.runs: {offenders}"


def test_the_layout_rule_sees_a_spelled_name_and_not_prose():
    tree = ast.parse('p = run / "run.json"\nq = f"checkpoint-{step}"\nhelp = "reads run.json and final/"')
    assert run_file_names_in(tree) == [("run.json", 1), ("checkpoint-", 2)]
