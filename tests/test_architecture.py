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
