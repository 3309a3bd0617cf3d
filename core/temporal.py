"""Temporal client construction shared by the api, the worker and the CLI. Imports only settings."""

from __future__ import annotations

from temporalio.client import Client

from core.settings import Settings


async def connect_temporal(settings: Settings) -> Client:
    return await Client.connect(
        settings.resolved_temporal_address, namespace=settings.temporal_namespace
    )
