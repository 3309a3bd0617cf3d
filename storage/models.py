"""SQLAlchemy 2.0 table mappings for Postgres. Must never import api, workflows or activities."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names keep Alembic migrations reproducible.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[dict[str, Any]]: JSONB}


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Organization(Base):
    __tablename__ = "organization"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # "provider/model" for turns that name no model, under the user's own default.
    default_model: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()


class ApiKey(Base):
    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    # A key bound to a user sees only that user's chats; a key without one acts for the organization.
    user_id: Mapped[str | None] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    name: Mapped[str | None] = mapped_column(String(200))
    # The first characters of the secret, safe to show so people can tell keys apart.
    display_prefix: Mapped[str] = mapped_column(String(16))
    # Only a SHA-256 of the secret is stored: secrets are 256-bit random, so a slow hash adds nothing.
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index(None, "organization_id"),)


class Chat(Base):
    __tablename__ = "chat"

    # Chat ids are scoped to an organization: AI SDK clients choose their own chat ids, and one
    # tenant's choice must never collide with, or reveal, another tenant's chat.
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organization.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(200))
    title: Mapped[str | None] = mapped_column(String(500))
    pinned: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    instructions: Mapped[str | None] = mapped_column(Text)
    # The chat's default model, for sends that name none.
    model: Mapped[str | None] = mapped_column(String(200))
    # serious, friendly or normal (NULL): a line of the system prompt.
    mood: Mapped[str | None] = mapped_column(String(16))
    folder: Mapped[str | None] = mapped_column(String(100))
    # Offer the built-in web tools to sends that do not say (`web` on a send overrides it).
    web: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Toolkits offered to sends that name none of their own (`toolkitIds` on a send overrides).
    toolkit_ids: Mapped[list[str] | None] = mapped_column(JSONB)
    external_source: Mapped[str | None] = mapped_column(String(32))
    external_id: Mapped[str | None] = mapped_column(String(200))
    # The leaf of the branch the chat shows; walking parent_id from it gives the conversation.
    active_leaf_id: Mapped[str | None] = mapped_column(String(64))
    # The turn holding the chat's session lease; NULL when no turn is running.
    active_turn_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "uq_chat_live_external_channel",
            "organization_id",
            "external_source",
            "external_id",
            unique=True,
            postgresql_where=text("deleted_at IS NULL AND external_id IS NOT NULL"),
        ),
        Index(
            "ix_chat_live_by_recency",
            "organization_id",
            "user_id",
            text("updated_at DESC"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
        Index("ix_chat_deleted_at", "deleted_at", postgresql_where=text("deleted_at IS NOT NULL")),
    )


class Message(Base):
    __tablename__ = "message"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    chat_id: Mapped[str] = mapped_column(String(64))
    # Edits and regenerations are siblings under one parent, never overwrites.
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("message.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    parts: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    status: Mapped[str] = mapped_column(String(16))
    turn_id: Mapped[str | None] = mapped_column(String(64))
    # The id the client gave its own copy of this message (AI SDK `messages[].id`), when it gave one.
    client_message_id: Mapped[str | None] = mapped_column(String(200))
    message_metadata: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        ForeignKeyConstraint(
            ["organization_id", "chat_id"], ["chat.organization_id", "chat.id"], ondelete="CASCADE"
        ),
        Index(None, "organization_id", "chat_id", "created_at"),
        Index(None, "parent_id"),
    )


class Turn(Base):
    __tablename__ = "turn"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    chat_id: Mapped[str] = mapped_column(String(64))
    user_message_id: Mapped[str] = mapped_column(String(64))
    assistant_message_id: Mapped[str] = mapped_column(String(64))
    workflow_id: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    # queued, running, completed, aborted, failed, or rejected (a queued turn that could not run)
    status: Mapped[str] = mapped_column(String(16))
    # While queued: the turn's place in its chat's queue (lowest runs first); NULL otherwise.
    queue_position: Mapped[int | None] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    # True when the provider reported no usage before the turn ended (a stop): the token counts
    # are estimated from the prompt and the text streamed.
    usage_estimated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Of input_tokens: read from and written to the provider's prompt cache. Of output_tokens:
    # spent on reasoning. All summed over every attempt the provider billed.
    cached_input_tokens: Mapped[int | None] = mapped_column(Integer)
    cache_write_tokens: Mapped[int | None] = mapped_column(Integer)
    reasoning_tokens: Mapped[int | None] = mapped_column(Integer)
    # Exact USD from the usage and the catalog's prices (or the provider's own reported charge).
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))
    # How the model was chosen: {"requested", "model", "reason", "fallbacks"}.
    model_choice: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # One entry per generation attempt: model, outcome, tokens and cost.
    attempt_log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    # Messages of the history left out so the prompt fits the model's context window.
    messages_left_out: Mapped[int | None] = mapped_column(Integer)
    # A SHA-256 of the request that started the turn under an `Idempotency-Key`: a later request
    # with the same key must be the same request.
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # The tools the turn offers its model (core.contracts.TurnTools as JSON); NULL offers none.
    tools: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # While queued: the user message the turn will store when it runs, so chat reads can show it.
    queued_user_parts: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        ForeignKeyConstraint(
            ["organization_id", "chat_id"], ["chat.organization_id", "chat.id"], ondelete="CASCADE"
        ),
        Index(None, "organization_id", "chat_id", "created_at"),
        Index(
            "ix_turn_queued_by_chat",
            "organization_id",
            "chat_id",
            "queue_position",
            postgresql_where=text("status = 'queued'"),
        ),
    )


class Attachment(Base):
    """A file a user gave a chat: one row per stored object (the original; an image's model-ready
    variant is named beside it)."""

    __tablename__ = "attachment"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    # The user of a user-keyed organization who gave it; only that user reads it.
    user_id: Mapped[str | None] = mapped_column(String(200))
    # Set once the file belongs to a chat (uploaded to one, or sent in one); NULL for an upload
    # through `/v1/files` not used yet.
    chat_id: Mapped[str | None] = mapped_column(String(64))
    # The user message that first carried it; NULL while no message has (swept after a while).
    message_id: Mapped[str | None] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    # Sniffed from the bytes, never the client's word; for a remote file not fetched yet, the type
    # the client declared.
    media_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # The object's name under the organization's prefix in the store.
    object_name: Mapped[str] = mapped_column(String(300))
    # An image's normalized copy, sent to models (EXIF orientation applied, downscaled, re-encoded).
    variant_name: Mapped[str | None] = mapped_column(String(300))
    variant_media_type: Mapped[str | None] = mapped_column(String(100))
    # A file named by an https URL, fetched and stored by the turn.
    source_url: Mapped[str | None] = mapped_column(Text)
    # pending (a remote file not fetched yet, or an upload whose bytes are being written), stored,
    # or failed (`error` says why).
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        ForeignKeyConstraint(
            ["organization_id", "chat_id"], ["chat.organization_id", "chat.id"], ondelete="CASCADE"
        ),
        Index(None, "organization_id", "chat_id"),
        Index(
            "ix_attachment_unattached_by_age",
            "created_at",
            postgresql_where=text("message_id IS NULL"),
        ),
    )


class UserPreference(Base):
    """A user's own settings within an organization."""

    __tablename__ = "user_preference"

    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organization.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    default_model: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = _now()


