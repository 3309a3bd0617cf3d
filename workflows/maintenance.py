"""PurgeDeletedChatsWorkflow: run by a Temporal schedule the worker keeps in place. No I/O here."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.maintenance import MaintenanceActivities
    from core.contracts import PurgeDeletedChatsInput

PURGE_SCHEDULE_ID = "durachat-purge-deleted-chats"
PURGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=1), maximum_attempts=5
)


@workflow.defn(name="PurgeDeletedChatsWorkflow")
class PurgeDeletedChatsWorkflow:
    @workflow.run
    async def run(self, request: PurgeDeletedChatsInput) -> int:
        return await workflow.execute_activity_method(
            MaintenanceActivities.purge_deleted_chats,
            request,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=PURGE_RETRY,
        )
