"""Deployment stage: the OpenAI-compatible wire format (requests, responses, stream chunks, errors) of the server.

Request models ignore parameters they do not know (clients such as LangChain send `user`, `store`, `metadata`)
but refuse the ones whose meaning they cannot honour (logprobs, penalties other than 0), so a client never gets
an answer that silently differs from what it asked for.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# ------------------------------------------------------------------------------------------------------- requests
class TextPart(Request):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class FunctionCall(Request):
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text (OpenAI) or an object.")


class ToolCall(Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: str = Field(description="system, developer (same as system), user, assistant or tool.")
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, content: Any) -> Any:
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")
        return content

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs `content` (only assistant messages with tool_calls "
                             "may omit it)")
        return self

    def to_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (the same shape tunelab.data.types.Message produces)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [_template_tool_call(c) for c in self.tool_calls]
        if self.name:
            out["name"] = self.name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


def _template_tool_call(call: ToolCall) -> dict[str, Any]:
    # OpenAI sends arguments as JSON text; Hugging Face chat templates expect a mapping.
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    out = {"type": "function", "function": {"name": call.function.name, "arguments": args}}
    if call.id:
        out["id"] = call.id
    return out


class StreamOptions(Request):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage.")


class SamplingRequest(Request):
    """Parameters shared by /v1/chat/completions and /v1/completions."""

    model: str = Field(description="The served model's name, as listed by /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: the server's limit).")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="Extension (as in vLLM): keep the k most likely tokens; 0: off.")
    repetition_penalty: float = Field(1.0, gt=0, description="Extension (as in vLLM); 1.0: off.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion.")
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    n: int = Field(1, ge=1, le=16, description="Completions per prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, description="Only 0 is supported; use repetition_penalty.")
    presence_penalty: float = Field(0.0, description="Only 0 is supported; use repetition_penalty.")
    logprobs: bool | int | None = Field(None, description="Not supported.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> SamplingRequest:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server; use repetition_penalty (e.g. 1.1)")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.stream and self.n > 1:
            raise ValueError("n > 1 is not supported together with stream")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Tool definitions passed to the chat template; calls the model writes come back as "
        "`tool_calls` (Hermes/Qwen, Mistral and Llama 3.1 formats)."
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="none: leave tool calls as text. Other values are accepted; the model decides."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="Raw prompt text (no chat template), or a list of them.")
    echo: bool = Field(False, description="Only false is supported.")
    suffix: str | None = Field(None, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt: str | list[str]) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        return prompts

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported by this server")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class GenerateRequest(Request):
    """The seeds' simple endpoint: an Alpaca-style instruction with optional input."""

    instruction: str = Field(min_length=1)
    input: str = ""
    max_length: int = Field(1024, ge=1, description="Prompt plus output tokens, as in transformers' generate().")
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)


# ------------------------------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class GenerateResponse(BaseModel):
    output: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunelab"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    queued: int = Field(description="Requests waiting for the engine.")
    running: int = Field(description="Requests being generated now.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def chat_chunk(id: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               with_usage_field: bool = False) -> dict[str, Any]:
    """One `chat.completion.chunk` (OpenAI sends `usage: null` on every chunk when include_usage is on)."""
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def text_chunk(id: str, created: int, model: str, text: str, finish_reason: str | None = None,
               with_usage_field: bool = False) -> dict[str, Any]:
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk
