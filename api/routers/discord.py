"""Discord endpoints: admins connect an application and register its slash commands; Discord posts
interactions, which become durable turns. Secrets (the bot token, interaction tokens) are never in an
answer or a log line.

The interactions endpoint is a thin edge: it verifies Discord's Ed25519 signature with the public
key of the application the interaction names, answers at once, and leaves everything slow to
Temporal. `/ask` starts the turn on the chat bound to the channel and a DiscordReplyWorkflow that
edits the answer in; `/stop` and `/new` act on the channel's chat and answer ephemerally. Nothing
changes for a request whose signature does not hold.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask

from activities.discord import TOKEN_PLACEHOLDER, DiscordReplyInput, TokenHidingTransport
from api import integration_admin
from api.bot_turns import start_channel_turn, start_reply_once, stop_channel_turn
from api.deps import AdminPrincipal, SessionDep, StateDep
from api.problems import problem_response
from api.schemas import RequestBody
from api.state import AppState
from core.errors import DurachatError, UpstreamError
from core.secrets import SecretBox
from storage import chats, integrations
from storage.chats import ChatBusy
from storage.integrations import IntegrationRecord
from workflows.discord_reply import DiscordReplyWorkflow, reply_workflow_id

router = APIRouter(prefix="/v1/integrations/discord", tags=["integrations"])
log = structlog.get_logger(__name__)

PLATFORM = "discord"
DISCORD = integration_admin.Platform(PLATFORM, "Discord application")
INTERACTIONS_PATH = "/v1/integrations/discord/interactions"
# Discord documents no tolerance; an older signed request is a replay (Slack and Standard
# Webhooks allow five minutes too).
SIGNATURE_TOLERANCE_SECONDS = 300
# Interaction ids already acted on are kept this long, past the tolerance, so a replay within it
# is refused rather than run twice (a second `/new` would unbind the chat the first one began).
SEEN_INTERACTION_SECONDS = 900
# Discord gives an interaction 3 s for its first answer; starting the turn may take this long
# before `/ask` is deferred anyway.
ACK_WITHIN_SECONDS = 2.0

# Interaction types and the callback types that answer them.
PING = 1
APPLICATION_COMMAND = 2
PONG = 1
CHANNEL_MESSAGE_WITH_SOURCE = 4
DEFERRED = 5  # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: "thinking…" until the answer is edited in
EPHEMERAL = 1 << 6
STRING_OPTION = 3

COMMANDS: list[dict[str, Any]] = [
    {
        "name": "ask",
        "type": 1,
        "description": "Ask the assistant; the answer continues this channel's conversation",
        "options": [
            {
                "type": STRING_OPTION,
                "name": "prompt",
                "description": "What to ask",
                "required": True,
                "max_length": 6000,
            }
        ],
    },
    {"name": "stop", "type": 1, "description": "Stop the answer being written in this channel"},
    {"name": "new", "type": 1, "description": "Start a new conversation in this channel"},
]

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"description": "Missing or invalid API key", **PROBLEM}}
FORBIDDEN: Responses = {403: {"description": "The API key is not an admin key", **PROBLEM}}
NOT_FOUND: Responses = {
    404: {"description": "The organization has no Discord application connected", **PROBLEM}
}
CONFLICT: Responses = {
    409: {"description": "The application is connected to another organization", **PROBLEM}
}
INVALID: Responses = {422: {"description": "Invalid parameters or body", **PROBLEM}}
UPSTREAM: Responses = {
    502: {"description": "Discord could not be reached or refused the bot token", **PROBLEM}
}


class DiscordIntegrationIn(RequestBody):
    """A Discord application to connect: from its Developer Portal page (General Information for
    the ids and key, Bot for the token)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    application_id: str = Field(
        alias="applicationId", pattern=r"^[0-9]{1,25}$", description="The application id."
    )
    public_key: str = Field(
        alias="publicKey",
        pattern=r"^[0-9a-fA-F]{64}$",
        description="The application's public key (hex): it checks interaction signatures.",
    )
    bot_token: str = Field(
        alias="botToken",
        min_length=1,
        max_length=200,
        pattern=r"^\S+$",
        description="The bot's token; stored encrypted and never shown again.",
    )

    @field_validator("public_key")
    @classmethod
    def _an_ed25519_key(cls, value: str) -> str:
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
        except ValueError:
            raise ValueError("not an Ed25519 public key") from None
        return value.lower()


class DiscordIntegrationPublic(BaseModel):
    """The connected application as admins read it: never its bot token."""

    applicationId: str  # noqa: N815 - wire names are camelCase
    publicKey: str  # noqa: N815
    hasBotToken: bool  # noqa: N815
    interactionsPath: str = Field(  # noqa: N815
        description="Where Discord must post interactions, under the api's public URL."
    )

    @classmethod
    def of(cls, record: IntegrationRecord) -> DiscordIntegrationPublic:
        return cls(
            applicationId=record.external_id,
            publicKey=str(record.settings.get("publicKey", "")),
            hasBotToken=bool(record.secrets.get("botToken")),
            interactionsPath=INTERACTIONS_PATH,
        )


class DiscordCommandOut(BaseModel):
    id: str | None
    name: str


class DiscordCommandsOut(BaseModel):
    commands: list[DiscordCommandOut] = Field(description="The commands Discord now has.")


def _box(state: AppState) -> SecretBox:
    return SecretBox.from_settings(state.settings)


@router.put(
    "",
    summary="Connect the organization's Discord application (or replace its keys)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **CONFLICT, **INVALID},
)
async def put_discord_integration(
    body: DiscordIntegrationIn, principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> DiscordIntegrationPublic:
    record = await integration_admin.connect(
        session,
        state,
        principal,
        DISCORD,
        external_id=body.application_id,
        secrets={"botToken": body.bot_token},
        # Not a secret: Discord shows it to anyone with the application's page.
        settings={"publicKey": body.public_key},
    )
    return DiscordIntegrationPublic.of(record)


@router.get(
    "",
    summary="The organization's connected Discord application (never its bot token)",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND},
)
async def get_discord_integration(
    principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> DiscordIntegrationPublic:
    return DiscordIntegrationPublic.of(
        await integration_admin.connected(session, state, principal, DISCORD)
    )


@router.delete(
    "",
    status_code=204,
    summary="Disconnect the Discord application: its interactions are refused from now on",
    responses={
        204: {"description": "Disconnected; the chats it started stay"},
        **UNAUTHORIZED,
        **FORBIDDEN,
        **NOT_FOUND,
    },
)
async def delete_discord_integration(principal: AdminPrincipal, session: SessionDep) -> Response:
    await integration_admin.disconnect(session, principal, DISCORD)
    return Response(status_code=204)


@router.post(
    "/commands",
    summary="Register the slash commands (/ask, /stop, /new) with Discord",
    description="Replaces the application's global commands with durachat's; Discord may take a "
    "moment to show them.",
    responses={**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **UPSTREAM},
)
async def register_discord_commands(
    principal: AdminPrincipal, session: SessionDep, state: StateDep
) -> DiscordCommandsOut:
    record = await integration_admin.connected(session, state, principal, DISCORD)
    # Discord may take a while: no database connection is held meanwhile.
    await session.close()
    url = f"{state.settings.discord_api_url.rstrip('/')}/applications/{record.external_id}/commands"
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(15.0)) as http:
            response = await http.put(
                url,
                json=COMMANDS,
                headers={"Authorization": f"Bot {record.secrets.get('botToken', '')}"},
            )
    except httpx.TransportError as exc:
        raise UpstreamError(f"Discord could not be reached: {type(exc).__name__}") from None
    if response.status_code in (401, 403):
        raise UpstreamError("Discord refused the bot token", extra={"status": response.status_code})
    if response.status_code >= 300:
        raise UpstreamError(
            "Discord did not register the commands", extra={"status": response.status_code}
        )
    registered = response.json() if response.content else []
    log.info(
        "discord.commands_registered",
        organization_id=principal.organization_id,
        application_id=record.external_id,
    )
    return DiscordCommandsOut(
        commands=[
            DiscordCommandOut(id=str(command.get("id")) if command.get("id") else None, name=name)
            for command in (registered if isinstance(registered, list) else [])
            if isinstance(command, dict) and isinstance(name := command.get("name"), str)
        ]
    )


# --- interactions ---------------------------------------------------------------------------


def signature_holds(public_key: str, signature: str, timestamp: str, body: bytes) -> bool:
    """Whether Discord signed `timestamp + body` with the application's key, recently."""
    try:
        signed_at = int(timestamp)
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key)).verify(
            bytes.fromhex(signature), timestamp.encode() + body
        )
    except (ValueError, InvalidSignature):
        return False
    return abs(time.time() - signed_at) <= SIGNATURE_TOLERANCE_SECONDS


def _refused() -> JSONResponse:
    # One answer for every refusal: an unknown application and a bad signature look the same.
    return problem_response(401, "Unauthorized", "invalid request signature")


def _ephemeral(text: str) -> JSONResponse:
    return JSONResponse(
        {"type": CHANNEL_MESSAGE_WITH_SOURCE, "data": {"content": text, "flags": EPHEMERAL}}
    )


@router.post("/interactions", include_in_schema=False)
async def discord_interaction(request: Request, state: StateDep) -> Response:
    """Discord's Interactions Endpoint URL: signed by Discord, no API key. Left out of the OpenAPI
    document, which describes what API-key holders call."""
    body = await request.body()
    signature = request.headers.get("X-Signature-Ed25519")
    timestamp = request.headers.get("X-Signature-Timestamp")
    try:
        interaction = json.loads(body)
    except ValueError:
        return _refused()
    application_id = interaction.get("application_id") if isinstance(interaction, dict) else None
    if not signature or not timestamp or not isinstance(application_id, str):
        return _refused()
    async with state.sessions() as session:
        record = await integrations.find_integration(
            session, _box(state), PLATFORM, application_id[:100]
        )
    public_key = str(record.settings.get("publicKey", "")) if record is not None else ""
    if record is None or not signature_holds(public_key, signature, timestamp, body):
        log.info("discord.interaction_refused", application_id=application_id[:100])
        return _refused()

    kind = interaction.get("type")
    if kind == PING:
        return JSONResponse({"type": PONG})
    interaction_id = str(interaction.get("id", ""))
    if not interaction_id or not await _first_delivery(state, application_id, interaction_id):
        log.info("discord.interaction_replayed", application_id=application_id)
        return _refused()
    if kind != APPLICATION_COMMAND:
        return _ephemeral("durachat answers only its slash commands: /ask, /stop and /new.")
    command = Command.of(interaction, record)
    log.info(
        "discord.command",
        organization_id=record.organization_id,
        application_id=application_id,
        interaction_id=interaction_id,
        command=command.name,
        channel=command.channel,
    )
    if command.name == "ask":
        return await _ask(state, command)
    if command.name == "stop":
        return await _stop(state, command)
    if command.name == "new":
        return await _new(state, command)
    return _ephemeral(f"durachat does not know /{command.name[:32]}.")


async def _first_delivery(state: AppState, application_id: str, interaction_id: str) -> bool:
    key = f"discord:interaction:{application_id}:{interaction_id[:64]}"
    return bool(await state.redis.set(key, "1", nx=True, ex=SEEN_INTERACTION_SECONDS))


class Command:
    """A signed slash command, in the organization of the application it was signed for."""

    def __init__(
        self,
        *,
        record: IntegrationRecord,
        interaction_id: str,
        name: str,
        options: dict[str, Any],
        channel_id: str,
        guild_id: str | None,
        token: str,
    ) -> None:
        self.organization_id = record.organization_id
        self.application_id = record.external_id
        self.interaction_id = interaction_id
        self.name = name
        self.options = options
        self.channel_id = channel_id
        # Threads are channels in Discord, so a thread is a chat of its own; DMs have no guild.
        self.channel = f"{guild_id or 'dm'}:{channel_id}"
        self.token = token

    @classmethod
    def of(cls, interaction: dict[str, Any], record: IntegrationRecord) -> Command:
        given = interaction.get("data")
        data: dict[str, Any] = given if isinstance(given, dict) else {}
        options = {
            str(option.get("name")): option.get("value")
            for option in data.get("options") or []
            if isinstance(option, dict)
        }
        channel = interaction.get("channel")
        channel_id = interaction.get("channel_id") or (
            channel.get("id") if isinstance(channel, dict) else None
        )
        return cls(
            record=record,
            interaction_id=str(interaction.get("id")),
            name=str(data.get("name", "")),
            options=options,
            channel_id=str(channel_id or ""),
            guild_id=str(interaction["guild_id"]) if interaction.get("guild_id") else None,
            token=str(interaction.get("token", "")),
        )


async def _ask(state: AppState, command: Command) -> Response:
    prompt = command.options.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _ephemeral("Ask something: `/ask prompt:<your question>`.")
    if not command.channel_id or not command.token:
        return _ephemeral("This interaction has no channel to answer in.")
    start = asyncio.create_task(_start_answer(state, command, prompt, time.time()))
    done, _ = await asyncio.wait({start}, timeout=ACK_WITHIN_SECONDS)
    if start in done:
        refusal = start.result()
        return _ephemeral(refusal) if refusal else JSONResponse({"type": DEFERRED})
    # Starting is slow (a worker just starting, a busy Temporal): Discord must hear within 3 s or
    # the interaction fails, so defer now and finish the start once the answer is sent.
    log.warning("discord.ask_deferred_before_start", interaction_id=command.interaction_id)
    return JSONResponse(
        {"type": DEFERRED}, background=BackgroundTask(_finish_late, state, command, start)
    )


async def _start_answer(
    state: AppState, command: Command, prompt: str, issued_at: float
) -> str | None:
    """Start the turn and the workflow relaying its answer; the refusal to show, if refused."""
    try:
        accepted = await start_channel_turn(
            state,
            organization_id=command.organization_id,
            source=PLATFORM,
            channel_id=command.channel,
            text=prompt,
            event_key=command.interaction_id,
        )
    except DurachatError as exc:
        # A refusal (a spent budget, a too-long message, too many running turns) is the asker's to
        # read, as the chat endpoints would have told them.
        return f"durachat could not start this answer: {exc.detail}"[:2000]
    reply = DiscordReplyInput(
        organization_id=command.organization_id,
        application_id=command.application_id,
        channel_id=command.channel_id,
        turn_id=accepted.turn_id,
        assistant_message_id=accepted.assistant_message_id,
        sealed_token=_box(state).seal({"token": command.token}),
        token_issued_at=issued_at,
    )
    await start_reply_once(
        state, DiscordReplyWorkflow.run, reply, workflow_id=reply_workflow_id(accepted.turn_id)
    )
    return None


async def _finish_late(state: AppState, command: Command, start: asyncio.Task[str | None]) -> None:
    """Wait for a start that outlasted the acknowledgement; a refusal replaces the deferred
    response, since no relay will."""
    try:
        refusal = await start
    except Exception:
        log.exception("discord.ask_start_failed", interaction_id=command.interaction_id)
        refusal = "durachat could not start this answer; try /ask again."
    if refusal is None:
        return
    path = f"/webhooks/{command.application_id}/{TOKEN_PLACEHOLDER}/messages/@original"
    try:
        async with httpx.AsyncClient(
            base_url=state.settings.discord_api_url.rstrip("/"),
            transport=TokenHidingTransport(command.token),
            timeout=httpx.Timeout(10.0),
        ) as http:
            await http.patch(path, json={"content": refusal})
    except httpx.HTTPError as exc:
        log.warning("discord.refusal_not_shown", error=type(exc).__name__)


async def _stop(state: AppState, command: Command) -> Response:
    stopped = await stop_channel_turn(
        state,
        organization_id=command.organization_id,
        source=PLATFORM,
        channel_id=command.channel,
    )
    if stopped is None:
        return _ephemeral("Nothing is being answered in this channel.")
    return _ephemeral("Stopped: the answer keeps what it had written.")


async def _new(state: AppState, command: Command) -> Response:
    try:
        async with state.sessions.begin() as session:
            unbound = await chats.unbind_channel(
                session, command.organization_id, PLATFORM, command.channel
            )
    except ChatBusy:
        return _ephemeral("An answer is still being written here: wait for it or /stop it first.")
    if unbound is None:
        return _ephemeral("This channel has no conversation yet: /ask starts one.")
    return _ephemeral("New conversation: the next /ask here starts afresh.")
