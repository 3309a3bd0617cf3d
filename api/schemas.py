"""Request and response schemas of the chat endpoints. Input, storage and output never share a class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Self

import httpx
import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from agent_tools.mcp import TOOLKIT_NAME_PATTERN
from api.file_intake import GivenFile, given_file_of
from core.contracts import ClientTool, IfBusy, SeedMessage, TurnKind
from providers.catalog import Tier
from storage.chats import iso
from storage.models import Attachment, Chat
from storage.toolkits import ToolkitRecord

CHAT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ChatId = Annotated[
    str, Field(pattern=CHAT_ID_PATTERN, description="A chat id: 1-64 of A-Z a-z 0-9 _ -")
]

MessageId = Annotated[
    str,
    Field(pattern=CHAT_ID_PATTERN, description="A message id, as a chat read returns it."),
]


def _unstorable_text_at(value: Any) -> str | None:
    """Where `value` holds text Postgres cannot store (NUL, or a lone surrogate), if anywhere: the
    first such place in document order, as a dotted path (`messages.0.parts.1.text`), `""` for the
    value itself.

    Iterative, so its cost is one step per value whatever the nesting: a recursive walk overflowed
    the stack on a body some hundreds of levels deep.
    """
    # Values still to look at, last in first out: (value, where its container is, its key there).
    pending: list[tuple[Any, str, str | None]] = [(value, "", None)]
    while pending:
        current, parent, name = pending.pop()
        if name is None:
            where = parent
        elif not _storable(name):
            return parent
        else:
            where = f"{parent}.{name}" if parent else name
        if isinstance(current, str):
            if not _storable(current):
                return where
        elif isinstance(current, dict):
            # Reversed, so that the answer is the first such place in the body.
            pending.extend((item, where, str(key)) for key, item in reversed(current.items()))
        elif isinstance(current, list):
            pending.extend(
                (current[index], where, str(index)) for index in reversed(range(len(current)))
            )
    return None


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class RequestBody(BaseModel):
    """A request body. Its text is checked before anything else: text that cannot be stored would
    otherwise fail the turn's storage step on every retry."""

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        where = _unstorable_text_at(data)
        if where is not None:
            raise ValueError(
                f"`{where or 'body'}` holds a NUL character or a lone surrogate, which cannot be stored"
            )
        return data


# Parts a stored message may carry: text and files from users; the assistant kinds are what a client
# may echo back in the history it sends with a new chat.
_SEED_PART_TYPES = frozenset({"text", "file", "reasoning", "step-start"})

FileIds = Annotated[
    list[Annotated[str, Field(pattern=CHAT_ID_PATTERN)]],
    Field(
        description="Files uploaded earlier (`POST /v1/files` or `POST /v1/chats/{chatId}/attachments`) "
        "to send with the message, by id."
    ),
]


class ExternalChannelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["discord", "slack", "dashboard", "api"]
    id: str = Field(min_length=1, max_length=200)


