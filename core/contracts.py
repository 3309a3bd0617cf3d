"""Contract types shared by the api, the turn workflow and its activities. Pure data: no I/O, sandbox-safe."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

TURN_WORKFLOW_NAME = "ChatTurnWorkflow"

# Custom search attributes (all Keyword) that let operators find a chat's turns in the Temporal UI/CLI.
# The dev launcher registers exactly these names; production registers them once per namespace.
SEARCH_ATTRIBUTE_NAMES = (
    "DurachatOrganizationId",
    "DurachatChatId",
    "DurachatTurnId",
    "DurachatModel",
    "DurachatProvider",
    "DurachatStatus",
)


class ChatMode(StrEnum):
    """How a send finds its chat."""

    CREATE = "create"  # a new chat with the id the api chose
    CONTINUE = "continue"  # an existing live chat of the caller; else ChatNotFound
    CREATE_OR_CONTINUE = "create_or_continue"  # AI SDK clients pick the chat id themselves
    CHANNEL = "channel"  # the live chat bound to an external channel, created on first use


class TurnKind(StrEnum):
    """What a turn adds to the chat's message tree."""

    SEND = "send"  # a new user message after the active leaf, and its answer
    REGENERATE = "regenerate"  # a new answer beside an earlier one, to the same user message
    EDIT = "edit"  # a new user message beside an earlier one (same parent), and its answer


class IfBusy(StrEnum):
    """What a turn does when its chat already has a running turn."""

    REJECT = "reject"  # refuse it (409 with the running turn's id)
    QUEUE = "queue"  # wait durably behind the running turn and any turns queued before it
    INTERRUPT = "interrupt"  # stop the running turn, then run first


class TurnStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    # Only a workflow result and search attribute: the chat was not found or busy, nothing was stored.
    REJECTED = "rejected"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"
    # Only a search attribute: the turn waits for a person's approval or its client's tool outputs.
    AWAITING_INPUT = "awaiting-input"


