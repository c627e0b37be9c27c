"""Deployment stage: tool calls in generated text -> OpenAI `tool_calls`.

Models write tool calls as text in their family's format; a request that declared `tools` gets them back as
structured calls, as from OpenAI. Recognized (only for tools the request declared; anything else stays text):

- Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call;
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- Llama 3.1 style: the whole answer is one JSON object `{"name": ..., "parameters": {...}}`.

In a stream, text is sent as it comes until something that may start a call appears; from there the rest is
held back, parsed at the end, and sent as tool-call deltas (or as text, when it was not a call after all).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
MARKERS = ("<tool_call>", "[TOOL_CALLS]")


@dataclass
class ParsedReply:
    content: str | None
    calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool_call objects


def tool_names(tools: list[dict] | None) -> set[str]:
    names = set()
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def parse_reply(text: str, names: set[str]) -> ParsedReply:
    """Split a generated reply into text and tool calls to the declared `names`. Malformed calls stay text."""
    if not names:
        return ParsedReply(text)
    if "<tool_call>" in text:
        calls = [_call(body, names) for body in HERMES.findall(text)]
        if calls and all(calls):
            rest = HERMES.sub("", text).strip()
            return ParsedReply(rest or None, calls)
    if "[TOOL_CALLS]" in text:
        before, _, body = text.partition("[TOOL_CALLS]")
        items = _json(body.strip())
        items = items if isinstance(items, list) else [items]
        calls = [_call(item, names) for item in items]
        if calls and all(calls):
            return ParsedReply(before.strip() or None, calls)
    stripped = text.strip()
    if stripped.startswith("{") and (call := _call(stripped, names, "parameters")):
        return ParsedReply(None, [call])
    return ParsedReply(text)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _call(body: Any, names: set[str], *argument_keys: str) -> dict[str, Any] | None:
    item = _json(body) if isinstance(body, str) else body
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = next((item[k] for k in ("arguments", *argument_keys) if k in item), {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": item["name"], "arguments": arguments}}


def safe_prefix(text: str) -> int:
    """How much of a streamed reply can be sent as text now: up to where a tool call may begin (a marker, a
    trailing piece of one, or an answer that opens with a JSON object)."""
    if text.lstrip().startswith("{"):
        return 0
    cut = len(text)
    for marker in MARKERS:
        at = text.find(marker)
        if at >= 0:
            cut = min(cut, at)
        for n in range(min(len(marker) - 1, len(text)), 0, -1):  # the text ends with the marker's first n chars
            if text.endswith(marker[:n]):
                cut = min(cut, len(text) - n)
                break
    return cut
