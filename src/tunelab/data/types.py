"""The one internal conversation type every record format is normalized to (formats.py) and encoded from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    train: bool | None = None  # per-message override of data.train_on (None: follow the config)

    def to_template_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    source: str = ""  # "file:line" or "file#index", for error messages
    text: str | None = None  # raw document (format text, continued pretraining): trained on in full, no template

    def to_template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict() for m in self.messages]

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass
class Reject:
    """A record that could not be used, with enough detail for the user to find and fix it."""

    source: str  # "file:line" or "file#index"
    field: str  # the offending field ("" when the whole record is at fault)
    reason: str
    rule: str = "invalid"  # short key the summary groups by: invalid, json, utf8, template, ...

    def __str__(self) -> str:
        where = f"{self.source} field {self.field!r}" if self.field else self.source
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "field": self.field, "reason": self.reason, "rule": self.rule}


@dataclass
class LoadResult:
    conversations: list[Conversation] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    records_read: int = 0
    name: str = ""  # dataset name or path, for the summary
