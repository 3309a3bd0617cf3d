"""The Discord Gateway process (bots/discord_gateway.py), run in-process against a local Gateway
(tests/support/discord_gateway_server.py), the local Discord REST API and the real api and worker:
a message mentioning the bot in a thread becomes a durable turn whose answer the bot posts there;
messages without a mention, or from bots, start nothing; a replayed message starts one turn; a 🛑
reaction stops the running answer; a dropped or silent connection resumes its session and misses
nothing; heartbeats carry the last sequence; one application's events touch only its organization;
a disconnected application's connection closes.

The default model (`local/echo`) answers with the prompt, 20 ms a word.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from activities.discord import STOPPED_NOTE
from api.app import build_state
from bots.discord_gateway import DiscordGateway
from core.settings import Settings
from tests.conftest import RunningServices, Tenant, make_tenant
from tests.support.chat_api import stored_text
from tests.support.discord_gateway_server import (
    HEARTBEAT,
    IDENTIFY,
    RESUME,
    DiscordGatewayServer,
    FakeSession,
    message_create,
    reaction_add,
    snowflake,
)
from tests.support.discord_server import DiscordServer, FakeMessage, InteractionSigner

INTEGRATION_URL = "/v1/integrations/discord"
GUILD = "g-1"
STOP_SIGN = "\N{OCTAGONAL SIGN}"
INTENTS = (1 << 9) | (1 << 10) | (1 << 12)
# Short, so heartbeats and a missed ACK show within seconds; long enough that a busy test machine
# does not make a healthy connection look like a zombie.
HEARTBEAT_MS = 1000


def words(count: int) -> str:
    return " ".join(f"word{index:04d}" for index in range(count))


def new_channel() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def discord_server(settings: Settings) -> Iterator[DiscordServer]:
    # On the port the session's api and worker were configured with; read from the settings, as
    # importing tests.conftest would pick another port (see tests/test_discord.py).
    port = httpx.URL(settings.discord_api_url).port
    assert port is not None
    with DiscordServer(port) as server:
        yield server


@pytest.fixture(scope="module")
async def gateway_server(discord_server: DiscordServer) -> AsyncIterator[DiscordGatewayServer]:
    server = DiscordGatewayServer(heartbeat_interval_ms=HEARTBEAT_MS)
    await server.start()
    discord_server.gateway_url = server.url
    try:
        yield server
    finally:
        discord_server.gateway_url = None
        await server.stop()


@pytest.fixture(scope="module")
async def gateway_process(
    settings: Settings, running_services: RunningServices, gateway_server: DiscordGatewayServer
) -> AsyncIterator[asyncio.Task[None]]:
    """The Gateway process, as `durachat discord-gateway` runs it, reading the integrations every
    0.2 s so each test's new application is connected at once."""
    async with build_state(
        settings, client_name="durachat-test-gateway", read_streams=False
    ) as state:
        stop = asyncio.Event()
        task = asyncio.create_task(DiscordGateway(state, refresh_seconds=0.2).run(stop))
        try:
            yield task
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