class MessageIn(BaseModel):
    """A message as `{role, content}` or as an AI SDK UIMessage with `parts`."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "oneOf": [
                {"required": ["content"], "properties": {"content": {"type": "string"}}},
                {"required": ["parts"], "properties": {"parts": {"type": "array"}}},
            ]
        },
    )

    id: str | None = Field(default=None, max_length=200)
    role: Literal["user", "assistant", "system"]
    content: str | None = None
    parts: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_or_parts(self) -> MessageIn:
        if (self.content is None) == (self.parts is None):
            raise ValueError("a message has exactly one of `content` or `parts`")
        # Malformed parts are the caller's error here, not a failure when the turn is built.
        self.stored_parts()
        return self

    def stored_parts(self) -> list[dict[str, Any]]:
        if self.content is not None:
            return [{"type": "text", "text": self.content}]
        assert self.parts is not None
        kept = [part for part in self.parts if part.get("type") in _SEED_PART_TYPES]
        for part in kept:
            if part.get("type") == "file":
                if self.role != "user":
                    raise ValueError("only user messages carry files")
                given_file_of(part)  # raises for a part that names no file
            elif part.get("type") != "step-start" and not isinstance(part.get("text"), str):
                raise ValueError(f"a {part.get('type')} part needs a string `text`")
        return kept

    def text(self) -> str:
        return "".join(
            str(part.get("text", "")) for part in self.stored_parts() if part.get("type") == "text"
        )


IF_BUSY_DESCRIPTION = (
    "While another turn of the chat runs (or turns wait in its queue): `reject` answers 409 with its "
    "`turnId`; `queue` waits durably behind it and every turn queued before, then runs in that "
    "order; `interrupt` stops the running turn (its partial answer is kept) and then runs first."
)


@dataclass(frozen=True)
class ModelRequest:
    """How a request asks for its model: by name, by provider, by tier, or not at all."""

    model: str | None = None  # "provider/model", or "auto"
    provider: str | None = None  # a provider (or alias) alone; "default" is the caller's default
    tier: Tier | None = None

    def describe(self) -> str | None:
        """The request as the turn record shows it."""
        if self.model:
            return self.model
        if self.provider:
            return f"provider:{self.provider}"
        if self.tier:
            return f"tier:{self.tier}"
        return None


MODEL_DESCRIPTION = (
    "`provider/model`, or `auto` to let the server choose from what the message needs; "
    "left out, the chat's model, then the caller's, the organization's and the server's default."
)
PROVIDER_DESCRIPTION = (
    "A provider alone (`anthropic` or `claude`, `google`, `openai`, `groq`, `openrouter`, "
    "`ollama`, ...): its default model. `default` is the caller's default model."
)
TIER_DESCRIPTION = "A tier alone: its configured model, or its cheapest available one."


class ModelChoiceIn(RequestBody):
    """The three ways a send names its model; at most one of them."""

    model: str | None = Field(default=None, max_length=200, description=MODEL_DESCRIPTION)
    provider: str | None = Field(default=None, max_length=100, description=PROVIDER_DESCRIPTION)
    tier: Tier | None = Field(default=None, description=TIER_DESCRIPTION)

    @model_validator(mode="after")
    def _one_way_to_name_the_model(self) -> Self:
        named = [name for name in ("model", "provider", "tier") if getattr(self, name)]
        if len(named) > 1:
            raise ValueError(f"give one of model, provider and tier, not {' and '.join(named)}")
        return self

    def model_request(self) -> ModelRequest:
        return ModelRequest(self.model, self.provider, self.tier)


@dataclass
class NewTurn:
    """What a request asks a turn to do, whichever endpoint it came through."""

    kind: TurnKind
    user_parts: list[dict[str, Any]]
    model: ModelRequest
    system: str | None
    provider_options: dict[str, dict[str, Any]]
    target_message_id: str | None = None
    external_channel: ExternalChannelIn | None = None
    history_seed: list[SeedMessage] = field(default_factory=list)
    client_message_id: str | None = None
    if_busy: IfBusy = IfBusy.REJECT
    # Files given beside the message's parts (`fileIds`, a seed-style `image`); they go first.
    extra_files: list[GivenFile] = field(default_factory=list)
    # An edit that names no files of its own keeps the files of the message it replaces.
    keeps_edited_files: bool = False
    # What the model may call (a send's `web`, `tools`, `toolkitIds`, `functions`, `maxSteps`).
    tool_options: ToolOptionsIn | None = None
    # Where to announce this turn's end, besides the organization's webhooks.
    webhook_url: str | None = None

    def text(self) -> str:
        return "".join(
            str(part.get("text", "")) for part in self.user_parts if part.get("type") == "text"
        )


class TurnOptionsIn(ModelChoiceIn):
    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(default=None, max_length=100_000)
    provider_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, alias="providerOptions"
    )
    if_busy: IfBusy = Field(default=IfBusy.REJECT, alias="ifBusy", description=IF_BUSY_DESCRIPTION)


class RegenerateRequest(TurnOptionsIn):
    """A new answer beside an earlier one; the earlier one stays in the tree."""

    def as_new_turn(self, message_id: str) -> NewTurn:
        return NewTurn(
            TurnKind.REGENERATE,
            [],
            self.model_request(),
            self.system,
            self.provider_options,
            message_id,
            if_busy=self.if_busy,
        )


class EditRequest(TurnOptionsIn):
    """A new user message beside an earlier one (the earlier one and its answers stay), and its answer."""

    content: str = Field(min_length=1, description="The edited message text.")
    file_ids: FileIds | None = Field(
        default=None,
        alias="fileIds",
        description="Files for the edited message, replacing the original's; left out, the edit "
        "keeps the original message's files.",
    )
    files: list[dict[str, Any]] | None = Field(
        default=None,
        description="AI SDK `file` parts (`data:` or https URLs) for the edited message, replacing "
        "the original's files.",
    )

    @model_validator(mode="after")
    def _valid_file_parts(self) -> EditRequest:
        for part in self.files or []:
            if part.get("type") != "file":
                raise ValueError("`files` holds AI SDK `file` parts only")
            given_file_of(part)
        return self

    def as_new_turn(self, message_id: str) -> NewTurn:
        parts = [*(self.files or []), {"type": "text", "text": self.content}]
        return NewTurn(
            TurnKind.EDIT,
            parts,
            self.model_request(),
            self.system,
            self.provider_options,
            message_id,
            if_busy=self.if_busy,
            extra_files=[GivenFile(attachment_id=item) for item in self.file_ids or []],
            keeps_edited_files=self.file_ids is None and self.files is None,
        )


class BranchRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    message_id: str = Field(
        alias="messageId", max_length=64, description="Show the branch through this message."
    )


TOOL_NAME_PATTERN = r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$"


class ClientToolIn(BaseModel):
    """A tool the client runs itself (AI SDK client-side tools); the model may call it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=TOOL_NAME_PATTERN, description="What the model calls it.")
    description: str = Field(default="", max_length=4_000)
    input_schema: dict[str, Any] = Field(
        alias="inputSchema",
        description="A JSON Schema (an object schema) the call's input is checked against "
        "before it reaches the client.",
    )

    @field_validator("input_schema")
    @classmethod
    def _an_object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type", "object") != "object":
            raise ValueError("a tool's inputSchema describes an object (`type: object`)")
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"inputSchema is not a valid JSON Schema: {exc.message}") from exc
        return value

    def as_contract(self) -> ClientTool:
        return ClientTool(self.name, self.description, self.input_schema)


