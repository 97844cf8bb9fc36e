"""What every route needs: the engine, the server settings, and the served model names."""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from winnow import __version__
from winnow.config import ServerConfig
from winnow.server.errors import ApiError
from winnow.server.lifecycle import METRICS_PATH, PROBE_PATHS
from winnow.server.metrics import ServerMetrics
from winnow.structured.tool_formats import ToolFormat, detect_tool_format, tool_format

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine

SYSTEM_FINGERPRINT = f"winnow-{__version__}"


@dataclass
class ServerContext:
    engine: AsyncEngine
    config: ServerConfig
    keepalive_s: float
    started: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine, self.served_names[0])

    @functools.cached_property
    def tool_format(self) -> ToolFormat:
        """The model's tool-call format (known once the model has loaded)."""
        tokenizer = self.engine.tokenizer
        name = self.config.tool_call_parser or detect_tool_format(tokenizer.chat_template)
        return tool_format(name, tokenizer.special_token_id)

    @property
    def served_names(self) -> list[str]:
        return self.config.served_model_names or [self.engine.model_name]

    @property
    def public_paths(self) -> list[str]:
        """Routes that need no API key (when the server has keys)."""
        return [*PROBE_PATHS] + ([METRICS_PATH] if self.config.public_metrics else [])

    def resolve_model(self, requested: str | None) -> str:
        """The name to report back: the one asked for when it is served, else the default."""
        names = self.served_names
        if requested is None or requested in names:
            return requested or names[0]
        if self.config.accept_any_model:
            return names[0]
        raise model_not_found(requested)


def model_not_found(name: str) -> ApiError:
    return ApiError(
        404, f"The model '{name}' does not exist.", param="model", code="model_not_found"
    )


def request_id(request: Request) -> str:
    """The id chosen for this HTTP request by RequestIdMiddleware."""
    return str(request.state.request_id)


def engine_request_id(public_id: str) -> str:
    """The engine needs ids unique among live requests; a client-chosen id may repeat."""
    return f"{public_id}-{secrets.token_hex(4)}"
