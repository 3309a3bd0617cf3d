"""The Temporal worker process: hosts ChatTurnWorkflow and every activity, with clients built once here."""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from datetime import timedelta

import structlog
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
)
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.attachments import AttachmentActivities, AttachmentLimits, ModelInputs
from activities.chat_session import ChatSessionActivities
from activities.discord import DiscordActivities
from activities.generation import GenerationActivities, StopFlagPoller
from activities.maintenance import MaintenanceActivities
from activities.slack import SlackActivities
from activities.tool_set import ToolSet
from activities.tools import ToolActivities
from activities.webhooks import WebhookActivities, WebhookSender
from agent_tools.mcp import McpToolkits
from agent_tools.web import WebTools
from core.contracts import PurgeDeletedChatsInput
from core.logging import configure_logging
from core.secrets import SecretBox
from core.settings import Settings, get_settings
from core.temporal import connect_temporal
from outbound.guard import GuardedHttpClient, OutboundPolicy
from providers.registry import ProviderRegistry
from storage.db import DatabaseTimeouts, create_engine, create_session_factory
from storage.lost_turn_sweep import LostTurnSweep
from storage.lost_turns import LostTurns
from storage.objects import ObjectStore
from storage.redis import create_redis
from storage.streams import TurnStreams
from workflows.chat_turn import ChatTurnWorkflow
from workflows.discord_reply import DiscordReplyWorkflow
from workflows.maintenance import PURGE_SCHEDULE_ID, PurgeDeletedChatsWorkflow
from workflows.slack_reply import SlackReplyWorkflow
from workflows.webhook_delivery import WebhookDeliveryWorkflow

log = structlog.get_logger(__name__)