class ToolOptionsIn(BaseModel):
    """What a send lets its model call, and how many model steps its turn may take."""

    web: bool | None = Field(
        default=None,
        description="Offer the built-in `web_search` and `web_fetch` tools (default: the chat's "
        "`web` setting).",
    )
    tools: list[ClientToolIn] | None = Field(default=None, max_length=64)
    toolkit_ids: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, alias="toolkitIds", max_length=16
    )
    functions: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=128, description="Single toolkit tools to offer, by name."
    )
    max_steps: int | None = Field(
        default=None,
        alias="maxSteps",
        ge=1,
        description="How many model steps the turn may take (tools run between steps).",
    )
    approval_timeout_seconds: float | None = Field(
        default=None,
        alias="approvalTimeoutSeconds",
        gt=0,
        description="How long a tool call waits for approval (or a client-side tool for its "
        "output) before it counts as denied; at most the server's setting (default 24 h).",
    )

    @model_validator(mode="after")
    def _unique_tool_names(self) -> Self:
        names = [tool.name for tool in self.tools or []]
        if len(names) != len(set(names)):
            raise ValueError("two tools in `tools` have the same name")
        return self


class SendMessageRequest(ModelChoiceIn, ToolOptionsIn):
    """A send: the durachat shape, or the exact body the AI SDK's DefaultChatTransport posts."""

    model_config = ConfigDict(
        extra="forbid",
        # What `_one_source_of_the_new_message` checks, told to the OpenAPI document as well.
        json_schema_extra={
            "oneOf": [
                {"required": ["message"], "properties": {"message": {"type": "string"}}},
                {
                    "required": ["messages"],
                    "properties": {"messages": {"type": "array", "minItems": 1}},
                },
            ]
        },
    )

    message: str | None = Field(default=None, description="The new user message as plain text.")
    messages: list[MessageIn] | None = Field(
        default=None,
        description="Messages; the last one is the new user message. For a new chat the earlier ones seed its history.",
    )
    system: str | None = Field(default=None, max_length=100_000)
    external_channel_id: ExternalChannelIn | None = Field(default=None, alias="externalChannelId")
    provider_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, alias="providerOptions"
    )
    if_busy: IfBusy = Field(default=IfBusy.REJECT, alias="ifBusy", description=IF_BUSY_DESCRIPTION)
    file_ids: FileIds | None = Field(default=None, alias="fileIds")
    image: str | None = Field(
        default=None,
        description="An image for the new message, base64-encoded (no `data:` prefix).",
    )
    image_mime_type: str | None = Field(
        default=None, alias="imageMimeType", max_length=100, description="The `image`'s type."
    )
    webhook_url: str | None = Field(
        default=None,
        alias="webhookUrl",
        max_length=2_000,
        pattern=r"^https?://",
        description="Also announce this turn's end (turn.completed, turn.failed, turn.aborted) "
        "and its approval requests to this URL, signed with the organization's one-off webhook "
        "secret (Standard Webhooks).",
    )
    # DefaultChatTransport fields.
    id: ChatId | None = Field(default=None, description="The chat id (AI SDK clients choose it).")
    trigger: Literal["submit-message", "regenerate-message"] | None = None
    message_id: str | None = Field(default=None, alias="messageId", max_length=200)
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source_of_the_new_message(self) -> SendMessageRequest:
        if (self.message is None) == (not self.messages):
            raise ValueError("send exactly one of `message` or a non-empty `messages`")
        if self.messages and self.messages[-1].role != "user" and not self.continues_answer:
            raise ValueError(
                "the last of `messages` must be the new user message (role `user`), or the "
                "assistant message a `submit-message` continues"
            )
        if self.image_mime_type is not None and self.image is None:
            raise ValueError("`imageMimeType` describes an `image`, and none was sent")
        return self

    def new_user_parts(self) -> list[dict[str, Any]]:
        if self.message is not None:
            return [{"type": "text", "text": self.message}]
        assert self.messages
        return [
            part
            for part in self.messages[-1].stored_parts()
            if part.get("type") in ("text", "file")
        ]

    def extra_files(self) -> list[GivenFile]:
        files = [GivenFile(attachment_id=item) for item in self.file_ids or []]
        if self.image is not None:
            files.insert(
                0,
                GivenFile(
                    declared_type=self.image_mime_type,
                    data_url=f"data:{self.image_mime_type or ''};base64,{self.image}",
                ),
            )
        return files

    def new_user_text(self) -> str:
        return "".join(
            str(part["text"]) for part in self.new_user_parts() if part.get("type") == "text"
        )

    def as_new_turn(self) -> NewTurn:
        if self.trigger == "regenerate-message":
            # The AI SDK names the assistant message to answer again; without one, the latest.
            return NewTurn(
                TurnKind.REGENERATE,
                [],
                self.model_request(),
                self.system,
                self.provider_options,
                self.message_id,
                if_busy=self.if_busy,
                tool_options=self,
            )
        return NewTurn(
            TurnKind.SEND,
            self.new_user_parts(),
            self.model_request(),
            self.system,
            self.provider_options,
            external_channel=self.external_channel_id,
            history_seed=self.history_seed(),
            client_message_id=self.client_message_id(),
            if_busy=self.if_busy,
            extra_files=self.extra_files(),
            tool_options=self,
            webhook_url=self.webhook_url,
        )

    def client_message_id(self) -> str | None:
        return self.messages[-1].id if self.messages else None

    @property
    def continues_answer(self) -> bool:
        """The AI SDK's answer to a paused turn: its tool approvals or client-side tool outputs,
        on the assistant message it continues (the last message)."""
        return (
            self.trigger == "submit-message"
            and bool(self.messages)
            and self.messages is not None
            and self.messages[-1].role == "assistant"
        )

    def history_seed(self) -> list[SeedMessage]:
        if not self.messages:
            return []
        return [
            SeedMessage(role=item.role, parts=item.stored_parts()) for item in self.messages[:-1]
        ]


