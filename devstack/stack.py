"""The dev service stack: start the embedded twin of every backing service the settings leave unset; never imports api, workflows or activities."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import structlog

from core.settings import Settings
from devstack.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedSeaweedFS,
    EmbeddedService,
    EmbeddedTemporal,
    ServiceStartError,
)

__all__ = ["ServiceStack", "StackEndpoints"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StackEndpoints:
    """Where the api and the worker find the backing services, embedded or external."""

    database_url: str
    redis_url: str
    temporal_address: str
    temporal_ui_url: str | None
    s3_endpoint_url: str

    def as_environment(self) -> dict[str, str]:
        """The variables that point child processes' `Settings` at these endpoints."""
        return {
            "DURACHAT_DATABASE_URL": self.database_url,
            "DURACHAT_REDIS_URL": self.redis_url,
            "DURACHAT_TEMPORAL_ADDRESS": self.temporal_address,
            "DURACHAT_S3_ENDPOINT_URL": self.s3_endpoint_url,
        }


class ServiceStack:
    """Start the embedded Temporal, Redis, SeaweedFS and Postgres the settings do not point elsewhere; stop them on exit.

    Start: every server is spawned from the calling thread (it must outlive them, see
    `devstack._process.spawn`), slow-to-prepare Postgres last so its first-run initdb overlaps the
    others' boot; then all are awaited in parallel. If one fails, those already started are stopped.
    Stop: sequentially, in reverse start order, each with its own timeout.
    Crash: a server that dies on its own is reaped at once (see `EmbeddedService.start`) and
    started again by `restart_exited()`, which the launcher calls while it waits.
    """

    # Between two failed restarts of one service the pause doubles, from the first to the last.
    RESTART_BACKOFF_SECONDS = (1.0, 30.0)

    def __init__(
        self,
        settings: Settings,
        *,
        redis_persistent: bool = True,
        ready_timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.settings = settings
        self.redis_persistent = redis_persistent
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._services: list[EmbeddedService] = []
        self._endpoints: StackEndpoints | None = None
        # Per service name: the pause after its last failed restart, and when to try again.
        self._restart_backoff: dict[str, tuple[float, float]] = {}

    @property
    def endpoints(self) -> StackEndpoints:
        if self._endpoints is None:
            raise RuntimeError("the service stack is not started")
        return self._endpoints

    @property
    def services(self) -> tuple[EmbeddedService, ...]:
        """The embedded services this stack started, in start order."""
        return tuple(self._services)

    def start(self) -> StackEndpoints:
        if self._endpoints is not None:
            raise RuntimeError("the service stack is already started")
        started_at = time.monotonic()
        planned = self._plan()
        try:
            for service in planned:
                self._services.append(service)
                service.start()
            self._wait_ready()
        except BaseException:
            # KeyboardInterrupt included: a Ctrl-C during start must not leave servers behind.
            self.stop()
            raise
        settings = self.settings
        temporal = next((s for s in planned if isinstance(s, EmbeddedTemporal)), None)
        self._endpoints = StackEndpoints(
            database_url=settings.resolved_database_url,
            redis_url=settings.resolved_redis_url,
            temporal_address=settings.resolved_temporal_address,
            temporal_ui_url=temporal.ui_url if temporal is not None else None,
            s3_endpoint_url=settings.resolved_s3_endpoint_url,
        )
        log.info(
            "devstack.stack.ready",
            embedded=[service.name for service in planned],
            external=self._external(),
            temporal_ui=self._endpoints.temporal_ui_url,
            elapsed_s=round(time.monotonic() - started_at, 3),
        )
        return self._endpoints

    def restart_exited(self) -> list[str]:
        """Start again every embedded service that died on its own (crashed, killed); returns the
        names of those serving again. A restart that fails is retried later, with a growing pause,
        so a server that cannot start does not spin.

        Call it from the thread that started the stack: a server dies with the thread that
        spawned it (see `devstack._process.spawn`).
        """
        if self._endpoints is None:
            return []
        restarted: list[str] = []
        for service in self._services:
            # A failed restart stopped the service; its backoff entry marks it as still down.
            if not service.exited_on_its_own() and service.name not in self._restart_backoff:
                continue
            pause, retry_at = self._restart_backoff.get(service.name, (0.0, 0.0))
            if time.monotonic() < retry_at:
                continue
            log.warning(f"devstack.{service.name}.restarting", log=str(service.log_path))
            try:
                service.start()
                service.wait_ready(self.ready_timeout)
            except ServiceStartError as error:
                service.stop(self.stop_timeout)  # a half-started server must not linger
                first, longest = self.RESTART_BACKOFF_SECONDS
                pause = min(longest, pause * 2) if pause else first
                self._restart_backoff[service.name] = (pause, time.monotonic() + pause)
                log.error(
                    f"devstack.{service.name}.restart_failed", retry_in_s=pause, error=str(error)
                )
                continue
            self._restart_backoff.pop(service.name, None)
            restarted.append(service.name)
        return restarted

    def stop(self) -> None:
        errors: list[BaseException] = []
        while self._services:
            service = self._services.pop()
            try:
                service.stop(self.stop_timeout)
            except Exception as error:  # keep stopping the others
                log.exception("devstack.stack.stop_failed", service=service.name)
                errors.append(error)
        self._endpoints = None
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _plan(self) -> list[EmbeddedService]:
        settings = self.settings
        data_dir = settings.data_dir
        services: list[EmbeddedService] = []
        if settings.temporal_address is None:
            services.append(
                EmbeddedTemporal(
                    data_dir,
                    settings.embedded_temporal_port,
                    settings.embedded_temporal_ui_port,
                    settings.embedded_temporal_ui,
                    namespace=settings.temporal_namespace,
                )
            )
        if settings.redis_url is None:
            services.append(
                EmbeddedRedis(
                    data_dir, settings.embedded_redis_port, persistent=self.redis_persistent
                )
            )
        if settings.s3_endpoint_url is None:
            services.append(
                EmbeddedSeaweedFS(
                    data_dir,
                    settings.embedded_s3_port,
                    access_key_id=settings.s3_access_key_id,
                    secret_access_key=settings.s3_secret_access_key.get_secret_value(),
                    region=settings.s3_region,
                    volume_size_limit_mb=settings.embedded_s3_volume_size_limit_mb,
                )
            )
        if settings.database_url is None:
            services.append(EmbeddedPostgres(data_dir, settings.embedded_postgres_port))
        return services

    def _external(self) -> list[str]:
        # Names only: external URLs may carry credentials, which have no place in a log line.
        settings = self.settings
        configured = {
            "postgres": settings.database_url,
            "redis": settings.redis_url,
            "temporal": settings.temporal_address,
            "s3": settings.s3_endpoint_url,
        }
        return [name for name, value in configured.items() if value is not None]

    def _wait_ready(self) -> None:
        if not self._services:
            return
        # Threads only wait (the children were spawned above, from the long-lived calling thread).
        pool = ThreadPoolExecutor(
            max_workers=len(self._services), thread_name_prefix="devstack-ready"
        )
        try:
            futures = [
                pool.submit(service.wait_ready, self.ready_timeout) for service in self._services
            ]
            failures = [error for future in futures if (error := future.exception()) is not None]
        finally:
            # Not waiting for the threads: on Ctrl-C the caller stops the servers first, and then
            # the waits end at once because their process is gone.
            pool.shutdown(wait=False, cancel_futures=True)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise ServiceStartError("\n\n".join(str(error) for error in failures))
