"""Preference records -> PreferenceExample (the registry of preference formats), for the alignment stages.

Shapes: LLaMA-Factory `ranking: true` entries (ShareGPT `conversations` + `chosen`/`rejected` turn objects, Alpaca
`instruction`/`input`/`chosen`/`rejected` with `history`/`system`), OpenAI `messages` + `chosen`/`rejected` (a string,
a message, or a list of one assistant message), TRL's `prompt`/`chosen`/`rejected` (explicit prompt: a string or a
message list; implicit prompt: two full conversations sharing their first messages) and KTO's unpaired data (TRL
`prompt`/`completion`/`label`, LLaMA-Factory's `kto_tag` column next to a whole conversation). Every prompt and
reply goes through the SFT converters of formats.py, so roles, tags, tool calls, system columns and the errors are
the same as for SFT; a bad record raises RecordError naming the field, as there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import (
    OPENAI_TAGS,
    FormatOptions,
    RecordError,
    _role_map,
    alpaca_to_conversation,
    chat_to_conversation,
    detect_format,
    get_format_entry,
    known_formats,
)
from tunelab.data.types import Conversation, Message
from tunelab.registry import Registry

PREFERENCE_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
               "response": "output", "history": "history", "system": "system", "tools": "tools"},
    "sharegpt": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system",
                 "tools": "tools"},
    "openai": {"messages": "messages", "chosen": "chosen", "rejected": "rejected", "system": "system",
               "tools": "tools"},
    "trl": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system", "tools": "tools"},
    "kto": {"prompt": "prompt", "completion": "completion", "kto_tag": "label", "system": "system", "tools": "tools"},
}
_OPENAI_TAGS = OPENAI_TAGS
_PROMPT_ENDS = ("user", "tool")


@dataclass
class PreferenceExample:
    prompt: Conversation  # every message before the final assistant reply (system, tools, history, user)
    chosen: Message | None  # the preferred assistant reply (paired), or KTO's single completion
    rejected: Message | None  # None for unpaired (KTO) examples
    label: bool | None = None  # KTO: desirable (True) or not; None for paired examples
    source: str = ""  # "file:line" for error messages

    @property
    def paired(self) -> bool:
        return self.rejected is not None

    def replies(self) -> list[Message]:
        return [m for m in (self.chosen, self.rejected) if m is not None]


Converter = Callable[[dict, FormatOptions], PreferenceExample]
# KeyError for an unknown name: the loader turns it into a DataError naming the dataset
PREFERENCE_FORMATS: Registry[Converter] = Registry("preference format", unknown=KeyError)


def register_preference_format(name: str, converter: Converter) -> None:
    PREFERENCE_FORMATS.register(converter, name)


def dataset_format_choices() -> list[str]:
    """What a dataset's `format:` accepts: auto and the SFT record formats, then the preference-only ones."""
    from tunelab.data.formats import format_choices

    sft = format_choices()
    return [*sft, *(name for name in PREFERENCE_FORMATS.names() if name not in sft)]


def get_preference_format(name: str) -> Converter:
    return PREFERENCE_FORMATS.get(name)


def preference_options(fmt: str, user: FormatOptions, record: dict) -> FormatOptions:
    """The format's default columns and tags under the user's; a `kto_tag` column in the record (LLaMA-Factory's
    KTO data) makes alpaca/sharegpt/openai data unpaired."""
    columns = {**PREFERENCE_COLUMNS.get(fmt, {}), **user.columns}
    if "kto_tag" not in columns and "kto_tag" in record and columns.get("chosen", "chosen") not in record:
        columns["kto_tag"] = "kto_tag"
    tags = get_format_entry(fmt).tags if fmt in known_formats() else {}  # trl, kto: no role tags of their own
    return FormatOptions(columns, {**tags, **user.tags})


def detect_preference_format(record: dict, options: FormatOptions) -> str:
    """Guess the preference format from one record's keys (columns given by the user take precedence)."""
    cols = options.columns
    keys = set(record)
    if {cols.get("completion", "completion"), cols.get("kto_tag", "label")} <= keys:
        return "kto"
    paired = cols.get("chosen", "chosen") in keys or cols.get("rejected", "rejected") in keys
    if not paired and cols.get("kto_tag", "kto_tag") not in keys:
        raise RecordError("", f"cannot tell the preference format from the keys {sorted(record)}; expected chosen and "
                          "rejected replies (LLaMA-Factory ranking, OpenAI messages, TRL prompt/chosen/rejected), or "
                          "KTO's completion and label (or kto_tag); or set `format` and `columns`", "format")
    if "messages" in cols or "conversations" in keys or "messages" in keys:
        return detect_format(record, options)
    if "instruction" in keys or "query" in cols or "history" in cols or "response" in cols:
        return "alpaca"
    return "trl"  # a string prompt with string replies reads the same either way; trl also takes message lists


