"""Deployment stage: load a model into an engine and run the API server under uvicorn (`tunelab serve`)."""

from __future__ import annotations

import ipaddress
import logging
import socket

from tunelab.config.schema import ServeConfig
from tunelab.errors import TunelabError
from tunelab.serving.security import api_keys

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: ServeConfig, allow_no_auth: bool = False) -> None:
    """Refuse to open the model to the network without an API key, unless explicitly asked to."""
    if is_loopback(cfg.host) or api_keys(cfg) or allow_no_auth:
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


def run_server(app, cfg: ServeConfig, shutdown_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serve `app` until SIGINT/SIGTERM; then stop accepting, let requests in flight finish, and return."""
    import uvicorn

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout_s, server_header=False)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown; that is a normal stop
        log.info("server stopped")


def serve(model: str, adapter: str | None = None, cfg: ServeConfig | None = None, *, allow_no_auth: bool = False,
          shutdown_timeout_s: float = 30.0, **engine_kwargs) -> None:
    """Load `model` (run directory, adapter, merged or exported folder, hub id or GGUF) and serve it."""
    from tunelab.inference.hf import load_engine
    from tunelab.serving.app import create_app

    cfg = cfg or ServeConfig()
    check_exposure(cfg, allow_no_auth)
    check_port_free(cfg.host, cfg.port)
    engine = load_engine(model, adapter=adapter, **engine_kwargs)
    app = create_app(engine, cfg)
    name = app.state.serve.model_name
    auth = "API key required" if api_keys(cfg) else "no API key"
    print(f"serving {name} on http://{cfg.host}:{cfg.port}/v1 ({auth}); Ctrl+C stops", flush=True)
    run_server(app, cfg, shutdown_timeout_s)
