"""/openapi.json tells the truth: the error responses each route really gives, the SSE media
type, the field ranges; and schemathesis, fuzzing a real server from that document, finds no
failure of any check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.server.conftest import MAX_MODEL_LEN
from winnow.server.lifecycle import PROBE_PATHS
from winnow.server.openapi import CROSS_FIELD_RULES, ERROR_SCHEMA

EXAMPLES_PER_OPERATION = 25
FUZZ_MAX_MODEL_LEN = 128
FUZZ_MAX_N = 2


async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def walk(node: Any) -> Iterator[Any]:
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


@pytest.mark.anyio
async def test_every_error_status_uses_the_openai_error_body_and_422_is_gone(
    client: httpx.AsyncClient,
) -> None:
    document = await openapi(client)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    ref = f"#/components/schemas/{ERROR_SCHEMA}"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert "422" not in statuses, (path, method)
            for status, response in operation["responses"].items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"] == {"$ref": ref}
            if method == "post":
                assert {"400", "413"} <= statuses, (path, statuses)
    for path in ("/v1/chat/completions", "/v1/completions"):
        operation = document["paths"][path]["post"]
        assert {"400", "404", "413", "429", "503"} <= set(operation["responses"])
        assert set(operation["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }
        assert "Retry-After" in operation["responses"]["429"]["headers"]


@pytest.mark.anyio
async def test_401_is_listed_exactly_where_the_key_is_required(make_app: Any) -> None:
    from tests.server.conftest import asgi_client

    async with asgi_client(make_app(api_keys=["sk-test"])) as http:
        response = await http.get("/openapi.json", headers={"authorization": "Bearer sk-test"})
    for path, operations in response.json()["paths"].items():
        for operation in operations.values():
            assert ("401" in operation["responses"]) == (path not in PROBE_PATHS), path


@pytest.mark.anyio
async def test_request_fields_carry_their_real_ranges(client: httpx.AsyncClient) -> None:
    schemas = (await openapi(client))["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]

    def bounds(prop: dict[str, Any]) -> tuple[Any, Any]:
        typed = next(alt for alt in prop.get("anyOf", [prop]) if alt.get("type") != "null")
        return typed.get("minimum"), typed.get("maximum")

    assert bounds(chat["temperature"]) == (0, 2)
    assert bounds(chat["top_logprobs"]) == (0, 20)
    assert bounds(chat["n"]) == (1, 4)  # the session engine's max_n
    assert bounds(chat["max_tokens"]) == (1, MAX_MODEL_LEN - 1)
    assert bounds(chat["seed"]) == (-(2**63), 2**63 - 1)
    bias = chat["logit_bias"]["anyOf"][0]
    assert bias["additionalProperties"] is False
    assert [bounds(v) for v in bias["patternProperties"].values()] == [(-100, 100)]
    assert chat["model"]["anyOf"][0]["enum"] == ["demo"]
    assert bounds(schemas["DetokenizeRequest"]["properties"]["tokens"]["items"])[1] > 0
    assert "min_tokens" in schemas["CompletionRequest"]["description"]
    # every integer anywhere in a request has both bounds
    for name in ("ChatCompletionRequest", "CompletionRequest", "DetokenizeRequest"):
        for node in walk(schemas[name]):
            if isinstance(node, dict) and node.get("type") == "integer":
                assert "minimum" in node and "maximum" in node, (name, node)


# ---------------------------------------------------------------------------------------------
# schemathesis against a real server process


@pytest.fixture(scope="module")
def fuzzed_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("fuzzed") / "server.log"
    server = start_server(
        demo_model_dir,
        log_path,
        "--max-model-len",
        str(FUZZ_MAX_MODEL_LEN),
        "--max-n",
        str(FUZZ_MAX_N),
    )
    yield server
    stop_server(server)


@schemathesis.check
def schema_valid_data_is_accepted_or_breaks_a_cross_field_rule(
    ctx: Any, response: Any, case: Any
) -> bool | None:
    """positive_data_acceptance, except for a 400 that names a documented cross-field rule
    (CROSS_FIELD_RULES; JSON Schema cannot state them), which is the right answer there."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.status_code != 400:
        return positive_data_acceptance(ctx, response, case)
    param = response.json()["error"]["param"] or ""
    field = param.split("[")[0].split(".")[0]
    assert field in CROSS_FIELD_RULES, f"schema-valid data refused: {response.text}"
    return None


def test_schemathesis_finds_nothing(fuzzed_server: ServerProcess) -> None:
    """Every operation, positive and negative examples, every built-in check."""
    schema = schemathesis.openapi.from_url(fuzzed_server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(
                excluded_checks=[positive_data_acceptance],
                additional_checks=[schema_valid_data_is_accepted_or_breaks_a_cross_field_rule],
                timeout=60,
            )

        fuzz()
    health = httpx.get(fuzzed_server.base_url + "/health", timeout=10)
    assert health.status_code == 200
