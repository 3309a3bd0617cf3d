"""A chat turn end to end: the api, a real worker, Temporal, Postgres, Redis and the stream on the wire."""

from __future__ import annotations

import httpx

from tests.conftest import Tenant
from tests.support.sse import chunks_of, collect_sse, text_of


async def test_send_streams_answer_and_stores_it(client: httpx.AsyncClient, tenant: Tenant) -> None:
    body = {"message": "hello durable world", "providerOptions": {"local": {"delayMs": 0}}}
    async with client.stream("POST", "/v1/chats", json=body, headers=tenant.headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        chat_id = response.headers["x-chat-id"]
        events = await collect_sse(response)

    assert events[-1].data == "[DONE]"
    chunks = chunks_of(events)
    assert [chunks[0]["type"], chunks[1]["type"]] == ["start", "start-step"]
    assert chunks[0]["messageMetadata"]["chatId"] == chat_id
    assert chunks[-1]["type"] == "finish"
    assert text_of(chunks) == "hello durable world"
    assert all(event.id for event in events[:-1])

    chat = (await client.get(f"/v1/chats/{chat_id}", headers=tenant.headers)).json()
    user, assistant = chat["messages"]
    assert user["parts"] == [{"type": "text", "text": "hello durable world"}]
    assert assistant["id"] == chunks[0]["messageId"]
    assert assistant["status"] == "complete"
    assert "".join(p["text"] for p in assistant["parts"] if p["type"] == "text") == "hello durable world"
