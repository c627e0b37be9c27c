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

    def to_template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict() for m in self.messages]
