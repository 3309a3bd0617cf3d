"""DiscordReplyWorkflow: one run per `/ask` or bot mention, relaying its turn's answer into Discord. No I/O here.

Started by the interactions endpoint (or the Gateway process, for a message mentioning the bot)
next to the turn it answers (workflow id `discord-reply-<turn id>`), so a retried interaction or
a replayed message never relays twice. Its input holds ids and the interaction token sealed under
the secrets key (none for a mention: the bot token is read by the activity): the token is a
credential and history must not hold it readable. The answer's text never passes through here
either: the activity reads it from the turn's stream and from Postgres.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.discord import (
        DISCORD_REFUSED,
        DiscordActivities,
        DiscordReplyInput,
        DiscordReplyResult,
    )


def reply_workflow_id(turn_id: str) -> str:
    return f"discord-reply-{turn_id}"


# Discord's 5xx, the network and long rate limits retry with backoff for as long as the relay may
# run; a refusal (the bot lost access to the channel) is final. A retried attempt resumes editing
# the messages the last one recorded.
RELAY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=[DISCORD_REFUSED],
)
# A turn may wait a day for a person's approval (`approval_timeout_seconds`) before it answers.
RELAY_DEADLINE = timedelta(hours=25)
# Short, so a killed worker's relay resumes elsewhere within seconds.
RELAY_HEARTBEAT_TIMEOUT = timedelta(seconds=10)


@workflow.defn(name="DiscordReplyWorkflow")
class DiscordReplyWorkflow:
    @workflow.run
    async def run(self, request: DiscordReplyInput) -> DiscordReplyResult:
        return await workflow.execute_activity_method(
            DiscordActivities.relay_answer,
            request,
            schedule_to_close_timeout=RELAY_DEADLINE,
            heartbeat_timeout=RELAY_HEARTBEAT_TIMEOUT,
            retry_policy=RELAY_RETRY,
        )