# The `budget.user_id` of an organization's own budget (a user's budget names the user).
ORGANIZATION_BUDGET = ""


class Budget(Base):
    """Spending limits in USD: the organization's (user_id "") or one user's; NULL is no limit."""

    __tablename__ = "budget"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(200))
    weekly_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))
    per_chat_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (PrimaryKeyConstraint("organization_id", "user_id"),)


class UsageEntry(Base):
    """The usage ledger: one row per turn, reserved when the turn is accepted, settled when it ends.

    Keyed by turn, so every crash, retry and replay writes the same row: a turn's spend counts
    exactly once. Chats are not referenced: deleting a chat must not refund what it spent.
    """

    __tablename__ = "usage_ledger"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    turn_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(200))
    chat_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    # reserved (the turn runs; `reserved_usd` counts against budgets), settled (`cost_usd` does),
    # or released (the turn never ran; nothing counts)
    state: Mapped[str] = mapped_column(String(16))
    reserved_usd: Mapped[Decimal] = mapped_column(Numeric(20, 10))
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))
    input_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cached_input_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    cache_write_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    reasoning_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = _now()
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        PrimaryKeyConstraint("organization_id", "turn_id"),
        Index(None, "organization_id", "created_at"),
        Index(None, "organization_id", "user_id", "created_at"),
        Index(None, "organization_id", "chat_id"),
    )


class ToolApproval(Base):
    """A tool call waiting for (or given) a person's decision before it runs.

    The row is the durable record the api checks a decision against: the call's stored input (never
    a client's copy), its turn's owner and its pending state. The turn workflow waits on it by id.
    """

    __tablename__ = "tool_approval"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    id: Mapped[str] = mapped_column(String(64))
    chat_id: Mapped[str] = mapped_column(String(64))
    turn_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(64))
    tool_call_id: Mapped[str] = mapped_column(String(200))
    tool_name: Mapped[str] = mapped_column(String(200))
    input: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # The user the turn was sent for; None for a turn sent with an organization key and no user.
    user_id: Mapped[str | None] = mapped_column(String(200))
    # pending, approved, denied, or expired (nobody decided in time: the call counts as denied)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    decided_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        PrimaryKeyConstraint("organization_id", "id"),
        Index(None, "organization_id", "chat_id", "status"),
    )