class MessageStatus(StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass
class ExternalChannel:
    source: str
    id: str


@dataclass
class SeedMessage:
    """An earlier message given with a chat's first send, stored as the start of its history."""

    role: str
    parts: list[dict[str, Any]]


@dataclass
class ClientTool:
    """A tool the client declared on a send and runs itself (the AI SDK's client-side tools)."""

    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass
class TurnTools:
    """The tools a turn offers its model. Stored on the turn row; activities read them by turn id."""

    # None: as the chat's `web` setting says (activities read it with the turn's tools).
    web: bool | None = None
    client_tools: list[ClientTool] = field(default_factory=list)
    toolkit_ids: list[str] = field(default_factory=list)
    # Single toolkit tools to offer (their exposed names); None offers every allowed tool.
    functions: list[str] | None = None


@dataclass
class TurnInput:
    organization_id: str
    user_id: str | None
    turn_id: str
    chat_mode: ChatMode
    chat_id: str | None
    user_message_id: str
    assistant_message_id: str
    user_parts: list[dict[str, Any]]
    model: str
    provider: str
    system: str | None = None
    provider_options: dict[str, Any] = field(default_factory=dict)
    external_channel: ExternalChannel | None = None
    history_seed: list[SeedMessage] = field(default_factory=list)
    client_message_id: str | None = None
    kind: TurnKind = TurnKind.SEND
    # REGENERATE: the message to answer again (an assistant message, or the user message it answers).
    # EDIT: the user message the new one replaces as a sibling.
    target_message_id: str | None = None
    if_busy: IfBusy = IfBusy.REJECT
    # Set for a send with an `Idempotency-Key`: a digest of the request (path and body), so a later
    # request with the same key is recognised as the same request or refused as a different one.
    request_fingerprint: str | None = None
    # How `model` was chosen ({"requested", "model", "reason", "fallbacks"}), for the turn record
    # and the `start` chunk's metadata.
    model_choice: dict[str, Any] | None = None
    # Models of the same tier to try, in order, when `model` keeps failing after its retries.
    fallback_models: list[str] = field(default_factory=list)
    # The tools the model may call, and how many model steps the turn may take (one without tools).
    tools: TurnTools | None = None
    max_steps: int = 1
    # How long a tool call waits for a person's approval (or a client-side tool for its output).
    approval_timeout_seconds: float = 86_400.0
    # A send's own completion webhook (besides the organization's registered ones).
    webhook_url: str | None = None


@dataclass
class AcceptTurnRequest:
    """The api's update asking a just-started turn workflow to answer once the turn is accepted."""

    turn_id: str
    # The fingerprint of the request asking; a repeat of an idempotent send must match the first.
    request_fingerprint: str | None = None


@dataclass
class TurnAccepted:
    chat_id: str
    turn_id: str
    user_message_id: str
    assistant_message_id: str
    # Set while the turn waits behind others: 1 runs next.
    queue_position: int | None = None
    # The running turn an `interrupt` turn stopped.
    interrupted_turn_id: str | None = None


@dataclass
class ClaimSessionResult:
    chat_id: str
    created: bool
    # Where the turn's new message hangs in the tree.
    parent_message_id: str | None
    # REGENERATE: the stored user message the turn answers (no new user message is stored).
    answered_message_id: str | None = None
    # Set when the chat is busy and the turn waits in its queue instead (1 runs next); the turn has
    # not claimed the chat then.
    queue_position: int | None = None
    # An `interrupt` turn that queued first: the running turn it must stop.
    interrupted_turn_id: str | None = None
    # A queued turn: the turn that held the chat when it queued, if one did.
    holder_turn_id: str | None = None

    @property
    def queued(self) -> bool:
        return self.queue_position is not None


@dataclass
class DropQueuedTurnInput:
    """A queued turn that will never run: stopped while it waited, or its chat or message went away."""

    organization_id: str
    chat_id: str
    turn_id: str
    status: TurnStatus  # ABORTED or REJECTED
    reason: str


@dataclass
class StoreUserMessageInput:
    turn: TurnInput
    chat_id: str
    parent_message_id: str | None
    workflow_id: str
    run_id: str
    # Only a chat this turn created takes the history seed; an existing chat's history is the server's.
    chat_created: bool = False
    # A regeneration: the stored user message to answer; no new user message is stored.
    answered_message_id: str | None = None


@dataclass
class PrepareAttachmentsInput:
    """Fetch a turn's remote files into the store and make its images model-ready, by id."""

    organization_id: str
    chat_id: str
    turn_id: str
    model: str
    attachment_ids: list[str]


def attachment_ids_in(parts: list[dict[str, Any]]) -> list[str]:
    """The attachments stored message parts refer to (`file` parts with an `attachmentId`), in
    order, each once."""
    ids: list[str] = []
    for part in parts:
        attachment_id = part.get("attachmentId") if part.get("type") == "file" else None
        if isinstance(attachment_id, str) and attachment_id not in ids:
            ids.append(attachment_id)
    return ids


@dataclass
class GenerateReplyInput:
    organization_id: str
    chat_id: str
    turn_id: str
    user_message_id: str
    assistant_message_id: str
    model: str
    system: str | None
    provider_options: dict[str, Any]
    # The model before this one failed after its retries: the stream drops what it showed first.
    replaces_failed_model: str | None = None
    # Attempts the turn's earlier models used: this model's attempts are numbered after them.
    attempt_offset: int = 0
    # The model step (1-based): a step after the first continues the same assistant message, after
    # the tool results of the step before.
    step: int = 1
    # The step bound: the last step's tool calls are not run.
    max_steps: int = 1
    # Pages the step before's tools cited ({"url", "title"}): this step opens with them as
    # `source-url` parts.
    sources: list[dict[str, str | None]] = field(default_factory=list)


class ToolRunner(StrEnum):
    """Who runs a tool call."""

    SERVER = "server"  # a built-in tool or a toolkit's, as an activity of the turn
    CLIENT = "client"  # the client, which sends the output back


@dataclass
class ToolCallDescriptor:
    """A tool call of a step, small enough for workflow history: its input stays in Postgres."""

    call_id: str
    name: str
    runner: ToolRunner
    needs_approval: bool = False


@dataclass
class RunToolInput:
    organization_id: str
    chat_id: str
    turn_id: str
    assistant_message_id: str
    call_id: str
    # fail_tool_call: the error the call ends with.
    error: str | None = None


@dataclass
class RunToolResult:
    is_error: bool
    # Pages the output cites ({"url", "title"}), for the next step's `source-url` parts.
    sources: list[dict[str, str | None]] = field(default_factory=list)


class PauseReason(StrEnum):
    """Why a turn waits for its client between steps."""

    APPROVAL = "approval"  # a tool call waits for a person's decision
    CLIENT_TOOLS = "client-tools"  # the client runs tool calls and sends their outputs back


@dataclass
class PauseTurnInput:
    """Ask for approvals (when any), then end the client's response with a pausing `finish`."""

    organization_id: str
    chat_id: str
    turn_id: str
    assistant_message_id: str
    user_id: str | None
    step: int
    approval_call_ids: list[str]
    client_call_ids: list[str]
    approval_timeout_seconds: float


@dataclass
class PendingApproval:
    approval_id: str
    call_id: str


@dataclass
class ApprovalDecision:
    """A person's decision on a pending approval (the api checked owner and organization)."""

    approval_id: str
    approved: bool
    reason: str | None = None
    decided_by: str | None = None


@dataclass
class ClientToolOutputs:
    """The client stored the outputs of these calls in the assistant message (the api did)."""

    call_ids: list[str]


@dataclass
class ResumeTurnInput:
    """After a pause: record decisions (denied and expired ones get their outcome), and open the
    client's next response with `start`."""

    organization_id: str
    chat_id: str
    turn_id: str
    assistant_message_id: str
    model: str
    step: int
    decisions: list[ApprovalDecision]
    expired_approval_ids: list[str]
    client_call_ids: list[str]
    # The turn was stopped while it waited: undecided approvals end with that reason.
    stopped: bool = False


@dataclass
class GenerateReplyResult:
    finish_reason: str
    input_tokens: int
    output_tokens: int
    ttft_ms: int | None
    attempt: int
    # True when a stop ended generation early; the partial answer is stored.
    stopped: bool = False
    # True when the provider reported no usage and the token counts are estimates.
    usage_estimated: bool = False
    # Oldest history messages left out of the prompt to fit the model's context window.
    messages_left_out: int = 0
    # The step's tool calls that are to run (finish reason "tool-calls"); calls whose input was
    # refused already hold their error in the message.
    tool_calls: list[ToolCallDescriptor] = field(default_factory=list)
    # The model called tools in the turn's last allowed step: they were not run, the turn ends.
    step_limit_reached: bool = False


@dataclass
class PersistAssistantMessageInput:
    organization_id: str
    chat_id: str
    turn_id: str
    assistant_message_id: str
    status: MessageStatus
    model: str
    attempts: int
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    ttft_ms: int | None = None
    duration_ms: int | None = None
    error: str | None = None
    usage_estimated: bool = False
    # The user the turn was sent for: whose spend the usage ledger settles.
    user_id: str | None = None
    messages_left_out: int | None = None
    # Model steps the turn took (tools run between steps), and whether it stopped at its bound.
    steps: int | None = None
    step_limit_reached: bool = False


@dataclass
class PurgeDeletedChatsInput:
    """Purge chats deleted at least `retention_seconds` ago (of one organization, or of all)."""

    retention_seconds: int
    organization_id: str | None = None
    # Also delete files uploaded this long ago that no message carries (None: leave them).
    unattached_file_retention_seconds: int | None = None


@dataclass
class TitleChatInput:
    organization_id: str
    chat_id: str


# The turn workflow's signal that wakes a queued turn; named here so code that cannot import the
# workflow (storage.lost_turns) signals it by the same name.
CHAT_RELEASED_SIGNAL = "chat_released"


@dataclass
class ChatReleased:
    """Signal to the head of a chat's queue: the turn before it has let go of the chat."""

    released_by_turn_id: str


@dataclass
class StopTurnRequest:
    """Signal: stop the turn's generation and keep the partial answer."""

    reason: str = "user"


@dataclass
class TurnResult:
    chat_id: str
    turn_id: str
    assistant_message_id: str
    status: TurnStatus
    error: str | None = None


def turn_status_for(message_status: MessageStatus) -> TurnStatus:
    """A finished turn's status follows its assistant message's final status."""
    return {
        MessageStatus.COMPLETE: TurnStatus.COMPLETED,
        MessageStatus.ABORTED: TurnStatus.ABORTED,
        MessageStatus.FAILED: TurnStatus.FAILED,
    }[message_status]


def turn_workflow_id(turn_id: str) -> str:
    """The workflow id of a turn: derived from the turn id, so a repeated start attaches to the same run."""
    return f"turn-{turn_id}"


# --- webhooks ---------------------------------------------------------------------------------------

# Named here so code that cannot import the workflow (the announcing activity) starts it by name.
WEBHOOK_DELIVERY_WORKFLOW_NAME = "WebhookDeliveryWorkflow"


class WebhookEvent(StrEnum):
    """The events webhook endpoints subscribe to."""

    TURN_COMPLETED = "turn.completed"
    TURN_FAILED = "turn.failed"
    TURN_ABORTED = "turn.aborted"
    # The turn paused for a person's decision on one or more tool calls.
    APPROVAL_REQUESTED = "approval.requested"


@dataclass
class AnnounceEventInput:
    """Announce a turn's event to the organization's subscribed webhook endpoints (and to
    `one_off_url`, if given). Ids only: the activity reads the rest from Postgres."""

    organization_id: str
    event_type: WebhookEvent
    chat_id: str
    turn_id: str
    one_off_url: str | None = None
    # approval.requested: the step that paused, so each pause of a turn is an event of its own.
    step: int | None = None


@dataclass
class DeliveryRetry:
    """How a delivery retries: exponential backoff from `initial_seconds` up to
    `max_interval_seconds`, for `for_seconds` in all; one attempt gets `attempt_timeout_seconds`."""

    initial_seconds: float
    max_interval_seconds: float
    for_seconds: float
    attempt_timeout_seconds: float


@dataclass
class WebhookDeliveryInput:
    """One delivery's workflow: its ids and retry figures, never its payload or a secret."""

    organization_id: str
    delivery_id: str
    retry: DeliveryRetry


@dataclass
class DeliverInput:
    organization_id: str
    delivery_id: str


class WebhookErrorType:
    """`ApplicationError.type` values of delivery attempts (core.errors.ErrorType's kind)."""

    # The receiver answered other than 2xx, or not at all: retried.
    UNDELIVERED = "WebhookUndelivered"
    # The outbound guard refuses the URL: final.
    REFUSED = "WebhookRefused"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass
class DeliveryAttemptResult:
    """How a delivery ended: delivered, or failed without retries (410, its endpoint disabled or
    deleted). `status_code` is the receiver's answer when one was sent."""

    delivery_id: str
    status: DeliveryStatus
    status_code: int | None = None


@dataclass
class GiveUpInput:
    organization_id: str
    delivery_id: str


def webhook_delivery_workflow_id(delivery_id: str) -> str:
    """One workflow id per delivery: announcing twice attaches to the run already going."""
    return f"webhook-delivery-{delivery_id}"
