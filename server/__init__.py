"""The hardened Λ-Split trunk server (Starlette + uvicorn)."""

from __future__ import annotations

from server.app import build_app
from server.config import ConfigError, ServerConfig, load_config
from server.run import BackgroundServer, ReadyServer, build_server, serve

__all__ = [
    "BackgroundServer",
    "ConfigError",
    "ReadyServer",
    "ServerConfig",
    "build_app",
    "build_server",
    "load_config",
    "serve",
]