class UsageOut(BaseModel):
    inputTokens: int | None = None  # noqa: N815 - wire names follow the AI SDK
    outputTokens: int | None = None  # noqa: N815
    totalTokens: int | None = None  # noqa: N815
    cachedInputTokens: int | None = Field(  # noqa: N815
        default=None, description="Of inputTokens, read from the provider's prompt cache."
    )
    cacheWriteTokens: int | None = Field(  # noqa: N815
        default=None, description="Of inputTokens, written to the provider's prompt cache."
    )
    reasoningTokens: int | None = Field(  # noqa: N815
        default=None, description="Of outputTokens, spent on reasoning."
    )
    estimated: bool = Field(
        default=False,
        description="The provider reported no usage (the turn was stopped before its last "
        "chunk): the counts are estimated from the prompt and the text streamed.",
    )


class UIMessageOut(BaseModel):
    id: str
    role: str
    siblingIds: list[str] = Field(  # noqa: N815
        default_factory=list,
        description="This message and its siblings (edits, regenerations) in creation order; the client can show `2 of 3`.",
    )
    parts: list[dict[str, Any]]
    metadata: dict[str, Any]
    status: Literal["queued", "streaming", "complete", "aborted", "failed"] = Field(
        description="`queued`: the user message of a turn waiting in the chat's queue (it joins "
        "the message tree when its turn runs)."
    )
    createdAt: str  # noqa: N815


