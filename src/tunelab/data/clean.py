"""Cleaning rules applied to loaded conversations, each optional and each counting what it changed or removed.

Runs after sources.py (records -> conversations) and before encoding. By default the only rewrite is `trim`
(whitespace at the start and end of a message), so the targets are what users wrote; `normalize_whitespace` is an
opt-in that never touches fenced code, indented lines or template markup such as <think> or <tool_call>.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable

from tunelab.config.schema import CleanConfig
from tunelab.data.types import Conversation

# Tags of HTML documents (scraped pages), not the angle-bracket markup chat data uses (<think>, <tool_call>...).
_HTML_TAGS = ("a|abbr|article|aside|b|blockquote|body|br|caption|center|code|col|colgroup|dd|del|div|dl|dt|em|"
              "figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|ins|kbd|label|li|"
              "link|main|mark|meta|nav|noscript|ol|p|pre|q|s|samp|script|section|small|span|strike|strong|style|sub|"
              "sup|table|tbody|td|tfoot|th|thead|title|tr|tt|u|ul|var")
_HTML = re.compile(rf"<(?:script|style)\b[^>]*>.*?</(?:script|style)\s*>|</?(?:{_HTML_TAGS})\b[^<>]*/?>",
                   re.IGNORECASE | re.DOTALL)
_BLOCK_BREAK = re.compile(r"<(?:br|/p|/div|/li|/h[1-6]|/tr)\b[^<>]*>", re.IGNORECASE)
_INNER_RUNS = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?(?:^[ \t]*\1[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)


def trim(text: str) -> str:
    """Leading and trailing whitespace of a message, nothing inside it."""
    return text.strip()


def normalize_whitespace(text: str) -> str:
    """Opt-in: trim, unify line endings, drop trailing spaces, collapse runs of blank lines and of spaces inside a
    line. Fenced code blocks (``` or ~~~) are kept byte for byte, and so are indented lines (code, poems, tables
    aligned with spaces): only prose is rewritten."""
    if "  " not in text and "\t" not in text and "\r" not in text and " \n" not in text and "\n\n\n" not in text:
        return text.strip()  # the common case, without running the regexes
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.strip()  # first: the message's own first line is not an indented one
    out, pos = [], 0
    for fence in _FENCE.finditer(text):
        out += [_normalize_prose(text[pos:fence.start()]), fence.group(0)]
        pos = fence.end()
    out.append(_normalize_prose(text[pos:]))
    return "".join(out).strip()


def _normalize_prose(text: str) -> str:
    lines = [line if line[:1] in (" ", "\t") else _INNER_RUNS.sub(" ", line) for line in text.split("\n")]
    text = _TRAILING.sub("", "\n".join(lines))
    return _BLANK_RUNS.sub("\n\n", text)


def strip_html(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    text = _BLOCK_BREAK.sub("\n", text)
    return html.unescape(_HTML.sub("", text))


def _rewrite(conversations: Iterable[Conversation], fn, documents: bool = True) -> int:
    """Apply fn to every message (and plain-text document, if `documents`); return how many conversations changed."""
    changed = 0
    for conv in conversations:
        before = conv.text
        if conv.text is not None and documents:
            conv.text = fn(conv.text)
        hit = before != conv.text
        for m in conv.messages:
            new = fn(m.content)
            if new != m.content:
                m.content, hit = new, True
        changed += hit
    return changed


def _is_empty(conv: Conversation) -> bool:
    if conv.text is not None:
        return not conv.text.strip()
    prompts = [m for m in conv.messages if m.role in ("user", "tool")]
    replies = [m for m in conv.messages if m.role == "assistant"]
    return (not any(m.content.strip() for m in prompts)
            or not any(m.content.strip() or m.tool_calls for m in replies))


def _key(conv: Conversation) -> tuple:
    if conv.text is not None:
        return (conv.text,)
    turns = tuple((m.role, m.content, json.dumps(m.tool_calls, sort_keys=True) if m.tool_calls else "")
                  for m in conv.messages)
    return turns + ((json.dumps(conv.tools, sort_keys=True),) if conv.tools else ())


def _chars(conv: Conversation) -> int:
    return len(conv.text) if conv.text is not None else sum(len(m.content) for m in conv.messages)


def clean_conversations(conversations: list[Conversation], cfg: CleanConfig,
                        seen: set | None = None) -> tuple[list[Conversation], dict[str, int]]:
    """Apply the enabled rules in order; `seen` carries duplicate keys across datasets being mixed."""
    report: dict[str, int] = {}
    if cfg.strip_html:
        report["strip_html (changed)"] = _rewrite(conversations, strip_html)
    if cfg.normalize_whitespace:
        report["normalize_whitespace (changed)"] = _rewrite(conversations, normalize_whitespace)
    elif cfg.trim:  # normalize_whitespace trims too
        report["trim (changed)"] = _rewrite(conversations, trim, documents=False)
    kept = conversations
    if cfg.drop_empty:
        kept = [c for c in kept if not _is_empty(c)]
        report["drop_empty"] = len(conversations) - len(kept)
    if cfg.dedup:
        seen = set() if seen is None else seen
        unique = []
        for conv in kept:
            key = hash(_key(conv))
            if key not in seen:
                seen.add(key)
                unique.append(conv)
        report["dedup"] = len(kept) - len(unique)
        kept = unique
    if cfg.min_chars:
        before = len(kept)
        kept = [c for c in kept if _chars(c) >= cfg.min_chars]
        report["min_chars"] = before - len(kept)
    if cfg.max_chars is not None:
        before = len(kept)
        kept = [c for c in kept if _chars(c) <= cfg.max_chars]
        report["max_chars"] = before - len(kept)
    return kept, report
