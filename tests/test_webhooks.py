"""Completion webhooks against a local receiver that verifies every delivery with the Standard Webhooks
reference verifier (tests/support/webhook_receiver.py), the real api, worker and Temporal: admins
register, read, change and delete webhooks behind the organization wall; a secret is shown once and
sealed at rest; deliveries are signed, retried with the same `webhook-id` until they arrive, and end
failed (disabling the endpoint after several in a row, or at once on 410); a rotated secret keeps
signing for the overlap; redirects are not followed and the outbound guard refuses private URLs.

Events are announced here the way the announcing activity does it (`WebhookAnnouncer`), with a
Temporal client of the session's stack; the session worker runs the delivery workflows."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook, WebhookVerificationError
from temporalio.client import Client

from activities.webhooks import (
    MAX_PAYLOAD_BYTES,
    PayloadTooLarge,
    WebhookAnnouncer,
    delivery_retry_of,
    event_payload,
)
from core.contracts import AnnounceEventInput, WebhookEvent
from core.secrets import SecretBox
from core.settings import Settings
from storage import api_keys, webhooks
from storage.models import WebhookDelivery, WebhookEndpoint
from storage.webhooks import SigningSecrets, new_signing_secret
from tests.conftest import REMOTE_FILES_HOST, Tenant, make_tenant
from tests.support.chat_api import assert_problem, send_and_collect, wait_for_settled_answer
from tests.support.database import until_a_backend_waits_for_a_lock
from tests.support.webhook_receiver import WebhookReceiver

Sessions = async_sessionmaker[AsyncSession]

WEBHOOKS_URL = "/v1/webhooks"
ALL_EVENTS = ["turn.completed", "turn.failed", "turn.aborted", "approval.requested"]
DATA = {"chatId": "chat-1", "turnId": "turn-1", "text": "the answer"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    # On the one private address the test stack's outbound guard lets through.
    with WebhookReceiver(REMOTE_FILES_HOST) as server:
        yield server


@pytest.fixture
async def temporal(settings: Settings) -> Client:
    return await Client.connect(settings.resolved_temporal_address)


@pytest.fixture
def announcer(
    settings: Settings, sessions: Sessions, temporal: Client
) -> Callable[..., WebhookAnnouncer]:
    """An announcer as the worker's activity builds one; keyword arguments change its retry
    figures (`for_seconds=2`: deliveries give up after about two seconds)."""

    def make(**retry: float) -> WebhookAnnouncer:
        return WebhookAnnouncer(
            sessions,
            temporal,
            SecretBox.from_settings(settings),
            task_queue=settings.temporal_task_queue,
            retry=dataclasses.replace(delivery_retry_of(settings), **retry),
        )

    return make


@dataclasses.dataclass(frozen=True)
class Registered:
    id: str
    secret: str
    path: str
    url: str
    answer: dict[str, Any]

    @property
    def api_url(self) -> str:
        return f"{WEBHOOKS_URL}/{self.id}"


async def register(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    **body: Any,
) -> Registered:
    """A webhook of the tenant at a fresh path of the receiver, which verifies with its secret."""
    path = f"/hooks/{uuid.uuid4().hex[:12]}"
    url = receiver.route(path, None)
    response = await client.post(WEBHOOKS_URL, json={"url": url, **body}, headers=tenant.headers)
    assert response.status_code == 201, response.text
    answer = response.json()
    receiver.set_secret(path, answer["secret"])
    return Registered(answer["id"], answer["secret"], path, url, answer)


async def wait_for(
    condition: Callable[[], Any],
    what: str,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.05)


async def wait_for_answer(
    predicate: Callable[[dict[str, Any]], bool],
    read: Callable[[], Any],
    what: str,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> dict[str, Any]:
    """The first answer of `read()` (an awaitable of a response) that satisfies `predicate`."""
    deadline = time.monotonic() + timeout
    while True:
        response = await read()
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        if predicate(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s: {answer}")
        await asyncio.sleep(0.1)


async def deliveries(
    client: httpx.AsyncClient, tenant: Tenant, webhook_id: str
) -> list[dict[str, Any]]:
    response = await client.get(f"{WEBHOOKS_URL}/{webhook_id}/deliveries", headers=tenant.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def settled_delivery(
    client: httpx.AsyncClient, tenant: Tenant, webhook_id: str, delivery_id: str
) -> dict[str, Any]:
    """The delivery once it is no longer pending."""

    def settled(page: dict[str, Any]) -> bool:
        return any(
            item["id"] == delivery_id and item["status"] != "pending" for item in page["items"]
        )

    page = await wait_for_answer(
        settled,
        lambda: client.get(f"{WEBHOOKS_URL}/{webhook_id}/deliveries", headers=tenant.headers),
        f"delivery {delivery_id} settling",
    )
    (item,) = [item for item in page["items"] if item["id"] == delivery_id]
    return item


def assert_no_secret(response: httpx.Response, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in response.text
        assert secret.removeprefix("whsec_") not in response.text


# --- payloads and secrets, without the stack ------------------------------------------------------


def test_a_payload_is_type_timestamp_and_data_and_a_long_text_is_cut_to_fit() -> None:
    at = datetime(2026, 12, 9, 10, 0, tzinfo=UTC)
    small = event_payload("turn.completed", DATA, at=at)
    long = event_payload("turn.completed", {**DATA, "text": 'é"' * 30_000}, at=at)

    assert small == {"type": "turn.completed", "timestamp": "2026-12-09T10:00:00Z", "data": DATA}
    assert long["data"]["textTruncated"] is True
    assert long["data"]["text"].startswith('é"é"')
    size = len(json.dumps(long, separators=(",", ":"), ensure_ascii=False).encode())
    assert MAX_PAYLOAD_BYTES - 100 < size <= MAX_PAYLOAD_BYTES
    with pytest.raises(PayloadTooLarge):
        event_payload("turn.completed", {"blob": "x" * MAX_PAYLOAD_BYTES})


def test_the_previous_secret_signs_only_until_its_overlap_ends() -> None:
    now = datetime.now(UTC)
    pair = SigningSecrets(current="whsec_new", previous="whsec_old")

    assert pair.signing(now + timedelta(seconds=1), now) == ["whsec_new", "whsec_old"]
    assert pair.signing(now - timedelta(seconds=1), now) == ["whsec_new"]
    assert pair.signing(None, now) == ["whsec_new"]
    assert "whsec_" not in repr(pair)
    assert len(base64.b64decode(new_signing_secret().removeprefix("whsec_"))) == 32


# --- the admin api ---------------------------------------------------------------------------------


async def test_admin_creates_lists_reads_updates_and_deletes_a_webhook(
    client: httpx.AsyncClient, tenant: Tenant, receiver: WebhookReceiver
) -> None:
    created = await register(client, tenant, receiver, description="Bot replies")
    answer = created.answer

    assert created.id.startswith("we_")
    assert created.secret.startswith("whsec_")
    public = {key: value for key, value in answer.items() if key != "secret"}
    assert {key: public[key] for key in public if key not in ("id", "createdAt", "updatedAt")} == {
        "url": created.url,
        "description": "Bot replies",
        "events": ALL_EVENTS,
        "enabled": True,
        "disabledReason": None,
        "consecutiveFailures": 0,
        "previousSecretExpiresAt": None,
    }
    listed = await client.get(WEBHOOKS_URL, headers=tenant.headers)
    assert (listed.status_code, listed.json()) == (200, {"items": [public]})
    read = await client.get(created.api_url, headers=tenant.headers)
    assert (read.status_code, read.json()) == (200, public)

    updated = await client.patch(
        created.api_url,
        json={"events": ["turn.failed"], "description": "failures only", "enabled": False},
        headers=tenant.headers,
    )
    assert updated.status_code == 200, updated.text
    changed = updated.json()
    assert (changed["events"], changed["description"], changed["enabled"]) == (
        ["turn.failed"],
        "failures only",
        False,
    )
    assert changed["url"] == created.url
    assert changed["updatedAt"] >= public["updatedAt"]

    deleted = await client.delete(created.api_url, headers=tenant.headers)
    assert deleted.status_code == 204
    assert_problem(await client.get(created.api_url, headers=tenant.headers), 404)
    assert_problem(await client.delete(created.api_url, headers=tenant.headers), 404)
    assert (await client.get(WEBHOOKS_URL, headers=tenant.headers)).json() == {"items": []}


async def test_the_secret_is_shown_once_and_sealed_at_rest(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: Sessions,
    settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    created = await register(client, tenant, receiver)
    rotated = await client.post(f"{created.api_url}/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]

    assert new_secret.startswith("whsec_")
    assert new_secret != created.secret
    for answer in (
        await client.get(WEBHOOKS_URL, headers=tenant.headers),
        await client.get(created.api_url, headers=tenant.headers),
        await client.patch(created.api_url, json={"description": "x"}, headers=tenant.headers),
        await client.get(f"{created.api_url}/deliveries", headers=tenant.headers),
    ):
        assert answer.status_code == 200, answer.text
        assert_no_secret(answer, created.secret, new_secret)
    assert_no_secret(rotated, created.secret)

    async with sessions() as session:
        sealed = await session.scalar(
            select(WebhookEndpoint.secrets).where(
                WebhookEndpoint.organization_id == tenant.organization_id,
                WebhookEndpoint.id == created.id,
            )
        )
    assert sealed is not None
    for secret in (created.secret, new_secret):
        assert secret.removeprefix("whsec_") not in sealed
    opened = SecretBox.from_settings(settings).open(sealed)
    assert opened == {"current": new_secret, "previous": created.secret}


@pytest.mark.parametrize("bound_to", ["ada", None], ids=["user-key", "organization-key-not-admin"])
async def test_non_admin_keys_get_403_on_every_webhook_endpoint(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: Sessions,
    receiver: WebhookReceiver,
    bound_to: str | None,
) -> None:
    created = await register(client, tenant, receiver)
    async with sessions.begin() as session:
        key = await api_keys.create_key(session, tenant.organization_id, user_id=bound_to)
    headers = {"Authorization": f"Bearer {key.secret}"}

    for method, path, body in [
        ("POST", WEBHOOKS_URL, {"url": created.url}),
        ("GET", WEBHOOKS_URL, None),
        ("GET", created.api_url, None),
        ("PATCH", created.api_url, {"enabled": False}),
        ("DELETE", created.api_url, None),
        ("POST", f"{created.api_url}/rotate-secret", None),
        ("GET", f"{created.api_url}/deliveries", None),
        ("POST", f"{created.api_url}/deliveries/wd_x/redeliver", None),
        ("POST", f"{WEBHOOKS_URL}/one-off/rotate-secret", None),
    ]:
        response = await client.request(method, path, json=body, headers=headers)
        assert assert_problem(response, 403)["type"] == "/problems/forbidden"
        assert created.url not in response.text

    still = await client.get(created.api_url, headers=tenant.headers)
    assert (still.status_code, still.json()["enabled"]) == (200, True)


async def test_another_organizations_webhook_and_deliveries_are_404(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: Sessions,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    (delivery_id,) = await announcer().announce(
        tenant.organization_id, "turn.completed", f"walls-{uuid.uuid4()}", DATA
    )
    await wait_for(lambda: receiver.accepted(created.path), "the delivery")
    other = await make_tenant(sessions)

    for method, path, body in [
        ("GET", created.api_url, None),
        ("PATCH", created.api_url, {"enabled": False}),
        ("DELETE", created.api_url, None),
        ("POST", f"{created.api_url}/rotate-secret", None),
        ("GET", f"{created.api_url}/deliveries", None),
        ("POST", f"{created.api_url}/deliveries/{delivery_id}/redeliver", None),
    ]:
        response = await client.request(method, path, json=body, headers=other.headers)
        assert_problem(response, 404)
        assert_no_secret(response, created.secret)
    assert (await client.get(WEBHOOKS_URL, headers=other.headers)).json() == {"items": []}
    # Its own one-off deliveries exist (none yet), and never include the first tenant's.
    one_off = await client.get(f"{WEBHOOKS_URL}/one-off/deliveries", headers=other.headers)
    assert (one_off.status_code, one_off.json()["items"]) == (200, [])

    still = await client.get(created.api_url, headers=tenant.headers)
    assert (still.status_code, still.json()["enabled"]) == (200, True)
    assert len(receiver.received(created.path)) == 1


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param({"url": "ftp://hooks.example.com/x"}, "url", id="ftp-url"),
        pytest.param({"url": "not a url"}, "url", id="not-a-url"),
        pytest.param({"url": "https://ada:pw@hooks.example.com/"}, "url", id="url-credentials"),
        pytest.param({"url": ""}, "url", id="empty-url"),
        pytest.param({"url": 5}, "url", id="url-not-a-string"),
        pytest.param({}, "url", id="no-url"),
        pytest.param({"events": ["turn.started"]}, "events", id="unknown-event"),
        pytest.param({"events": []}, "events", id="no-events"),
        pytest.param({"events": ["turn.failed", "turn.failed"]}, "events", id="event-twice"),
        pytest.param({"events": "turn.failed"}, "events", id="events-not-a-list"),
        pytest.param({"description": "d" * 1_001}, "description", id="description-too-long"),
        pytest.param({"secret": "whsec_mine"}, "secret", id="unknown-field"),
    ],
)
async def test_invalid_webhooks_are_validation_problems_and_store_nothing(
    client: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], where: str
) -> None:
    full = {"url": "https://hooks.example.com/durachat", **body}
    if "url" not in body and where == "url":
        del full["url"]

    response = await client.post(WEBHOOKS_URL, json=full, headers=tenant.headers)

    problem = assert_problem(response, 422)
    assert problem["type"] == "/problems/validation"
    assert problem["detail"].startswith(where)
    assert (await client.get(WEBHOOKS_URL, headers=tenant.headers)).json() == {"items": []}


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param({"url": None}, "url", id="null-url"),
        pytest.param({"enabled": "yes"}, "enabled", id="enabled-not-a-boolean"),
        pytest.param({"events": ["nope"]}, "events", id="unknown-event"),
        pytest.param({"secret": "x"}, "secret", id="unknown-field"),
    ],
)
async def test_invalid_updates_are_validation_problems_and_change_nothing(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    body: dict[str, Any],
    where: str,
) -> None:
    created = await register(client, tenant, receiver)

    response = await client.patch(created.api_url, json=body, headers=tenant.headers)

    assert assert_problem(response, 422)["detail"].startswith(where)
    still = (await client.get(created.api_url, headers=tenant.headers)).json()
    assert still == {key: value for key, value in created.answer.items() if key != "secret"}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hooks",
        "http://169.254.169.254/latest/meta-data",
        "http://metadata.google.internal/hooks",
        "http://10.1.2.3/hooks",
    ],
    ids=["loopback", "link-local-metadata", "metadata-name", "private"],
)
async def test_a_url_the_outbound_guard_refuses_cannot_be_registered(
    client: httpx.AsyncClient, tenant: Tenant, receiver: WebhookReceiver, url: str
) -> None:
    refused = url.format(port=receiver.port)
    created = await register(client, tenant, receiver)

    response = await client.post(WEBHOOKS_URL, json={"url": refused}, headers=tenant.headers)
    moved = await client.patch(created.api_url, json={"url": refused}, headers=tenant.headers)

    for answer in (response, moved):
        problem = assert_problem(answer, 422)
        assert problem["errors"][0]["loc"] == ["body", "url"]
        assert "not allowed" in problem["detail"] or "metadata" in problem["detail"]
    listed = (await client.get(WEBHOOKS_URL, headers=tenant.headers)).json()["items"]
    assert [item["url"] for item in listed] == [created.url]


# --- delivery --------------------------------------------------------------------------------------


async def test_a_delivery_arrives_signed_and_the_reference_verifier_accepts_it(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver, events=["turn.completed"])
    before = int(time.time())

    ids = await announcer().announce(
        tenant.organization_id, "turn.completed", f"signed-{uuid.uuid4()}", DATA
    )

    (delivery_id,) = ids
    assert delivery_id.startswith("wd_")
    assert "." not in delivery_id
    await wait_for(lambda: receiver.received(created.path), "the delivery")
    (request,) = receiver.received(created.path)
    assert request.accepted, request.rejection
    assert request.webhook_id == delivery_id
    assert before - 1 <= request.timestamp <= int(time.time()) + 1
    assert request.headers["content-type"] == "application/json"
    assert [signature[:3] for signature in request.signatures] == ["v1,"]
    payload = Webhook(created.secret).verify(request.body, request.headers)
    assert payload == request.payload
    assert (payload["type"], payload["data"]) == ("turn.completed", DATA)
    assert datetime.fromisoformat(payload["timestamp"]).tzinfo is not None

    delivery = await settled_delivery(client, tenant, created.id, delivery_id)
    assert {key: delivery[key] for key in ("id", "webhookId", "url", "eventType", "status")} == {
        "id": delivery_id,
        "webhookId": created.id,
        "url": None,
        "eventType": "turn.completed",
        "status": "delivered",
    }
    assert delivery["payload"] == payload
    assert delivery["deliveredAt"] is not None
    (attempt,) = delivery["attempts"]
    assert (attempt["statusCode"], attempt["error"]) == (200, None)
    assert isinstance(attempt["durationMs"], int)
    assert attempt["durationMs"] >= 0


async def test_only_subscribed_enabled_webhooks_get_an_event(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    subscribed = await register(client, tenant, receiver, events=["turn.failed"])
    elsewhere = await register(client, tenant, receiver, events=["turn.completed"])
    disabled = await register(client, tenant, receiver, events=["turn.failed"])
    await client.patch(disabled.api_url, json={"enabled": False}, headers=tenant.headers)

    ids = await announcer().announce(
        tenant.organization_id, "turn.failed", f"subs-{uuid.uuid4()}", DATA
    )

    await wait_for(lambda: receiver.accepted(subscribed.path), "the subscribed delivery")
    assert len(ids) == 1
    assert receiver.received(elsewhere.path) == receiver.received(disabled.path) == []
    assert await deliveries(client, tenant, elsewhere.id) == []


async def test_an_event_announced_twice_is_delivered_once(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    temporal: Client,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    key = f"twice-{uuid.uuid4()}"

    first = await announcer().announce(tenant.organization_id, "turn.completed", key, DATA)
    again = await announcer().announce(tenant.organization_id, "turn.completed", key, DATA)
    (delivery_id,) = first
    await settled_delivery(client, tenant, created.id, delivery_id)
    after = await announcer().announce(tenant.organization_id, "turn.completed", key, DATA)

    assert first == again == after
    assert len(receiver.received(created.path)) == 1
    runs = [
        run
        async for run in temporal.list_workflows(f"WorkflowId = 'webhook-delivery-{delivery_id}'")
    ]
    assert len(runs) == 1


async def test_a_failing_receiver_gets_the_same_webhook_id_until_it_accepts(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    receiver.fail_next(created.path, 5, status=500)

    (delivery_id,) = await announcer().announce(
        tenant.organization_id, "turn.completed", f"retry-{uuid.uuid4()}", DATA
    )

    await wait_for(lambda: receiver.accepted(created.path), "the sixth attempt")
    requests = receiver.received(created.path)
    assert [request.status for request in requests] == [500] * 5 + [200]
    assert {request.webhook_id for request in requests} == {delivery_id}
    assert {request.body for request in requests} == {requests[0].body}
    # Each attempt is signed afresh, at its own time, and verifies.
    assert all(request.verified for request in requests)
    timestamps = [request.timestamp for request in requests]
    assert timestamps == sorted(timestamps)
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(requests)]
    assert gaps[0] >= 0.15  # the initial interval, then backoff
    delivery = await settled_delivery(client, tenant, created.id, delivery_id)
    assert delivery["status"] == "delivered"
    assert [attempt["statusCode"] for attempt in delivery["attempts"]] == [500] * 5 + [200]
    assert [attempt["error"] for attempt in delivery["attempts"]] == ["HTTP 500"] * 5 + [None]
    webhook = (await client.get(created.api_url, headers=tenant.headers)).json()
    assert (webhook["enabled"], webhook["consecutiveFailures"]) == (True, 0)


async def test_retry_after_from_the_receiver_sets_the_next_attempt(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    receiver.fail_next(created.path, 1, status=429, retry_after="2")

    await announcer().announce(
        tenant.organization_id, "turn.completed", f"later-{uuid.uuid4()}", DATA
    )

    await wait_for(lambda: receiver.accepted(created.path), "the attempt after retry-after")
    throttled, accepted = receiver.received(created.path)
    assert throttled.status == 429
    # Without retry-after the next attempt would come 0.2 s later.
    assert accepted.at - throttled.at >= 1.8


async def test_deliveries_failing_for_good_disable_the_webhook_with_a_reason(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    receiver.fail_next(created.path, 10_000, status=500)
    # Deliveries that give up after about 1.5 s; the stack disables after 3 in a row.
    quick = announcer(for_seconds=1.5)

    ids = [
        delivery_id
        for n in range(3)
        for delivery_id in await quick.announce(
            tenant.organization_id, "turn.completed", f"doomed-{n}-{uuid.uuid4()}", DATA
        )
    ]

    webhook = await wait_for_answer(
        lambda answer: not answer["enabled"],
        lambda: client.get(created.api_url, headers=tenant.headers),
        "disabling the webhook",
    )
    assert webhook["disabledReason"] == "3 deliveries in a row failed; last: HTTP 500"
    assert webhook["consecutiveFailures"] == 3
    listed = await deliveries(client, tenant, created.id)
    assert {item["id"]: item["status"] for item in listed} == dict.fromkeys(ids, "failed")
    for item in listed:
        assert item["attempts"]
        assert {a["statusCode"] for a in item["attempts"]} == {500}
    # Disabled: a new event makes no delivery, and a redelivery is refused until it is enabled.
    assert (
        await quick.announce(
            tenant.organization_id, "turn.completed", f"after-{uuid.uuid4()}", DATA
        )
        == []
    )
    refused = await client.post(
        f"{created.api_url}/deliveries/{ids[0]}/redeliver", headers=tenant.headers
    )
    assert assert_problem(refused, 409)["type"] == "/problems/conflict"

    enabled = await client.patch(created.api_url, json={"enabled": True}, headers=tenant.headers)
    assert enabled.status_code == 200, enabled.text
    assert (
        enabled.json()["enabled"],
        enabled.json()["disabledReason"],
        enabled.json()["consecutiveFailures"],
    ) == (True, None, 0)


async def test_410_gone_disables_the_webhook_at_once(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    receiver.answer(created.path, 410)

    (delivery_id,) = await announcer().announce(
        tenant.organization_id, "turn.completed", f"gone-{uuid.uuid4()}", DATA
    )

    delivery = await settled_delivery(client, tenant, created.id, delivery_id)
    assert delivery["status"] == "failed"
    assert [attempt["statusCode"] for attempt in delivery["attempts"]] == [410]
    webhook = (await client.get(created.api_url, headers=tenant.headers)).json()
    assert (webhook["enabled"], webhook["disabledReason"]) == (
        False,
        "the endpoint answered HTTP 410 Gone",
    )
    assert len(receiver.received(created.path)) == 1


async def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    elsewhere = f"/elsewhere/{uuid.uuid4().hex[:8]}"
    receiver.route(elsewhere, created.secret)
    receiver.answer(created.path, 302, location=receiver.url(elsewhere))

    (delivery_id,) = await announcer(for_seconds=1.0).announce(
        tenant.organization_id, "turn.completed", f"moved-{uuid.uuid4()}", DATA
    )

    delivery = await settled_delivery(client, tenant, created.id, delivery_id)
    assert delivery["status"] == "failed"
    assert delivery["attempts"]
    for attempt in delivery["attempts"]:
        assert attempt["statusCode"] == 302
        assert attempt["error"] == "HTTP 302 (redirects are not followed)"
    assert receiver.received(elsewhere) == []
    webhook = (await client.get(created.api_url, headers=tenant.headers)).json()
    assert webhook["consecutiveFailures"] == 1


async def test_a_tampered_body_or_signature_fails_the_reference_verifier(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    await announcer().announce(
        tenant.organization_id, "turn.completed", f"tamper-{uuid.uuid4()}", DATA
    )
    await wait_for(lambda: receiver.accepted(created.path), "the delivery")
    (genuine,) = receiver.received(created.path)
    verifier = Webhook(created.secret)
    signature = genuine.headers["webhook-signature"]
    flipped = signature[:-3] + ("A" if signature[-3] != "A" else "B") + signature[-2:]

    tampered: list[tuple[bytes, dict[str, str]]] = [
        (genuine.body.replace(b"the answer", b"the ANSWER"), genuine.headers),
        (genuine.body, {**genuine.headers, "webhook-signature": flipped}),
        (genuine.body, {**genuine.headers, "webhook-id": "wd_someone_else"}),
        (genuine.body, {**genuine.headers, "webhook-timestamp": str(genuine.timestamp + 1)}),
    ]
    for body, headers in tampered:
        with pytest.raises(WebhookVerificationError):
            verifier.verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_signing_secret()).verify(genuine.body, genuine.headers)

    # And the receiver itself turns a forged request away.
    forged = genuine.body.replace(b"the answer", b"a forged answer")
    webhook_headers = {
        name: value for name, value in genuine.headers.items() if name.startswith("webhook-")
    }
    async with httpx.AsyncClient() as outside:
        answer = await outside.post(created.url, content=forged, headers=webhook_headers)
    assert answer.status_code == 400
    rejected = receiver.received(created.path)[-1]
    assert (rejected.verified, rejected.rejection) == (False, "No matching signature found")


async def test_after_a_rotation_the_old_and_the_new_secret_both_verify_during_the_overlap(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    rotated = await client.post(f"{created.api_url}/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    expires_at = datetime.fromisoformat(rotated.json()["previousSecretExpiresAt"])
    assert timedelta(hours=23) < expires_at - datetime.now(UTC) <= timedelta(hours=24)
    webhook = (await client.get(created.api_url, headers=tenant.headers)).json()
    assert webhook["previousSecretExpiresAt"] == rotated.json()["previousSecretExpiresAt"]

    # The receiver still holds the old secret.
    await announcer().announce(
        tenant.organization_id, "turn.completed", f"overlap-{uuid.uuid4()}", DATA
    )
    await wait_for(lambda: receiver.received(created.path), "the delivery")
    (request,) = receiver.received(created.path)

    assert request.accepted, request.rejection
    assert len(request.signatures) == 2
    assert all(signature.startswith("v1,") for signature in request.signatures)
    for secret in (created.secret, new_secret):
        assert Webhook(secret).verify(request.body, request.headers) == request.payload
    # A receiver that switched to the new secret verifies the next one too.
    receiver.set_secret(created.path, new_secret)
    await announcer().announce(
        tenant.organization_id, "turn.completed", f"switched-{uuid.uuid4()}", DATA
    )
    await wait_for(lambda: len(receiver.accepted(created.path)) == 2, "the second delivery")


async def test_a_one_off_url_is_signed_with_the_organizations_one_off_secret(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    rotated = await client.post(f"{WEBHOOKS_URL}/one-off/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    secret = rotated.json()["secret"]
    assert (rotated.json()["id"], rotated.json()["previousSecretExpiresAt"]) == ("one-off", None)
    path = f"/one-off/{uuid.uuid4().hex[:12]}"
    url = receiver.route(path, secret)

    (delivery_id,) = await announcer().announce(
        tenant.organization_id, "turn.completed", f"one-off-{uuid.uuid4()}", DATA, one_off_url=url
    )

    await wait_for(lambda: receiver.accepted(path), "the one-off delivery")
    delivery = await settled_delivery(client, tenant, "one-off", delivery_id)
    assert (delivery["webhookId"], delivery["url"], delivery["status"]) == (None, url, "delivered")
    assert_no_secret(
        await client.get(f"{WEBHOOKS_URL}/one-off/deliveries", headers=tenant.headers), secret
    )


async def test_a_private_address_is_refused_by_the_guard_and_never_retried(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    path = f"/private/{uuid.uuid4().hex[:8]}"
    receiver.route(path, None)
    # The receiver's own port, on 127.0.0.1: loopback, which the guard refuses.
    private = f"http://127.0.0.1:{receiver.port}{path}"

    (delivery_id,) = await announcer().announce(
        tenant.organization_id, "turn.failed", f"private-{uuid.uuid4()}", DATA, one_off_url=private
    )

    delivery = await settled_delivery(client, tenant, "one-off", delivery_id)
    assert delivery["status"] == "failed"
    (attempt,) = delivery["attempts"]
    assert attempt["statusCode"] is None
    assert "not allowed" in attempt["error"]
    assert receiver.received(path) == []


async def test_redelivery_sends_the_same_delivery_again(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    (delivery_id,) = await announcer().announce(
        tenant.organization_id, "turn.completed", f"again-{uuid.uuid4()}", DATA
    )
    await settled_delivery(client, tenant, created.id, delivery_id)

    response = await client.post(
        f"{created.api_url}/deliveries/{delivery_id}/redeliver", headers=tenant.headers
    )

    assert response.status_code == 202, response.text
    assert (response.json()["id"], response.json()["status"]) == (delivery_id, "pending")
    await wait_for(lambda: len(receiver.accepted(created.path)) == 2, "the redelivery")
    first, second = receiver.received(created.path)
    assert second.webhook_id == first.webhook_id == delivery_id
    assert second.body == first.body
    delivery = await settled_delivery(client, tenant, created.id, delivery_id)
    assert [attempt["statusCode"] for attempt in delivery["attempts"]] == [200, 200]
    unknown = await client.post(
        f"{created.api_url}/deliveries/wd_unknown/redeliver", headers=tenant.headers
    )
    assert_problem(unknown, 404)


async def test_deleting_a_webhook_stops_its_retries_and_deletes_its_deliveries(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver)
    receiver.fail_next(created.path, 10_000, status=503)
    await announcer().announce(
        tenant.organization_id, "turn.completed", f"deleted-{uuid.uuid4()}", DATA
    )
    await wait_for(lambda: len(receiver.received(created.path)) >= 2, "two attempts")

    deleted = await client.delete(created.api_url, headers=tenant.headers)
    assert deleted.status_code == 204
    # At most an attempt already under way arrives after the delete.
    seen = len(receiver.received(created.path))
    await wait_for(
        lambda: time.monotonic() - receiver.received(created.path)[-1].at > 2.5,
        "the retries stopping",
        timeout=10,
    )
    assert len(receiver.received(created.path)) <= seen + 1


# --- a real turn's event -----------------------------------------------------------------------------


async def test_a_finished_turn_announces_turn_completed_carrying_the_stored_turn(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
    announcer: Callable[..., WebhookAnnouncer],
) -> None:
    created = await register(client, tenant, receiver, events=["turn.completed"])
    response, _ = await send_and_collect(
        client, tenant.headers, {"message": "hi", "model": "local/echo"}
    )
    assert response.status_code == 200
    chat_id, turn_id = response.headers["x-chat-id"], response.headers["x-turn-id"]
    answer = await wait_for_settled_answer(client, tenant.headers, chat_id)

    # The turn's workflow announced its end; announcing it again delivers nothing twice.
    await wait_for(lambda: receiver.accepted(created.path), "the turn's delivery")
    ids = await announcer().announce_turn_event(
        AnnounceEventInput(tenant.organization_id, WebhookEvent.TURN_COMPLETED, chat_id, turn_id)
    )
    assert len(ids) == 1
    (request,) = receiver.received(created.path)
    payload = request.payload
    assert payload["type"] == "turn.completed"
    data = payload["data"]
    assert {key: data[key] for key in data if key not in ("usage", "costUsd")} == {
        "chatId": chat_id,
        "turnId": turn_id,
        "messageId": answer["id"],
        "externalChannel": None,
        "status": "completed",
        "text": "hi",
        "error": None,
        "links": {"chat": f"/v1/chats/{chat_id}", "messages": f"/v1/chats/{chat_id}/messages"},
    }
    assert data["usage"] == answer["metadata"]["usage"]
    assert data["costUsd"] is None or isinstance(data["costUsd"], str)
    # An event of a turn that does not exist announces nothing.
    assert (
        await announcer().announce_turn_event(
            AnnounceEventInput(
                tenant.organization_id, WebhookEvent.TURN_COMPLETED, chat_id, "no-such-turn"
            )
        )
        == []
    )


async def test_a_sends_own_webhook_url_hears_of_its_turn_and_of_nothing_else(
    client: httpx.AsyncClient,
    tenant: Tenant,
    receiver: WebhookReceiver,
) -> None:
    rotated = await client.post(f"{WEBHOOKS_URL}/one-off/rotate-secret", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    path = f"/one-off/{uuid.uuid4().hex[:12]}"
    url = receiver.route(path, None)
    receiver.set_secret(path, rotated.json()["secret"])
    response, _ = await send_and_collect(
        client,
        tenant.headers,
        {"message": "tell me when done", "model": "local/echo", "webhookUrl": url},
    )
    chat_id = response.headers["x-chat-id"]
    await wait_for_settled_answer(client, tenant.headers, chat_id)
    await wait_for(lambda: receiver.accepted(path), "the one-off delivery")
    (request,) = receiver.received(path)
    assert request.payload["type"] == "turn.completed"
    assert request.payload["data"]["chatId"] == chat_id
    assert request.payload["data"]["text"] == "tell me when done"
    # A later send without it announces nothing there.
    await send_and_collect(
        client, tenant.headers, {"message": "again", "model": "local/echo"}, f"/v1/chats/{chat_id}"
    )
    await wait_for_settled_answer(client, tenant.headers, chat_id)
    assert len(receiver.received(path)) == 1


async def test_deleting_a_webhook_while_a_delivery_records_its_outcome_does_not_deadlock(
    client: httpx.AsyncClient, tenant: Tenant, receiver: WebhookReceiver, sessions: Sessions
) -> None:
    """An attempt records its outcome on the delivery, then on its endpoint (a success ends the
    endpoint's run of failures); deleting the endpoint meanwhile waits for it instead of
    deadlocking with it."""
    created = await register(client, tenant, receiver)
    organization_id = tenant.organization_id
    async with sessions.begin() as session:
        announced = await webhooks.create_deliveries(
            session,
            organization_id,
            event_type="turn.completed",
            event_key=f"race-{uuid.uuid4()}",
            payload={"type": "turn.completed", "data": DATA},
            one_off_url=None,
        )
        # A failure before: the success below has an endpoint row to update.
        await webhooks.count_failure(
            session, organization_id, created.id, disable_after=100, last_error="HTTP 500"
        )
    (delivery_id,) = announced.ids

    async def delete() -> bool:
        async with sessions.begin() as session:
            return await webhooks.delete_endpoint(session, organization_id, created.id)

    recording = sessions()
    async with recording.begin():
        # The attempt's record, halfway: the delivery row is locked.
        attempt = {"at": "2026-12-07T00:00:00Z", "statusCode": 204, "durationMs": 3, "error": None}
        await webhooks.append_attempt(recording, organization_id, delivery_id, attempt)
        deleting = asyncio.create_task(delete())
        await until_a_backend_waits_for_a_lock(sessions)
        await webhooks.mark_delivered(recording, organization_id, delivery_id)
    await recording.close()

    assert await deleting is True
    assert (await client.get(created.api_url, headers=tenant.headers)).status_code == 404
    async with sessions() as session:
        assert await session.get(WebhookDelivery, (organization_id, delivery_id)) is None