class ExternalChannelOut(BaseModel):
    source: str
    id: str


Mood = Literal["serious", "friendly", "normal"]


class ChatSummaryOut(BaseModel):
    """A chat without its messages, as lists show it."""

    id: str
    title: str | None
    pinned: bool
    model: str | None = Field(description="The default model of sends that name none.")
    instructions: str | None = Field(description="The chat's own system prompt.")
    mood: Mood
    web: bool = Field(description="Sends that do not say offer the built-in web tools.")
    toolkitIds: list[str] = Field(  # noqa: N815
        description="Toolkits offered to sends that name none of their own."
    )
    folder: str | None
    externalChannel: ExternalChannelOut | None  # noqa: N815
    activeTurnId: str | None  # noqa: N815
    createdAt: str  # noqa: N815
    updatedAt: str  # noqa: N815

    @classmethod
    def fields_of(cls, chat: Chat) -> dict[str, Any]:
        return {
            "id": chat.id,
            "title": chat.title,
            "pinned": chat.pinned,
            "model": chat.model,
            "instructions": chat.instructions,
            "mood": chat.mood or "normal",
            "web": chat.web,
            "toolkitIds": chat.toolkit_ids or [],
            "folder": chat.folder,
            "externalChannel": (
                ExternalChannelOut(source=chat.external_source, id=chat.external_id)
                if chat.external_source and chat.external_id
                else None
            ),
            "activeTurnId": chat.active_turn_id,
            "createdAt": iso(chat.created_at),
            "updatedAt": iso(chat.updated_at),
        }


class ChatPageOut(BaseModel):
    items: list[ChatSummaryOut]
    total: int = Field(description="How many chats match, over all pages.")
    limit: int
    offset: int


