"""A small renderer for the subset of Go's text/template that tunelab writes into Ollama Modelfiles.

It lets the export check, without Ollama or Go, that the TEMPLATE renders the same prompt as the training
Jinja template. Supported: text with `{{-`/`-}}` trimming; `{{ if }}`/`{{ else if }}`/`{{ else }}`/`{{ end }}`;
`{{ range PIPE }}`; `{{ $x := PIPE }}` and `{{ $x = PIPE }}`; operands `.`, `.Field`, `$`, `$.Field`, `$x`,
`$x.Field`, "strings", numbers; functions eq, ne, not, and, or, len. Anything else raises ValueError.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.DOTALL)


@dataclass
class _Node:
    kind: str  # text, out, if, range, set, decl
    value: Any = None  # text, pipeline, or variable name
    expr: list[str] | None = None
    branches: list[tuple[list[str] | None, list[_Node]]] = field(default_factory=list)


def render_go_template(template: str, data: dict[str, Any]) -> str:
    nodes, _ = _parse(_tokenize(template), 0, top=True)
    scopes: list[dict[str, Any]] = [{"$": data}]
    out: list[str] = []
    _exec(nodes, data, scopes, out)
    return "".join(out)


def _tokenize(template: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    tokens.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return tokens


def _parse(tokens, i: int, top: bool = False) -> tuple[list[_Node], int]:
    nodes: list[_Node] = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            if value:
                nodes.append(_Node("text", value))
            i += 1
            continue
        words = _split(value)
        if words[0] in ("end", "else"):
            if top:
                raise ValueError(f"unexpected {{{{ {value} }}}}")
            return nodes, i
        if words[0] in ("if", "range"):
            node, i = _parse_block(tokens, i, words)
            nodes.append(node)
            continue
        if len(words) >= 3 and words[0].startswith("$") and words[1] in (":=", "="):
            nodes.append(_Node("decl" if words[1] == ":=" else "set", words[0], words[2:]))
        else:
            nodes.append(_Node("out", expr=words))
        i += 1
    if not top:
        raise ValueError("missing {{ end }}")
    return nodes, i


def _parse_block(tokens, i: int, words: list[str]) -> tuple[_Node, int]:
    node = _Node(words[0])
    cond: list[str] | None = words[1:]
    i += 1
    while True:
        body, i = _parse(tokens, i)
        node.branches.append((cond, body))
        words = _split(tokens[i][1])
        i += 1
        if words[0] == "end":
            return node, i
        cond = words[2:] if words[1:2] == ["if"] else None  # else if COND / else


def _split(action: str) -> list[str]:
    lexer = shlex.shlex(action, posix=False, punctuation_chars="")
    lexer.whitespace_split = True
    return list(lexer)


def _exec(nodes: list[_Node], dot: Any, scopes: list[dict[str, Any]], out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "out":
            value = _eval(node.expr, dot, scopes)
            out.append("" if value is None else str(value))
        elif node.kind == "decl":
            scopes[-1][node.value] = _eval(node.expr, dot, scopes)
        elif node.kind == "set":
            _assign(node.value, _eval(node.expr, dot, scopes), scopes)
        elif node.kind == "if":
            for cond, body in node.branches:
                if cond is None or _truthy(_eval(cond, dot, scopes)):
                    _exec(body, dot, scopes + [{}], out)
                    break
        elif node.kind == "range":
            (expr, body), *rest = node.branches
            items = _eval(expr, dot, scopes) or []
            for item in items:
                _exec(body, item, scopes + [{}], out)
            if not items and rest:
                _exec(rest[0][1], dot, scopes + [{}], out)


def _assign(name: str, value: Any, scopes: list[dict[str, Any]]) -> None:
    for scope in reversed(scopes):
        if name in scope:
            scope[name] = value
            return
    raise ValueError(f"undefined variable {name}")


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "len": len,
}


def _eval(words: list[str], dot: Any, scopes: list[dict[str, Any]]) -> Any:
    if words and words[0] in _FUNCS:
        return _FUNCS[words[0]](*(_operand(w, dot, scopes) for w in words[1:]))
    if len(words) != 1:
        raise ValueError(f"unsupported pipeline: {' '.join(words)}")
    return _operand(words[0], dot, scopes)


def _operand(word: str, dot: Any, scopes: list[dict[str, Any]]) -> Any:
    if word.startswith('"'):
        return json.loads(word)
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word in ("true", "false"):
        return word == "true"
    if word.startswith("$"):
        name, _, path = word.partition(".")
        for scope in reversed(scopes):
            if name in scope:
                return _fields(scope[name], path)
        raise ValueError(f"undefined variable {name}")
    if word.startswith("."):
        return _fields(dot, word[1:])
    raise ValueError(f"unsupported operand {word!r}")


def _fields(value: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, dict) else getattr(value, name)
    return value


def _truthy(value: Any) -> bool:
    return bool(value)