# ------------------------------------------------------------------------------------------------------- helpers
def _split(conv: Conversation, source_field: str) -> tuple[Conversation, Message]:
    """A converted conversation -> (prompt, final reply), checking the reply is the assistant's and the prompt ends
    with the turn it answers."""
    reply = conv.messages[-1]
    if reply.role != "assistant":
        raise RecordError(source_field, f"expected the assistant's reply last, got a {reply.role!r} message",
                          "bad_order")
    prompt = Conversation(conv.messages[:-1], tools=conv.tools)
    _check_prompt_end(prompt.messages, source_field)
    return prompt, reply


def _check_prompt_end(messages: list[Message], where: str) -> None:
    last = next((m.role for m in reversed(messages) if m.role != "system"), None)
    if last is None:
        raise RecordError(where, "the prompt has no user message", "empty_prompt")
    if last not in _PROMPT_ENDS:
        raise RecordError(where, f"the prompt ends with an {last} turn; expected it to end with a user (or tool) "
                          "turn, the one the reply answers", "prompt_end")


def _raw_prompt_end(turns: list, key: str, tags: dict[str, str]) -> None:
    """Check the last raw prompt turn before conversion: formats.py merges an assistant text turn with a following
    tool-call turn, which would silently fold the reply into the prompt."""
    if not turns or not isinstance(turns[-1], dict):
        return  # the converter names what is wrong
    role = _role_map(tags).get(turns[-1].get(tags["role_tag"]))
    if role in ("assistant", "function", "system"):
        name = "assistant" if role == "function" else role
        raise RecordError(f"{key}[{len(turns) - 1}]", f"the prompt ends with an {name} turn; expected it to end "
                          "with a user (or tool) turn, the one the reply answers", "prompt_end")


def _reply_turn(value: Any, where: str, tags: dict[str, str]) -> dict:
    """A reply as one turn object: a string, a message object, or a list holding exactly one message."""
    if value is None:
        raise RecordError(where, "missing (expected the assistant's reply)", "missing_field")
    if isinstance(value, list):
        if len(value) != 1:
            got = "an empty list" if not value else f"a list of {len(value)} messages"
            raise RecordError(where, f"expected one assistant reply (a string, a message, or a list of one message), "
                              f"got {got}", "wrong_type")
        value = value[0]
    if isinstance(value, str):
        return {tags["role_tag"]: tags["assistant_tag"], tags["content_tag"]: value}
    if isinstance(value, dict):
        return value
    raise RecordError(where, f"expected the reply as a string or a message object, got {type(value).__name__}",
                      "wrong_type")


def _chat_side(record: dict, options: FormatOptions, turns: list, reply: Any, reply_field: str) -> tuple:
    """Prompt turns + one reply through formats.chat_to_conversation; errors in the reply name `reply_field`."""
    key, tags = options.columns["messages"], options.tags
    if not isinstance(turns, list) or not turns:
        got = "missing" if turns is None else "an empty list" if turns == [] else f"got {type(turns).__name__}"
        raise RecordError(key, f"expected a non-empty list of prompt messages, {got}", "missing_field")
    _raw_prompt_end(turns, key, tags)
    turn = _reply_turn(reply, reply_field, tags)
    role = _role_map(tags).get(turn.get(tags["role_tag"]))
    if role not in ("assistant", "function"):
        raise RecordError(reply_field, f"expected the assistant's reply, got a message with role "
                          f"{turn.get(tags['role_tag'])!r}", "bad_order")
    try:
        conv = chat_to_conversation({**record, key: [*turns, turn]}, options)
    except RecordError as e:
        inner = f"{key}[{len(turns)}]"
        if e.field == inner or e.field.startswith((inner + ".", inner + "[")):
            suffix = "" if isinstance(reply, str) else e.field[len(inner):]  # a plain string has no sub-fields
            raise RecordError(reply_field + suffix, e.reason, e.rule) from None
        raise
    return _split(conv, reply_field)