class ChatUpdateIn(RequestBody):
    """The chat settings to change; a field left out stays as it is, `null` clears it."""

    model_config = ConfigDict(extra="forbid")

    title: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
        | None
    ) = None
    pinned: bool = False
    instructions: str | None = Field(default=None, max_length=20_000)
    model: str | None = Field(default=None, max_length=200, description="`provider/model`")
    mood: Mood | None = None
    web: bool = Field(default=False, description="Offer the built-in web tools to sends.")
    toolkit_ids: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, alias="toolkitIds", max_length=16
    )
    folder: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
        | None
    ) = None


class TruncateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep: int = Field(ge=0, le=1_000_000, description="How many of the newest messages to keep.")


class TruncateOut(BaseModel):
    kept: int
    deleted: int


class MessagePageOut(BaseModel):
    messages: list[UIMessageOut] = Field(description="Oldest to newest.")
    hasMore: bool = Field(description="Older messages exist; ask with `before` = the first id.")  # noqa: N815


class TurnRecordOut(BaseModel):
    id: str
    status: str
    model: str
    attempts: int
    userMessageId: str  # noqa: N815
    assistantMessageId: str  # noqa: N815
    usage: UsageOut = Field(description="Summed over every attempt the provider billed.")
    costUsd: str | None = Field(  # noqa: N815
        description="What the turn cost, exact decimal USD, from its usage and the catalog prices."
    )
    modelChoice: dict[str, Any] | None = Field(  # noqa: N815
        description="How the model was chosen: `requested`, `model`, `reason`, `fallbacks`."
    )
    attemptLog: list[dict[str, Any]] = Field(  # noqa: N815
        description="Each generation attempt: model, outcome, tokens and cost (a fallback to "
        "another model shows both models' attempts)."
    )
    messagesLeftOut: int = Field(  # noqa: N815
        description="Oldest history messages left out so the prompt fit the model's context window."
    )
    ttftMs: int | None  # noqa: N815
    durationMs: int | None  # noqa: N815
    finishReason: str | None  # noqa: N815
    error: str | None
    workflowId: str  # noqa: N815
    runId: str | None  # noqa: N815
    createdAt: str  # noqa: N815
    completedAt: str | None  # noqa: N815


class TurnPageOut(BaseModel):
    items: list[TurnRecordOut] = Field(description="Newest first.")
    total: int
    limit: int
    offset: int


class AttachmentOut(BaseModel):
    id: str
    filename: str
    mediaType: str  # noqa: N815
    size: int

    @classmethod
    def of(cls, attachment: Attachment) -> AttachmentOut:
        return cls(
            id=attachment.id,
            filename=attachment.filename,
            mediaType=attachment.media_type,
            size=attachment.size or 0,
        )


class UploadedFileOut(AttachmentOut):
    """A stored upload; send it with a message by listing its id in `fileIds`."""

    url: str = Field(
        description="Where the file reads back: a signed link valid for a while (chat uploads), "
        "or the upload's own route, read with the API key (`POST /v1/files`)."
    )
    createdAt: str  # noqa: N815


class ChatUsageOut(UsageOut):
    """What a chat's finished turns used and cost, summed."""

    turns: int = Field(description="Finished turns counted.")
    costUsd: str = Field(description="Exact decimal USD.")  # noqa: N815


class ChatOut(ChatSummaryOut):
    usage: ChatUsageOut = Field(description="The chat's usage and cost over its finished turns.")
    queuedTurnIds: list[str] = Field(  # noqa: N815
        description="Turns waiting for the active one to end (`ifBusy: queue`), first in line first."
    )
    messages: list[UIMessageOut] = Field(description="The active branch, oldest first.")
    attachments: list[AttachmentOut] = Field(
        default_factory=list, description="The chat's stored files, oldest first."
    )


class TurnOut(BaseModel):
    """The answer of a non-streaming send."""

    chatId: str  # noqa: N815
    turnId: str  # noqa: N815
    status: str
    message: UIMessageOut | None = Field(
        description="The answer; null for a queued turn that ended before it ran (stopped, or its "
        "chat or message went away)."
    )
    usage: UsageOut


class StopRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    turn_id: str | None = Field(
        default=None,
        alias="turnId",
        max_length=64,
        description="The turn to stop: the active one (stopped only if it still is), or a queued "
        "one (it will not run).",
    )


class StopOut(BaseModel):
    stopped: bool = Field(description="True when a turn was running and has been told to stop.")
    turnId: str | None  # noqa: N815


# --- toolkits (MCP servers) -----------------------------------------------------------------------

# Headers the MCP transport sets itself, and hop-by-hop ones: a toolkit may not set them.
RESERVED_TOOLKIT_HEADERS = frozenset(
    {
        "accept",
        "connection",
        "content-length",
        "content-type",
        "host",
        "keep-alive",
        "last-event-id",
        "mcp-protocol-version",
        "mcp-session-id",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
MAX_TOOLKIT_HEADERS = 20
MAX_TOOLKIT_TOOLS = 200

ToolkitName = Annotated[
    str,
    Field(
        pattern=TOOLKIT_NAME_PATTERN,
        description="A slug unique in the organization (a-z, 0-9 and _, starting with a letter, at "
        "most 31 characters): models call its tools `<name>__<tool>`.",
        examples=["glossary"],
    ),
]
ToolkitUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2_048,
        description="The MCP server's streamable HTTP endpoint, http or https, without "
        "credentials (give those as `token` or `headers`).",
        examples=["https://mcp.example.com/mcp"],
    ),
]
ToolkitDescription = Annotated[str, Field(max_length=1_000, description="What the toolkit is for.")]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")]
HeaderValue = Annotated[str, StringConstraints(max_length=4_000, pattern=r"^[^\r\n\x00]*$")]
ToolkitHeaders = Annotated[
    dict[HeaderName, HeaderValue],
    Field(
        max_length=MAX_TOOLKIT_HEADERS,
        description="Extra request headers for the server (`X-Api-Key`, ...); write-only: answers "
        "name them but never show a value.",
    ),
]
ToolkitToken = Annotated[
    str,
    Field(
        pattern=r"^[\x21-\x7e]{1,4096}$",
        description="Sent as `Authorization: Bearer <token>`; write-only: answers say only "
        "`hasToken`.",
    ),
]
McpToolName = Annotated[str, StringConstraints(pattern=r"^\S{1,128}$")]
ToolNameList = Annotated[list[McpToolName], Field(max_length=MAX_TOOLKIT_TOOLS)]


def check_toolkit_url(url: str | None) -> str | None:
    """`url` when it is an http(s) URL with a host and no credentials (where it leads is the
    outbound guard's to judge)."""
    if url is None:
        return None
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError("must be an http or https URL")
    if not parsed.host:
        raise ValueError("must name a host")
    if parsed.userinfo:
        raise ValueError("may not carry credentials: give them as `token` or `headers`")
    if parsed.fragment:
        raise ValueError("may not have a fragment")
    return url


def check_toolkit_headers(headers: dict[str, str], *, with_token: bool) -> dict[str, str]:
    names = [name.lower() for name in headers]
    if len(set(names)) != len(names):
        raise ValueError("headers names a header twice (names are case-insensitive)")
    reserved = sorted(set(names) & RESERVED_TOOLKIT_HEADERS)
    if reserved:
        raise ValueError(f"headers may not set {', '.join(reserved)}: the MCP transport does")
    if with_token and "authorization" in names:
        raise ValueError("give either `token` or an Authorization header, not both")
    return headers


def check_tool_names(names: list[str] | None) -> list[str] | None:
    if names is not None and len(set(names)) != len(names):
        raise ValueError("names a tool twice")
    return names


