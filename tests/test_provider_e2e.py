"""Every native provider end to end: a turn through the api and worker to each provider's wire-format
test server, read by the real `ai` client as `useChat` would.

The entries are named after each provider (tests/conftest.py `NativeServers`), so each runs its
preset (adapter, dialect, catalog) with only `base_url` pointed at its local server.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant
from tests.support.ai_client import ai_client_available, run_ai_client
from tests.support.chat_api import get_chat, stored_text

pytestmark = pytest.mark.skipif(
    not ai_client_available(),
    reason="needs node and tests/js/node_modules (`make test` runs npm ci)",
)

PROVIDERS = ["anthropic", "google", "ollama", "groq", "openrouter"]


def chat_command(api_url: str, tenant: Tenant, text: str, model: str) -> dict[str, Any]:
    return {
        "mode": "chat",
        "api": f"{api_url}/v1/chats",
        "headers": tenant.headers,
        "chatId": f"chat_{uuid.uuid4().hex[:12]}",
        "actions": [{"do": "send", "text": text}],
        "body": {"model": model},
    }


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_ai_client_reads_a_streamed_answer_from_each_provider(
    provider: str, api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    text = f"hello from the {provider} wire format"
    command = chat_command(api_url, tenant, text, f"{provider}/echo")
    result = await run_ai_client(command)
    assert result["error"] is None, result
    _user, answer = result["messages"]
    assert stored_text(answer) == text
    assert answer["metadata"]["model"] == f"{provider}/echo"
    usage = answer["metadata"]["usage"]
    assert usage["inputTokens"] > 0
    assert usage["outputTokens"] > 0
    assert not usage.get("estimated", False)

    stored = await get_chat(client, tenant.headers, command["chatId"])
    assert stored_text(stored["messages"][-1]) == text


@pytest.mark.parametrize("provider", ["anthropic", "google", "ollama"])
async def test_reasoning_arrives_as_reasoning_parts_from_each_native_provider(
    provider: str, api_url: str, tenant: Tenant
) -> None:
    options = {
        "anthropic": {"thinking": {"type": "enabled", "budgetTokens": 1024}},
        "google": {"thinkingConfig": {"includeThoughts": True}},
        "ollama": {"think": True},
    }[provider]
    command = chat_command(api_url, tenant, "think first", f"{provider}/thinking-deep-thoughts")
    command["body"]["providerOptions"] = {provider: options}
    result = await run_ai_client(command)
    assert result["error"] is None, result
    answer = result["messages"][-1]
    reasoning = [part for part in answer["parts"] if part["type"] == "reasoning"]
    assert reasoning, answer["parts"]
    assert all(part["text"] for part in reasoning), answer["parts"]
    assert stored_text(answer), answer["parts"]
