"""Static checks of the production-like stack (docker-compose.yml + Dockerfile).

No Docker engine runs in CI, so these catch what would otherwise only fail at `docker compose up`:
dangling dependencies, services nobody can wait on, settings the code does not read, and drift
between the registered Temporal search attributes and the ones the workflows set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.contracts import SEARCH_ATTRIBUTE_NAMES
from core.settings import Environment, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"

# `${NAME}`, `${NAME:-default}`, `${NAME-default}` (the forms the file uses; `$$` is a literal `$`).
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def _load_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def _settings_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency name -> condition, for both the list and the mapping form."""
    raw = service.get("depends_on", {})
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {name: "" if value is None else str(value) for name, value in raw.items()}


def _one_shot_jobs() -> set[str]:
    """Services something waits on to *finish*; everything else is long-running."""
    return {
        name
        for service in SERVICES.values()
        for name, condition in _depends_on(service).items()
        if condition == "service_completed_successfully"
    }


def _env_names_set_anywhere(node: object) -> Iterator[str]:
    """Every variable name assigned anywhere in the document (mapping keys or `NAME=value`)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                yield key
            yield from _env_names_set_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, str) and (match := re.match(r"([A-Z][A-Z0-9_]*)=", item)):
                yield match.group(1)
            else:
                yield from _env_names_set_anywhere(item)


def _interpolate(value: str) -> str:
    """What Compose substitutes when no .env overrides the defaults."""
    return INTERPOLATION.sub(lambda match: match.group("default") or "", value)


def test_every_dependency_exists() -> None:
    missing = {
        (name, dependency)
        for name, service in SERVICES.items()
        for dependency in _depends_on(service)
        if dependency not in SERVICES
    }
    assert not missing


def test_dependencies_wait_for_readiness_not_just_start() -> None:
    # `service_started` would let the api race Postgres, Temporal or an unfinished migration.
    loose = {
        (name, dependency)
        for name, service in SERVICES.items()
        for dependency, condition in _depends_on(service).items()
        if condition not in {"service_healthy", "service_completed_successfully"}
    }
    assert not loose


def test_every_long_running_service_has_a_healthcheck() -> None:
    long_running = set(SERVICES) - _one_shot_jobs()
    unchecked = {
        name
        for name in long_running
        if not SERVICES[name].get("healthcheck", {}).get("test")
        or SERVICES[name]["healthcheck"].get("disable")
    }
    assert not unchecked
    assert {"api", "worker", "temporal", "postgres", "redis"} <= long_running


def test_one_shot_jobs_are_not_restarted_forever() -> None:
    # A job under `restart: unless-stopped` would re-run after success and never "complete".
    for name in _one_shot_jobs():
        assert SERVICES[name].get("restart", "no") in {"no", "on-failure"}, name
    assert {"migrate", "temporal-setup"} <= _one_shot_jobs()


def test_every_durachat_variable_is_a_setting() -> None:
    valid = _settings_env_names()
    used = {name for name in _env_names_set_anywhere(COMPOSE) if name.startswith("DURACHAT_")}

    assert used, "the stack configures durachat through DURACHAT_ variables"
    assert used <= valid, f"not fields of core.settings.Settings: {sorted(used - valid)}"


@pytest.mark.parametrize("service_name", ["api", "worker", "migrate"])
def test_durachat_services_get_a_valid_production_configuration(
    service_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Settings refuses production without external services; build it from exactly the
    # environment the container gets, with this process's DURACHAT_ variables out of the way.
    for name in _settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in _environment(SERVICES[service_name]).items():
        monkeypatch.setenv(name, _interpolate(value))

    settings = Settings()

    assert settings.environment is Environment.PRODUCTION
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.s3_endpoint_url == "http://s3:8333"
    assert settings.dev_api_key is None


def test_the_object_store_is_seaweedfs_with_the_services_credentials() -> None:
    s3 = SERVICES["s3"]
    assert s3["image"].startswith("chrislusf/seaweedfs:")
    command = s3["command"]
    assert command[0] == "mini"
    assert "-s3.port=8333" in command
    # The same optional servers the embedded one turns off.
    assert {"-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false"} <= set(
        command
    )
    store_env = {name: _interpolate(value) for name, value in _environment(s3).items()}
    for name in ("api", "worker"):
        env = {key: _interpolate(value) for key, value in _environment(SERVICES[name]).items()}
        assert env["DURACHAT_S3_ACCESS_KEY_ID"] == store_env["AWS_ACCESS_KEY_ID"], name
        assert env["DURACHAT_S3_SECRET_ACCESS_KEY"] == store_env["AWS_SECRET_ACCESS_KEY"], name
        assert _depends_on(SERVICES[name])["s3"] == "service_healthy", name
    assert not s3.get("ports"), "attachments are served through the api only"


def test_durachat_services_run_the_image_built_from_the_dockerfile() -> None:
    built = {name: service for name, service in SERVICES.items() if "build" in service}
    assert {"api", "worker", "migrate"} <= set(built)
    for name, service in built.items():
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (context / dockerfile).is_file(), name

    dockerfile_text = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen --no-dev" in dockerfile_text
    assert re.search(r"^USER (?!root)", dockerfile_text, re.MULTILINE), "runs as non-root"
    assert 'ENTRYPOINT ["durachat"]' in dockerfile_text
    assert [SERVICES[name]["command"] for name in ("api", "worker", "migrate")] == [
        ["api"],
        ["worker"],
        ["migrate"],
    ]


def test_third_party_images_are_pinned() -> None:
    for name, service in SERVICES.items():
        if "build" in service:
            continue
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag not in {"", "latest"}, f"{name}: {image}"


def test_registered_search_attributes_match_the_workflow_contract() -> None:
    setup = SERVICES["temporal-setup"]
    environment = _environment(setup)

    assert set(environment["SEARCH_ATTRIBUTES"].split()) == set(SEARCH_ATTRIBUTE_NAMES)
    assert "--type Keyword" in setup["command"][0]
    # The attributes are namespace-scoped: they must land in the namespace durachat uses.
    durachat_namespace = _environment(SERVICES["worker"])["DURACHAT_TEMPORAL_NAMESPACE"]
    assert environment["NAMESPACE"] == durachat_namespace
    assert _environment(SERVICES["api"])["DURACHAT_TEMPORAL_NAMESPACE"] == durachat_namespace