def parse_label(value: Any, where: str) -> bool:
    """KTO's desirable flag: true/false, 1/0, or those words as text (CSV)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    got = "missing" if value is None else f"got {value!r}"
    raise RecordError(where, f"expected true (desirable) or false (undesirable), {got}",
                      "missing_field" if value is None else "wrong_type")


def _paired(options: FormatOptions, side: Callable[[str], tuple]) -> PreferenceExample:
    c = options.columns
    prompt, chosen = side(c["chosen"])
    _, rejected = side(c["rejected"])
    return PreferenceExample(prompt, chosen, rejected)


def _unpaired(record: dict, options: FormatOptions, conv: Conversation, where: str) -> PreferenceExample:
    prompt, completion = _split(conv, where)
    key = options.columns["kto_tag"]
    return PreferenceExample(prompt, completion, None, label=parse_label(record.get(key), key))


# ---------------------------------------------------------------------------------------------------- converters
def alpaca_preference(record: dict, options: FormatOptions) -> PreferenceExample:
    """instruction/input + chosen/rejected strings (or output + kto_tag), with history and system."""
    c = options.columns
    if "kto_tag" in c:
        return _unpaired(record, options, alpaca_to_conversation(record, options), c["response"])

    def side(column: str) -> tuple:
        value = record.get(column)
        if isinstance(value, (list, dict)):
            value = _reply_turn(value, column, _OPENAI_TAGS).get("content", value)
        one = FormatOptions({**c, "response": column}, options.tags)
        return _split(alpaca_to_conversation({**record, column: value}, one), column)

    return _paired(options, side)


def chat_preference(record: dict, options: FormatOptions) -> PreferenceExample:
    """ShareGPT/OpenAI: the prompt turns + chosen/rejected replies, or a whole conversation + kto_tag."""
    c = options.columns
    if "kto_tag" in c:
        conv = chat_to_conversation(record, options)
        return _unpaired(record, options, conv, f"{c['messages']}[{len(record[c['messages']]) - 1}]")
    turns = record.get(c["messages"])
    return _paired(options, lambda column: _chat_side(record, options, turns, record.get(column), column))


def _prompt_turns(record: dict, options: FormatOptions) -> list:
    """TRL's prompt: a string (one user turn) or a list of messages."""
    key = options.columns["prompt"]
    value = record.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(key, "is empty", "empty_prompt")
        return [{"role": "user", "content": value}]
    if value is None:
        raise RecordError(key, "missing (expected the prompt: a string or a list of messages)", "missing_field")
    if not isinstance(value, list):
        raise RecordError(key, f"expected a string or a list of messages, got {type(value).__name__}", "wrong_type")
    return value


def _implicit_prompt(record: dict, options: FormatOptions) -> tuple[list, Any, Any]:
    """TRL's implicit prompt: chosen and rejected are whole conversations; the prompt is the messages they share,
    and each must then hold exactly one more message, its reply."""
    c = options.columns
    chosen, rejected = record.get(c["chosen"]), record.get(c["rejected"])
    for key, value in ((c["chosen"], chosen), (c["rejected"], rejected)):
        if value is None:
            raise RecordError(key, "missing (expected the assistant's reply)", "missing_field")
        if not isinstance(value, list):
            raise RecordError(key, f"without a `{c['prompt']}` column, expected a whole conversation (a list of "
                              f"messages) sharing its first messages with the other reply, got "
                              f"{type(value).__name__}", "wrong_type")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RecordError(c["chosen"], f"implicit prompt: chosen and rejected share no first message, so there is no "
                          f"prompt; give a `{c['prompt']}` column or conversations that start the same",
                          "no_common_prefix")
    for key, value in ((c["chosen"], chosen), (c["rejected"], rejected)):
        extra = len(value) - shared
        if extra != 1:
            what = "nothing" if extra == 0 else f"{extra} messages"
            raise RecordError(key, f"implicit prompt: expected exactly one reply after the {shared} shared messages, "
                              f"got {what}", "same_reply" if extra == 0 else "bad_order")
    return chosen[:shared], chosen[shared], rejected[shared]


def trl_preference(record: dict, options: FormatOptions) -> PreferenceExample:
    """TRL's prompt/chosen/rejected, standard (strings) or conversational (message lists), explicit or implicit."""
    c = options.columns
    chat = FormatOptions({**c, "messages": c["prompt"]}, {**_OPENAI_TAGS, **options.tags})
    if record.get(c["prompt"]) is None and isinstance(record.get(c["chosen"]), list):
        turns, chosen, rejected = _implicit_prompt(record, options)
        prompt, chosen_msg = _chat_side(record, chat, turns, chosen, c["chosen"])
        _, rejected_msg = _chat_side(record, chat, turns, rejected, c["rejected"])
        return PreferenceExample(prompt, chosen_msg, rejected_msg)
    turns = _prompt_turns(record, options)
    return _paired(options, lambda column: _chat_side(record, chat, turns, record.get(column), column))


def kto_preference(record: dict, options: FormatOptions) -> PreferenceExample:
    """TRL's unpaired prompt/completion/label."""
    c = options.columns
    chat = FormatOptions({**c, "messages": c["prompt"]}, {**_OPENAI_TAGS, **options.tags})
    prompt, completion = _chat_side(record, chat, _prompt_turns(record, options), record.get(c["completion"]),
                                    c["completion"])
    key = c["kto_tag"]
    return PreferenceExample(prompt, completion, None, label=parse_label(record.get(key), key))


register_preference_format("alpaca", alpaca_preference)
register_preference_format("sharegpt", chat_preference)
register_preference_format("openai", chat_preference)
register_preference_format("trl", trl_preference)
register_preference_format("kto", kto_preference)