class ToolkitCreate(RequestBody):
    """A new toolkit: an MCP server whose tools the organization's turns may call."""

    model_config = ConfigDict(extra="forbid")

    name: ToolkitName
    description: ToolkitDescription = ""
    url: ToolkitUrl
    headers: ToolkitHeaders = Field(default_factory=dict)
    token: ToolkitToken | None = None
    allowed_tools: ToolNameList | None = Field(
        default=None,
        alias="allowedTools",
        description="The server's tool names offered to turns; null or left out: every tool.",
    )
    approval_tools: ToolNameList = Field(
        default_factory=list,
        alias="approvalTools",
        description='Tool names that wait for a person\'s approval before they run; ["*"]: all.',
    )
    enabled: bool = Field(default=True, strict=True)

    _url = field_validator("url")(check_toolkit_url)
    _tool_names = field_validator("allowed_tools", "approval_tools")(check_tool_names)

    @model_validator(mode="after")
    def _token_or_authorization(self) -> Self:
        check_toolkit_headers(self.headers, with_token=self.token is not None)
        return self


class ToolkitUpdate(RequestBody):
    """Changes to a toolkit: fields left out stay as they are. `headers` replaces every header
    (`{}` or null: none); `token: null` removes the token; `allowedTools: null` offers every tool."""

    model_config = ConfigDict(extra="forbid")

    name: ToolkitName | None = None
    description: ToolkitDescription | None = None
    url: ToolkitUrl | None = None
    headers: ToolkitHeaders | None = None
    token: ToolkitToken | None = None
    allowed_tools: ToolNameList | None = Field(default=None, alias="allowedTools")
    approval_tools: ToolNameList | None = Field(default=None, alias="approvalTools")
    enabled: bool | None = Field(default=None, strict=True)

    _url = field_validator("url")(check_toolkit_url)
    _tool_names = field_validator("allowed_tools", "approval_tools")(check_tool_names)

    @field_validator("name", "description", "url", "approval_tools", "enabled", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # Left out keeps a field; null would mean nothing for these.
        if value is None:
            raise ValueError("may not be null (leave it out to keep it)")
        return value

    @model_validator(mode="after")
    def _token_or_authorization(self) -> Self:
        if self.headers is not None:
            # A token kept from before is the router's to check: it knows the toolkit.
            check_toolkit_headers(self.headers, with_token=self.token is not None)
        return self


class ToolkitPublic(BaseModel):
    """A toolkit as admins read it: header names and whether a token is set, never a secret."""

    id: str
    name: str
    description: str
    url: str
    headerNames: list[str] = Field(  # noqa: N815 - wire names are camelCase
        description="The names of the extra headers sent; their values are never shown."
    )
    hasToken: bool = Field(description="Whether a bearer token is set.")  # noqa: N815
    allowedTools: list[str] | None = Field(  # noqa: N815
        description="The server's tool names offered; null: every tool."
    )
    approvalTools: list[str]  # noqa: N815
    enabled: bool
    createdAt: str  # noqa: N815
    updatedAt: str  # noqa: N815

    @classmethod
    def of(cls, record: ToolkitRecord) -> ToolkitPublic:
        return cls(
            id=record.id,
            name=record.name,
            description=record.description,
            url=record.url,
            headerNames=record.header_names,
            hasToken=record.has_token,
            allowedTools=record.allowed_tools,
            approvalTools=record.approval_tools,
            enabled=record.enabled,
            createdAt=iso(record.created_at),
            updatedAt=iso(record.updated_at),
        )


class ToolkitListOut(BaseModel):
    items: list[ToolkitPublic] = Field(description="By name.")


class ToolkitToolOut(BaseModel):
    """One tool the toolkit's server offers, as turns would offer it to a model."""

    name: str = Field(description="The name models call it by: `<toolkit>__<tool>`.")
    toolName: str = Field(description="The server's own name for it.")  # noqa: N815
    description: str
    inputSchema: dict[str, Any] = Field(description="JSON Schema of its input.")  # noqa: N815
    needsApproval: bool = Field(  # noqa: N815
        description="Whether a call waits for a person's approval before it runs."
    )


class ToolkitToolsOut(BaseModel):
    toolkitId: str  # noqa: N815
    tools: list[ToolkitToolOut] = Field(description="In the server's order, allow list applied.")