class Toolkit(Base):
    """An MCP server an organization's admins registered: the tools it serves can be offered to
    the organization's turns.

    `secrets` is a SecretBox-sealed JSON object (`headers`, `token`): the only copy of what the
    server's requests carry, never read back by any endpoint. Deleting a toolkit deletes the row, so
    its secrets go with it.
    """

    __tablename__ = "toolkit"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    id: Mapped[str] = mapped_column(String(64))
    # A slug (`^[a-z][a-z0-9_]{0,30}$`): it prefixes the names its tools are offered under.
    name: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    url: Mapped[str] = mapped_column(Text)
    secrets: Mapped[str] = mapped_column(Text)
    # The server's tool names offered (NULL: all); names needing a person's approval (["*"]: all).
    allowed_tools: Mapped[list[str] | None] = mapped_column(JSONB)
    approval_tools: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        PrimaryKeyConstraint("organization_id", "id"),
        Index("uq_toolkit_organization_id_name", "organization_id", "name", unique=True),
    )


class WebhookEndpoint(Base):
    """A URL an organization's admins registered to receive events (Standard Webhooks).

    `secrets` is a SecretBox-sealed JSON object (`current`, and `previous` while a rotation's
    overlap lasts, until `previous_secret_expires_at`): never read back by any endpoint.
    """

    __tablename__ = "webhook_endpoint"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    id: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    # The event types delivered (core.contracts.WebhookEvent values).
    events: Mapped[list[str]] = mapped_column(JSONB)
    secrets: Mapped[str] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    # Why it was disabled automatically (a 410, or too many failed deliveries in a row).
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # Deliveries that failed for good since the last one delivered.
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (PrimaryKeyConstraint("organization_id", "id"),)


class WebhookDelivery(Base):
    """One event sent to one endpoint (or to a one-off URL), and every attempt at it.

    The id is the Standard Webhooks `webhook-id`, the same on every attempt, derived from the event
    and its target so a repeated announcement creates nothing twice. Deleting an endpoint deletes
    its deliveries.
    """

    __tablename__ = "webhook_delivery"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    id: Mapped[str] = mapped_column(String(64))
    # NULL for a one-off URL, which `url` then holds.
    endpoint_id: Mapped[str | None] = mapped_column(String(64))
    url: Mapped[str | None] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(64))
    # What is sent: {"type", "timestamp", "data"}, under 20 kB.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # pending, delivered or failed
    status: Mapped[str] = mapped_column(String(16))
    # One {"at", "statusCode", "durationMs", "error"} per attempt, oldest first.
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(
        JSONB, server_default=text("'[]'::jsonb")
    )
    created_at: Mapped[datetime] = _now()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        PrimaryKeyConstraint("organization_id", "id"),
        ForeignKeyConstraint(
            ["organization_id", "endpoint_id"],
            ["webhook_endpoint.organization_id", "webhook_endpoint.id"],
            name="fk_webhook_delivery_endpoint",
            ondelete="CASCADE",
        ),
        Index(None, "organization_id", "endpoint_id", "created_at"),
    )


class WebhookOneOffSecret(Base):
    """The organization's secret for deliveries to one-off URLs (a URL given with a send rather
    than registered), sealed like an endpoint's and rotated the same way."""

    __tablename__ = "webhook_one_off_secret"

    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organization.id", ondelete="CASCADE"), primary_key=True
    )
    secrets: Mapped[str] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Integration(Base):
    """A chat platform an organization connected (a Slack workspace, a Discord application).

    `external_id` (the Slack team id, the Discord application id) is how an incoming event finds
    its organization before its signature is checked with that organization's secret; one
    workspace or application belongs to one organization.
    """

    __tablename__ = "integration"

    organization_id: Mapped[str] = mapped_column(ForeignKey("organization.id", ondelete="CASCADE"))
    platform: Mapped[str] = mapped_column(String(16))  # slack or discord
    external_id: Mapped[str] = mapped_column(String(100))
    # Sealed with the secrets key (core.secrets.SecretBox): signing secret, public key, bot token.
    secrets: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        PrimaryKeyConstraint("organization_id", "platform"),
        Index("uq_integration_platform_external_id", "platform", "external_id", unique=True),
    )
