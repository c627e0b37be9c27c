"""Record formats -> Conversation: Alpaca, ShareGPT, OpenAI messages and raw text (the registry of formats).

Column and role-tag names follow LLaMA-Factory's dataset_info.json, so a user's registry works unchanged. A bad
record raises RecordError naming the field and what was expected; sources.py adds the file and line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.types import Conversation, Message
from tunelab.registry import Registry

AUTO = "auto"  # DatasetSpec.format's default: detect the format from the first record
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function", "system_tag": "system"}


class RecordError(ValueError):
    """A record that cannot be used: `field` is the offending key path, `rule` groups the summary."""

    def __init__(self, field: str, reason: str, rule: str = "invalid"):
        super().__init__(reason)
        self.field, self.reason, self.rule = field, reason, rule


@dataclass
class FormatOptions:
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def for_format(self, fmt: str) -> FormatOptions:
        """User columns/tags over the format's defaults."""
        entry = get_format_entry(fmt)
        return FormatOptions({**entry.columns, **self.columns}, {**entry.tags, **self.tags})


Converter = Callable[[dict, FormatOptions], Conversation]
Detector = Callable[[dict, FormatOptions], bool]  # (first record, the user's columns/tags) -> "this format"


@dataclass(frozen=True)
class RecordFormat:
    """One record format: how to convert a record, its default columns and role tags, how `auto` recognizes it.

    Detection asks the formats in registration order; `detect` decides, else a record having every `keys` entry
    is this format. `DatasetSpec.format`, dataset_info.json `formatting`, the web UI choices and detection read it.
    """

    name: str
    convert: Converter
    description: str = ""
    keys: tuple[str, ...] = ()  # record keys that identify the format (shown in the "cannot tell" error)
    columns: dict[str, str] = field(default_factory=dict)  # default column mapping (LLaMA-Factory names)
    tags: dict[str, str] = field(default_factory=dict)  # default role tags (chat formats)
    detect: Detector | None = None

    def matches(self, record: dict, options: FormatOptions) -> bool:
        if self.detect is not None:
            return self.detect(record, options)
        return bool(self.keys) and all(k in record for k in self.keys)


# KeyError for an unknown name: the loaders turn it into a DataError naming the dataset
FORMATS: Registry[RecordFormat] = Registry("record format", unknown=KeyError, reserved=(AUTO,))


def register_format(name: str | RecordFormat, converter: Converter | None = None, **info) -> RecordFormat:
    """Register a RecordFormat (or `name, converter, description=..., keys=...`); refuses duplicates."""
    return FORMATS.register(name if isinstance(name, RecordFormat) else RecordFormat(name, converter, **info))


def unregister_format(name: str) -> RecordFormat:
    """Remove a registered format (tests, plugins reloading); returns its entry."""
    return FORMATS.unregister(name)


def get_format_entry(name: str) -> RecordFormat:
    return FORMATS.get(name)


def get_format(name: str) -> Converter:
    return get_format_entry(name).convert


def known_formats() -> list[str]:
    """Registered formats in detection order (without `auto`)."""
    return FORMATS.names()


def format_choices() -> list[str]:
    """What `format:` accepts: auto, then every registered format."""
    return [AUTO, *FORMATS.names()]


def detect_format(record: dict, options: FormatOptions) -> str:
    """Guess the format from one record's keys (columns given by the user take precedence)."""
    for entry in FORMATS:
        if entry.matches(record, options):
            return entry.name
    expected = ", ".join(f"{e.name} ({', '.join(e.keys)})" if e.keys else e.name for e in FORMATS)
    raise RecordError("", f"cannot tell the format from the keys {sorted(record)}; expected {expected}; "
                      "or set `format`", "format")


def _chat_kind(record: dict, options: FormatOptions) -> str | None:
    """'openai' or 'sharegpt' for a chat record (role/content vs from/value turns), None for anything else."""
    cols = options.columns
    if "messages" in cols:  # the user named the turns column
        rows = record.get(cols["messages"])
        first = rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
        return "openai" if "role" in first and not options.tags else "sharegpt"
    if _looks_alpaca(record, options):
        return None
    if "conversations" in record:
        return "sharegpt"
    if isinstance(record.get("messages"), list):
        first = record["messages"][0] if record["messages"] else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "openai"
    return None


def _looks_alpaca(record: dict, options: FormatOptions) -> bool:
    cols = options.columns
    return "messages" not in cols and ("response" in cols or "instruction" in record or "output" in record)


def _looks_text(record: dict, options: FormatOptions) -> bool:
    return _chat_kind(record, options) is None and not _looks_alpaca(record, options) and (
        "text" in record or set(options.columns) == {"prompt"})


# --------------------------------------------------------------------------------------------------- field readers
def _string(record: dict, key: str, required: bool = False, empty_ok: bool = True, optional: bool = False) -> str:
    """A text field. `optional` fields (input, system) may also be NaN: pandas' missing value, as in an all-empty
    column; anywhere else NaN is a reject, never the text "nan"."""
    value = record.get(key)
    if optional and isinstance(value, float) and math.isnan(value):
        value = None
    if value is None:
        if required:
            raise RecordError(key, "missing (expected a string)", "missing_field")
        return ""
    if not isinstance(value, str):
        raise RecordError(key, f"expected a string, got {_what(value)}", "wrong_type")
    if not empty_ok and not value.strip():
        raise RecordError(key, "is empty", "empty_output")
    return value


