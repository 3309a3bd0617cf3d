"""The OpenAPI document against the live api: schemathesis sends every operation generated requests
(valid and invalid) and finds no 5xx and no status, content type or body the document does not
describe; plain tests check what the document promises about errors and auth."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Tenant

# Bounded so the whole run stays well under two minutes on a small machine.
EXAMPLES_PER_OPERATION = 15
# A turn of the default model (`local/echo`) ends in well under a second; schemathesis stops reading
# an event stream after this many seconds in total, so a stream that never ends cannot hang the test.
REQUEST_TIMEOUT_SECONDS = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
PUBLIC_OPERATIONS = {("get", "/healthz"), ("get", "/readyz")}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture
def api_schema(api_url: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {"base-url": api_url, "request-timeout": REQUEST_TIMEOUT_SECONDS}
    )
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json", config=config, timeout=10)


def test_api_conforms_to_its_openapi_document(
    api_schema: schemathesis.BaseSchema, api_url: str, tenant: Tenant, subtests: pytest.Subtests
) -> None:
    # Operation by operation rather than through `schema.parametrize()`: its lazy (fixture-loaded)
    # form does not run under pytest 9.2, and the schema can only be loaded once the api runs.
    labels = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        with subtests.test(msg=operation.label):
            # A key of its own per operation: each gets the whole per-key send rate limit.
            headers = new_admin_key_headers(api_url, tenant)
            with httpx.Client(base_url=api_url, headers=headers, timeout=30) as client:
                exercise(operation, headers, existing_path_parameters(operation, client))
    assert "POST /v1/chats" in labels


def new_admin_key_headers(api_url: str, tenant: Tenant) -> dict[str, str]:
    response = httpx.post(
        f"{api_url}/v1/keys", json={"admin": True}, headers=tenant.headers, timeout=10
    )
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['secret']}"}


def existing_path_parameters(
    operation: schemathesis.APIOperation, client: httpx.Client
) -> list[dict[str, str]]:
    """Path parameters that name things that exist, made afresh for this operation (it may delete them)."""
    if "{chat_id}" in operation.path:
        response = client.post("/v1/chats", params={"stream": "false"}, json={"message": "hello"})
        assert response.status_code == 200, response.text
        chat_id = response.json()["chatId"]
        response = client.get(f"/v1/chats/{chat_id}")
        assert response.status_code == 200, response.text
        return [
            {"chat_id": chat_id, "message_id": message["id"]}
            if "{message_id}" in operation.path
            else {"chat_id": chat_id}
            for message in response.json()["messages"]
        ]
    if "{key_id}" in operation.path:
        response = client.post("/v1/keys", json={"name": "schemathesis"})
        assert response.status_code == 201, response.text
        return [{"key_id": response.json()["id"]}]
    return []


def exercise(
    operation: schemathesis.APIOperation,
    headers: dict[str, str],
    existing: list[dict[str, str]],
) -> None:
    """Valid and invalid requests (the API key always valid), each response checked against the document."""
    strategies = [
        operation.as_strategy(mode, headers=headers) for mode in schemathesis.GenerationMode
    ]
    if existing:
        # Random ids almost never name anything: also aim valid requests at things that exist, so
        # reads, streams, updates, regenerations and deletions get past the 404.
        strategies.append(
            st.sampled_from(existing).flatmap(
                lambda parameters: operation.as_strategy(
                    schemathesis.GenerationMode.POSITIVE,
                    headers=headers,
                    path_parameters=parameters,
                )
            )
        )
    cases = st.one_of(strategies)

    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        # Every example is an HTTP request: no shrinking, so a failure is reported without a long tail.
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=cases)
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    check()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"message": "a\x00b"}, id="nul-in-message"),
        pytest.param({"message": "hi", "system": "\ud800"}, id="lone-surrogate-in-system"),
        pytest.param(
            {"message": "hi", "providerOptions": {"mock": {"user": "\x00"}}},
            id="nul-in-provider-options",
        ),
        pytest.param(
            {"messages": [{"role": "user", "parts": [{"type": "text", "text": 5}]}]},
            id="text-part-without-text",
        ),
    ],
)
async def test_body_the_turn_could_never_store_is_a_validation_problem(
    client: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any]
) -> None:
    # Before: the send started a turn whose storage step failed on every retry, and the request hung
    # (a malformed part answered 500).
    response = await client.post(
        "/v1/chats",
        content=json.dumps(body),
        headers={**tenant.headers, "Content-Type": "application/json"},
        timeout=10,
    )

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"] == "/problems/validation"
    assert problem["errors"]


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        pytest.param("GET", "/v1/chats?q=a%00b", None, id="query"),
        pytest.param("GET", "/v1/chats/by-external?source=api&id=a%00", None, id="lookup-query"),
        pytest.param("PATCH", "/v1/chats/no-such-chat", {"title": "a\x00"}, id="chat-update"),
        pytest.param("POST", "/v1/keys", {"name": "a\x00"}, id="key-create"),
    ],
)
async def test_nul_in_a_parameter_or_stored_field_is_a_validation_problem(
    client: httpx.AsyncClient, tenant: Tenant, method: str, url: str, body: dict[str, Any] | None
) -> None:
    # Before: the value reached a SQL statement and the api answered 500.
    response = await client.request(method, url, json=body, headers=tenant.headers)

    assert response.status_code == 422, response.text
    assert response.json()["type"] == "/problems/validation"


@pytest.fixture(scope="module")
def spec(api_url: str) -> dict[str, Any]:
    response = httpx.get(f"{api_url}/openapi.json", timeout=10)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def test_every_operation_but_the_probes_requires_an_api_key_and_declares_401(
    spec: dict[str, Any],
) -> None:
    public = set()
    for method, path, operation in operations(spec):
        if not operation.get("security"):
            public.add((method, path))
            continue
        assert operation["security"] == [{"HTTPBearer": []}], (method, path)
        assert "401" in operation["responses"], (method, path)
    assert public == PUBLIC_OPERATIONS
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_every_error_response_is_a_problem(spec: dict[str, Any]) -> None:
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if status[0] not in "45":
                continue
            assert list(response["content"]) == ["application/problem+json"], (method, path, status)
            reference = response["content"]["application/problem+json"]["schema"]["$ref"]
            expected = "ValidationProblem" if status == "422" else "Problem"
            assert reference == f"#/components/schemas/{expected}", (method, path, status)
    problem = spec["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert "instance" in problem["properties"]
    assert problem["additionalProperties"] is True
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_streams_are_server_sent_events_and_204_has_no_body(spec: dict[str, Any]) -> None:
    streaming = {
        (method, path)
        for method, path, operation in operations(spec)
        if "text/event-stream" in operation["responses"].get("200", {}).get("content", {})
    }
    assert ("post", "/v1/chats") in streaming
    assert ("get", "/v1/chats/{chat_id}/stream") in streaming
    resume = spec["paths"]["/v1/chats/{chat_id}/stream"]["get"]["responses"]
    assert list(resume["200"]["content"]) == ["text/event-stream"]
    assert "content" not in resume["204"]


async def test_the_docs_page_loads_everything_from_the_api_itself(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # Every script, stylesheet and icon the page loads is served by the api: it works offline.
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets, page.text
    assert all(asset.startswith("/docs/assets/") for asset in assets), assets
    for asset in assets:
        served = await client.get(asset)
        assert served.status_code == 200, asset
        assert served.content
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
    assert (await client.get("/redoc")).status_code == 404
