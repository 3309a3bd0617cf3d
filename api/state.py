"""The api's process-wide resources, built by the lifespan and handed to requests through dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from temporalio.client import Client

from core.settings import Settings
from providers.registry import ProviderRegistry
from storage.limits import RateLimiter, StreamLeases
from storage.lost_turns import LostTurns
from storage.objects import ObjectStore
from storage.stream_reader import MultiplexedStreamReader
from storage.streams import TurnStreams


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    streams: TurnStreams
    stream_reader: MultiplexedStreamReader
    temporal: Client
    providers: ProviderRegistry
    rate_limiter: RateLimiter
    stream_leases: StreamLeases
    lost_turns: LostTurns
    objects: ObjectStore
