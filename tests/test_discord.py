"""The Discord adapter against a local Discord (tests/support/discord_server.py) and the real api and
worker: admins connect an application and register its commands; signed interactions become
durable turns (`/ask` deferred, then edited in as it streams, long answers continued in follow-ups,
a refused token continued in channel messages); `/stop` and `/new` act on the channel's chat; bad
signatures and replays change nothing; one application never reaches another organization; a
worker killed mid-relay delivers the reply once; Discord's rate limits and 5xx are honoured.

The default model (`local/echo`) answers with the prompt, 20 ms a word, so a prompt sets both how
long an answer is and how long it streams.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.discord import (
    FAILED_NOTE,
    STOPPED_NOTE,
    DiscordActivities,
    DiscordReplyInput,
    split_message,
)
from core.secrets import SecretBox
from core.settings import Settings
from storage import chats
from storage.streams import TurnStreams
from tests.conftest import RunningServices, Tenant, make_tenant
from tests.support.chat_api import assert_problem, stored_text
from tests.support.discord_server import (
    DiscordServer,
    FakeMessage,
    InteractionSigner,
    command_interaction,
)

Sessions = async_sessionmaker[AsyncSession]
INTEGRATION_URL = "/v1/integrations/discord"
INTERACTIONS_URL = "/v1/integrations/discord/interactions"
GUILD = "g-1"
EPHEMERAL = 64


def words(count: int, width: int = 8) -> str:
    """A prompt (and so an answer) of `count` words, each `width` characters or so."""
    return " ".join(f"{'w' * max(1, width - 4)}{index:04d}" for index in range(count))


async def wait_until(
    condition: Callable[[], bool],
    timeout: float = 30.0,  # noqa: ASYNC109
    what: str = "the condition",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def discord_server(settings: Settings) -> Iterator[DiscordServer]:
    # On the port the session's api and worker were configured with (tests/conftest.py). Read
    # from the settings: pytest imports conftest.py as `conftest`, so importing its
    # DISCORD_API_PORT as `tests.conftest` would run its free_port_block() a second time.
    port = httpx.URL(settings.discord_api_url).port
    assert port is not None
    with DiscordServer(port) as server:
        assert server.api_url == settings.discord_api_url
        yield server


@dataclass
class DiscordApp:
    """An organization with a connected Discord application, and ways to act as Discord for it."""

    tenant: Tenant
    application_id: str
    bot_token: str
    signer: InteractionSigner
    server: DiscordServer
    client: httpx.AsyncClient

    async def post(
        self, interaction: dict[str, Any], *, signer: InteractionSigner | None = None
    ) -> httpx.Response:
        body = json.dumps(interaction).encode()
        headers = (signer or self.signer).headers(body)
        return await self.client.post(INTERACTIONS_URL, content=body, headers=headers)

    async def command(
        self, name: str, channel_id: str, prompt: str | None = None, guild_id: str | None = GUILD
    ) -> tuple[httpx.Response, str]:
        """Discord posting the command; the answer, and the interaction's token."""
        token = self.server.open_interaction(self.application_id, channel_id)
        interaction = command_interaction(
            self.application_id,
            name,
            token=token,
            channel_id=channel_id,
            guild_id=guild_id,
            prompt=prompt,
        )
        return await self.post(interaction), token

    async def ask(self, channel_id: str, prompt: str) -> str:
        started = time.monotonic()
        response, token = await self.command("ask", channel_id, prompt)
        assert response.status_code == 200, response.text
        assert response.json() == {"type": 5}
        assert time.monotonic() - started < 3, "deferred within Discord's 3 s"
        return token

    async def set_default_model(self, model: str) -> None:
        response = await self.client.put(
            "/v1/defaults/organization", json={"model": model}, headers=self.tenant.headers
        )
        assert response.status_code == 200, response.text

    async def bound_chat(self, channel_id: str, guild_id: str | None = GUILD) -> dict[str, Any]:
        response = await self.client.get(
            "/v1/chats/by-external",
            params={"source": "discord", "id": f"{guild_id or 'dm'}:{channel_id}"},
            headers=self.tenant.headers,
        )
        assert response.status_code == 200, response.text
        chat: dict[str, Any] = response.json()
        return chat

    async def settled_answer(self, channel_id: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The channel's chat's last answer once it has ended."""
        deadline = time.monotonic() + timeout
        while True:
            last: dict[str, Any] = (await self.bound_chat(channel_id))["messages"][-1]
            if last["role"] == "assistant" and last["status"] != "streaming":
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"the answer did not settle: {last}")
            await asyncio.sleep(0.1)


async def connect_application(
    client: httpx.AsyncClient, tenant: Tenant, server: DiscordServer
) -> DiscordApp:
    application_id = str(secrets.randbelow(10**18) + 10**18)
    bot_token = f"bot-{uuid.uuid4().hex}"
    signer = InteractionSigner()
    server.add_application(application_id, bot_token)
    response = await client.put(
        INTEGRATION_URL,
        json={
            "applicationId": application_id,
            "publicKey": signer.public_key,
            "botToken": bot_token,
        },
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    return DiscordApp(tenant, application_id, bot_token, signer, server, client)


@pytest.fixture
async def discord_app(
    client: httpx.AsyncClient, tenant: Tenant, discord_server: DiscordServer
) -> DiscordApp:
    return await connect_application(client, tenant, discord_server)


def new_channel() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def reply_is(server: DiscordServer, token: str, text: str) -> Callable[[], bool]:
    return lambda: server.reply_text(token) == text


def assert_within_limit(messages: list[FakeMessage]) -> None:
    for message in messages:
        assert all(len(content) <= 2000 for content in message.contents)


# --- connecting -------------------------------------------------------------------------------


async def test_connecting_never_shows_the_bot_token_and_another_org_cannot_take_the_application(
    client: httpx.AsyncClient,
    discord_app: DiscordApp,
    sessions: Sessions,
    discord_server: DiscordServer,
) -> None:
    headers = discord_app.tenant.headers
    read = await client.get(INTEGRATION_URL, headers=headers)
    assert read.status_code == 200, read.text
    assert read.json() == {
        "applicationId": discord_app.application_id,
        "publicKey": discord_app.signer.public_key,
        "hasBotToken": True,
        "interactionsPath": INTERACTIONS_URL,
    }
    assert discord_app.bot_token not in read.text

    other = await make_tenant(sessions)
    taken = await client.put(
        INTEGRATION_URL,
        json={
            "applicationId": discord_app.application_id,
            "publicKey": InteractionSigner().public_key,
            "botToken": "bot-other",
        },
        headers=other.headers,
    )
    assert_problem(taken, 409)
    member = await make_tenant(sessions, user_id="someone")
    assert_problem(await client.get(INTEGRATION_URL, headers=member.headers), 403)
    bad_key = await client.put(
        INTEGRATION_URL,
        json={"applicationId": "1", "publicKey": "zz" * 32, "botToken": "b"},
        headers=other.headers,
    )
    assert_problem(bad_key, 422)

    registered = await client.post(f"{INTEGRATION_URL}/commands", headers=headers)
    assert registered.status_code == 200, registered.text
    assert [command["name"] for command in registered.json()["commands"]] == ["ask", "stop", "new"]
    commands = discord_server.commands(discord_app.application_id)
    ask = next(command for command in commands if command["name"] == "ask")
    assert ask["options"][0]["name"] == "prompt"
    assert ask["options"][0]["required"] is True
    put = [call for call in discord_server.calls if call.route == "put-commands"][-1]
    assert put.headers["authorization"] == f"Bot {discord_app.bot_token}"

    assert (await client.delete(INTEGRATION_URL, headers=headers)).status_code == 204
    assert_problem(await client.get(INTEGRATION_URL, headers=headers), 404)
    # A disconnected application's interactions are refused.
    response, _ = await discord_app.command("ask", new_channel(), "hello")
    assert response.status_code == 401


# --- verification -----------------------------------------------------------------------------


async def test_ping_is_answered_with_pong(discord_app: DiscordApp) -> None:
    response = await discord_app.post(
        {"type": 1, "id": "1", "application_id": discord_app.application_id}
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"type": 1}


async def test_missing_bad_tampered_or_stale_signatures_are_refused_and_start_nothing(
    client: httpx.AsyncClient, discord_app: DiscordApp
) -> None:
    channel = new_channel()
    token = discord_app.server.open_interaction(discord_app.application_id, channel)
    interaction = command_interaction(
        discord_app.application_id, "ask", token=token, channel_id=channel, prompt="hi"
    )
    body = json.dumps(interaction).encode()
    signed = discord_app.signer.headers(body)
    tampered = json.dumps({**interaction, "data": {**interaction["data"], "name": "new"}}).encode()
    unknown_app = json.dumps({**interaction, "application_id": "42"}).encode()
    attempts = {
        "missing": (body, {"Content-Type": "application/json"}),
        "no timestamp": (body, {"X-Signature-Ed25519": signed["X-Signature-Ed25519"]}),
        "another key": (body, InteractionSigner().headers(body)),
        "tampered body": (tampered, signed),
        "stale": (body, discord_app.signer.headers(body, timestamp=int(time.time()) - 600)),
        "not hex": (body, {**signed, "X-Signature-Ed25519": "zz"}),
        "unknown application": (unknown_app, discord_app.signer.headers(unknown_app)),
        "not json": (b"{", discord_app.signer.headers(b"{")),
    }
    for name, (content, headers) in attempts.items():
        response = await client.post(INTERACTIONS_URL, content=content, headers=headers)
        assert response.status_code == 401, name

    missing = await client.get(
        "/v1/chats/by-external",
        params={"source": "discord", "id": f"{GUILD}:{channel}"},
        headers=discord_app.tenant.headers,
    )
    assert missing.status_code == 404, "no turn started"
    assert discord_app.server.calls_for(token) == []


async def test_a_replayed_interaction_is_refused_and_answered_once(
    client: httpx.AsyncClient, discord_app: DiscordApp
) -> None:
    channel = new_channel()
    token = discord_app.server.open_interaction(discord_app.application_id, channel)
    body = json.dumps(
        command_interaction(
            discord_app.application_id, "ask", token=token, channel_id=channel, prompt="only once"
        )
    ).encode()
    headers = discord_app.signer.headers(body)

    first = await client.post(INTERACTIONS_URL, content=body, headers=headers)
    replay = await client.post(INTERACTIONS_URL, content=body, headers=headers)

    assert first.json() == {"type": 5}
    assert replay.status_code == 401
    await wait_until(reply_is(discord_app.server, token, "only once"), what="the reply")
    chat = await discord_app.bound_chat(channel)
    assert [message["role"] for message in chat["messages"]] == ["user", "assistant"]


# --- /ask -------------------------------------------------------------------------------------


async def test_ask_is_deferred_then_edited_in_as_it_streams_and_ends_as_the_stored_answer(
    discord_app: DiscordApp,
) -> None:
    channel = new_channel()
    prompt = words(80)  # 1.6 s of streaming: several edits 0.2 s apart

    token = await discord_app.ask(channel, prompt)

    answer = await discord_app.settled_answer(channel)
    final = stored_text(answer).strip()
    assert final == prompt
    await wait_until(reply_is(discord_app.server, token, final), what="the final edit")
    [original] = discord_app.server.reply_messages(token)
    assert len(original.contents) >= 3, "edited as it streamed"
    assert all(final.startswith(content) for content in original.contents)
    edits = [call for call in discord_app.server.calls_for(token) if call.route == "edit-original"]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(edits)]
    assert min(gaps) >= 0.15, "paced by bot_edit_interval_seconds"


async def test_a_long_answer_continues_in_follow_ups_that_together_are_the_stored_answer(
    discord_app: DiscordApp,
) -> None:
    channel = new_channel()
    prompt = words(200, width=25)  # about 5,200 characters, 4 s

    token = await discord_app.ask(channel, prompt)

    final = stored_text(await discord_app.settled_answer(channel)).strip()
    await wait_until(reply_is(discord_app.server, token, final), what="the whole answer")
    messages = discord_app.server.reply_messages(token)
    assert len(messages) == len(split_message(final)) >= 3
    assert [message.kind for message in messages] == ["original"] + ["follow-up"] * (
        len(messages) - 1
    )
    assert_within_limit(messages)
    posts = [c for c in discord_app.server.calls_for(token) if c.route == "post-follow-up"]
    assert len(posts) == len(messages) - 1, "each follow-up posted once"


async def test_a_failed_turn_shows_a_short_error_note(discord_app: DiscordApp) -> None:
    await discord_app.set_default_model("mock/fail-400")
    channel = new_channel()

    token = await discord_app.ask(channel, "this will fail")

    answer = await discord_app.settled_answer(channel)
    assert answer["status"] == "failed"
    await wait_until(
        lambda: FAILED_NOTE in discord_app.server.reply_text(token), what="the error note"
    )


async def test_a_refused_interaction_token_continues_in_bot_messages_in_the_channel(
    discord_app: DiscordApp,
) -> None:
    server = discord_app.server
    channel = new_channel()
    prompt = words(200)  # 4 s

    token = await discord_app.ask(channel, prompt)
    await wait_until(lambda: len(server.reply_text(token)) > 100, what="a first edit")
    [original] = server.reply_messages(token)
    server.expire_token(token)

    final = stored_text(await discord_app.settled_answer(channel)).strip()
    await wait_until(
        lambda: (
            server.reply_text(token)
            + "".join(message.content for message in server.channel_messages(channel))
            == final
        ),
        what="the answer continued in the channel",
    )
    posted = server.channel_messages(channel)
    assert posted
    assert posted[0].reference == original.id, "the continuation replies to the answer"
    posts = [call for call in server.calls if call.route == "post-channel" and channel in call.path]
    assert all(call.headers["authorization"] == f"Bot {discord_app.bot_token}" for call in posts)


async def test_the_token_is_left_before_its_fifteen_minutes_end(
    client: httpx.AsyncClient,
    discord_app: DiscordApp,
    sessions: Sessions,
    redis: Redis,
    settings: Settings,
) -> None:
    """The relay activity itself, run here with a short token lifetime: once the token's time is
    up the answer goes on in channel messages, the token's messages cut at a whole word."""
    server = discord_app.server
    sent = await client.post(
        "/v1/chats",
        params={"stream": "false"},
        json={"message": words(150), "model": "local/echo"},
        headers=discord_app.tenant.headers,
    )
    assert sent.status_code == 200, sent.text
    chat_id, turn_id = sent.json()["chatId"], sent.headers["x-turn-id"]
    async with sessions() as session:
        turn = await chats.get_turn_by_id(session, discord_app.tenant.organization_id, turn_id)
    assert turn is not None
    channel = new_channel()
    token = server.open_interaction(discord_app.application_id, channel)
    box = SecretBox.from_settings(settings)
    activities = DiscordActivities(
        sessions,
        TurnStreams(redis, max_lifetime_seconds=600, retention_seconds=600),
        box,
        settings,
        redis,
        token_lifetime=timedelta(seconds=60),
    )
    request = DiscordReplyInput(
        organization_id=discord_app.tenant.organization_id,
        application_id=discord_app.application_id,
        channel_id=channel,
        turn_id=turn_id,
        assistant_message_id=turn.assistant_message_id,
        sealed_token=box.seal({"token": token}),
        # Issued 60 s ago: its time is up at once.
        token_issued_at=time.time() - 60,
    )

    result = await ActivityEnvironment().run(activities.relay_answer, request)

    assert result.via_channel
    final = stored_text(
        (await client.get(f"/v1/chats/{chat_id}", headers=discord_app.tenant.headers)).json()[
            "messages"
        ][-1]
    ).strip()
    on_token = server.reply_text(token)
    in_channel = "".join(message.content for message in server.channel_messages(channel))
    assert on_token + in_channel == final
    assert on_token == "" or on_token.endswith(" ")


# --- /stop and /new ---------------------------------------------------------------------------


async def test_stop_ends_the_running_answer_which_keeps_its_text_marked_stopped(
    discord_app: DiscordApp,
) -> None:
    server = discord_app.server
    channel = new_channel()
    token = await discord_app.ask(channel, words(400))  # 8 s
    await wait_until(lambda: len(server.reply_text(token)) > 50, what="a first edit")

    busy, _ = await discord_app.command("new", channel)
    assert busy.json()["data"]["flags"] == EPHEMERAL
    assert "still being written" in busy.json()["data"]["content"]
    stop, _ = await discord_app.command("stop", channel)

    assert stop.status_code == 200, stop.text
    assert stop.json()["type"] == 4
    assert stop.json()["data"]["flags"] == EPHEMERAL
    assert stop.json()["data"]["content"].startswith("Stopped")
    answer = await discord_app.settled_answer(channel)
    assert answer["status"] == "aborted"
    partial = stored_text(answer).strip()
    assert 0 < len(partial) < len(words(400))
    await wait_until(
        reply_is(server, token, partial + STOPPED_NOTE), what="the stopped answer's final edit"
    )
    again, _ = await discord_app.command("stop", channel)
    assert "Nothing is being answered" in again.json()["data"]["content"]


async def test_new_makes_the_next_ask_start_a_new_chat(discord_app: DiscordApp) -> None:
    server = discord_app.server
    channel = new_channel()
    first = await discord_app.ask(channel, "the first conversation")
    await wait_until(reply_is(server, first, "the first conversation"), what="the first reply")
    first_chat = await discord_app.bound_chat(channel)

    fresh, _ = await discord_app.command("new", channel)
    assert fresh.json()["type"] == 4
    assert fresh.json()["data"]["flags"] == EPHEMERAL
    second = await discord_app.ask(channel, "the second conversation")
    await wait_until(reply_is(server, second, "the second conversation"), what="the second reply")

    second_chat = await discord_app.bound_chat(channel)
    assert second_chat["id"] != first_chat["id"]
    assert [m["role"] for m in second_chat["messages"]] == ["user", "assistant"]
    kept = await discord_app.client.get(
        f"/v1/chats/{first_chat['id']}", headers=discord_app.tenant.headers
    )
    assert kept.status_code == 200, "the earlier chat stays readable"
    assert len(kept.json()["messages"]) == 2


async def test_a_thread_and_a_dm_are_chats_of_their_own(discord_app: DiscordApp) -> None:
    server = discord_app.server
    channel, thread = new_channel(), new_channel()
    tokens = [
        await discord_app.ask(channel, "in the channel"),
        await discord_app.ask(thread, "in the thread"),
    ]
    response, dm_token = await discord_app.command("ask", channel, "in a dm", guild_id=None)
    assert response.json() == {"type": 5}
    for token, text in zip(
        [*tokens, dm_token], ["in the channel", "in the thread", "in a dm"], strict=True
    ):
        await wait_until(reply_is(server, token, text), what=f"the reply {text!r}")
    chat_ids = {
        (await discord_app.bound_chat(channel))["id"],
        (await discord_app.bound_chat(thread))["id"],
        (await discord_app.bound_chat(channel, guild_id=None))["id"],
    }
    assert len(chat_ids) == 3


# --- isolation --------------------------------------------------------------------------------


async def test_an_application_never_reaches_another_organizations_chats(
    client: httpx.AsyncClient,
    discord_app: DiscordApp,
    sessions: Sessions,
    discord_server: DiscordServer,
) -> None:
    other = await connect_application(client, await make_tenant(sessions), discord_server)
    channel = new_channel()  # the same Discord channel id seen by both applications
    other_token = await other.ask(channel, words(150))  # 3 s
    await wait_until(lambda: discord_server.reply_text(other_token) != "", what="B's first edit")

    # A's /stop in the same channel finds nothing of A's to stop; A's /ask starts A's own chat.
    stop, _ = await discord_app.command("stop", channel)
    assert "Nothing is being answered" in stop.json()["data"]["content"]
    mine = await discord_app.ask(channel, "my own question")
    # Signed with A's key but naming B's application: refused.
    token = discord_server.open_interaction(other.application_id, channel)
    forged = command_interaction(other.application_id, "stop", token=token, channel_id=channel)
    assert (await discord_app.post(forged)).status_code == 401

    other_answer = await other.settled_answer(channel)
    assert other_answer["status"] == "complete", "B's turn ran to its end"
    await wait_until(reply_is(discord_server, mine, "my own question"), what="A's reply")
    mine_chat = await discord_app.bound_chat(channel)
    other_chat = await other.bound_chat(channel)
    assert mine_chat["id"] != other_chat["id"]
    assert [stored_text(m) for m in mine_chat["messages"]] == ["my own question"] * 2
    # Neither organization reads the other's chat.
    foreign = await client.get(f"/v1/chats/{other_chat['id']}", headers=discord_app.tenant.headers)
    assert foreign.status_code == 404


# --- durability and pacing --------------------------------------------------------------------


async def test_a_worker_killed_mid_relay_delivers_the_reply_once(
    discord_app: DiscordApp, running_services: RunningServices
) -> None:
    server = discord_app.server
    channel = new_channel()
    prompt = words(500, width=25)  # about 13,000 characters over 10 s: seven messages

    token = await discord_app.ask(channel, prompt)

    def editing_the_second_follow_up() -> bool:
        # Killed between edits, not while a follow-up is being created: a kill in the middle of
        # that POST is the one case the relay cannot tell whether Discord made the message
        # (docs/discord.md "Durability").
        calls = server.calls_for(token)
        return len(server.reply_messages(token)) >= 3 and calls[-1].route == "edit-follow-up"

    await wait_until(editing_the_second_follow_up, what="editing the second follow-up")
    running_services.worker.kill()
    running_services.worker.start()

    answer = await discord_app.settled_answer(channel, timeout=90)
    final = stored_text(answer).strip()
    assert final == prompt
    await wait_until(reply_is(server, token, final), timeout=60, what="the whole reply")
    messages = server.reply_messages(token)
    assert [len(message.content) for message in messages] == [
        len(piece) for piece in split_message(final)
    ]
    assert_within_limit(messages)
    posts = [call for call in server.calls_for(token) if call.route == "post-follow-up"]
    answered_posts = [call for call in posts if call.scripted_status is None]
    assert len(answered_posts) == len(messages) - 1, "no follow-up posted twice"
    assert not [call for call in server.calls_for(token) if call.route.startswith("delete")]


async def test_rate_limits_and_discord_failures_are_waited_out(discord_app: DiscordApp) -> None:
    server = discord_app.server
    channel = new_channel()
    server.rate_limit(times=1, retry_after=1.0)
    server.exhaust_bucket(reset_after=0.8)

    token = await discord_app.ask(channel, words(20))

    await wait_until(reply_is(server, token, words(20)), what="the reply")
    calls = server.calls_for(token)
    assert calls[0].scripted_status == 429
    assert calls[1].at - calls[0].at >= 1.0, "retry_after honoured"
    assert calls[2].at - calls[1].at >= 0.8, "X-RateLimit-Reset-After honoured"

    channel = new_channel()
    server.fail(status=502, times=2)
    token = await discord_app.ask(channel, "through a bad gateway")
    await wait_until(
        reply_is(server, token, "through a bad gateway"), what="the reply after Discord's 502s"
    )
    assert [call.scripted_status for call in server.calls_for(token)][:2] == [502, 502]


# --- splitting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        words(700),
        "x" * 4500,
        ("a line of text\n" * 400).strip(),
        ("word " * 300 + "\n") * 5,
    ],
    ids=["words", "no-spaces", "lines", "mixed"],
)
def test_a_long_answer_splits_into_whole_pieces_that_stay_put_as_it_grows(text: str) -> None:
    pieces = split_message(text)

    assert "".join(pieces) == text
    assert all(0 < len(piece) <= 2000 for piece in pieces)
    # Every piece but the last ends at a line break or a space when the text has one nearby.
    if " " in text or "\n" in text:
        assert all(piece[-1] in " \n" for piece in pieces[:-1])
    # The pieces of a prefix are the text's pieces but (maybe) the last: earlier messages are
    # never edited as the answer grows.
    for cut in range(0, len(text), 997):
        grown = split_message(text[:cut])
        assert grown[:-1] == pieces[: max(len(grown) - 1, 0)]
