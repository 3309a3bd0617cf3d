"""SlackReplyWorkflow: one run per Slack turn, relaying its answer into the thread. No I/O here.

Started by the events endpoint beside the turn it answers (workflow id `slack-reply-<turn id>`,
an existing run reused and a finished one never run again), so a retried event never replies
twice. Its history holds ids, the reply's message timestamps and each message's length and
digest, never the answer's text: each `relay_answer` attempt reads the turn's stream and
Postgres, and returns as soon as it creates a message, so that every message the reply posted is
recorded here before anything else happens and later attempts edit it rather than post it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.slack import (
        PostedMessage,
        RelayInput,
        RelayResult,
        SetStatusInput,
        SlackActivities,
        SlackErrorType,
        SlackThread,
    )

SLACK_REPLY_WORKFLOW_NAME = "SlackReplyWorkflow"


def slack_reply_workflow_id(turn_id: str) -> str:
    return f"slack-reply-{turn_id}"


@dataclass
class SlackReplyInput:
    organization_id: str
    team_id: str
    channel: str
    # The thread's root message: the reply and the chat bound to the thread both hang on it.
    thread_ts: str
    turn_id: str
    chat_id: str
    # Who asked: Slack streams outside DMs only to a named recipient.
    user_id: str | None = None
    # Carried over by continue-as-new: what the reply has posted so far.
    messages: list[PostedMessage] = field(default_factory=list)
    streaming_available: bool = True


@dataclass
class ReplyPlace:
    team_id: str
    channel: str
    thread_ts: str
    # The `ts` of every message the reply has posted, oldest first.
    message_ts: list[str]


# The thread status is a nicety: one try, so a rate-limited or failing Slack never holds the answer
# back for it (the answer follows the status, which Slack clears when the answer's message comes).
STATUS_RETRY = RetryPolicy(maximum_attempts=1)
STATUS_TIMEOUT = timedelta(seconds=15)

# A Slack outage (5xx, 429, the network) delays the reply, never loses it: retried with backoff
# (a 429's Retry-After sets the next delay) for as long as a turn may take, approval waits
# included. Refusals are final: the token was revoked, the bot left the channel.
RELAY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    non_retryable_error_types=[SlackErrorType.REFUSED, SlackErrorType.NOT_CONNECTED],
)
RELAY_DEADLINE = timedelta(hours=25)
# An attempt returns after RELAY_SLICE_SECONDS (10 min) at the latest.
RELAY_ATTEMPT_TIMEOUT = timedelta(minutes=15)
# Short, so a killed worker's relay resumes elsewhere within seconds.
RELAY_HEARTBEAT_TIMEOUT = timedelta(seconds=10)

# While the turn waits for an approval the relay is asked again after these pauses, doubling.
PAUSED_RECHECK_FIRST = timedelta(seconds=2)
PAUSED_RECHECK_MAX = timedelta(seconds=60)


@workflow.defn(name=SLACK_REPLY_WORKFLOW_NAME)
class SlackReplyWorkflow:
    def __init__(self) -> None:
        self._request: SlackReplyInput | None = None
        self._messages: list[PostedMessage] = []

    @workflow.run
    async def run(self, request: SlackReplyInput) -> str:
        """Relay the turn's answer; returns how it ended (finish, abort, error or gone)."""
        thread = SlackThread(
            organization_id=request.organization_id,
            team_id=request.team_id,
            channel=request.channel,
            thread_ts=request.thread_ts,
            user_id=request.user_id,
        )
        self._request = request
        self._messages = list(request.messages)
        streaming_available = request.streaming_available
        if not self._messages:
            try:
                await workflow.execute_activity_method(
                    SlackActivities.set_status,
                    SetStatusInput(thread=thread),
                    start_to_close_timeout=STATUS_TIMEOUT,
                    retry_policy=STATUS_RETRY,
                )
            except ActivityError:
                workflow.logger.info("no thread status for turn %s", request.turn_id)
        recheck = PAUSED_RECHECK_FIRST
        while True:
            result: RelayResult = await workflow.execute_activity_method(
                SlackActivities.relay_answer,
                RelayInput(
                    thread=thread,
                    turn_id=request.turn_id,
                    messages=self._messages,
                    streaming_available=streaming_available,
                ),
                start_to_close_timeout=RELAY_ATTEMPT_TIMEOUT,
                schedule_to_close_timeout=RELAY_DEADLINE,
                heartbeat_timeout=RELAY_HEARTBEAT_TIMEOUT,
                retry_policy=RELAY_RETRY,
            )
            self._messages = result.messages
            streaming_available = result.streaming_available
            if result.outcome is not None and result.outcome != "paused":
                return result.outcome
            if result.outcome == "paused":
                await workflow.sleep(recheck)
                recheck = min(recheck * 2, PAUSED_RECHECK_MAX)
            else:
                recheck = PAUSED_RECHECK_FIRST
            if workflow.info().is_continue_as_new_suggested():
                request.messages = self._messages
                request.streaming_available = streaming_available
                workflow.continue_as_new(request)

    @workflow.query
    def get_place(self) -> ReplyPlace:
        """Where the reply is and the messages it has posted: a stop reaction on one of them
        finds the reply's thread."""
        request = self._request
        return ReplyPlace(
            team_id=request.team_id if request else "",
            channel=request.channel if request else "",
            thread_ts=request.thread_ts if request else "",
            message_ts=[message.ts for message in self._messages],
        )
