"""The Slack adapter end to end: signed events from a local Slack become durable turns, answered in
their threads through the Web API of the same local Slack (tests/support/slack_server.py), by the
real api and worker processes."""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.slack import MESSAGE_CHARS, split_text
from core.secrets import SecretBox
from core.settings import Settings
from storage import integrations
from tests.conftest import RunningServices, Tenant, make_tenant
from tests.support.chat_api import assert_problem
from tests.support.database import until_a_backend_waits_for_a_lock
from tests.support.slack_server import SlackEvents, SlackServer

EVENTS = "/v1/integrations/slack/events"
# Answers 1,000 words at 20 ms a word (about 20 s, 4,890 characters: two Slack messages).
SLOW_MODEL = "mock/slow-20"
SLOW_TEXT = " ".join(f"w{index}" for index in range(1000))
STOPPED = " _(stopped)_"


@pytest.fixture(scope="module")
def slack_server(settings: Settings) -> Iterator[SlackServer]:
    # The port the api and worker were configured with (conftest's SLACK_API_PORT), read from the
    # settings: importing it from `tests.conftest` would run its free_port_block() a second time.
    port = httpx.URL(settings.slack_api_url).port
    assert port is not None
    with SlackServer(port) as server:
        assert server.api_url == settings.slack_api_url
        yield server


@pytest.fixture
def slack(slack_server: SlackServer) -> SlackServer:
    """The local Slack, with no calls, messages or failures left from an earlier test."""
    slack_server.reset()
    return slack_server


@dataclass
class Workspace:
    tenant: Tenant
    team_id: str
    token: str
    events: SlackEvents

    def channel_id(self, channel: str, thread_ts: str) -> str:
        return f"{self.team_id}:{channel}:{thread_ts}"


