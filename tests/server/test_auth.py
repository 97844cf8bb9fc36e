"""API keys (deny by default, decided on the raw path) and CORS."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.server.conftest import AppFactory, asgi_client, chat_body
from winnow.server.lifecycle import PROBE_PATHS

pytestmark = pytest.mark.anyio

KEYS = ["sk-first-key", "sk-second-key"]
PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/demo"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/metrics"),
    ("GET", "/no/such/route"),
    ("GET", "/health/"),
    ("GET", "/livez/"),
]
ORIGIN = "https://app.example"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-wrong"), {"Authorization": "sk-first-key"}, {"Authorization": "Basic abc"}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
async def test_protected_routes_need_a_key(
    make_app: AppFactory, method: str, path: str, headers: dict[str, str]
) -> None:
    async with asgi_client(make_app(api_keys=KEYS)) as http:
        response = await http.request(method, path, headers=headers, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error"


async def test_every_key_opens_every_route(make_app: AppFactory) -> None:
    async with asgi_client(make_app(api_keys=KEYS)) as http:
        for key in KEYS:
            assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200
            chat = await http.post("/v1/chat/completions", json=chat_body(), headers=bearer(key))
            assert chat.status_code == 200
            tokenize = await http.post("/tokenize", json={"prompt": "hi"}, headers=bearer(key))
            assert tokenize.status_code == 200
        lowercase_scheme = {"Authorization": f"bearer {KEYS[0]}"}
        assert (await http.get("/v1/models", headers=lowercase_scheme)).status_code == 200


async def test_probes_are_public_and_metrics_only_when_asked(make_app: AppFactory) -> None:
    async with asgi_client(make_app(api_keys=KEYS)) as http:
        for path in PROBE_PATHS:
            assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/metrics")).status_code == 401
    async with asgi_client(make_app(api_keys=KEYS, public_metrics=True)) as http:
        # passes authentication; whether /metrics exists is another room's business
        assert (await http.get("/metrics")).status_code != 401
        assert (await http.get("/v1/models")).status_code == 401


async def test_no_keys_configured_means_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).status_code == 200


async def test_keys_never_reach_the_logs(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with asgi_client(make_app(api_keys=KEYS)) as http:
        await http.get("/v1/models", headers=bearer("sk-wrong-guess"))
        await http.get("/v1/models", headers=bearer(KEYS[0]))
    assert "sk-" not in caplog.text


async def test_preflight_passes_authentication(make_app: AppFactory) -> None:
    app = make_app(api_keys=KEYS, allowed_origins=[ORIGIN])
    async with asgi_client(app) as http:
        response = await http.options(
            "/v1/chat/completions",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_allows_only_the_configured_origins(make_app: AppFactory) -> None:
    async with asgi_client(make_app(allowed_origins=[ORIGIN])) as http:
        allowed = await http.get("/v1/models", headers={"Origin": ORIGIN})
        other = await http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in other.headers


async def test_wildcard_origin_never_comes_with_credentials(make_app: AppFactory) -> None:
    async with asgi_client(make_app(allowed_origins=["*"])) as http:
        response = await http.get("/v1/models", headers={"Origin": ORIGIN})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization",
}


@pytest.mark.parametrize(
    ("allowed_origins", "headers"),
    [
        ([], {}),
        ([], {"Origin": ORIGIN, **PREFLIGHT}),
        ([ORIGIN], {"Origin": ORIGIN}),
        ([ORIGIN], PREFLIGHT),
    ],
    ids=["no-cors", "no-cors-preflight", "not-a-preflight", "no-origin"],
)
async def test_options_needs_the_key_unless_an_allowed_preflight(
    make_app: AppFactory, allowed_origins: list[str], headers: dict[str, str]
) -> None:
    async with asgi_client(make_app(api_keys=KEYS, allowed_origins=allowed_origins)) as http:
        refused = await http.options("/v1/chat/completions", headers=headers)
        keyed = await http.options("/v1/chat/completions", headers={**headers, **bearer(KEYS[0])})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert "allow" not in refused.headers  # the route's methods are not disclosed without a key
    assert keyed.status_code != 401


async def test_wildcard_origins_let_any_preflight_through(make_app: AppFactory) -> None:
    async with asgi_client(make_app(api_keys=KEYS, allowed_origins=["*"])) as http:
        response = await http.options(
            "/v1/completions", headers={"Origin": "https://any.example", **PREFLIGHT}
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


async def test_preflight_from_another_origin_is_refused(make_app: AppFactory) -> None:
    """The CORS layer answers every preflight before authentication; one from an origin not
    allowed gets no CORS grant and learns nothing about the route."""
    async with asgi_client(make_app(api_keys=KEYS, allowed_origins=[ORIGIN])) as http:
        response = await http.options(
            "/v1/chat/completions", headers={"Origin": "https://evil.example", **PREFLIGHT}
        )
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    assert "allow" not in response.headers
