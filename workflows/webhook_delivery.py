"""WebhookDeliveryWorkflow: one run per delivery (`webhook-delivery-<delivery id>`), retrying its attempt
for days. No I/O here.

History carries the delivery's ids and retry figures only; the payload and the endpoint's secrets
stay in Postgres, read by each attempt. A redelivery is a new run under the same workflow id.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.webhooks import WebhookActivities
    from core.contracts import (
        WEBHOOK_DELIVERY_WORKFLOW_NAME,
        DeliverInput,
        DeliveryAttemptResult,
        DeliveryStatus,
        GiveUpInput,
        WebhookDeliveryInput,
    )

# Time an attempt has beyond its HTTP timeout: loading the delivery and recording the attempt.
ATTEMPT_MARGIN = timedelta(seconds=30)

# Ending a delivery is a short Postgres transaction: retried until the database answers, so a
# failure is always counted against its endpoint.
GIVE_UP_TIMEOUT = timedelta(seconds=30)
GIVE_UP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)

# For workflows announcing an event (the turn workflow, after a turn is stored or when it pauses):
# creating the deliveries is a short transaction and one workflow start per delivery, retried until
# Postgres and Temporal answer, so an event is never lost.
ANNOUNCE_TIMEOUT = timedelta(seconds=30)
ANNOUNCE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)


def delivery_retry_policy(request: WebhookDeliveryInput) -> RetryPolicy:
    """Exponential backoff with no attempt limit: the schedule-to-close timeout ends the retries."""
    return RetryPolicy(
        initial_interval=timedelta(seconds=request.retry.initial_seconds),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=request.retry.max_interval_seconds),
        maximum_attempts=0,
    )


@workflow.defn(name=WEBHOOK_DELIVERY_WORKFLOW_NAME)
class WebhookDeliveryWorkflow:
    @workflow.run
    async def run(self, request: WebhookDeliveryInput) -> DeliveryAttemptResult:
        retry_for = timedelta(seconds=request.retry.for_seconds)
        attempt_timeout = timedelta(seconds=request.retry.attempt_timeout_seconds) + ATTEMPT_MARGIN
        try:
            return await workflow.execute_activity_method(
                WebhookActivities.deliver,
                DeliverInput(request.organization_id, request.delivery_id),
                start_to_close_timeout=min(attempt_timeout, retry_for),
                schedule_to_close_timeout=retry_for,
                retry_policy=delivery_retry_policy(request),
            )
        except ActivityError as failure:
            # Retries ran out (or the URL is refused): the delivery failed for good.
            workflow.logger.info(
                "webhook delivery %s failed: %s", request.delivery_id, failure.cause
            )
        await workflow.execute_activity_method(
            WebhookActivities.give_up,
            GiveUpInput(request.organization_id, request.delivery_id),
            start_to_close_timeout=GIVE_UP_TIMEOUT,
            retry_policy=GIVE_UP_RETRY,
        )
        return DeliveryAttemptResult(request.delivery_id, DeliveryStatus.FAILED)
