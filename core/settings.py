"""The one Settings object: every configuration value, read from the environment. No other module reads os.environ."""

from __future__ import annotations

import functools
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from limits import parse_many
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Images, PDFs and plain text formats; never SVG or HTML, which a browser would run as a page.
DEFAULT_ATTACHMENT_TYPES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "text/markdown",
    "text/csv",
    "application/json",
)
# Signs file links outside production, where no secret need be configured.
DEV_FILE_URL_SECRET = "durachat-development-file-links"  # noqa: S105 - dev only, refused in production


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ProviderType(StrEnum):
    """The adapter a configured provider entry uses."""

    OPENAI_COMPATIBLE = "openai-compatible"
    ANTHROPIC = "anthropic"
    GOOGLE = "google"
    OLLAMA = "ollama"


class ProviderEntry(BaseModel):
    """One configured model provider.

    An entry named after a known provider (`anthropic`, `google`, `ollama`, `groq`, `openrouter`,
    `openai`) uses that provider's adapter, endpoint and catalog models: a key is enough. Any other
    name says which adapter it uses with `type` (OpenAI-compatible when absent) and needs
    `base_url` and `models` (providers/presets.py).
    """

    type: ProviderType | None = None
    base_url: str | None = None
    api_key: SecretStr = SecretStr("")
    # None: the catalog's models of a known provider.
    models: list[str] | None = None
    timeout_seconds: float = Field(default=120.0, gt=0)
    # The models that take image inputs; None means what the catalog says (every model, for
    # models it does not know), [] none.
    image_models: list[str] | None = None
    # The models that take PDFs natively, as documents (the others get the PDF's extracted text);
    # None means what the catalog says (none, for models it does not know).
    document_models: list[str] | None = None

    @model_validator(mode="after")
    def _input_models_are_configured_models(self) -> ProviderEntry:
        if self.models is None:
            return self
        for setting in ("image_models", "document_models"):
            unknown = [name for name in getattr(self, setting) or () if name not in self.models]
            if unknown:
                raise ValueError(
                    f"{setting} names models missing from models: {', '.join(map(repr, unknown))}"
                )
        return self


class ModelOverride(BaseModel):
    """An operator's catalog entry (`DURACHAT_MODELS`): adds a model or overrides curated fields.

    `id` is "provider/model" with the configured provider name. Prices are USD per million tokens.
    """

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    id: str
    name: str | None = None
    tier: Literal["everyday", "advanced", "strategic"] | None = None
    prompt_ppm: Decimal | None = Field(default=None, alias="promptPpm", ge=0)
    cached_prompt_ppm: Decimal | None = Field(default=None, alias="cachedPromptPpm", ge=0)
    cache_write_ppm: Decimal | None = Field(default=None, alias="cacheWritePpm", ge=0)
    completion_ppm: Decimal | None = Field(default=None, alias="completionPpm", ge=0)
    context_window: int | None = Field(default=None, alias="contextWindow", gt=0)
    max_output_tokens: int | None = Field(default=None, alias="maxOutputTokens", gt=0)
    capabilities: list[Literal["vision", "documents", "reasoning", "tools"]] | None = None
    deprecated: bool | None = None
    internal: bool | None = None


