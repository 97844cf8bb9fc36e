"""The FastAPI application: routes, error handlers and middleware around one AsyncEngine.

The app does not start the engine; whoever runs it calls `engine.start()` inside the event loop.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST

from winnow import __version__
from winnow.config import ServerConfig
from winnow.server.auth import ApiKeyMiddleware
from winnow.server.body_limit import BodyLimitMiddleware
from winnow.server.chat import create_chat_completion
from winnow.server.completions import create_completion
from winnow.server.context import ServerContext, model_not_found
from winnow.server.errors import ApiError, install_error_handlers
from winnow.server.json_body import ThreadedBodyRoute, require_json_body
from winnow.server.lifecycle import (
    LIVE_PATH,
    METRICS_PATH,
    READINESS_PATHS,
    ReadinessGate,
    health_response,
    liveness_response,
)
from winnow.server.openapi import install_openapi, served_limits
from winnow.server.prompts import chat_prompt, check_token_ids, text_prompt
from winnow.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from winnow.server.request_id import RequestIdMiddleware
from winnow.server.response_store import AsyncResponseStore, Retention
from winnow.server.responses import (
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from winnow.server.responses_protocol import ResponseObject, ResponsesRequest
from winnow.server.tokenizer_pool import with_tokenizer

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine
    from winnow.models import Tokenizer

DEFAULT_KEEPALIVE_S = 10.0


def build_app(
    engine: AsyncEngine, config: ServerConfig, *, keepalive_s: float = DEFAULT_KEEPALIVE_S
) -> FastAPI:
    """The OpenAI-compatible app; `keepalive_s` is the SSE `: ping` interval while idle."""
    ctx = ServerContext(engine, config, keepalive_s)
    app = FastAPI(title="Winnow", version=__version__)
    app.router.route_class = ThreadedBodyRoute
    install_error_handlers(app)
    json_body = [Depends(require_json_body)]

    @app.post("/v1/chat/completions", dependencies=json_body, response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """JSON, or SSE chat.completion.chunk events when the body says `"stream": true`."""
        return await create_chat_completion(body, request, ctx)

    @app.post("/v1/completions", dependencies=json_body, response_model=Completion)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Legacy text completions, JSON or SSE."""
        return await create_completion(body, request, ctx)

    retention = Retention(
        ttl_s=config.response_store_ttl * 3600, max_responses=config.response_store_max_responses
    )
    store = AsyncResponseStore(config.response_store, retention)

    @app.post("/v1/responses", dependencies=json_body, response_model=ResponseObject)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """The Responses API: JSON, or its typed SSE events when `"stream": true`."""
        return await create_response(body, request, ctx, store)

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject)
    async def get_response(response_id: str) -> Response:
        return await retrieve_response(response_id, store)

    @app.delete("/v1/responses/{response_id}")
    async def remove_response(response_id: str) -> Response:
        return await delete_response(response_id, store)

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(
        response_id: str,
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: str | None = None,
    ) -> Response:
        return await list_input_items(response_id, store, order, limit, after)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[_model_card(ctx, name) for name in ctx.served_names])

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id not in ctx.served_names:
            raise model_not_found(model_id)
        return _model_card(ctx, model_id)

    @app.post("/tokenize", dependencies=json_body)
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        """Token ids of a text prompt, or of chat messages rendered with the chat template."""
        ctx.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "Give exactly one of 'prompt' and 'messages'.", param="prompt")
        if body.messages is not None:
            job = partial(
                chat_prompt,
                messages=body.messages,
                tool_format=ctx.tool_format,
                system_prompt=body.system_prompt,
                tools=body.tools,
                template_kwargs=body.chat_template_kwargs,
                special_tokens_in_content=config.allow_special_tokens_in_content,
            )
        else:
            assert body.prompt is not None
            job = partial(text_prompt, text=body.prompt, add_special_tokens=body.add_special_tokens)
        tokens = await with_tokenizer(engine.tokenizer, job, size=len(await request.body()))
        return TokenizeResponse(
            count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens
        )

    @app.post("/detokenize", dependencies=json_body)
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        ctx.resolve_model(body.model)
        text = await with_tokenizer(
            engine.tokenizer,
            partial(_checked_decode, tokens=body.tokens),
            size=len(await request.body()),
        )
        return DetokenizeResponse(prompt=text)

    @app.get(METRICS_PATH)
    async def metrics() -> Response:
        """Prometheus text; behind the API key unless --public-metrics."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def health() -> Response:
        """Readiness: 200 while the engine runs; 503 with the state while it loads, drains or
        is dead."""
        return health_response(engine.state)

    for path in READINESS_PATHS:
        app.add_api_route(path, health, methods=["GET"])

    @app.get(LIVE_PATH)
    async def livez() -> Response:
        """Liveness: 200 while the process is up, the model loading included; 503 once dead."""
        return liveness_response(engine.state)

    install_openapi(app, lambda: served_limits(ctx))
    # Middleware wraps in reverse order of adding: CORS, request id, auth, body limit, readiness
    # gate, routes.
    app.add_middleware(ReadinessGate, engine=engine)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_keys:
        app.add_middleware(
            ApiKeyMiddleware,
            api_keys=config.api_keys,
            public_paths=ctx.public_paths,
            allowed_origins=config.allowed_origins,
        )
    app.add_middleware(RequestIdMiddleware)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_credentials="*" not in config.allowed_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id"],
        )
    return app


def _checked_decode(tokenizer: Tokenizer, tokens: list[int]) -> str:
    check_token_ids(tokens, tokenizer.vocab_size, "tokens")
    return tokenizer.decode(tokens)


def _model_card(ctx: ServerContext, name: str) -> ModelCard:
    return ModelCard(
        id=name, created=ctx.started, owned_by="winnow", max_model_len=ctx.engine.max_model_len
    )
