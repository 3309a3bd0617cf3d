"""Session fixtures: the embedded services (through the same launcher as `durachat dev`), migrations,
a provider server speaking the OpenAI wire format, and the real api and worker processes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.settings import Settings
from devstack.ports import free_port_block
from devstack.stack import ServiceStack
from storage import api_keys
from storage.db import create_engine, create_session_factory
from storage.migrations import upgrade_database
from storage.objects import ObjectStore
from storage.redis import create_redis
from tests.support.anthropic_server import AnthropicServer
from tests.support.gemini_server import GeminiServer
from tests.support.ollama_server import OllamaServer
from tests.support.openai_server import OpenAICompatibleServer
from tests.support.processes import ServiceProcess, wait_until_ready
from tests.support.search_server import SearchServer

# Mock models that call tools, as scripted by each test (`provider_server.script`) or by name
# (`calls-<tool>`); the catalog gives them the `tools` capability (tests/test_tools.py).
TOOL_MODELS = [
    "tools-agent",
    "tools-slow",
    "tools-many",
    "tools-client",
    "tools-approval",
    "calls-web_search",
]

# Models the test provider `mock` serves (see tests/support/openai_server.py for what each does).
MOCK_MODELS = [
    "echo",
    "fail-503",
    "reply-the-fallback-answered",
    "reply-hello-from-the-provider",
    "reasoning-the-answer-is-42",
    "slow",
    "slow-20",
    "fail-400",
    "fail-401",
    "fail-429",
    "fail-500",
    "flaky-1",
    "drop",
    "titler",
    *TOOL_MODELS,
]


# Where the local Slack Web API and Discord REST API servers of tests/test_slack.py and
# tests/test_discord.py listen: chosen here, before the stack starts, so the api and worker
# processes are configured with them (each test module starts its server on its port).
SLACK_API_PORT = free_port_block()
SLACK_API_URL = f"http://127.0.0.1:{SLACK_API_PORT}/api/"
DISCORD_API_PORT = free_port_block()
DISCORD_API_URL = f"http://127.0.0.1:{DISCORD_API_PORT}/api/v10"

# The loopback address the remote-file test server listens on, and the only private address the
# outbound guard lets through in tests.
REMOTE_FILES_HOST = "127.0.0.2"
MAX_TEST_ATTACHMENT_BYTES = 2_000_000


# Mock models that routing tests rely on: `auto` and tiers pick among these and `local/lorem`
# (the other mock models are internal, so routing never lands on a failing or slow one).
PRICED_MODEL = "mock/echo"
FALLING_MODEL = "mock/fail-503"
FALLBACK_MODEL = "mock/reply-the-fallback-answered"
# Models each native provider's test server serves (tests/test_provider_e2e.py).
NATIVE_MODELS = ["echo", "thinking-deep-thoughts"]


@pytest.fixture(scope="session")
def provider_server() -> Iterator[OpenAICompatibleServer]:
    with OpenAICompatibleServer(api_key="sk-test-provider-key") as server:
        yield server


@pytest.fixture(scope="session")
def native_servers() -> Iterator[NativeServers]:
    """One test server per provider wire format besides the `mock` one, started for the session."""
    with (
        AnthropicServer() as anthropic,
        GeminiServer(api_key="gemini-test-key-0123456789") as google,
        OllamaServer() as ollama,
        OpenAICompatibleServer(api_key="gsk_test_0123456789", dialect="groq") as groq,
        OpenAICompatibleServer(api_key="sk-or-test-0123456789", dialect="openrouter") as openrouter,
    ):
        yield NativeServers(anthropic, google, ollama, groq, openrouter)


@dataclass(frozen=True)
class NativeServers:
    anthropic: AnthropicServer
    google: GeminiServer
    ollama: OllamaServer
    groq: OpenAICompatibleServer
    openrouter: OpenAICompatibleServer

    @staticmethod
    def models() -> dict[str, list[str]]:
        return {
            "anthropic": NATIVE_MODELS,
            "google": NATIVE_MODELS,
            "ollama": NATIVE_MODELS,
            "groq": ["echo"],
            "openrouter": ["echo"],
        }

    def providers(self) -> dict[str, Any]:
        """`DURACHAT_PROVIDERS` entries named after each provider, so each uses its preset."""
        models = self.models()
        return {
            "anthropic": self.anthropic.providers_entry(models["anthropic"]),
            "google": self.google.providers_entry(models["google"]),
            "ollama": self.ollama.providers_entry(models["ollama"]),
            "groq": _without_type(self.groq.providers_entry(models["groq"])),
            "openrouter": _without_type(self.openrouter.providers_entry(models["openrouter"])),
        }


def _without_type(entry: dict[str, Any]) -> dict[str, Any]:
    # A known name needs no `type`: the preset gives the adapter and its dialect.
    return {key: value for key, value in entry.items() if key != "type"}


# A model whose context window a test history overflows (tests/test_models_and_costs.py).
SMALL_WINDOWS = {"reply-hello-from-the-provider": {"contextWindow": 4_000, "maxOutputTokens": 100}}


def catalog_for_tests() -> list[dict[str, Any]]:
    """Operator catalog entries (`DURACHAT_MODELS`) giving the tests priced and routable models."""
    routable = {PRICED_MODEL, FALLING_MODEL, FALLBACK_MODEL}
    return [
        # Prices with cache reads, so costs have several terms to get exactly right.
        {
            "id": PRICED_MODEL,
            "tier": "everyday",
            "promptPpm": "2.50",
            "cachedPromptPpm": "1.25",
            "completionPpm": "10",
            "contextWindow": 200_000,
        },
        {"id": FALLING_MODEL, "tier": "strategic", "promptPpm": "1", "completionPpm": "2"},
        {"id": FALLBACK_MODEL, "tier": "strategic", "promptPpm": "3", "completionPpm": "4"},
        # Out of the everyday tier, so `auto` picks local/lorem without images and the priced
        # mock/echo with them.
        {"id": "local/echo", "tier": "advanced"},
        *(
            {"id": f"{provider}/{model}", "tier": "advanced"}
            for provider, models in NativeServers.models().items()
            for model in models
        ),
        *(
            {
                "id": f"mock/{model}",
                "internal": True,
                **SMALL_WINDOWS.get(model, {}),
                **({"capabilities": ["tools"]} if model in TOOL_MODELS else {}),
            }
            for model in MOCK_MODELS
            if f"mock/{model}" not in routable
        ),
    ]


@pytest.fixture(scope="session")
def search_server() -> Iterator[SearchServer]:
    """A SearXNG-shaped search backend the worker's `web_search` asks (tests/test_tools.py)."""
    with SearchServer() as server:
        yield server


