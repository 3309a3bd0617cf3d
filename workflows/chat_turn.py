"""ChatTurnWorkflow: one run per chat turn, from claiming the chat to the stored answer. No I/O here.

The api starts a run with update-with-start and its `accept_turn` update answers once the chat is
claimed and the user message is stored. Tokens never pass through this workflow: the generation
activity streams them into Redis and Postgres, and history carries ids and small figures only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
    TimeoutError,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.attachments import AttachmentActivities
    from activities.chat_session import ChatSessionActivities
    from activities.generation import GenerationActivities
    from activities.tools import TOOL_MAX_ATTEMPTS, ToolActivities
    from activities.webhooks import WebhookActivities
    from core.contracts import (
        CHAT_RELEASED_SIGNAL,
        TURN_WORKFLOW_NAME,
        AcceptTurnRequest,
        AnnounceEventInput,
        ApprovalDecision,
        ChatMode,
        ChatReleased,
        ClaimSessionResult,
        ClientToolOutputs,
        DropQueuedTurnInput,
        GenerateReplyInput,
        GenerateReplyResult,
        MessageStatus,
        PauseTurnInput,
        PersistAssistantMessageInput,
        PrepareAttachmentsInput,
        ResumeTurnInput,
        RunToolInput,
        StopTurnRequest,
        StoreUserMessageInput,
        TitleChatInput,
        ToolCallDescriptor,
        ToolRunner,
        TurnAccepted,
        TurnInput,
        TurnResult,
        TurnStatus,
        WebhookEvent,
        attachment_ids_in,
        turn_status_for,
        turn_workflow_id,
    )
    from core.errors import ErrorType
    from workflows import search_attributes
    from workflows.webhook_delivery import ANNOUNCE_RETRY, ANNOUNCE_TIMEOUT

# The session steps (claim, store the user message, persist the answer, drop a queued turn) are
# short Postgres transactions, run as local activities: inside the workflow task that needs them,
# with no round trip through the server. The turn is accepted after one workflow task, which also
# schedules generation (the "early return" pattern). A worker that dies during one loses the
# workflow task, and the next worker runs the step again: every step is idempotent.
#
# Postgres writes retry without an attempt limit: a database that is down for a while must delay the
# turn, never lose it. Only a rejected claim is final. The retries stay local (each pause is under
# the worker's local retry threshold, and the worker heartbeats the workflow task meanwhile).
SESSION_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=[
        ErrorType.CHAT_NOT_FOUND,
        ErrorType.CHAT_BUSY,
        ErrorType.MESSAGE_NOT_FOUND,
    ],
)
SESSION_TIMEOUT = timedelta(seconds=15)

# Provider failures retry a few times with backoff; a provider's Retry-After overrides the interval
# (the activity raises with next_retry_delay). Rejections (4xx) are not retried.
GENERATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=4,
    non_retryable_error_types=[ErrorType.PROVIDER_REJECTED],
)
GENERATION_TIMEOUT = timedelta(minutes=10)
# Short, so a dead worker's generation is retried elsewhere within seconds.
GENERATION_HEARTBEAT_TIMEOUT = timedelta(seconds=5)

# Preparing files retries network trouble, a remote server's 5xx and an unreachable object store
# until the overall timeout; a file that cannot be used (4xx, refused type or address, too large)
# is final at once.
ATTACHMENTS_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=[ErrorType.ATTACHMENT_REFUSED],
)
ATTACHMENTS_ATTEMPT_TIMEOUT = timedelta(minutes=2)
ATTACHMENTS_TIMEOUT = timedelta(minutes=10)
ATTACHMENTS_HEARTBEAT_TIMEOUT = timedelta(seconds=20)

# A tool call retries trouble that may pass (its backend's 5xx, timeouts) a few times; a dead
# worker's call is noticed by its heartbeat and run again elsewhere. Its last attempt stores the
# failure as the call's error, which the model reads (activities/tools.py).
TOOL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=TOOL_MAX_ATTEMPTS,
)
TOOL_TIMEOUT = timedelta(minutes=2)
TOOL_HEARTBEAT_TIMEOUT = timedelta(seconds=5)
# Pausing, resuming and failing a call are short Postgres and Redis writes.
TOOL_BOOKKEEPING_TIMEOUT = timedelta(seconds=15)

# Titling a new chat is best effort: a few tries, then the chat stays untitled.
TITLE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=3)
TITLE_TIMEOUT = timedelta(seconds=30)

# A queued turn is woken by the turn before it (the `chat_released` signal); it also looks again on
# this period, so a wake-up that never came (that turn's workflow was terminated) only delays it.
QUEUE_RECHECK = timedelta(seconds=60)
# Claim rejections that end the turn: the chat or message is not there, or the chat is busy.
CLAIM_REJECTIONS = (ErrorType.CHAT_NOT_FOUND, ErrorType.CHAT_BUSY, ErrorType.MESSAGE_NOT_FOUND)
# Runs recorded before turns announced their end to webhooks replay without the announcement.
ANNOUNCE_TURN_EVENTS_PATCH = "announce-turn-events"
TURN_EVENTS = {
    TurnStatus.COMPLETED: WebhookEvent.TURN_COMPLETED,
    TurnStatus.FAILED: WebhookEvent.TURN_FAILED,
    TurnStatus.ABORTED: WebhookEvent.TURN_ABORTED,
}
# Runs recorded before the session steps were local activities replay with regular ones.
LOCAL_SESSION_STEPS_PATCH = "local-session-steps"

StepInput = TypeVar("StepInput")
StepResult = TypeVar("StepResult")


@workflow.defn(name=TURN_WORKFLOW_NAME)
class ChatTurnWorkflow:
    @workflow.init
    def __init__(self, turn: TurnInput) -> None:
        self._turn = turn
        self._accepted: TurnAccepted | None = None
        self._queued: TurnAccepted | None = None
        self._rejection: ApplicationError | None = None
        self._stop: StopTurnRequest | None = None
        self._chat_released = False
        self._local_session_steps = False
        # Model steps: attempts used so far (attempts are numbered across the turn), the model in
        # use (an index into the turn's model and its fallbacks) and the model each step began with.
        self._attempts_used = 0
        self._model_index = 0
        self._step_first_model: dict[int, int] = {}
        # A pause between steps: the approvals and client-side calls waited on, and what came in.
        self._pending_approvals: dict[str, str] = {}
        self._decisions: dict[str, ApprovalDecision] = {}
        self._awaited_client_calls: set[str] = set()
        self._client_outputs: set[str] = set()
        # What earlier pauses waited on (a late answer to one is refused, not kept waiting), and
        # whether the run is ending (answers still waiting are refused then).
        self._past_approvals: set[str] = set()
        self._past_client_calls: set[str] = set()
        self._closing = False

    @workflow.run
    async def run(self, turn: TurnInput) -> TurnResult:
        info = workflow.info()
        self._local_session_steps = workflow.patched(LOCAL_SESSION_STEPS_PATCH)
        try:
            claim = await self._claim(turn)
        except (ActivityError, ApplicationError) as err:
            rejection = _claim_rejection(err)
            if rejection is None:
                raise
            self._rejection = rejection
            workflow.upsert_search_attributes(
                [search_attributes.STATUS.value_set(TurnStatus.REJECTED)]
            )
            await self._finish_handlers()
            return TurnResult(
                chat_id=turn.chat_id or "",
                turn_id=turn.turn_id,
                assistant_message_id=turn.assistant_message_id,
                status=TurnStatus.REJECTED,
                error=rejection.type,
            )
        workflow.upsert_search_attributes([search_attributes.CHAT_ID.value_set(claim.chat_id)])
        if claim.queued:
            waited = await self._wait_in_queue(turn, claim)
            if isinstance(waited, TurnStatus):
                await self._finish_handlers()
                return TurnResult(
                    chat_id=claim.chat_id,
                    turn_id=turn.turn_id,
                    assistant_message_id=turn.assistant_message_id,
                    status=waited,
                )
            claim = waited

        await self._session_step(
            ChatSessionActivities.store_user_message,
            StoreUserMessageInput(
                turn=turn,
                chat_id=claim.chat_id,
                parent_message_id=claim.parent_message_id,
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                chat_created=claim.created,
                answered_message_id=claim.answered_message_id,
            ),
        )
        user_message_id = claim.answered_message_id or turn.user_message_id
        self._accepted = TurnAccepted(
            chat_id=claim.chat_id,
            turn_id=turn.turn_id,
            user_message_id=user_message_id,
            assistant_message_id=turn.assistant_message_id,
        )

        started = workflow.now()
        outcome = PersistAssistantMessageInput(
            organization_id=turn.organization_id,
            chat_id=claim.chat_id,
            turn_id=turn.turn_id,
            assistant_message_id=turn.assistant_message_id,
            status=MessageStatus.COMPLETE,
            model=turn.model,
            attempts=0,
            user_id=turn.user_id,
        )
        if self._stop is None and not await self._prepare_attachments(turn, claim.chat_id, outcome):
            pass  # a file could not be used: `outcome` says why, and nothing is generated
        elif self._stop is None:
            await self._generate(turn, claim.chat_id, user_message_id, outcome)
        else:
            outcome.status = MessageStatus.ABORTED
            outcome.finish_reason = "other"
        outcome.duration_ms = int((workflow.now() - started).total_seconds() * 1000)

        next_turn_id = await self._session_step(
            ChatSessionActivities.persist_assistant_message, outcome
        )
        status = turn_status_for(outcome.status)
        workflow.upsert_search_attributes([search_attributes.STATUS.value_set(status)])
        if next_turn_id is not None:
            await self._hand_over(turn.turn_id, next_turn_id)
        # Histories recorded before turns announced their end to webhooks replay without it.
        event = TURN_EVENTS.get(status)
        if event is not None and workflow.patched(ANNOUNCE_TURN_EVENTS_PATCH):
            await self._announce(turn, claim.chat_id, event)
        # Histories recorded before chats were titled replay without this step.
        if claim.created and workflow.patched("title-new-chats"):
            await self._title_chat(turn.organization_id, claim.chat_id)
        await self._finish_handlers()
        # A failed turn closes its workflow as failed, so operators find it by execution status;
        # its outcome is stored and its stream ended by now. Histories recorded before this
        # completed such turns, and replay that way.
        if status is TurnStatus.FAILED and workflow.patched("fail-failed-turns"):
            raise ApplicationError(
                outcome.error or "generation failed",
                claim.chat_id,
                type=ErrorType.TURN_FAILED,
                non_retryable=True,
            )
        return TurnResult(
            chat_id=claim.chat_id,
            turn_id=turn.turn_id,
            assistant_message_id=turn.assistant_message_id,
            status=status,
            error=outcome.error,
        )

    async def _claim(self, turn: TurnInput) -> ClaimSessionResult:
        return await self._session_step(ChatSessionActivities.claim_session, turn)

    async def _session_step(
        self,
        step: Callable[[ChatSessionActivities, StepInput], Awaitable[StepResult]],
        argument: StepInput,
    ) -> StepResult:
        """Run a session step: a local activity, or a regular one in runs recorded before."""
        if self._local_session_steps:
            return await workflow.execute_local_activity_method(
                step,
                argument,
                start_to_close_timeout=SESSION_TIMEOUT,
                retry_policy=SESSION_RETRY,
            )
        return await workflow.execute_activity_method(
            step,
            argument,
            start_to_close_timeout=SESSION_TIMEOUT,
            retry_policy=SESSION_RETRY,
        )

    async def _wait_in_queue(
        self, turn: TurnInput, claim: ClaimSessionResult
    ) -> ClaimSessionResult | TurnStatus:
        """Wait until the chat is free and this turn is first in line, then hold the chat's lease.

        Returns the claim, or the status the turn ended with without running (stopped while it
        waited, or its chat or message went away).
        """
        self._queued = TurnAccepted(
            chat_id=claim.chat_id,
            turn_id=turn.turn_id,
            user_message_id=turn.user_message_id,
            assistant_message_id=turn.assistant_message_id,
            queue_position=claim.queue_position,
            interrupted_turn_id=claim.interrupted_turn_id,
        )
        workflow.upsert_search_attributes([search_attributes.STATUS.value_set(TurnStatus.QUEUED)])
        if claim.interrupted_turn_id is not None:
            await self._signal_turn(
                claim.interrupted_turn_id,
                ChatTurnWorkflow.stop_turn,
                StopTurnRequest(reason=f"interrupted by turn {turn.turn_id}"),
            )
        # Later claims name the chat the first one found, even if its channel has been bound to a
        # new chat since.
        again = dataclasses.replace(turn, chat_mode=ChatMode.CONTINUE, chat_id=claim.chat_id)
        while claim.queued:
            self._chat_released = False
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(
                    lambda: self._chat_released or self._stop is not None,
                    timeout=QUEUE_RECHECK,
                )
            if self._stop is not None:
                return await self._drop(
                    turn, claim.chat_id, TurnStatus.ABORTED, "stopped before it ran"
                )
            try:
                claim = await self._claim(again)
            except (ActivityError, ApplicationError) as err:
                rejection = _claim_rejection(err)
                if rejection is None:
                    raise
                return await self._drop(turn, claim.chat_id, TurnStatus.REJECTED, rejection.message)
        workflow.upsert_search_attributes([search_attributes.STATUS.value_set(TurnStatus.RUNNING)])
        return claim

    async def _drop(
        self, turn: TurnInput, chat_id: str, status: TurnStatus, reason: str
    ) -> TurnStatus:
        next_turn_id = await self._session_step(
            ChatSessionActivities.drop_queued_turn,
            DropQueuedTurnInput(
                organization_id=turn.organization_id,
                chat_id=chat_id,
                turn_id=turn.turn_id,
                status=status,
                reason=reason,
            ),
        )
        workflow.upsert_search_attributes([search_attributes.STATUS.value_set(status)])
        if next_turn_id is not None:
            await self._hand_over(turn.turn_id, next_turn_id)
        return status

    async def _title_chat(self, organization_id: str, chat_id: str) -> None:
        """Title the chat this turn created; a chat without a title is no failure of the turn."""
        try:
            await workflow.execute_activity_method(
                GenerationActivities.title_chat,
                TitleChatInput(organization_id=organization_id, chat_id=chat_id),
                start_to_close_timeout=TITLE_TIMEOUT,
                retry_policy=TITLE_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("chat %s was not titled: %s", chat_id, err.cause)

    async def _announce(
        self, turn: TurnInput, chat_id: str, event: WebhookEvent, *, step: int | None = None
    ) -> None:
        """Tell the organization's webhooks (and the send's one-off `webhookUrl`) of the event;
        each delivery is a workflow of its own, so a receiver that is down never holds the turn.

        A local activity: every turn announces its end, and most organizations have no webhook,
        so the step costs a query in the worker rather than a round trip through the server."""
        await workflow.execute_local_activity_method(
            WebhookActivities.announce_event,
            AnnounceEventInput(
                organization_id=turn.organization_id,
                event_type=event,
                chat_id=chat_id,
                turn_id=turn.turn_id,
                one_off_url=turn.webhook_url,
                step=step,
            ),
            start_to_close_timeout=ANNOUNCE_TIMEOUT,
            retry_policy=ANNOUNCE_RETRY,
        )

    async def _hand_over(self, turn_id: str, next_turn_id: str) -> None:
        """Wake the chat's next queued turn: this one no longer holds the chat."""
        await self._signal_turn(next_turn_id, ChatTurnWorkflow.chat_released, ChatReleased(turn_id))

    async def _signal_turn(self, turn_id: str, signal: Any, argument: Any) -> None:
        handle = workflow.get_external_workflow_handle_for(
            ChatTurnWorkflow.run, turn_workflow_id(turn_id)
        )
        try:
            await handle.signal(signal, argument)
        except FailureError:
            # That turn's workflow has already ended: nothing to wake or stop.
            workflow.logger.info("turn %s has ended; signal not delivered", turn_id)

    async def _prepare_attachments(
        self, turn: TurnInput, chat_id: str, outcome: PersistAssistantMessageInput
    ) -> bool:
        """Fetch the turn's remote files and make its images model-ready; False when a file
        cannot be used, which fails the turn (recorded in `outcome`). Only turns whose messages
        carry files take this step, so histories of turns without files replay unchanged."""
        attachment_ids = _attachment_ids(turn)
        if not attachment_ids:
            return True
        try:
            await workflow.execute_activity_method(
                AttachmentActivities.prepare_attachments,
                PrepareAttachmentsInput(
                    organization_id=turn.organization_id,
                    chat_id=chat_id,
                    turn_id=turn.turn_id,
                    model=turn.model,
                    attachment_ids=attachment_ids,
                ),
                start_to_close_timeout=ATTACHMENTS_ATTEMPT_TIMEOUT,
                schedule_to_close_timeout=ATTACHMENTS_TIMEOUT,
                heartbeat_timeout=ATTACHMENTS_HEARTBEAT_TIMEOUT,
                retry_policy=ATTACHMENTS_RETRY,
            )
        except ActivityError as err:
            outcome.status = MessageStatus.FAILED
            outcome.finish_reason = "error"
            outcome.error = _describe_attachment_failure(err)
            return False
        return True

    async def _generate(
        self,
        turn: TurnInput,
        chat_id: str,
        user_message_id: str,
        outcome: PersistAssistantMessageInput,
    ) -> None:
        """Run the turn's model steps to the end, or until a stop; record what happened in `outcome`.

        A step whose model calls tools is followed by those calls (each its own activity, the
        calls of one step in parallel) and then by the next step, which reads the results back
        from Postgres. Calls that wait for a person's approval or for the client pause the turn.
        """
        sources: list[dict[str, str | None]] = []
        step = 1
        while True:
            reply = await self._generate_step(
                turn, chat_id, user_message_id, outcome, step=step, sources=sources
            )
            outcome.steps = step
            if reply is None or self._stop is not None or reply.finish_reason != "tool-calls":
                outcome.step_limit_reached = reply is not None and reply.step_limit_reached
                return
            sources = await self._run_tool_calls(turn, chat_id, step, reply.tool_calls)
            if self._stop is not None:
                outcome.status = MessageStatus.ABORTED
                outcome.finish_reason = "other"
                return
            step += 1

    async def _generate_step(
        self,
        turn: TurnInput,
        chat_id: str,
        user_message_id: str,
        outcome: PersistAssistantMessageInput,
        *,
        step: int,
        sources: list[dict[str, str | None]],
    ) -> GenerateReplyResult | None:
        """One model step, with its retries; None when it failed or was stopped (`outcome` says).

        A model that keeps failing after its retries (unavailable, not a rejection) hands the turn
        to the next of `turn.fallback_models`; only turns routed by tier or `auto` have any.
        """
        models = [turn.model, *turn.fallback_models]
        for index in range(self._model_index, len(models)):
            self._model_index = index
            model = models[index]
            replaced = models[index - 1] if index > self._first_model_index(step) else None
            reply, may_fall_back = await self._generate_with(
                turn,
                model,
                chat_id,
                user_message_id,
                outcome,
                replaces_failed_model=replaced,
                step=step,
                sources=sources,
            )
            if reply is not None or not may_fall_back or self._stop is not None:
                return reply
            if index == len(models) - 1:
                return None
            workflow.logger.warning(
                "model %s kept failing; turn %s falls back to %s",
                model,
                turn.turn_id,
                models[index + 1],
            )
        return None

    def _first_model_index(self, step: int) -> int:
        """The model a step began with: a fallback replaces only a model that failed in this step."""
        return self._step_first_model.setdefault(step, self._model_index)

    async def _generate_with(
        self,
        turn: TurnInput,
        model: str,
        chat_id: str,
        user_message_id: str,
        outcome: PersistAssistantMessageInput,
        *,
        replaces_failed_model: str | None,
        step: int,
        sources: list[dict[str, str | None]],
    ) -> tuple[GenerateReplyResult | None, bool]:
        """One model's generation of a step, with its retries: the reply, or None and whether the
        failure is one another model might not have (the provider unavailable or not answering)."""
        outcome.model = model
        # Attempts are numbered across the turn's steps and models.
        attempt_offset = self._attempts_used
        generation = workflow.start_activity_method(
            GenerationActivities.generate_reply,
            GenerateReplyInput(
                organization_id=turn.organization_id,
                chat_id=chat_id,
                turn_id=turn.turn_id,
                user_message_id=user_message_id,
                assistant_message_id=turn.assistant_message_id,
                model=model,
                system=turn.system,
                provider_options=turn.provider_options,
                replaces_failed_model=replaces_failed_model,
                attempt_offset=attempt_offset,
                step=step,
                max_steps=turn.max_steps,
                sources=sources,
            ),
            start_to_close_timeout=GENERATION_TIMEOUT,
            heartbeat_timeout=GENERATION_HEARTBEAT_TIMEOUT,
            retry_policy=GENERATION_RETRY,
            # The activity stores the partial answer when cancelled; wait for that before persisting.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        await workflow.wait_condition(lambda: generation.done() or self._stop is not None)
        if not generation.done():
            # The api also raised the Redis stop flag, which usually ends generation first; the
            # cancellation covers a lost flag and generation that has not started yet.
            generation.cancel()
        try:
            reply = await generation
        except ActivityError as err:
            # A model is handed over only after its retries ran out.
            self._attempts_used = attempt_offset + (GENERATION_RETRY.maximum_attempts or 1)
            if isinstance(err.cause, CancelledError):
                outcome.status = MessageStatus.ABORTED
                outcome.finish_reason = "other"
                return None, False
            outcome.status = MessageStatus.FAILED
            outcome.finish_reason = "error"
            outcome.error = _describe_failure(err)
            return None, _provider_unavailable(err)
        self._attempts_used = reply.attempt
        outcome.status = MessageStatus.ABORTED if reply.stopped else MessageStatus.COMPLETE
        outcome.attempts = reply.attempt
        outcome.finish_reason = reply.finish_reason
        outcome.input_tokens = reply.input_tokens
        outcome.output_tokens = reply.output_tokens
        outcome.usage_estimated = reply.usage_estimated
        if outcome.ttft_ms is None:
            outcome.ttft_ms = reply.ttft_ms
        outcome.messages_left_out = reply.messages_left_out
        outcome.error = None
        return (None if reply.stopped else reply), False

    async def _run_tool_calls(
        self, turn: TurnInput, chat_id: str, step: int, calls: list[ToolCallDescriptor]
    ) -> list[dict[str, str | None]]:
        """Run a step's tool calls; returns the pages their outputs cite."""
        run_now = [c for c in calls if c.runner is ToolRunner.SERVER and not c.needs_approval]
        to_approve = [c for c in calls if c.runner is ToolRunner.SERVER and c.needs_approval]
        by_client = [c for c in calls if c.runner is ToolRunner.CLIENT]
        sources = await self._run_server_calls(turn, chat_id, run_now)
        if self._stop is not None or not (to_approve or by_client):
            return sources
        pending = await workflow.execute_activity_method(
            ToolActivities.pause_turn,
            PauseTurnInput(
                organization_id=turn.organization_id,
                chat_id=chat_id,
                turn_id=turn.turn_id,
                assistant_message_id=turn.assistant_message_id,
                user_id=turn.user_id,
                step=step,
                approval_call_ids=[c.call_id for c in to_approve],
                client_call_ids=[c.call_id for c in by_client],
                approval_timeout_seconds=turn.approval_timeout_seconds,
            ),
            start_to_close_timeout=TOOL_BOOKKEEPING_TIMEOUT,
            retry_policy=SESSION_RETRY,
        )
        self._pending_approvals = {item.approval_id: item.call_id for item in pending}
        self._awaited_client_calls = {c.call_id for c in by_client}
        if pending:
            await self._announce(turn, chat_id, WebhookEvent.APPROVAL_REQUESTED, step=step)
        workflow.upsert_search_attributes(
            [search_attributes.STATUS.value_set(TurnStatus.AWAITING_INPUT)]
        )
        # No worker is busy meanwhile: the wait is a durable timer and the messages that end it.
        with contextlib.suppress(asyncio.TimeoutError):
            await workflow.wait_condition(
                lambda: (
                    self._stop is not None
                    or (
                        set(self._pending_approvals) <= set(self._decisions)
                        and self._awaited_client_calls <= self._client_outputs
                    )
                ),
                timeout=timedelta(seconds=turn.approval_timeout_seconds),
            )
        workflow.upsert_search_attributes([search_attributes.STATUS.value_set(TurnStatus.RUNNING)])
        decisions = [self._decisions[i] for i in self._pending_approvals if i in self._decisions]
        expired = [i for i in self._pending_approvals if i not in self._decisions]
        stopped = self._stop is not None
        missing = self._awaited_client_calls - self._client_outputs
        for call_id in sorted(missing):
            await self._fail_call(
                turn,
                chat_id,
                call_id,
                "the turn was stopped"
                if stopped
                else "the client sent no output for this call in time",
            )
        await workflow.execute_activity_method(
            ToolActivities.resume_turn,
            ResumeTurnInput(
                organization_id=turn.organization_id,
                chat_id=chat_id,
                turn_id=turn.turn_id,
                assistant_message_id=turn.assistant_message_id,
                model=turn.model,
                step=step,
                decisions=decisions,
                expired_approval_ids=expired,
                client_call_ids=sorted(self._awaited_client_calls),
                stopped=stopped,
            ),
            start_to_close_timeout=TOOL_BOOKKEEPING_TIMEOUT,
            retry_policy=SESSION_RETRY,
        )
        if stopped:
            # Nothing waited on runs: undecided approvals ended as denied, the turn ends.
            self._end_pause()
            return sources
        approved_calls = {self._pending_approvals[d.approval_id] for d in decisions if d.approved}
        approved = [c for c in to_approve if c.call_id in approved_calls]
        self._end_pause()
        return sources + await self._run_server_calls(turn, chat_id, approved)

    async def _finish_handlers(self) -> None:
        """Let every message handler finish before the run ends; answers still waiting for a
        pause that will not come are refused."""
        self._closing = True
        await workflow.wait_condition(workflow.all_handlers_finished)

    def _end_pause(self) -> None:
        self._past_approvals |= set(self._pending_approvals)
        self._past_client_calls |= self._awaited_client_calls
        self._pending_approvals = {}
        self._awaited_client_calls = set()

    async def _run_server_calls(
        self, turn: TurnInput, chat_id: str, calls: list[ToolCallDescriptor]
    ) -> list[dict[str, str | None]]:
        """Run calls in parallel, each an activity; a stop cancels the ones still running."""
        if not calls:
            return []
        runs = [
            workflow.start_activity_method(
                ToolActivities.run_tool,
                self._tool_call_input(turn, chat_id, call.call_id),
                start_to_close_timeout=TOOL_TIMEOUT,
                heartbeat_timeout=TOOL_HEARTBEAT_TIMEOUT,
                retry_policy=TOOL_RETRY,
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
            for call in calls
        ]
        await workflow.wait_condition(
            lambda: all(run.done() for run in runs) or self._stop is not None
        )
        for run in runs:
            if not run.done():
                run.cancel()
        sources: list[dict[str, str | None]] = []
        for call, run in zip(calls, runs, strict=True):
            try:
                result = await run
            except ActivityError as err:
                if isinstance(err.cause, CancelledError):
                    continue  # stopped: the call keeps its input, with no outcome
                await self._fail_call(turn, chat_id, call.call_id, _describe_tool_failure(err))
                continue
            sources += result.sources
        return sources

    async def _fail_call(self, turn: TurnInput, chat_id: str, call_id: str, error: str) -> None:
        request = self._tool_call_input(turn, chat_id, call_id)
        request.error = error
        await workflow.execute_activity_method(
            ToolActivities.fail_tool_call,
            request,
            start_to_close_timeout=TOOL_BOOKKEEPING_TIMEOUT,
            retry_policy=SESSION_RETRY,
        )

    @staticmethod
    def _tool_call_input(turn: TurnInput, chat_id: str, call_id: str) -> RunToolInput:
        return RunToolInput(
            organization_id=turn.organization_id,
            chat_id=chat_id,
            turn_id=turn.turn_id,
            assistant_message_id=turn.assistant_message_id,
            call_id=call_id,
        )

    @workflow.update
    async def decide_approval(self, decision: ApprovalDecision) -> None:
        """A person's decision on a pending approval; the turn goes on once every one is in.

        The api checked the approval's stored row, which the pause step writes before this run
        learns the step is done (a worker that died in between delays that by the step's
        timeout): so the decision waits for the pause, not refused for arriving early.
        """
        approval_id = decision.approval_id
        await workflow.wait_condition(
            lambda: (
                approval_id in self._pending_approvals
                or approval_id in self._past_approvals
                or self._closing
            )
        )
        if approval_id not in self._pending_approvals or approval_id in self._decisions:
            raise ApplicationError(
                "this approval is not waiting for a decision", type=ErrorType.APPROVAL_NOT_PENDING
            )
        self._decisions[approval_id] = decision

    @decide_approval.validator
    def _validate_decide_approval(self, decision: ApprovalDecision) -> None:
        if decision.approval_id in self._decisions or decision.approval_id in self._past_approvals:
            raise ApplicationError(
                "this approval is not waiting for a decision", type=ErrorType.APPROVAL_NOT_PENDING
            )

    @workflow.update
    async def submit_tool_outputs(self, outputs: ClientToolOutputs) -> None:
        """The client's outputs of its tool calls are stored: the turn goes on once all are in.
        Like a decision, outputs that arrive before the pause step is done wait for it."""
        named = set(outputs.call_ids)
        await workflow.wait_condition(
            lambda: (
                bool(named & self._awaited_client_calls)
                or bool(named & self._past_client_calls)
                or self._closing
            )
        )
        if not named & (self._awaited_client_calls - self._client_outputs):
            raise ApplicationError(
                "the turn is not waiting for these tool outputs",
                type=ErrorType.APPROVAL_NOT_PENDING,
            )
        self._client_outputs |= named

    @workflow.query
    def get_pending_approvals(self) -> list[str]:
        """The approval ids the turn waits on."""
        return [i for i in self._pending_approvals if i not in self._decisions]

    @workflow.signal
    def stop_turn(self, request: StopTurnRequest) -> None:
        """Stop generation and keep the partial answer; later stops of the same turn change nothing."""
        if self._stop is None:
            self._stop = request

    @workflow.signal(name=CHAT_RELEASED_SIGNAL)
    def chat_released(self, released: ChatReleased) -> None:
        """The turn before this queued one has let go of the chat: try to claim it now."""
        self._chat_released = True

    @workflow.update
    async def accept_turn(self, request: AcceptTurnRequest) -> TurnAccepted:
        """Answers once the chat is claimed and the user message is stored, or the turn is queued
        behind a busy chat; rejects the turn otherwise."""
        await workflow.wait_condition(
            lambda: (
                self._accepted is not None
                or self._queued is not None
                or self._rejection is not None
            )
        )
        if self._queued is not None:
            return self._queued
        if self._rejection is not None:
            raise ApplicationError(
                self._rejection.message,
                *self._rejection.details,
                type=self._rejection.type,
                non_retryable=True,
            )
        assert self._accepted is not None
        return self._accepted

    @accept_turn.validator
    def _validate_accept_turn(self, request: AcceptTurnRequest) -> None:
        if turn_workflow_id(request.turn_id) != workflow.info().workflow_id:
            raise ApplicationError("update names another turn", type=ErrorType.INVALID_TURN)
        first = self._turn.request_fingerprint
        if first is not None and request.request_fingerprint != first:
            # The turn id came from an `Idempotency-Key` that first came with another request.
            # (A turn started before requests had fingerprints has none to compare.)
            accepted = self._accepted or self._queued
            raise ApplicationError(
                "this Idempotency-Key was used with a different request",
                accepted.chat_id if accepted else self._turn.chat_id,
                self._turn.turn_id,
                type=ErrorType.IDEMPOTENCY_KEY_REUSED,
                non_retryable=True,
            )


def _claim_rejection(err: ActivityError | ApplicationError) -> ApplicationError | None:
    """The claim's refusal (no such chat or message, busy chat), or None for any other failure.

    The refusal usually arrives wrapped in an ActivityError; a claim refused on its first attempt
    has also been seen to surface as the bare ApplicationError, so both forms are recognised.
    """
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError) and cause.type in CLAIM_REJECTIONS:
        return cause
    return None


def _attachment_ids(turn: TurnInput) -> list[str]:
    """The files the turn's new messages carry (its user message, and a new chat's seed)."""
    ids = attachment_ids_in(turn.user_parts)
    for seed in turn.history_seed:
        ids += [item for item in attachment_ids_in(seed.parts) if item not in ids]
    return ids


def _describe_attachment_failure(err: ActivityError) -> str:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    if isinstance(cause, TimeoutError):
        return "the turn's files could not be fetched and stored in time"
    return "the turn's files could not be prepared"


def _provider_unavailable(err: ActivityError) -> bool:
    """Whether generation failed for want of the provider rather than because of the request."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.type == ErrorType.PROVIDER_UNAVAILABLE
    return isinstance(cause, TimeoutError)


def _describe_tool_failure(err: ActivityError) -> str:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    if isinstance(cause, TimeoutError):
        return "the tool did not answer in time"
    return "the tool failed"


def _describe_failure(err: ActivityError) -> str:
    """A user-safe reason for a failed generation: the provider's message, or what timed out."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    if isinstance(cause, TimeoutError):
        return "the model provider did not answer in time"
    return "generation failed"