MODEL_TIERS = ("everyday", "advanced", "strategic")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DURACHAT_", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT
    log_level: str = "INFO"
    log_json: bool = False

    data_dir: Path = Path(".durachat")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # External services. When one is set, `durachat dev` / `durachat services` use it as it is and do not
    # start the embedded twin.
    database_url: str | None = None
    redis_url: str | None = None
    temporal_address: str | None = None
    temporal_namespace: str = "default"
    temporal_task_queue: str = "durachat-turns"
    # The S3-compatible object store holding attachments (docs/decisions.md "Object store"). Every
    # object key begins with the organization id.
    s3_endpoint_url: str | None = None
    s3_bucket: str = "durachat"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = "durachat"
    s3_secret_access_key: SecretStr = SecretStr("durachat-dev-secret")
    # Callers own retries (the api answers 503, activities retry), so a store that does not answer
    # is reported quickly instead of retried inside botocore.
    s3_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    s3_read_timeout_seconds: float = Field(default=30.0, gt=0)

    # How long opening a Postgres connection and one statement may take before the caller is told
    # the database is unavailable (docs/decisions.md "Outages and lost turns"); 0 turns the
    # statement timeout off.
    database_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    database_statement_timeout_seconds: float = Field(default=10.0, ge=0)

    # Ports of the embedded services, so two dev stacks can run side by side.
    embedded_postgres_port: int = 54329
    embedded_redis_port: int = 63790
    embedded_temporal_port: int = 7233
    embedded_temporal_ui_port: int = 8233
    embedded_temporal_ui: bool = True
    # The embedded SeaweedFS (`weed mini`) serves S3 on this port and binds the nine after it for its
    # own master, volume, filer and admin servers (devstack.embedded.EmbeddedSeaweedFS).
    embedded_s3_port: int = 8333
    # Each volume file grows to at most this size, so a fresh data directory stays small.
    embedded_s3_volume_size_limit_mb: int = Field(default=64, ge=8)

    dev_api_key: SecretStr | None = None
    dev_organization: str = "dev"

    # The last step of a turn's model choice: the request, the chat's model, the user's default,
    # the organization's default, then this (README "Choosing a model").
    default_model: str = "local/echo"
    providers: dict[str, ProviderEntry] = Field(default_factory=dict)
    # Operator catalog entries, added to or overriding the curated catalog (providers/catalog.json).
    models: list[ModelOverride] = Field(default_factory=list)
    # The model each tier (`tier` in a send, and `auto`) prefers: "provider/model". A tier without
    # one uses its cheapest available model.
    tier_models: dict[str, str] = Field(default_factory=dict)

    # How long a finished turn's Redis Stream stays replayable.
    stream_retention_seconds: int = 3600
    # Upper bound on a live stream's lifetime, so a stream whose turn never finishes cannot leak.
    stream_max_lifetime_seconds: int = 86400
    # Idle comment pings on open SSE responses.
    stream_ping_seconds: float = 15.0

    # The model that titles a new chat after its first turn (`provider/model`); unset, or when it
    # fails, the title is the first words of the first message.
    title_model: str | None = None

    # Deleted chats (messages and turns included) are purged this long after deletion, by a job
    # that runs on this period.
    deleted_chat_retention_seconds: int = Field(default=30 * 86400, ge=0)
    purge_interval_seconds: int = Field(default=3600, ge=60)

    # A turn whose workflow was terminated or timed out is released (its streams end with `error`)
    # within about this long, by a sweep every worker runs, even when nothing touches its chat.
    lost_turn_release_seconds: float = Field(default=30.0, ge=1)

    # Limits (README "Configuration"; docs/decisions.md "Limits"). Bodies over max_request_bytes are
    # refused before anything reads them.
    max_message_chars: int = Field(default=100_000, ge=1)
    max_request_bytes: int = Field(default=1_000_000, ge=0)
    # The shape of a JSON body, checked before anything parses it for the app (400 beyond): how
    # deep its objects and arrays nest, and how many object members and array elements it holds.
    max_json_depth: int = Field(default=64, ge=1)
    max_json_items: int = Field(default=10_000, ge=1)
    # Rate limits per API key, shared by every api replica through Redis, in the notation of the
    # `limits` package: "60/minute", or several as "10/second;300/hour". Empty turns one off.
    send_rate_limit: str = "60/minute"
    stream_open_rate_limit: str = "120/minute"
    # Concurrency caps; 0 turns one off. Open streams are counted per API key, running turns per
    # organization.
    max_open_streams_per_key: int = Field(default=20, ge=0)
    max_active_turns_per_organization: int = Field(default=50, ge=0)
    # An open stream holds its slot through a Redis lease renewed every third of this; a slot whose
    # api process died frees itself after at most this long.
    stream_lease_seconds: int = Field(default=30, ge=3)

    # Streams at scale (docs/decisions.md "Streams at scale"). Each api and worker process shares one
    # Redis pool of at most this many connections; a command that finds all of them busy for the
    # pool timeout fails (a 503 in the api) instead of opening more.
    redis_max_connections: int = Field(default=50, ge=1)
    redis_pool_timeout_seconds: float = Field(default=2.0, gt=0)
    # The worker waits longer: a command that gives up fails a generation attempt, which Temporal
    # retries by generating the whole answer again, while waiting only delays a token.
    worker_redis_pool_timeout_seconds: float = Field(default=30.0, gt=0)
    # The api follows every open stream through this many blocking readers, each on a dedicated
    # connection of its own, whatever the number of streams.
    stream_reader_connections: int = Field(default=1, ge=1, le=16)
    # Entries one open stream may have waiting for its client; past that the stream catches up from
    # Redis at the client's pace, so a slow client cannot grow the api's memory.
    stream_subscriber_buffer_entries: int = Field(default=512, ge=16)
    # Worker concurrency: activities (every live turn holds one while it generates) and workflow
    # tasks processed at once.
    worker_max_concurrent_activities: int = Field(default=1000, ge=1)
    worker_max_concurrent_workflow_tasks: int = Field(default=100, ge=2)

    # Attachments (docs/decisions.md "Attachments"). Types are sniffed from the bytes; a file of a
    # type not listed is refused (415).
    attachment_allowed_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_ATTACHMENT_TYPES)
    )
    max_attachment_bytes: int = Field(default=20_000_000, ge=1)
    max_attachments_per_message: int = Field(default=10, ge=0)
    # Requests that may carry files (uploads, and sends whose messages hold `data:` URLs) are bounded
    # by this instead of max_request_bytes. Multipart uploads stream to a temporary file and on to
    # the store; they are never held in memory whole.
    max_upload_request_bytes: int = Field(default=50_000_000, ge=0)
    # Signed file links in chat reads (`<img src>` sends no Authorization header) expire after this.
    file_url_expiry_seconds: int = Field(default=3600, ge=10)
    # The HMAC secret of signed file links, the same on every api replica; required in production.
    file_url_secret: SecretStr | None = None
    # Where clients reach the api, for the absolute links in chat reads; unset, each request's own
    # scheme and host are used.
    public_base_url: str | None = None
    # Files uploaded but never sent in a message are deleted this long after their upload.
    unattached_file_retention_seconds: int = Field(default=86400, ge=0)
    # Outbound fetches of URLs users name refuse loopback, private, link-local and other
    # non-global addresses; these host names, IPs or CIDRs (comma-separated) are let through.
    outbound_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A remote file (an https URL in a `file` part) must arrive within this long.
    remote_file_timeout_seconds: float = Field(default=30.0, gt=0)

    # Tools (README "Tools"; docs/decisions.md "Tools"). A turn runs at most this many model steps
    # (a send's `maxSteps` may ask for fewer or more, up to the ceiling); the step that reaches
    # the bound ends the turn with finish reason `length` and says why.
    default_max_steps: int = Field(default=10, ge=1)
    max_steps_ceiling: int = Field(default=50, ge=1)
    # A tool output is stored whole; only this many characters of it enter the model's context.
    tool_output_context_chars: int = Field(default=8_000, ge=100)
    # Built-in tools that wait for a person's approval before they run (`web_search`, `web_fetch`).
    tools_needing_approval: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # An approval nobody decides ends as denied after this long.
    approval_timeout_seconds: float = Field(default=86_400.0, gt=0)
    # Web search backends, tried in this order: SearXNG's JSON API (self-hosted, no key), then
    # Brave, then Tavily, each when configured. None configured: `web: true` is refused (400).
    searxng_url: str | None = None
    brave_api_key: SecretStr | None = None
    brave_search_url: str = "https://api.search.brave.com/res/v1/web/search"
    tavily_api_key: SecretStr | None = None
    tavily_search_url: str = "https://api.tavily.com/search"
    web_search_results: int = Field(default=5, ge=1, le=20)
    web_search_timeout_seconds: float = Field(default=10.0, gt=0)
    # web_fetch reads at most this many bytes of a page within this long, and keeps at most this
    # many characters of its text.
    web_fetch_max_bytes: int = Field(default=5_000_000, ge=1_000)
    web_fetch_timeout_seconds: float = Field(default=15.0, gt=0)
    web_fetch_max_chars: int = Field(default=100_000, ge=1_000)
    # The key that encrypts secrets stored at rest (MCP server headers and tokens, bot tokens): a
    # Fernet key (32 url-safe base64 bytes). Required in production; development uses a fixed one.
    secrets_key: SecretStr | None = None
    # MCP tool calls: how long one call may take, and how long listing a server's tools may.
    mcp_call_timeout_seconds: float = Field(default=60.0, gt=0)
    mcp_list_timeout_seconds: float = Field(default=10.0, gt=0)

    # Webhooks: completion events signed as Standard Webhooks, each delivery a workflow. An attempt
    # that gets no answer within the attempt timeout failed; failed attempts retry with exponential
    # backoff from the initial interval up to the max interval, for `webhook_retry_for_seconds` in
    # all (receivers expect days: keep it at 24 h or more in production).
    webhook_attempt_timeout_seconds: float = Field(default=15.0, gt=0)
    webhook_retry_initial_seconds: float = Field(default=5.0, gt=0)
    webhook_retry_max_interval_seconds: float = Field(default=4 * 3600.0, gt=0)
    webhook_retry_for_seconds: float = Field(default=3 * 86_400.0, gt=0)
    # An endpoint whose deliveries failed for good this many times in a row is disabled.
    webhook_disable_after_failures: int = Field(default=20, ge=1)
    # After a secret rotation the previous secret signs too (a second signature) for this long, so
    # receivers can switch without missing a delivery.
    webhook_secret_overlap_seconds: float = Field(default=86_400.0, ge=0)

    # Bots (README "Slack and Discord"). The platforms' API base URLs, for tests and proxies.
    slack_api_url: str = "https://slack.com/api/"
    discord_api_url: str = "https://discord.com/api/v10"
    # A reaction (the emoji's name) on a Slack thread's message that stops its running answer.
    slack_stop_reaction: str = "octagonal_sign"
    # How often a streaming answer is edited into its platform message at most (each platform
    # also paces by its own rate-limit answers).
    bot_edit_interval_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _refuse_unsafe_production_defaults(self) -> Settings:
        if self.environment is Environment.PRODUCTION:
            missing = [
                name
                for name in ("database_url", "redis_url", "temporal_address", "s3_endpoint_url")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    "production needs external services; set "
                    + ", ".join(f"DURACHAT_{name.upper()}" for name in missing)
                )
            if self.dev_api_key is not None:
                raise ValueError("DURACHAT_DEV_API_KEY must not be set in production")
            if self.file_url_secret is None:
                raise ValueError("production needs DURACHAT_FILE_URL_SECRET to sign file links")
            if self.secrets_key is None:
                raise ValueError("production needs DURACHAT_SECRETS_KEY to encrypt stored secrets")
        return self

    @field_validator("tier_models")
    @classmethod
    def _tiers_are_known(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(MODEL_TIERS))
        if unknown:
            raise ValueError(f"unknown tiers {', '.join(unknown)}; tiers: {', '.join(MODEL_TIERS)}")
        return value

    @field_validator("send_rate_limit", "stream_open_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        value = value.strip()
        if value:
            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError(
                    f"{value!r} is not a rate limit such as '60/minute' or '10/second;300/hour'"
                ) from exc
        return value

    @field_validator(
        "cors_origins",
        "attachment_allowed_types",
        "outbound_allowed_hosts",
        "tools_needing_approval",
        mode="before",
    )
    @classmethod
    def _split_comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def model_post_init(self, __context: object) -> None:
        self.data_dir = self.data_dir.expanduser().resolve()

    @property
    def file_url_signing_key(self) -> bytes:
        secret = self.file_url_secret.get_secret_value() if self.file_url_secret else None
        return (secret or DEV_FILE_URL_SECRET).encode()

    @property
    def embedded_database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.embedded_postgres_port}/durachat"

    @property
    def embedded_redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    @property
    def embedded_temporal_address(self) -> str:
        return f"127.0.0.1:{self.embedded_temporal_port}"

    @property
    def embedded_s3_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.embedded_s3_port}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or self.embedded_database_url

    @property
    def resolved_redis_url(self) -> str:
        return self.redis_url or self.embedded_redis_url

    @property
    def resolved_temporal_address(self) -> str:
        return self.temporal_address or self.embedded_temporal_address

    @property
    def resolved_s3_endpoint_url(self) -> str:
        return self.s3_endpoint_url or self.embedded_s3_endpoint_url


@functools.cache
def get_settings() -> Settings:
    return Settings()