def _what(value: Any) -> str:
    """How a non-string value is named in a reject: never trained as "42" or "nan" behind the user's back."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN (a missing value, e.g. from pandas; write a string, or leave optional fields out)"
    if isinstance(value, list):
        return "a list (a preference/ranking record? SFT needs one answer)"
    if isinstance(value, (bool, int, float)):
        return f"a number ({value!r}); quote it if it is the text to learn"
    return type(value).__name__


def parse_tools(value: Any, key: str = "tools") -> list[dict] | None:
    """Tool schemas as a list of OpenAI-style {"type": "function", "function": {...}} (JSON strings accepted)."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(key, f"is not valid JSON ({e.msg} at char {e.pos})", "wrong_type") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError(key, "expected a list of tool (function) schemas", "wrong_type")
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


def parse_tool_calls(value: Any, key: str) -> list[dict]:
    """A ShareGPT function_call value or OpenAI tool_calls -> [{"type": "function", "function": {name, arguments}}]
    with arguments as a dict where it is JSON (templates serialize it themselves)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            reason = f"function call is not valid JSON ({e.msg} at char {e.pos})"
            raise RecordError(key, reason, "wrong_type") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(key, 'expected a function call {"name": ..., "arguments": {...}}', "wrong_type")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # keep the string: some tools take free text
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _train_flag(turn: dict, key: str) -> bool | None:
    flag = turn.get("train", turn.get("weight"))
    if flag is None or isinstance(flag, bool):
        return flag
    if isinstance(flag, (int, float)) and flag in (0, 1):
        return bool(flag)
    raise RecordError(f"{key}.train", f"expected true/false, got {flag!r}", "wrong_type")


# ------------------------------------------------------------------------------------------------------ converters
def alpaca_to_conversation(record: dict, options: FormatOptions) -> Conversation:
    c = options.columns
    if record.get(c["prompt"]) is None and record.get(c.get("query", "")) is None:
        raise RecordError(c["prompt"], "missing (expected the instruction text)", "missing_field")
    instruction = _string(record, c["prompt"])
    extra = _string(record, c["query"], optional=True) if "query" in c else ""
    prompt = "\n".join(part for part in (instruction, extra) if part.strip())
    if not prompt.strip():
        raise RecordError(c["prompt"], "is empty (and so is the input)", "empty_prompt")
    output = _string(record, c["response"], required=True, empty_ok=False)
    messages = []
    system = _string(record, c["system"], optional=True) if "system" in c else ""
    if system.strip():
        messages.append(Message("system", system))
    history = record.get(c.get("history", "history")) or []
    if not isinstance(history, list):
        raise RecordError(c["history"], "expected a list of [instruction, response] pairs", "wrong_type")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RecordError(f"{c['history']}[{i}]", "expected a pair [instruction, response] of strings",
                              "wrong_type")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages += [Message("user", prompt), Message("assistant", output)]
    tools = parse_tools(record.get(c["tools"]), c["tools"]) if "tools" in c else None
    return Conversation(messages, tools=tools)


def _role_map(tags: dict[str, str]) -> dict[str, str]:
    return {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
            tags["function_tag"]: "function", tags["system_tag"]: "system",
            # OpenAI-style names are understood whatever the tags say (mixed exports are common)
            **{r: r for r in ("user", "assistant", "system", "tool")}, "developer": "system"}


def chat_to_conversation(record: dict, options: FormatOptions) -> Conversation:
    """ShareGPT and OpenAI messages: a list of turns with a role and a content (names from the tags)."""
    c, t = options.columns, options.tags
    key = c["messages"]
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        got = "missing" if turns is None else f"got {type(turns).__name__ if turns != [] else 'an empty list'}"
        raise RecordError(key, f"expected a non-empty list of messages, {got}", "missing_field")
    roles = _role_map(t)
    turns_read = [(f"{key}[{i}]", _turn_to_message(turn, f"{key}[{i}]", roles, t)) for i, turn in enumerate(turns)]
    turns_read = _merge_tool_calls(turns_read)
    _check_turns(turns_read, key, t["content_tag"])
    messages = [m for _, m in turns_read]
    system = _string(record, c["system"], optional=True) if "system" in c and c["system"] in record else ""
    if system.strip() and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", system))
    tools = parse_tools(record.get(c["tools"]), c["tools"]) if "tools" in c else None
    return Conversation(messages, tools=tools)


def _turn_to_message(turn: Any, where: str, roles: dict[str, str], tags: dict[str, str]) -> Message:
    if not isinstance(turn, dict):
        raise RecordError(where, f"expected a message object, got {type(turn).__name__}", "wrong_type")
    role_key, content_key = tags["role_tag"], tags["content_tag"]
    raw_role = turn.get(role_key)
    if raw_role is None:
        raise RecordError(f"{where}.{role_key}", "missing (expected the speaker's role)", "missing_field")
    role = roles.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        known = ", ".join(repr(r) for r in dict.fromkeys(k for k in roles if k != "developer"))
        raise RecordError(f"{where}.{role_key}", f"unknown role {raw_role!r}; expected one of {known}", "unknown_role")
    content = turn.get(content_key)
    if isinstance(content, list) and role != "function" and all(isinstance(p, dict) and "type" in p for p in content):
        content = _text_parts(content, f"{where}.{content_key}")
    train = _train_flag(turn, where)
    if role == "function":
        return Message("assistant", "", tool_calls=parse_tool_calls(content, f"{where}.{content_key}"), train=train)
    if role == "tool" and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)
    calls = turn.get("tool_calls")
    if content is None and not calls:
        raise RecordError(f"{where}.{content_key}", "missing (expected the message text)", "missing_field")
    if content is not None and not isinstance(content, str):
        raise RecordError(f"{where}.{content_key}", f"expected a string, got {_what(content)}", "wrong_type")
    tool_calls = parse_tool_calls(calls, f"{where}.tool_calls") if calls else None
    return Message(role, content or "", tool_calls=tool_calls, train=train)


def _text_parts(parts: list[dict], where: str) -> str:
    """OpenAI content parts -> their text; an image/audio/file part is a reject, never silently dropped (the reply
    would be learned without what it describes)."""
    media = sorted({p["type"] for p in parts if p["type"] != "text"})
    if media:
        raise RecordError(where, f"multimodal content not supported (parts of type {', '.join(map(str, media))})",
                          "multimodal")
    texts = [p.get("text") for p in parts]
    if not all(isinstance(t, str) for t in texts):
        raise RecordError(where, 'expected each text part to have a string "text"', "wrong_type")
    return "".join(texts)


def _merge_tool_calls(turns: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
    """ShareGPT writes "gpt: let me check" then "function_call: {...}" as two turns; it is one assistant turn."""
    merged: list[tuple[str, Message]] = []
    for where, m in turns:
        prev = merged[-1][1] if merged else None
        if (prev is not None and prev.role == m.role == "assistant" and m.tool_calls and not m.content
                and not prev.tool_calls):
            prev.tool_calls = m.tool_calls
            continue
        merged.append((where, m))
    return merged


def _check_turns(turns: list[tuple[str, Message]], key: str, content_tag: str) -> None:
    if not any(m.role == "assistant" for _, m in turns):
        raise RecordError(key, "has no assistant message: nothing to learn from", "no_assistant")
    for where, m in turns:
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            raise RecordError(f"{where}.{content_tag}", "is empty (an assistant reply needs text or a tool call)",
                              "empty_output")
    first = next((m.role for _, m in turns if m.role != "system"), None)
    if first == "assistant":
        raise RecordError(key, "starts with an assistant message; expected a user message first", "bad_order")


def text_to_conversation(record: dict, options: FormatOptions) -> Conversation:
    key = options.columns.get("prompt", "text")
    text = _string(record, key, required=True)
    if not text.strip():
        raise RecordError(key, "is empty", "empty_output")
    return Conversation([], text=text)


register_format("alpaca", alpaca_to_conversation, description="instruction / input / output records",
                keys=("instruction", "output"), columns=ALPACA_COLUMNS, detect=_looks_alpaca)
register_format("sharegpt", chat_to_conversation, description="conversations of {from, value} turns",
                keys=("conversations",), columns={"messages": "conversations", "system": "system", "tools": "tools"},
                tags=SHAREGPT_TAGS, detect=lambda r, o: _chat_kind(r, o) == "sharegpt")
register_format("openai", chat_to_conversation, description="messages of {role, content} turns",
                keys=("messages",), columns={"messages": "messages", "system": "system", "tools": "tools"},
                tags=OPENAI_TAGS, detect=lambda r, o: _chat_kind(r, o) == "openai")
register_format("text", text_to_conversation, description="plain text (pretraining-style, every token trained)",
                keys=("text",), columns={"prompt": "text"}, detect=_looks_text)


# ----------------------------------------------------------------------------------------------------- variables
def make_substituter(variables: dict[str, str]) -> Callable[[str], str] | None:
    """{name} and {{name}} -> value, for the given variable names only: other braces (code, JSON) are untouched."""
    if not variables:
        return None
    names = "|".join(re.escape(k) for k in sorted(variables, key=len, reverse=True))
    pattern = re.compile(r"\{\{\s*(" + names + r")\s*\}\}|\{(" + names + r")\}")

    def substitute(text: str) -> str:
        if "{" not in text:
            return text
        return pattern.sub(lambda m: variables[m.group(1) or m.group(2)], text)

    return substitute


def substitute_conversation(conv: Conversation, substitute: Callable[[str], str]) -> None:
    if conv.text is not None:
        conv.text = substitute(conv.text)
    for m in conv.messages:
        m.content = substitute(m.content)
