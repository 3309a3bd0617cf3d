"""The OpenAPI document against the live api: schemathesis sends every operation generated requests
(valid and invalid) and finds no 5xx and no status, content type or body the document does not
describe; plain tests check what the document promises about errors and auth."""

from __future__ import annotations

import json
from dataclasses import dataclass
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
from tests.support.chat_api import get_chat

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


@dataclass(frozen=True)
class ExistingChat:
    id: str
    message_ids: list[str]


@pytest.fixture
async def existing_chat(client: httpx.AsyncClient, tenant: Tenant) -> ExistingChat:
    response = await client.post(
        "/v1/chats", params={"stream": "false"}, json={"message": "hello"}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    chat = await get_chat(client, tenant.headers, response.json()["chatId"])
    return ExistingChat(chat["id"], [message["id"] for message in chat["messages"]])


def test_api_conforms_to_its_openapi_document(
    api_schema: schemathesis.BaseSchema,
    tenant: Tenant,
    existing_chat: ExistingChat,
    subtests: pytest.Subtests,
) -> None:
    # Operation by operation rather than through `schema.parametrize()`: its lazy (fixture-loaded)
    # form does not run under pytest 9.2, and the schema can only be loaded once the api runs.
    labels = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        with subtests.test(msg=operation.label):
            exercise(operation, tenant.headers, existing_chat)
    assert "POST /v1/chats" in labels


def exercise(
    operation: schemathesis.APIOperation, headers: dict[str, str], chat: ExistingChat
) -> None:
    """Valid and invalid requests (the API key always valid), each response checked against the document."""
    strategies = [
        operation.as_strategy(mode, headers=headers) for mode in schemathesis.GenerationMode
    ]
    if "{chat_id}" in operation.path:
        # Random ids almost never name a chat: also aim valid requests at one that exists, so reads,
        # streams, stops, branch switches, regenerations and edits get past the 404.
        def at_existing_chat(message_id: str) -> st.SearchStrategy[schemathesis.Case]:
            parameters = {"chat_id": chat.id}
            if "{message_id}" in operation.path:
                parameters["message_id"] = message_id
            return operation.as_strategy(
                schemathesis.GenerationMode.POSITIVE, headers=headers, path_parameters=parameters
            )

        strategies.append(st.sampled_from(chat.message_ids).flatmap(at_existing_chat))
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