async def connect_workspace(
    client: httpx.AsyncClient, slack: SlackServer, tenant: Tenant
) -> Workspace:
    team_id = "T" + uuid.uuid4().hex[:10].upper()
    token = f"xoxb-{uuid.uuid4().hex}"
    secret = uuid.uuid4().hex
    response = await client.put(
        "/v1/integrations/slack",
        json={"teamId": team_id, "signingSecret": secret, "botToken": token},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    slack.add_token(token, team_id)
    return Workspace(tenant, team_id, token, SlackEvents(team_id, secret))


@pytest.fixture
async def workspace(client: httpx.AsyncClient, slack: SlackServer, tenant: Tenant) -> Workspace:
    return await connect_workspace(client, slack, tenant)


@pytest.fixture
async def temporal(settings: Settings) -> Client:
    return await Client.connect(settings.resolved_temporal_address)


async def deliver(
    client: httpx.AsyncClient, workspace: Workspace, payload: dict[str, Any], **signing: Any
) -> httpx.Response:
    body, headers = workspace.events.signed(payload, **signing)
    started = time.monotonic()
    response = await client.post(EVENTS, content=body, headers=headers)
    # Slack gives up on an answer after three seconds.
    assert time.monotonic() - started < 3, "the event was not acknowledged in time"
    return response


async def use_model(client: httpx.AsyncClient, tenant: Tenant, model: str) -> None:
    """Bot turns answer with the organization's default model."""
    response = await client.put(
        "/v1/defaults/organization", json={"model": model}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text


async def bound_chat(
    client: httpx.AsyncClient,
    tenant: Tenant,
    channel_id: str,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> dict[str, Any]:
    """The chat bound to the thread, once its first turn has started (the event's answer may go
    out before, when the turn takes long to start)."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(
            "/v1/chats/by-external",
            params={"source": "slack", "id": channel_id},
            headers=tenant.headers,
        )
        if response.status_code != 404 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert response.status_code == 200, response.text
    chat: dict[str, Any] = response.json()
    return chat


async def turns_of(client: httpx.AsyncClient, tenant: Tenant, chat_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/chats/{chat_id}/turns", headers=tenant.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def finished_reply(
    client: httpx.AsyncClient,
    temporal: Client,
    workspace: Workspace,
    channel_id: str,
    timeout: float = 90.0,  # noqa: ASYNC109
) -> tuple[dict[str, Any], str]:
    """Once the thread's (only) turn's reply workflow has finished: the stored answer and how the
    reply ended."""
    chat = await bound_chat(client, workspace.tenant, channel_id)
    [turn] = await turns_of(client, workspace.tenant, chat["id"])
    outcome = await reply_outcome(temporal, turn["id"], timeout)
    chat = await bound_chat(client, workspace.tenant, channel_id)
    answer: dict[str, Any] = chat["messages"][-1]
    assert answer["role"] == "assistant"
    return answer, outcome


async def reply_outcome(temporal: Client, turn_id: str, timeout: float) -> str:  # noqa: ASYNC109
    """How the turn's reply workflow ended, once it has (it may start a moment after the turn)."""
    handle = temporal.get_workflow_handle(f"slack-reply-{turn_id}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            outcome: str = await asyncio.wait_for(handle.result(), deadline - time.monotonic())
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        return outcome


def stored_text(answer: dict[str, Any]) -> str:
    return "\n\n".join(
        part["text"].strip()
        for part in answer["parts"]
        if part["type"] == "text" and part["text"].strip()
    )


async def wait_for(condition: Any, timeout: float = 30.0, what: str = "") -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)


def created(slack: SlackServer, channel: str) -> list[str]:
    """The ts of every message the bot created in the channel (streamed or posted)."""
    return [
        str(call.answer["ts"])
        for method in ("chat.startStream", "chat.postMessage")
        for call in slack.calls_to(method, channel=channel)
        if call.ok
    ]


# --- answering --------------------------------------------------------------------------------


async def test_a_mention_is_answered_in_its_thread_with_the_stored_answer(
    client: httpx.AsyncClient, slack: SlackServer, workspace: Workspace, temporal: Client
) -> None:
    payload = workspace.events.mention("hello from the general channel", channel="C0GENERAL")
    ts = payload["event"]["ts"]
    response = await deliver(client, workspace, payload)
    assert response.status_code == 200, response.text
    channel_id = workspace.channel_id("C0GENERAL", ts)
    answer, outcome = await finished_reply(client, temporal, workspace, channel_id)
    assert outcome == "finish"
    assert answer["status"] == "complete"
    chat = await bound_chat(client, workspace.tenant, channel_id)
    question = chat["messages"][0]
    assert question["parts"][0]["text"] == "hello from the general channel", "mention stripped"
    [message] = slack.thread("C0GENERAL", ts)
    assert message.text == stored_text(answer)
    assert message.streamed, "streamed"
    assert not message.streaming, "and the stream stopped"
    [status] = slack.calls_to("assistant.threads.setStatus")
    assert status.params["thread_ts"] == ts
    [start] = slack.calls_to("chat.startStream")
    assert start.params["recipient_user_id"] == "U0ASKER"
    assert start.params["recipient_team_id"] == workspace.team_id


async def test_a_direct_message_is_answered_and_the_bots_own_messages_are_not(
    client: httpx.AsyncClient, slack: SlackServer, workspace: Workspace, temporal: Client
) -> None:
    events = workspace.events
    ignored = [
        events.direct_message("from a bot", bot_id="B0OTHER"),
        events.direct_message("an edit", subtype="message_changed"),
        events.direct_message("our own answer", user=events.bot_user_id),
    ]
    for payload in ignored:
        assert (await deliver(client, workspace, payload)).status_code == 200
    payload = events.direct_message("a question in private")
    ts = payload["event"]["ts"]
    assert (await deliver(client, workspace, payload)).status_code == 200
    answer, outcome = await finished_reply(
        client, temporal, workspace, workspace.channel_id("D0DIRECT", ts)
    )
    assert outcome == "finish"
    assert slack.thread_text("D0DIRECT", ts) == stored_text(answer)
    for payload in ignored:
        response = await client.get(
            "/v1/chats/by-external",
            params={
                "source": "slack",
                "id": workspace.channel_id("D0DIRECT", payload["event"]["ts"]),
            },
            headers=workspace.tenant.headers,
        )
        assert response.status_code == 404, "no turn for a bot's message or an edit"


async def test_a_retried_event_makes_one_turn_and_one_reply(
    client: httpx.AsyncClient, slack: SlackServer, workspace: Workspace, temporal: Client
) -> None:
    payload = workspace.events.mention("only once please")
    ts = payload["event"]["ts"]
    # The first delivery and two retries, the retries arriving while the first is still handled.
    responses = await asyncio.gather(
        deliver(client, workspace, payload),
        deliver(client, workspace, payload, retry=1),
        deliver(client, workspace, payload, retry=2),
    )
    assert [response.status_code for response in responses] == [200, 200, 200]
    channel_id = workspace.channel_id("C0GENERAL", ts)
    answer, _ = await finished_reply(client, temporal, workspace, channel_id)
    # A late retry, after the reply ended, starts nothing either.
    assert (await deliver(client, workspace, payload, retry=3)).status_code == 200
    chat = await bound_chat(client, workspace.tenant, channel_id)
    assert [message["role"] for message in chat["messages"]] == ["user", "assistant"]
    assert len(await turns_of(client, workspace.tenant, chat["id"])) == 1
    assert len(created(slack, "C0GENERAL")) == 1
    assert slack.thread_text("C0GENERAL", ts) == stored_text(answer)


async def test_a_follow_up_in_the_thread_continues_the_same_chat(
    client: httpx.AsyncClient, slack: SlackServer, workspace: Workspace, temporal: Client
) -> None:
    first = workspace.events.mention("first question")
    root = first["event"]["ts"]
    assert (await deliver(client, workspace, first)).status_code == 200
    channel_id = workspace.channel_id("C0GENERAL", root)
    await finished_reply(client, temporal, workspace, channel_id)
    follow_up = workspace.events.mention("second question", thread_ts=root)
    assert (await deliver(client, workspace, follow_up)).status_code == 200
    chat = await bound_chat(client, workspace.tenant, channel_id)
    turns = await turns_of(client, workspace.tenant, chat["id"])
    assert len(turns) == 2, "a thread is one chat"
    await reply_outcome(temporal, turns[0]["id"], 60)
    chat = await bound_chat(client, workspace.tenant, channel_id)
    answers = [stored_text(m) for m in chat["messages"] if m["role"] == "assistant"]
    assert [message.text for message in slack.thread("C0GENERAL", root)] == answers


async def test_an_answer_outliving_its_stream_finishes_in_the_thread(
    client: httpx.AsyncClient, slack: SlackServer, workspace: Workspace, temporal: Client
) -> None:
    # Slack ends a stream about five minutes in; this one ends after a second.
    slack.stream_lifetime_seconds = 1.0
    await use_model(client, workspace.tenant, SLOW_MODEL)
    payload = workspace.events.mention("tell me a long story")
    ts = payload["event"]["ts"]
    assert (await deliver(client, workspace, payload)).status_code == 200
    answer, outcome = await finished_reply(
        client, temporal, workspace, workspace.channel_id("C0GENERAL", ts)
    )
    assert outcome == "finish"
    assert stored_text(answer) == SLOW_TEXT
    messages = slack.thread("C0GENERAL", ts)
    assert "".join(message.text for message in messages) == SLOW_TEXT
    assert len(messages) == 2, "split in two messages"
    assert all(len(message.text) <= 3_900 for message in messages)
    assert messages[0].text.endswith(" "), "cut after a word"
    appends = slack.calls_to("chat.appendStream")
    assert any(call.error == "message_not_in_streaming_state" for call in appends)
    assert any(message.edits for message in messages), "went on with chat.update"
    assert not any(message.streaming for message in messages)
    assert len(created(slack, "C0GENERAL")) == 2
    # The reply's history holds ids, timestamps, lengths and digests: no text, no token.
    chat = await bound_chat(client, workspace.tenant, workspace.channel_id("C0GENERAL", ts))
    [turn] = await turns_of(client, workspace.tenant, chat["id"])
    history = await temporal.get_workflow_handle(f"slack-reply-{turn['id']}").fetch_history()
    # Payloads are base64 in the JSON form of a history.
    recorded = b"".join(
        base64.b64decode(data) for data in re.findall(r'"data":\s*"([^"]+)"', history.to_json())
    )
    assert b"chars" in recorded, "the payloads were read"
    assert b"w100 w101" not in recorded
    assert workspace.token.encode() not in recorded


async def test_slack_outages_delay_the_reply_but_never_lose_or_double_it(
    client: httpx.AsyncClient, slack: SlackServer, workspace: Workspace, temporal: Client
) -> None:
    # Whichever call creates the answer's message meets a 429, a 503 and an error first.
    creating = ("chat.startStream", "chat.postMessage")
    slack.rate_limit_next(1, retry_after=2, methods=creating)
    slack.fail_next(1, status=503, methods=creating)
    slack.fail_next(1, error="internal_error", methods=creating)
    payload = workspace.events.mention("are you there")
    ts = payload["event"]["ts"]
    assert (await deliver(client, workspace, payload)).status_code == 200
    answer, outcome = await finished_reply(
        client, temporal, workspace, workspace.channel_id("C0GENERAL", ts)
    )
    assert outcome == "finish"
    tries = [call for call in slack.calls if call.method in creating]
    assert [(call.status, call.error) for call in tries] == [
        (429, "ratelimited"),
        (503, "internal_error"),
        (200, "internal_error"),
        (200, None),
    ]
    # The 429's Retry-After (2 s) was honoured over the backoff's first interval (1 s).
    assert tries[1].at - tries[0].at >= 1.9
    [message] = slack.thread("C0GENERAL", ts)
    assert message.text == stored_text(answer)


async def test_a_worker_killed_mid_reply_delivers_it_once(
    client: httpx.AsyncClient,
    slack: SlackServer,
    workspace: Workspace,
    temporal: Client,
    running_services: RunningServices,
) -> None:
    await use_model(client, workspace.tenant, SLOW_MODEL)
    payload = workspace.events.mention("a story worth the wait")
    ts = payload["event"]["ts"]
    assert (await deliver(client, workspace, payload)).status_code == 200
    await wait_for(
        lambda: any(len(m.text) > 200 for m in slack.thread("C0GENERAL", ts)),
        what="the answer to be streaming into the thread",
    )
    running_services.worker.kill()
    running_services.worker.start()
    answer, outcome = await finished_reply(
        client, temporal, workspace, workspace.channel_id("C0GENERAL", ts), timeout=120
    )
    assert outcome == "finish"
    messages = slack.thread("C0GENERAL", ts)
    assert "".join(message.text for message in messages) == stored_text(answer)
    assert len(created(slack, "C0GENERAL")) == len(messages) == 2, "no message posted twice"
    assert messages[0].edits, "the resumed reply rewrote the message it found half-written"


def test_long_answers_split_after_words_and_join_back_exactly() -> None:
    text = "paragraph one\n\n" + " ".join(f"word{index}" for index in range(2_000))
    pieces = split_text(text)
    assert "".join(pieces) == text
    assert all(len(piece) <= MESSAGE_CHARS for piece in pieces)
    assert [piece[-1] for piece in pieces[:-1]] == [" "] * (len(pieces) - 1)
    # A growing answer keeps the pieces it had: only its last piece changes.
    grown = split_text(text + " and more")
    assert grown[:-1] == pieces[:-1]
    # No space to cut at: cut at the limit.
    assert split_text("x" * 5_000) == ["x" * MESSAGE_CHARS, "x" * (5_000 - MESSAGE_CHARS)]


async def test_the_stop_reaction_stops_the_running_turn(
    client: httpx.AsyncClient,
    slack: SlackServer,
    workspace: Workspace,
    temporal: Client,
    settings: Settings,
) -> None:
    await use_model(client, workspace.tenant, SLOW_MODEL)
    payload = workspace.events.mention("go on and on")
    ts = payload["event"]["ts"]
    assert (await deliver(client, workspace, payload)).status_code == 200
    await wait_for(
        lambda: any(m.text for m in slack.thread("C0GENERAL", ts)),
        what="the answer to start",
    )
    answer_ts = slack.thread("C0GENERAL", ts)[0].ts
    # Another reaction does nothing; the stop reaction, on the answer being written, stops it.
    other = workspace.events.reaction("thumbsup", channel="C0GENERAL", ts=answer_ts)
    assert (await deliver(client, workspace, other)).status_code == 200
    stop = workspace.events.reaction(
        settings.slack_stop_reaction, channel="C0GENERAL", ts=answer_ts
    )
    assert (await deliver(client, workspace, stop)).status_code == 200
    answer, outcome = await finished_reply(
        client, temporal, workspace, workspace.channel_id("C0GENERAL", ts)
    )
    assert outcome == "abort"
    assert answer["status"] == "aborted"
    text = stored_text(answer)
    assert 0 < len(text) < len(SLOW_TEXT)
    assert slack.thread_text("C0GENERAL", ts) == text + STOPPED


async def test_the_stop_reaction_on_the_question_stops_its_turn(
    client: httpx.AsyncClient,
    slack: SlackServer,
    workspace: Workspace,
    temporal: Client,
    settings: Settings,
) -> None:
    await use_model(client, workspace.tenant, SLOW_MODEL)
    payload = workspace.events.mention("never mind")
    ts = payload["event"]["ts"]
    assert (await deliver(client, workspace, payload)).status_code == 200
    await wait_for(lambda: slack.thread_text("C0GENERAL", ts) != "", what="the answer to start")
    stop = workspace.events.reaction(settings.slack_stop_reaction, channel="C0GENERAL", ts=ts)
    assert (await deliver(client, workspace, stop)).status_code == 200
    answer, outcome = await finished_reply(
        client, temporal, workspace, workspace.channel_id("C0GENERAL", ts)
    )
    assert outcome == "abort"
    assert slack.thread_text("C0GENERAL", ts) == stored_text(answer) + STOPPED


# --- refusals -------------------------------------------------------------------------------------


async def test_url_verification_is_answered_only_when_signed(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    challenge = {"token": "unused", "challenge": "3eZbrw1aBm2rZgRNFdxV", "type": "url_verification"}
    # Slack's URL check names no team: the Request URL carries it.
    body, headers = workspace.events.signed(challenge)
    response = await client.post(
        EVENTS, params={"team": workspace.team_id}, content=body, headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"challenge": "3eZbrw1aBm2rZgRNFdxV"}
    body, headers = workspace.events.signed(challenge, secret="not-the-signing-secret")
    response = await client.post(
        EVENTS, params={"team": workspace.team_id}, content=body, headers=headers
    )
    assert_problem(response, 401)
    assert "3eZbrw1aBm2rZgRNFdxV" not in response.text


@pytest.mark.parametrize("flaw", ["forged", "unsigned", "replayed", "tampered", "unknown-team"])
async def test_unsigned_forged_and_replayed_events_are_refused(
    client: httpx.AsyncClient, slack: SlackServer, workspace: Workspace, flaw: str
) -> None:
    payload = workspace.events.mention("do something")
    ts = payload["event"]["ts"]
    body, headers = workspace.events.signed(payload)
    if flaw == "forged":
        body, headers = workspace.events.signed(payload, secret=uuid.uuid4().hex)
    elif flaw == "unsigned":
        del headers["X-Slack-Signature"], headers["X-Slack-Request-Timestamp"]
    elif flaw == "replayed":
        # Signed correctly, six minutes ago.
        body, headers = workspace.events.signed(payload, timestamp=int(time.time()) - 360)
    elif flaw == "tampered":
        body = body.replace(b"do something", b"do something else")
    elif flaw == "unknown-team":
        payload["team_id"] = "TNOTCONNECTED"
        body, headers = workspace.events.signed(payload)
    response = await client.post(EVENTS, content=body, headers=headers)
    problem = assert_problem(response, 401)
    assert workspace.events.signing_secret not in response.text
    assert problem["status"] == 401
    response = await client.get(
        "/v1/chats/by-external",
        params={"source": "slack", "id": workspace.channel_id("C0GENERAL", ts)},
        headers=workspace.tenant.headers,
    )
    assert response.status_code == 404, "no turn was started"
    assert slack.calls == []


async def test_an_event_for_one_workspace_never_touches_another_organization(
    client: httpx.AsyncClient,
    slack: SlackServer,
    sessions: async_sessionmaker[AsyncSession],
    temporal: Client,
) -> None:
    team_a = await connect_workspace(client, slack, await make_tenant(sessions))
    team_b = await connect_workspace(client, slack, await make_tenant(sessions))
    # Naming team B but signed with team A's secret: refused.
    payload = team_b.events.mention("let me in")
    ts = payload["event"]["ts"]
    response = await deliver(client, team_a, payload)
    assert_problem(response, 401)
    for workspace in (team_a, team_b):
        response = await client.get(
            "/v1/chats/by-external",
            params={"source": "slack", "id": team_b.channel_id("C0GENERAL", ts)},
            headers=workspace.tenant.headers,
        )
        assert response.status_code == 404
    # Team A's own event lands in team A's organization only, answered with team A's token.
    payload = team_a.events.mention("hello A")
    ts = payload["event"]["ts"]
    assert (await deliver(client, team_a, payload)).status_code == 200
    channel_id = team_a.channel_id("C0GENERAL", ts)
    await finished_reply(client, temporal, team_a, channel_id)
    response = await client.get(
        "/v1/chats/by-external",
        params={"source": "slack", "id": channel_id},
        headers=team_b.tenant.headers,
    )
    assert response.status_code == 404, "team B's organization sees nothing"
    assert {call.team_id for call in slack.calls} == {team_a.team_id}


async def test_connecting_slack_keeps_its_secrets_write_only(
    client: httpx.AsyncClient, slack: SlackServer, sessions: async_sessionmaker[AsyncSession]
) -> None:
    tenant = await make_tenant(sessions)
    secret, token = uuid.uuid4().hex, f"xoxb-{uuid.uuid4().hex}"
    team_id = "T" + uuid.uuid4().hex[:10].upper()
    body = {"teamId": team_id, "signingSecret": secret, "botToken": token, "botUserId": "U0BOT"}
    response = await client.put("/v1/integrations/slack", json=body, headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "teamId": team_id,
        "botUserId": "U0BOT",
        "hasSigningSecret": True,
        "hasBotToken": True,
        "eventsPath": f"/v1/integrations/slack/events?team={team_id}",
    }
    shown = await client.get("/v1/integrations/slack", headers=tenant.headers)
    assert shown.status_code == 200
    assert shown.json() == response.json()
    for text in (response.text, shown.text):
        assert secret not in text
        assert token not in text
    # Another organization connecting the same workspace: refused.
    other = await make_tenant(sessions)
    taken = await client.put("/v1/integrations/slack", json=body, headers=other.headers)
    assert_problem(taken, 409)
    assert secret not in taken.text
    assert token not in taken.text
    # A member's key may not see or change it.
    member = await make_tenant(sessions, user_id=f"user-{uuid.uuid4().hex[:6]}")
    assert (await client.get("/v1/integrations/slack", headers=member.headers)).status_code == 403
    # Invalid credentials are refused without echoing them.
    bad = await client.put(
        "/v1/integrations/slack",
        json={**body, "botToken": "not-a-bot-token " + secret},
        headers=tenant.headers,
    )
    assert_problem(bad, 422)
    assert secret not in bad.text
    # Disconnected: its events are refused.
    assert (
        await client.delete("/v1/integrations/slack", headers=tenant.headers)
    ).status_code == 204
    assert (await client.get("/v1/integrations/slack", headers=tenant.headers)).status_code == 404
    events = SlackEvents(team_id, secret)
    payload_body, headers = events.signed(events.mention("anyone?"))
    response = await client.post(EVENTS, content=payload_body, headers=headers)
    assert_problem(response, 401)


async def test_two_organizations_connecting_one_workspace_at_once_get_one_connection(
    sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """The second connection is refused as taken even when neither could see the other's row yet
    (the unique index decides, not the check before the insert)."""
    box = SecretBox.from_settings(settings)
    first, second = await make_tenant(sessions), await make_tenant(sessions)
    team_id = f"T{uuid.uuid4().hex[:8].upper()}"

    def connect(session: AsyncSession, tenant: Tenant) -> Any:
        return integrations.put_integration(
            session,
            box,
            organization_id=tenant.organization_id,
            platform="slack",
            external_id=team_id,
            secrets={"botToken": "xoxb-1"},
            settings={},
        )

    async with sessions.begin() as first_session:
        await connect(first_session, first)  # not committed yet: invisible to the second
        async with sessions() as second_session:
            racing = asyncio.create_task(connect(second_session, second))
            # The second insert waits on the first's index entry.
            await until_a_backend_waits_for_a_lock(sessions)
            await first_session.commit()
            with pytest.raises(integrations.IntegrationTaken):
                await racing
    async with sessions() as session:
        owner = await integrations.find_integration(session, box, "slack", team_id)
    assert owner is not None
    assert owner.organization_id == first.organization_id
