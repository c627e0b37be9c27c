"""Deployment stage: load a model into an engine and run the API server under uvicorn (`tunelab serve`)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import replace

from tunelab.config.schema import ServeConfig
from tunelab.errors import TunelabError
from tunelab.inference.engine import EngineOptions
from tunelab.serving.security import api_keys

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: ServeConfig) -> None:
    """Refuse to open the model to the network without an API key, unless explicitly asked to (serve.allow_no_auth)."""
    if is_loopback(cfg.host) or api_keys(cfg) or cfg.allow_no_auth:
        return
    raise TunelabError(
        f"refusing to serve on {cfg.host} without an API key: anyone who can reach the port could use the model. "
        f"Give --api-key KEY (or set {cfg.api_key_env}), bind 127.0.0.1, or pass --allow-no-auth."
    )


def check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise TunelabError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from e


# After the shutdown timeout, open streams get this long to send their error event before uvicorn cuts them.
ABORT_GRACE_S = 2.0


def run_server(app, cfg: ServeConfig, shutdown_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serve `app` until SIGINT/SIGTERM; then stop accepting, let requests in flight finish within
    `shutdown_timeout_s`, end those still open with an error event (streams) or a 503, and return."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:  # the first signal starts the graceful shutdown
                start_shutdown(app, shutdown_timeout_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout_s + ABORT_GRACE_S, server_header=False)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown; that is a normal stop
        log.info("server stopped")


def start_shutdown(app, timeout_s: float) -> threading.Timer:
    """Refuse new requests now; after `timeout_s`, end the requests still running (a timer thread)."""
    batcher = app.state.serve.batcher
    batcher.drain()

    def abort() -> None:
        ended = batcher.abort_running(f"the server stopped; requests still running after {timeout_s:g} s were ended")
        if ended:
            log.warning("shutdown timeout: ended %d request(s) still running", ended)

    timer = threading.Timer(timeout_s, abort)
    timer.daemon = True
    timer.start()
    return timer


def serve(model: str, adapter: str | None = None, cfg: ServeConfig | None = None,
          options: EngineOptions | None = None) -> None:
    """Load `model` (run directory, adapter, merged or exported folder, hub id or GGUF) into the engine
    `cfg.engine` and serve it. `options`: how the engine loads (threads, device...); its max_batch_size is
    `cfg.max_batch_size`, the serve section's."""
    cfg = cfg or ServeConfig()
    check_exposure(cfg)  # before the heavy imports below: a refusal must come at once
    check_port_free(cfg.host, cfg.port)
    from tunelab.inference.engine import get_engine

    options = replace(options or EngineOptions(), max_batch_size=cfg.max_batch_size)
    # the engine's loader refuses clearly before anything is loaded where the backend cannot run
    loaded = get_engine(cfg.engine).load(model, adapter, options)
    from tunelab.serving.app import create_app

    app = create_app(loaded, cfg)
    name = app.state.serve.model_name
    auth = "API key required" if api_keys(cfg) else "no API key"
    print(f"serving {name} on http://{cfg.host}:{cfg.port}/v1 ({auth}); Ctrl+C stops", flush=True)
    run_server(app, cfg, cfg.shutdown_timeout_s)