@dataclass
class Bot:
    """A connected application, its bot user on the local Gateway, and ways to read what it did."""

    tenant: Tenant
    application_id: str
    bot_token: str
    user_id: str
    client: httpx.AsyncClient
    rest: DiscordServer
    gateway: DiscordGatewayServer
    process: asyncio.Task[None]

    async def wait(
        self,
        condition: Callable[[], bool],
        what: str,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.done():
                raise AssertionError(f"the gateway process ended: {self.process!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout} s")
            await asyncio.sleep(0.05)

    async def ready(self) -> FakeSession:
        """The bot's Gateway session, once it has identified."""
        await self.wait(lambda: self.gateway.connected(self.application_id), "READY")
        session = self.gateway.session_of(self.application_id)
        assert session is not None
        return session

    async def say(self, channel_id: str, text: str, **fields: Any) -> dict[str, Any]:
        """A person's message mentioning the bot, dispatched on its Gateway session."""
        message = message_create(
            channel_id=channel_id,
            content=f"<@{self.user_id}> {text}",
            mentions=[self.user_id],
            **fields,
        )
        await self.gateway.dispatch(self.application_id, "MESSAGE_CREATE", message)
        return message

    async def chat(self, channel_id: str) -> dict[str, Any] | None:
        response = await self.client.get(
            "/v1/chats/by-external",
            params={"source": "discord", "id": f"{GUILD}:{channel_id}"},
            headers=self.tenant.headers,
        )
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        chat: dict[str, Any] = response.json()
        return chat

    async def settled_answer(self, channel_id: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The channel's chat's last answer, once it has ended."""
        deadline = time.monotonic() + timeout
        while True:
            chat = await self.chat(channel_id)
            # A chat is bound before its first message is stored.
            last = chat["messages"][-1] if chat is not None and chat["messages"] else None
            if last is not None and last["role"] == "assistant" and last["status"] != "streaming":
                return dict(last)
            if time.monotonic() > deadline:
                raise AssertionError(f"no settled answer in {channel_id}: {last}")
            await asyncio.sleep(0.1)

    def posted(self, channel_id: str) -> list[FakeMessage]:
        return self.rest.channel_messages(channel_id)

    def posted_text(self, channel_id: str) -> str:
        return "".join(message.content for message in self.posted(channel_id))


async def connect_bot(
    client: httpx.AsyncClient,
    tenant: Tenant,
    rest: DiscordServer,
    gateway: DiscordGatewayServer,
    process: asyncio.Task[None],
) -> Bot:
    application_id = str(secrets.randbelow(10**18) + 10**18)
    bot_token = f"bot-{uuid.uuid4().hex}"
    user_id = snowflake()
    rest.add_application(application_id, bot_token)
    gateway.add_bot(application_id, bot_token, user_id=user_id)
    response = await client.put(
        INTEGRATION_URL,
        json={
            "applicationId": application_id,
            "publicKey": InteractionSigner().public_key,
            "botToken": bot_token,
        },
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    return Bot(tenant, application_id, bot_token, user_id, client, rest, gateway, process)


@pytest.fixture
async def bot(
    client: httpx.AsyncClient,
    tenant: Tenant,
    discord_server: DiscordServer,
    gateway_server: DiscordGatewayServer,
    gateway_process: asyncio.Task[None],
) -> Bot:
    return await connect_bot(client, tenant, discord_server, gateway_server, gateway_process)


# --- answering --------------------------------------------------------------------------------


async def test_a_thread_message_mentioning_the_bot_is_answered_there_with_the_stored_answer(
    bot: Bot,
) -> None:
    await bot.ready()
    identify = bot.gateway.payloads(bot.application_id, IDENTIFY)[-1]
    assert identify.data["token"] == bot.bot_token
    assert identify.data["intents"] == INTENTS
    assert "v=10" in identify.path
    assert "encoding=json" in identify.path
    asked = [
        call
        for call in bot.rest.calls
        if call.route == "get-gateway-bot"
        and call.headers["authorization"] == f"Bot {bot.bot_token}"
    ]
    assert asked, "the Gateway URL came from GET /gateway/bot with the bot token"

    thread = new_channel()
    message = await bot.say(thread, "how do durable turns work?")

    answer = await bot.settled_answer(thread)
    assert answer["status"] == "complete"
    text = stored_text(answer)
    assert text == "how do durable turns work?"
    await bot.wait(lambda: bot.posted_text(thread) == text, "the answer posted in the thread")
    [posted] = bot.posted(thread)
    assert posted.reference == message["id"], "the answer replies to the message"
    posts = [call for call in bot.rest.calls if f"/channels/{thread}/" in call.path]
    assert posts
    assert all(call.headers["authorization"] == f"Bot {bot.bot_token}" for call in posts)
    chat = await bot.chat(thread)
    assert chat is not None
    assert [message["role"] for message in chat["messages"]] == ["user", "assistant"]
    assert stored_text(chat["messages"][0]) == "how do durable turns work?"


async def test_heartbeats_carry_the_last_sequence_and_are_sent_every_interval(bot: Bot) -> None:
    await bot.ready()
    # A message the bot ignores still moves the sequence on.
    sequence = await bot.gateway.dispatch(
        bot.application_id,
        "MESSAGE_CREATE",
        message_create(channel_id=new_channel(), content="just chatting"),
    )

    def beats() -> list[Any]:
        return [r.data for r in bot.gateway.payloads(bot.application_id, HEARTBEAT)]

    await bot.wait(lambda: beats().count(sequence) >= 2, "two heartbeats with the last sequence")
    carrying = [
        r for r in bot.gateway.payloads(bot.application_id, HEARTBEAT) if r.data == sequence
    ]
    gap = carrying[1].at - carrying[0].at
    assert 0.8 < gap < 2.0, "one heartbeat every interval (1 s)"


async def test_messages_without_a_mention_or_from_bots_start_nothing(bot: Bot) -> None:
    await bot.ready()
    thread = new_channel()
    someone_else = snowflake()
    ignored = [
        message_create(channel_id=thread, content="no mention of the bot"),
        message_create(
            channel_id=thread,
            content=f"<@{someone_else}> a mention of someone else",
            mentions=[someone_else],
        ),
        message_create(
            channel_id=thread,
            content=f"<@{bot.user_id}> from another bot",
            mentions=[bot.user_id],
            author_id=snowflake(),
            bot=True,
        ),
        message_create(
            channel_id=thread,
            content=f"<@{bot.user_id}> from the bot itself",
            mentions=[bot.user_id],
            author_id=bot.user_id,
            bot=True,
        ),
    ]
    for message in ignored:
        await bot.gateway.dispatch(bot.application_id, "MESSAGE_CREATE", message)
    # Events are handled in order: once this one is answered, those before it were handled.
    await bot.say(thread, "the only question")

    answer = await bot.settled_answer(thread)
    assert stored_text(answer) == "the only question"
    chat = await bot.chat(thread)
    assert chat is not None
    assert [stored_text(message) for message in chat["messages"]] == [
        "the only question",
        "the only question",
    ]
    await bot.wait(lambda: bot.posted_text(thread) == "the only question", "the one answer")
    assert len(bot.posted(thread)) == 1


async def test_a_message_dispatched_twice_makes_one_turn_and_one_answer(bot: Bot) -> None:
    await bot.ready()
    thread = new_channel()
    message = await bot.say(thread, "asked once, delivered twice")
    # The same message again, as a RESUME's replay would deliver it.
    await bot.gateway.dispatch(bot.application_id, "MESSAGE_CREATE", message)
    marker = new_channel()
    await bot.say(marker, "after the replay")
    await bot.settled_answer(marker)

    answer = await bot.settled_answer(thread)
    assert stored_text(answer) == "asked once, delivered twice"
    chat = await bot.chat(thread)
    assert chat is not None
    assert [message["role"] for message in chat["messages"]] == ["user", "assistant"]
    await bot.wait(
        lambda: bot.posted_text(thread) == "asked once, delivered twice", "the one answer"
    )
    assert len(bot.posted(thread)) == 1


# --- stopping ---------------------------------------------------------------------------------


async def test_a_stop_sign_reaction_stops_the_running_answer_which_keeps_its_text(
    bot: Bot,
) -> None:
    await bot.ready()
    thread = new_channel()
    prompt = words(300)  # 6 s of streaming
    await bot.say(thread, prompt)
    await bot.wait(lambda: len(bot.posted_text(thread)) > 50, "a first part of the answer")

    await bot.gateway.dispatch(
        bot.application_id,
        "MESSAGE_REACTION_ADD",
        reaction_add(channel_id=thread, message_id=bot.posted(thread)[0].id, emoji=STOP_SIGN),
    )

    answer = await bot.settled_answer(thread)
    assert answer["status"] == "aborted"
    partial = stored_text(answer).strip()
    assert 0 < len(partial) < len(prompt)
    await bot.wait(
        lambda: bot.posted_text(thread) == partial + STOPPED_NOTE, "the stopped answer's last edit"
    )


# --- the connection ---------------------------------------------------------------------------


async def test_a_dropped_connection_resumes_its_session_and_gets_what_it_missed(bot: Bot) -> None:
    session = await bot.ready()
    before = new_channel()
    await bot.say(before, "before the drop")
    await bot.settled_answer(before)
    last_seen = session.sequence
    resumed = len(bot.gateway.payloads(bot.application_id, RESUME))

    await bot.gateway.drop(bot.application_id)
    # Dispatched while the bot is away: Discord keeps it for the session's RESUME.
    after = new_channel()
    await bot.say(after, "while the connection was down")

    await bot.wait(
        lambda: len(bot.gateway.payloads(bot.application_id, RESUME)) > resumed,
        "a RESUME",
        timeout=15,
    )
    resume = bot.gateway.payloads(bot.application_id, RESUME)[-1]
    assert resume.data["session_id"] == session.id
    assert resume.data["seq"] == last_seen
    assert resume.data["token"] == bot.bot_token
    assert resume.path.startswith("/resume-"), "at the session's resume_gateway_url"
    assert "v=10" in resume.path
    assert len(bot.gateway.payloads(bot.application_id, IDENTIFY)) == 1, "the same session"
    answer = await bot.settled_answer(after)
    assert stored_text(answer) == "while the connection was down"
    await bot.wait(
        lambda: bot.posted_text(after) == "while the connection was down", "the missed answer"
    )


async def test_a_connection_whose_heartbeats_go_unacknowledged_is_replaced_and_resumed(
    bot: Bot,
) -> None:
    session = await bot.ready()
    resumed = len(bot.gateway.payloads(bot.application_id, RESUME))
    bot.gateway.go_silent(bot.application_id)
    try:
        await bot.wait(
            lambda: len(bot.gateway.payloads(bot.application_id, RESUME)) > resumed,
            "a RESUME after a missed heartbeat ACK",
            timeout=10,
        )
    finally:
        bot.gateway.go_silent(bot.application_id, silent=False)
    resume = bot.gateway.payloads(bot.application_id, RESUME)[-1]
    assert resume.data["session_id"] == session.id

    thread = new_channel()
    await bot.say(thread, "still listening")
    answer = await bot.settled_answer(thread)
    assert stored_text(answer) == "still listening"


async def test_an_application_acts_only_in_its_own_organization(
    bot: Bot,
    client: httpx.AsyncClient,
    discord_server: DiscordServer,
    gateway_server: DiscordGatewayServer,
    gateway_process: asyncio.Task[None],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    other = await connect_bot(
        client, await make_tenant(sessions), discord_server, gateway_server, gateway_process
    )
    await bot.ready()
    await other.ready()
    thread = new_channel()
    # On the other application's connection: a mention of this bot's user is no mention of its own.
    await other.gateway.dispatch(
        other.application_id,
        "MESSAGE_CREATE",
        message_create(
            channel_id=thread, content=f"<@{bot.user_id}> not yours", mentions=[bot.user_id]
        ),
    )
    await other.say(thread, "for the other organization")

    answer = await other.settled_answer(thread)
    assert stored_text(answer) == "for the other organization"
    assert await bot.chat(thread) is None, "nothing in this organization"
    chat = await other.chat(thread)
    assert chat is not None
    assert len(chat["messages"]) == 2


async def test_a_disconnected_application_loses_its_gateway_connection(bot: Bot) -> None:
    await bot.ready()

    deleted = await bot.client.delete(INTEGRATION_URL, headers=bot.tenant.headers)

    assert deleted.status_code == 204
    await bot.wait(
        lambda: not bot.gateway.connected(bot.application_id), "the connection closed", timeout=10
    )
