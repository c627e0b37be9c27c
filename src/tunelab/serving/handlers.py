"""Deployment stage: what each endpoint does, from a validated request to a response or an SSE stream.

Prompts are rendered by `engine.render` (the model's recorded training template), so the server formats a
conversation exactly as training and `tunelab chat` did. Token limits are checked before anything is queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from jinja2 import TemplateError

from tunelab.config.schema import ServeConfig
from tunelab.inference.engine import Completion, Engine, GenerationParams, StreamEvent
from tunelab.serving import protocol as p
from tunelab.serving.batcher import Batcher, ShuttingDownError
from tunelab.serving.tools import parse_reply, safe_prefix, tool_names

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


@dataclass
class ServeState:
    engine: Engine
    cfg: ServeConfig
    batcher: Batcher
    model_name: str
    default_system: str | None = None  # the run's data.system: what training put in prompts without one


def run_system_prompt(engine: Engine) -> str | None:
    """The default system prompt a run was trained with (data.system), as `tunelab chat` uses it."""
    run_config = getattr(getattr(engine, "artifact", None), "run_config", None)
    return run_config.data.system if run_config is not None else None


def with_default_system(state: ServeState, messages: list[dict]) -> list[dict]:
    if state.default_system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": state.default_system}, *messages]
    return messages


# ------------------------------------------------------------------------------------------------------- helpers
def check_model(state: ServeState, model: str) -> None:
    if model != state.model_name:
        raise p.ApiError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}` "
                         "(see GET /v1/models)", param="model", code="model_not_found")


async def render_chat(state: ServeState, req: p.ChatCompletionRequest) -> str:
    messages = with_default_system(state, [m.to_template_dict() for m in req.messages])
    try:  # rendering is CPU work: keep it off the event loop
        return await asyncio.to_thread(state.engine.render, messages, req.tools, True)
    except (TemplateError, ValueError) as e:
        raise p.ApiError(400, f"the model's chat template cannot render these messages: {e}",
                         param="messages") from e


def plan_new_tokens(state: ServeState, prompt_tokens: int, requested: int | None, param: str) -> int:
    """max_new_tokens for a request: what it asked for, within the server's ceiling and the model's context."""
    limit, context = state.cfg.max_new_tokens, state.engine.max_context
    room = context - prompt_tokens
    if room <= 0:
        raise p.ApiError(400, f"The prompt is {prompt_tokens} tokens long, but this model's context is {context} "
                         "tokens. Shorten the messages.", param="messages", code="context_length_exceeded")
    if requested is None:
        return min(limit, room)
    if requested > limit:
        raise p.ApiError(400, f"{param} is too large: {requested}. This server generates at most {limit} tokens "
                         "per completion (serve.max_new_tokens).", param=param, code="invalid_value")
    if requested > room:
        raise p.ApiError(400, f"This model's context is {context} tokens; the prompt takes {prompt_tokens} and "
                         f"{param} asks for {requested} more. Lower {param} or shorten the prompt.",
                         param=param, code="context_length_exceeded")
    return requested


def to_params(req: p.SamplingRequest, max_new_tokens: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, repetition_penalty=req.repetition_penalty, stop=list(req.stop or []),
                            seed=req.seed)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def open_stream(state: ServeState, prompt: str, params: GenerationParams
                      ) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
    """Start a stream and wait for its first event, so a full queue is still answered with a 503 status."""
    events = state.batcher.stream(prompt, params)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    return first, events


async def guarded(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error after the 200 status was sent can only be told in the stream: an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except ShuttingDownError as e:  # the shutdown timeout passed while this stream was still open
        yield sse(p.ApiError(503, f"{e}; the answer is incomplete, retry later", type="server_busy",
                             code="shutting_down").body())
        yield sse("[DONE]")
    except Exception as e:
        log.exception("streamed generation failed")
        yield sse(p.ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
        yield sse("[DONE]")


async def _with_first(first: StreamEvent, events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    try:
        yield first
        async for event in events:
            yield event
    finally:
        await events.aclose()  # the client left (task cancelled) or the stream ended: stop the engine


# ---------------------------------------------------------------------------------------------- chat completions
async def chat_completion(state: ServeState, req: p.ChatCompletionRequest):
    """A ChatCompletion, or an SSE event iterator when `req.stream`."""
    check_model(state, req.model)
    prompt = await render_chat(state, req)
    prompt_tokens = await asyncio.to_thread(state.engine.count_tokens, prompt)
    params = to_params(req, plan_new_tokens(state, prompt_tokens, req.token_limit, _limit_name(req)))
    names = tool_names(req.tools) if req.tool_choice != "none" else set()
    if req.stream:
        first, events = await open_stream(state, prompt, params)
        return guarded(stream_chat(state, _with_first(first, events), req.include_usage, names))
    completions = await generate_n(state, prompt, params, req.n)
    choices = [chat_choice(i, c, names) for i, c in enumerate(completions)]
    return p.ChatCompletion(id=p.new_id("chatcmpl"), created=p.now(), model=state.model_name, choices=choices,
                            usage=_usage(completions))


def chat_choice(index: int, completion: Completion, names: set[str]) -> p.ChatChoice:
    reply = parse_reply(completion.text, names)
    if not reply.calls:
        return p.ChatChoice(index=index, message=p.AssistantMessage(content=completion.text),
                            finish_reason=completion.finish_reason)
    return p.ChatChoice(index=index, message=p.AssistantMessage(content=reply.content, tool_calls=reply.calls),
                        finish_reason="tool_calls")


async def generate_n(state: ServeState, prompt: str, params: GenerationParams, n: int) -> list[Completion]:
    if params.temperature == 0:  # greedy: n identical answers, generated once
        return (await state.batcher.generate([prompt], params)) * n
    return await state.batcher.generate([prompt] * n, params)


def _limit_name(req: p.ChatCompletionRequest) -> str:
    return "max_completion_tokens" if req.max_completion_tokens else "max_tokens"


def _usage(completions: list[Completion]) -> p.Usage:
    # n completions of one prompt: the prompt is counted once, as OpenAI does.
    return p.usage(completions[0].prompt_tokens, sum(c.completion_tokens for c in completions))


async def stream_chat(state: ServeState, events: AsyncIterator[StreamEvent], include_usage: bool,
                      names: frozenset[str] | set[str] = frozenset()):
    """Text deltas as they come; with declared tools, text from where a call may begin is held back and sent at
    the end as tool-call deltas (or as text, if it was not a call)."""
    cid, created, model = p.new_id("chatcmpl"), p.now(), state.model_name
    yield sse(p.chat_chunk(cid, created, model, {"role": "assistant", "content": ""}, None, include_usage))
    final, text, sent = None, "", 0
    async for event in events:
        text += event.delta
        ready = safe_prefix(text) if names else len(text)
        if ready > sent:
            yield sse(p.chat_chunk(cid, created, model, {"content": text[sent:ready]}, None, include_usage))
            sent = ready
        final = event.completion or final
    reason = final.finish_reason if final else "stop"
    calls = parse_reply(text, names).calls if names and sent < len(text) else []
    if calls:
        deltas = [{"index": i, **call} for i, call in enumerate(calls)]
        yield sse(p.chat_chunk(cid, created, model, {"tool_calls": deltas}, None, include_usage))
        reason = "tool_calls"
    elif sent < len(text):
        yield sse(p.chat_chunk(cid, created, model, {"content": text[sent:]}, None, include_usage))
    yield sse(p.chat_chunk(cid, created, model, {}, reason, include_usage))
    if include_usage and final:
        usage = p.usage(final.prompt_tokens, final.completion_tokens).model_dump()
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": usage})
    yield sse("[DONE]")


# ---------------------------------------------------------------------------------------------- text completions
async def text_completion(state: ServeState, req: p.CompletionRequest):
    """A TextCompletion for raw prompts (no chat template), or an SSE event iterator when `req.stream`."""
    check_model(state, req.model)
    prompts: list[str] = req.prompt  # the validator made it a list
    counts = await asyncio.to_thread(lambda: [state.engine.count_tokens(t) for t in prompts])
    new_tokens = min(plan_new_tokens(state, n, req.max_tokens, "max_tokens") for n in counts)
    params = to_params(req, new_tokens)
    if req.stream:
        if len(prompts) > 1:
            raise p.ApiError(400, "stream takes a single prompt", param="prompt")
        first, events = await open_stream(state, prompts[0], params)
        return guarded(stream_text(state, _with_first(first, events), req.include_usage))
    if params.temperature == 0:  # greedy: n identical answers, generated once
        completions = [c for c in await state.batcher.generate(prompts, params) for _ in range(req.n)]
    else:
        completions = await state.batcher.generate([t for t in prompts for _ in range(req.n)], params)
    choices = [p.TextChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(completions)]
    prompt_tokens = sum(counts)
    return p.TextCompletion(id=p.new_id("cmpl"), created=p.now(), model=state.model_name, choices=choices,
                            usage=p.usage(prompt_tokens, sum(c.completion_tokens for c in completions)))


async def stream_text(state: ServeState, events: AsyncIterator[StreamEvent], include_usage: bool):
    cid, created, model = p.new_id("cmpl"), p.now(), state.model_name
    final = None
    async for event in events:
        if event.delta:
            yield sse(p.text_chunk(cid, created, model, event.delta, None, include_usage))
        final = event.completion or final
    yield sse(p.text_chunk(cid, created, model, "", final.finish_reason if final else "stop", include_usage))
    if include_usage and final:
        usage = p.usage(final.prompt_tokens, final.completion_tokens).model_dump()
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": usage})
    yield sse("[DONE]")


# ---------------------------------------------------------------------------------------------------- /generate
def instruction_text(instruction: str, input: str = "") -> str:
    """The user turn of an Alpaca record, joined as tunelab.data.formats does for training."""
    return "\n".join(part for part in (instruction, input) if part.strip())


async def simple_generate(state: ServeState, req: p.GenerateRequest) -> p.GenerateResponse:
    """The seeds' endpoint: `max_length` counts prompt plus output tokens, like transformers' generate()."""
    messages = with_default_system(state, [{"role": "user", "content": instruction_text(req.instruction, req.input)}])
    prompt = await asyncio.to_thread(state.engine.render, messages, None, True)
    prompt_tokens = await asyncio.to_thread(state.engine.count_tokens, prompt)
    if req.max_length <= prompt_tokens:
        raise p.ApiError(400, f"max_length ({req.max_length}) must exceed the prompt's {prompt_tokens} tokens: it "
                         "counts prompt plus output tokens", param="max_length", code="invalid_value")
    room = min(req.max_length, state.engine.max_context) - prompt_tokens
    if room <= 0:
        plan_new_tokens(state, prompt_tokens, None, "max_length")  # raises context_length_exceeded
    new_tokens = min(room, state.cfg.max_new_tokens)
    params = GenerationParams(max_new_tokens=new_tokens, temperature=req.temperature, top_p=req.top_p)
    [completion] = await state.batcher.generate([prompt], params)
    return p.GenerateResponse(output=completion.text)