@pytest.fixture(scope="session")
def stack_settings(
    tmp_path_factory: pytest.TempPathFactory,
    provider_server: OpenAICompatibleServer,
    native_servers: NativeServers,
    search_server: SearchServer,
) -> Settings:
    data_dir = tmp_path_factory.mktemp("durachat-data")
    return Settings(
        environment="test",
        data_dir=data_dir,
        embedded_postgres_port=free_port_block(),
        embedded_redis_port=free_port_block(),
        embedded_temporal_port=free_port_block((0, 10, 11)),
        embedded_temporal_ui=False,
        embedded_s3_port=free_port_block(tuple(range(10))),
        api_port=free_port_block(),
        temporal_task_queue=f"durachat-test-{uuid.uuid4().hex[:8]}",
        providers={
            **json.loads(provider_server.providers_env("mock", MOCK_MODELS)),
            **native_servers.providers(),
        },
        models=catalog_for_tests(),
        tier_models={"strategic": FALLING_MODEL},
        title_model="mock/titler",
        stream_ping_seconds=1,
        # A browser app's origin, for the CORS checks in tests/test_ai_sdk_chat.py.
        cors_origins=["http://app.durachat.test"],
        # Remote files come from a test server on this loopback address; every other private
        # address stays refused (tests/test_attachments.py).
        outbound_allowed_hosts=[REMOTE_FILES_HOST],
        # Small, so the refusals of tests/test_attachments.py need no large files.
        max_attachment_bytes=MAX_TEST_ATTACHMENT_BYTES,
        max_attachments_per_message=3,
        searxng_url=search_server.searxng_url,
        slack_api_url=SLACK_API_URL,
        discord_api_url=DISCORD_API_URL,
        # Edits paced quickly, so streamed bot answers show several edits within a test.
        bot_edit_interval_seconds=0.2,
        # Webhook retries in fractions of a second, and endpoints disabled after a few failed
        # deliveries, so tests/test_webhooks.py waits seconds, not days.
        webhook_retry_initial_seconds=0.2,
        webhook_retry_max_interval_seconds=1,
        webhook_disable_after_failures=3,
        # Deliveries to receivers that never answer (schemathesis registers endpoints at public
        # URLs, which do not resolve here) give up within a minute instead of days.
        webhook_retry_for_seconds=60,
    )


