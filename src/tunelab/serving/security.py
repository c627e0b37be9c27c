"""Deployment stage: who may call the server (bearer API keys) and how much they may send (body size limit)."""

from __future__ import annotations

import hmac
import json
import os

from tunelab.config.schema import ServeConfig
from tunelab.serving.protocol import ApiError


def api_keys(cfg: ServeConfig) -> list[str]:
    """Keys from the config plus the comma-separated environment variable `cfg.api_key_env`."""
    keys = list(cfg.api_keys)
    if cfg.api_key_env:
        keys += [k.strip() for k in os.environ.get(cfg.api_key_env, "").split(",")]
    return [k for k in keys if k]


class KeyChecker:
    """Accepts `Authorization: Bearer <key>` for any configured key; no keys configured means open."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key without stopping early, so timing reveals neither the key nor which matched.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            message = "missing API key: send `Authorization: Bearer <key>`" if not given else "incorrect API key"
            raise ApiError(401, message, type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


class BodyLimitMiddleware:
    """Refuses request bodies over `limit` bytes with 413, from Content-Length before reading, else while reading.

    A pure ASGI middleware: the body is never read past the limit, and streaming responses are left untouched.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, ApiError(400, "invalid Content-Length header"))
            if int(length) > self.limit:
                return await _send_error(send, self._too_large())
            return await self.app(scope, receive, send)
        # No Content-Length (chunked upload): read up to the limit, then hand the buffered body on.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _send_error(send, self._too_large())
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body is larger than the server's limit of {self.limit} bytes "
                        "(serve.max_body_bytes)", code="request_too_large")


async def _send_error(send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