# On shutdown, running activities get this long to finish before they are cancelled and left to
# Temporal to retry on another worker.
GRACEFUL_SHUTDOWN = timedelta(seconds=10)


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    engine = create_engine(
        settings.resolved_database_url, timeouts=DatabaseTimeouts.from_settings(settings)
    )
    redis = create_redis(
        settings.resolved_redis_url,
        max_connections=settings.redis_max_connections,
        pool_timeout_seconds=settings.worker_redis_pool_timeout_seconds,
        client_name="durachat-worker",
    )
    providers = ProviderRegistry.from_settings(settings)
    resources = AsyncExitStack()
    try:
        # The process's one S3 client, for the activities that read and write attachments.
        objects = await resources.enter_async_context(ObjectStore.from_settings(settings))
        await objects.ensure_bucket_if_reachable()
        streams = TurnStreams(
            redis,
            max_lifetime_seconds=settings.stream_max_lifetime_seconds,
            retention_seconds=settings.stream_retention_seconds,
        )
        sessions = create_session_factory(engine)
        client = await connect_temporal(settings)
        lost_turns = LostTurns(client, streams)
        session_activities = ChatSessionActivities(sessions, streams, lost_turns)
        stop_flags = StopFlagPoller(streams)
        # Web fetches go out through the outbound guard like attachment fetches (WebTools builds
        # its guarded client from the same policy); toolkit (MCP) servers too (McpToolkits).
        web_tools = WebTools(settings)
        resources.push_async_callback(web_tools.aclose)
        tool_set = ToolSet(
            sessions,
            web_tools,
            McpToolkits.from_settings(settings),
            SecretBox.from_settings(settings),
            builtins_needing_approval=settings.tools_needing_approval,
        )
        generation_activities = GenerationActivities(
            sessions,
            streams,
            providers,
            stop_flags,
            ModelInputs(objects),
            tool_set,
            title_model=settings.title_model,
            tool_output_chars=settings.tool_output_context_chars,
        )
        tool_activities = ToolActivities(sessions, streams, tool_set)
        # The one way out to URLs users name (attachment URLs), through the outbound guard.
        outbound = await resources.enter_async_context(
            GuardedHttpClient(
                OutboundPolicy.from_settings(settings),
                timeout_seconds=settings.remote_file_timeout_seconds,
            )
        )
        attachment_activities = AttachmentActivities(
            sessions,
            objects,
            outbound,
            providers,
            AttachmentLimits(
                max_bytes=settings.max_attachment_bytes,
                allowed_types=tuple(settings.attachment_allowed_types),
                fetch_timeout_seconds=settings.remote_file_timeout_seconds,
            ),
        )
        # Webhook deliveries go out through the outbound guard's checks too, following no redirect.
        webhook_sender = WebhookSender.from_settings(settings)
        resources.push_async_callback(webhook_sender.aclose)
        webhook_activities = WebhookActivities(
            sessions, webhook_sender, SecretBox.from_settings(settings), client, settings
        )
        discord_activities = DiscordActivities(
            sessions, streams, SecretBox.from_settings(settings), settings, redis
        )
        slack_activities = SlackActivities(
            sessions, streams, SecretBox.from_settings(settings), settings
        )
        worker = Worker(
            client,
            task_queue=settings.temporal_task_queue,
            workflows=[
                ChatTurnWorkflow,
                PurgeDeletedChatsWorkflow,
                WebhookDeliveryWorkflow,
                DiscordReplyWorkflow,
                SlackReplyWorkflow,
            ],
            activities=[
                session_activities.claim_session,
                session_activities.store_user_message,
                session_activities.persist_assistant_message,
                session_activities.drop_queued_turn,
                generation_activities.generate_reply,
                generation_activities.title_chat,
                tool_activities.run_tool,
                tool_activities.fail_tool_call,
                tool_activities.pause_turn,
                tool_activities.resume_turn,
                attachment_activities.prepare_attachments,
                MaintenanceActivities(sessions, objects).purge_deleted_chats,
                discord_activities.relay_answer,
                slack_activities.set_status,
                slack_activities.relay_answer,
                webhook_activities.announce_event,
                webhook_activities.deliver,
                webhook_activities.give_up,
            ],
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            # The sandbox re-imports a workflow's modules for every new run unless they are passed
            # through; passing them all through took ~13% off the worker's CPU per turn (see
            # docs/benchmarks.md). Its call restrictions stay, and the workflow modules keep no
            # mutable module state, so runs cannot leak into each other; the replay tests guard it.
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
            ),
            # Every live turn holds an activity slot while it generates; the SDK's default (100)
            # would make the 101st concurrent turn wait for a slot before its first token.
            max_concurrent_activities=settings.worker_max_concurrent_activities,
            max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
        )
        await keep_purge_schedule(client, settings)
        lost_turn_sweep = LostTurnSweep(
            sessions, lost_turns, release_within_seconds=settings.lost_turn_release_seconds
        )
        async with stop_flags, worker, lost_turn_sweep.running():
            log.info("worker.started", task_queue=settings.temporal_task_queue)
            await stop.wait()
            log.info("worker.stopping")
    finally:
        await resources.aclose()
        await providers.aclose()
        await redis.aclose()
        await engine.dispose()


async def keep_purge_schedule(client: Client, settings: Settings) -> None:
    """Create the schedule that purges deleted chats, or bring it in line with the settings.

    Every worker does this at start; the schedule id makes it one schedule per namespace.
    """
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            PurgeDeletedChatsWorkflow.run,
            PurgeDeletedChatsInput(
                retention_seconds=settings.deleted_chat_retention_seconds,
                unattached_file_retention_seconds=settings.unattached_file_retention_seconds,
            ),
            id=f"{PURGE_SCHEDULE_ID}-run",
            task_queue=settings.temporal_task_queue,
        ),
        spec=ScheduleSpec(
            intervals=[
                ScheduleIntervalSpec(every=timedelta(seconds=settings.purge_interval_seconds))
            ]
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(PURGE_SCHEDULE_ID, schedule)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(PURGE_SCHEDULE_ID).update(
            lambda _: ScheduleUpdate(schedule=schedule)
        )


def main() -> None:
    settings = get_settings()
    configure_logging(settings)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_worker(settings, stop)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