@pytest.fixture(scope="session")
def service_stack(stack_settings: Settings) -> Iterator[ServiceStack]:
    stack = ServiceStack(stack_settings, redis_persistent=False)
    stack.start()
    try:
        upgrade_database(stack.endpoints.database_url)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def settings(stack_settings: Settings, service_stack: ServiceStack) -> Settings:
    endpoints = service_stack.endpoints
    return stack_settings.model_copy(
        update={
            "database_url": endpoints.database_url,
            "redis_url": endpoints.redis_url,
            "temporal_address": endpoints.temporal_address,
            "s3_endpoint_url": endpoints.s3_endpoint_url,
        }
    )


def process_environment(settings: Settings) -> dict[str, str]:
    """The DURACHAT_* variables that make a child process's Settings equal `settings`."""
    environment: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        key = f"DURACHAT_{name.upper()}"
        if isinstance(value, (dict, list)):
            if not value:
                continue  # every collection setting defaults to empty
            if name == "providers":
                value = {
                    provider: {
                        **entry,
                        "api_key": settings.providers[provider].api_key.get_secret_value(),
                    }
                    for provider, entry in value.items()
                }
            # Lists of strings are comma-separated settings (NoDecode); mappings and lists of
            # objects are JSON.
            is_json = isinstance(value, dict) or any(isinstance(item, dict) for item in value)
            environment[key] = json.dumps(value) if is_json else ",".join(value)
        elif name == "s3_secret_access_key":
            environment[key] = settings.s3_secret_access_key.get_secret_value()
        else:
            environment[key] = str(value)
    return environment


@dataclass
class RunningServices:
    api: ServiceProcess
    worker: ServiceProcess
    base_url: str


@pytest.fixture(scope="session")
def running_services(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServices]:
    log_dir: Path = tmp_path_factory.mktemp("logs")
    environment = process_environment(settings)
    worker = ServiceProcess("worker", environment, log_dir)
    api = ServiceProcess("api", environment, log_dir)
    worker.start()
    api.start()
    base_url = f"http://{settings.api_host}:{settings.api_port}"
    try:
        wait_until_ready(base_url, api)
        yield RunningServices(api=api, worker=worker, base_url=base_url)
    finally:
        api.stop()
        worker.stop()


@pytest.fixture(scope="session")
def api_url(running_services: RunningServices) -> str:
    return running_services.base_url


@pytest.fixture(scope="session")
async def sessions(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings.resolved_database_url, pool_size=2)
    yield create_session_factory(engine)
    await engine.dispose()


@dataclass(frozen=True)
class Tenant:
    organization_id: str
    key_id: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


async def make_tenant(
    sessions: async_sessionmaker[AsyncSession], *, user_id: str | None = None
) -> Tenant:
    async with sessions.begin() as session:
        organization_id = await api_keys.ensure_organization(
            session, f"org-{uuid.uuid4().hex[:10]}"
        )
        created = await api_keys.create_key(
            session, organization_id, user_id=user_id, is_admin=user_id is None
        )
    return Tenant(organization_id=organization_id, key_id=created.id, secret=created.secret)


@pytest.fixture
async def tenant(sessions: async_sessionmaker[AsyncSession]) -> Tenant:
    return await make_tenant(sessions)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A Redis client of the session's Valkey, built as the services build theirs."""
    client = create_redis(settings.resolved_redis_url, max_connections=10, pool_timeout_seconds=5)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def object_store(settings: Settings) -> AsyncIterator[ObjectStore]:
    """The session's embedded SeaweedFS, through the client the services build, bucket ensured."""
    async with ObjectStore.from_settings(settings) as store:
        await store.ensure_bucket()
        yield store


@pytest.fixture
async def client(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_url, timeout=httpx.Timeout(30.0)) as http:
        yield http
