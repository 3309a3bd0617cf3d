"""Chat management against the running api: list, by-external, update, auto-title, delete and purge,
truncate, message and turn pages."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from core.contracts import PurgeDeletedChatsInput
from core.settings import Settings
from storage.models import Chat, Message, Organization, Turn
from tests.conftest import Tenant, process_environment
from tests.support.chat_api import assert_problem, get_chat, stored_text, wait_for_settled_answer
from tests.support.openai_server import OpenAICompatibleServer, Script
from tests.support.sse import iter_sse
from workflows.maintenance import PURGE_SCHEDULE_ID, PurgeDeletedChatsWorkflow

LONG = {"model": "local/lorem", "providerOptions": {"local": {"words": 200, "delayMs": 30}}}


async def send(
    client: httpx.AsyncClient, tenant: Tenant, text: str, chat_id: str | None = None, **body: Any
) -> dict[str, Any]:
    path = f"/v1/chats/{chat_id}" if chat_id else "/v1/chats"
    response = await client.post(
        path,
        json={"message": text, "model": "local/echo", **body},
        params={"stream": "false"},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def patch(
    client: httpx.AsyncClient, tenant: Tenant, chat_id: str, body: dict[str, Any]
) -> httpx.Response:
    return await client.patch(f"/v1/chats/{chat_id}", json=body, headers=tenant.headers)


async def test_list_pages_pinned_first_then_recent_with_filters(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    first = (await send(client, tenant, "one"))["chatId"]
    second = (await send(client, tenant, "two"))["chatId"]
    channel = {"source": "discord", "id": f"chan-{uuid.uuid4().hex[:8]}"}
    bound = (await send(client, tenant, "three", externalChannelId=channel))["chatId"]
    assert (
        await patch(client, tenant, first, {"pinned": True, "title": "Tides"})
    ).status_code == 200

    page = (await client.get("/v1/chats", headers=tenant.headers)).json()
    assert [item["id"] for item in page["items"]] == [first, bound, second]
    assert page["total"] == 3
    assert "messages" not in page["items"][0]

    paged = (
        await client.get("/v1/chats", params={"limit": 1, "offset": 1}, headers=tenant.headers)
    ).json()
    assert [item["id"] for item in paged["items"]] == [bound]
    assert paged["total"] == 3

    by_source = (
        await client.get("/v1/chats", params={"source": "discord"}, headers=tenant.headers)
    ).json()
    assert [item["id"] for item in by_source["items"]] == [bound]
    by_title = (await client.get("/v1/chats", params={"q": "tid"}, headers=tenant.headers)).json()
    assert [item["id"] for item in by_title["items"]] == [first]
    wildcard = (await client.get("/v1/chats", params={"q": "%"}, headers=tenant.headers)).json()
    assert wildcard["total"] == 0, "the search is literal text, not a pattern"

    for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"source": "irc"}):
        response = await client.get("/v1/chats", params=bad, headers=tenant.headers)
        assert response.status_code == 422, bad
        assert response.headers["content-type"] == "application/problem+json"

    found = await client.get("/v1/chats/by-external", params=channel, headers=tenant.headers)
    assert found.status_code == 200
    assert found.json()["id"] == bound
    assert stored_text(found.json()["messages"][-1]) == "three"
    missing = await client.get(
        "/v1/chats/by-external", params={"source": "discord", "id": "nope"}, headers=tenant.headers
    )
    assert missing.status_code == 404


async def test_update_validates_each_field_and_shapes_the_prompt(
    client: httpx.AsyncClient, tenant: Tenant, provider_server: OpenAICompatibleServer
) -> None:
    chat_id = (await send(client, tenant, "hello"))["chatId"]
    marker = uuid.uuid4().hex
    updated = await patch(
        client,
        tenant,
        chat_id,
        {
            "title": "  Travel plans  ",
            "instructions": f"Always answer in French. {marker}",
            "mood": "serious",
            "folder": "work",
            "model": "mock/echo",
        },
    )
    assert updated.status_code == 200, updated.text
    chat = updated.json()
    assert (chat["title"], chat["mood"], chat["folder"], chat["model"]) == (
        "Travel plans",
        "serious",
        "work",
        "mock/echo",
    )

    # A send without a model uses the chat's default; instructions and mood lead the system prompt.
    answer = await send(client, tenant, "bonjour", chat_id, model=None)
    turns = (await client.get(f"/v1/chats/{chat_id}/turns", headers=tenant.headers)).json()
    assert turns["items"][0]["id"] == answer["turnId"]
    assert turns["items"][0]["model"] == "mock/echo"
    prompt = next(
        request.body["messages"]
        for request in reversed(provider_server.requests_for("echo"))
        if marker in str(request.body["messages"])
    )
    assert prompt[0]["role"] == "system"
    assert prompt[0]["content"].startswith(
        f"Always answer in French. {marker}\n\nAnswer in a serious"
    )

    cleared = await patch(client, tenant, chat_id, {"folder": None, "mood": "normal"})
    assert (cleared.json()["folder"], cleared.json()["mood"]) == (None, "normal")
    assert cleared.json()["title"] == "Travel plans", "fields left out stay as they are"

    for bad in (
        {"colour": "blue"},
        {"mood": "grumpy"},
        {"title": ""},
        {"title": "x" * 201},
        {"pinned": None},
        {"pinned": "maybe"},
        {"folder": "f" * 101},
    ):
        response = await patch(client, tenant, chat_id, bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    unknown_model = await patch(client, tenant, chat_id, {"model": "nope/nothing"})
    assert unknown_model.status_code == 400
    after = await get_chat(client, tenant.headers, chat_id)
    assert (after["title"], after["model"], after["pinned"]) == ("Travel plans", "mock/echo", False)
    assert (await patch(client, tenant, "no-such-chat", {"pinned": True})).status_code == 404


async def test_a_new_chat_is_titled_after_its_first_turn_unless_the_user_titled_it(
    client: httpx.AsyncClient, tenant: Tenant, provider_server: OpenAICompatibleServer
) -> None:
    # The suite's title model is `mock/titler`, which answers `"About: <first four words>"`.
    words = "Plan a three day walking trip through the Scottish highlands in May"
    chat_id = (await send(client, tenant, words))["chatId"]
    assert (await get_chat(client, tenant.headers, chat_id))["title"] == "About: Plan a three day"
    [asked] = [r for r in provider_server.requests_for("titler") if words in str(r.messages)]
    assert [m["role"] for m in asked.messages] == ["system", "user"]
    assert asked.messages[1]["content"] == words
    await send(client, tenant, "and the second message changes nothing", chat_id)
    assert (await get_chat(client, tenant.headers, chat_id))["title"] == "About: Plan a three day"

    # When the title model fails, the first words of the first message are the title.
    provider_server.script("titler", Script(fail_status=500))
    try:
        untitled = (await send(client, tenant, words))["chatId"]
    finally:
        provider_server.forget_script("titler")
    assert (await get_chat(client, tenant.headers, untitled))["title"] == (
        "Plan a three day walking trip through the…"
    )

    async with client.stream(
        "POST", "/v1/chats", json={"message": "long one", **LONG}, headers=tenant.headers
    ) as response:
        user_titled = response.headers["x-chat-id"]
        assert (await patch(client, tenant, user_titled, {"title": "Mine"})).status_code == 200
        await client.post(f"/v1/chats/{user_titled}/stop", headers=tenant.headers)
        [event async for event in iter_sse(response)]
    await wait_for_settled_answer(client, tenant.headers, user_titled)
    await asyncio.sleep(0.5)  # the title step runs after the answer is stored
    assert (await get_chat(client, tenant.headers, user_titled))["title"] == "Mine"


async def test_delete_stops_the_turn_frees_the_channel_and_purge_removes_everything(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    channel = {"source": "slack", "id": f"C{uuid.uuid4().hex[:8]}"}
    async with client.stream(
        "POST",
        "/v1/chats",
        json={"message": "long", "externalChannelId": channel, **LONG},
        headers=tenant.headers,
    ) as response:
        chat_id = response.headers["x-chat-id"]
        turn_id = response.headers["x-turn-id"]
        events = iter_sse(response)
        await anext(events)
        deleted = await client.delete(f"/v1/chats/{chat_id}", headers=tenant.headers)
        assert deleted.status_code == 204
        ending = [event.chunk["type"] async for event in events if event.data != "[DONE]"]
    assert ending[-2:] == ["abort", "finish"], "deleting stopped the running turn"

    for method, path in (
        ("GET", f"/v1/chats/{chat_id}"),
        ("GET", f"/v1/chats/{chat_id}/messages"),
        ("GET", f"/v1/chats/{chat_id}/turns"),
        ("PATCH", f"/v1/chats/{chat_id}"),
        ("DELETE", f"/v1/chats/{chat_id}"),
        ("POST", f"/v1/chats/{chat_id}/stop"),
    ):
        response = await client.request(
            method, path, json={} if method == "PATCH" else None, headers=tenant.headers
        )
        assert response.status_code == 404, (method, path, response.status_code)
    gone = await client.get("/v1/chats/by-external", params=channel, headers=tenant.headers)
    assert gone.status_code == 404
    listed = (await client.get("/v1/chats", headers=tenant.headers)).json()
    assert chat_id not in [item["id"] for item in listed["items"]]

    # The channel takes a new chat at once.
    fresh = await send(client, tenant, "again", externalChannelId=channel)
    assert fresh["chatId"] != chat_id

    async with sessions() as session:
        turn = (await session.execute(select(Turn).where(Turn.id == turn_id))).scalar_one()
        assert turn.status == "aborted"
        organization_name = (
            await session.execute(
                select(Organization.name).where(Organization.id == tenant.organization_id)
            )
        ).scalar_one()

    # Within the retention nothing is purged; the admin command purges at once.
    temporal = await Client.connect(settings.resolved_temporal_address)
    kept = await temporal.execute_workflow(
        PurgeDeletedChatsWorkflow.run,
        PurgeDeletedChatsInput(retention_seconds=3600, organization_id=tenant.organization_id),
        id=f"purge-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.temporal_task_queue,
    )
    assert kept == 0
    assert await rows_of(sessions, chat_id) == (1, 2, 1)
    purge = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cli", "chats", "purge", "--org", organization_name),
        env=process_environment(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(purge.communicate(), 60)
    assert purge.returncode == 0, stderr.decode()
    assert "purged 1 deleted chats" in stdout.decode()
    assert await rows_of(sessions, chat_id) == (0, 0, 0)
    assert (await get_chat(client, tenant.headers, fresh["chatId"]))["messages"]

    # The scheduled job exists, and purges what has passed its retention.
    schedule = await temporal.get_schedule_handle(PURGE_SCHEDULE_ID).describe()
    assert schedule.schedule.action.workflow == "PurgeDeletedChatsWorkflow"  # type: ignore[union-attr]
    assert (
        await client.delete(f"/v1/chats/{fresh['chatId']}", headers=tenant.headers)
    ).status_code == 204
    purged = await temporal.execute_workflow(
        PurgeDeletedChatsWorkflow.run,
        PurgeDeletedChatsInput(retention_seconds=0, organization_id=tenant.organization_id),
        id=f"purge-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.temporal_task_queue,
    )
    assert purged == 1
    assert await rows_of(sessions, fresh["chatId"]) == (0, 0, 0)


async def rows_of(sessions: async_sessionmaker[AsyncSession], chat_id: str) -> tuple[int, int, int]:
    """(chats, messages, turns) stored under the chat id."""
    async with sessions() as session:
        counts = []
        for model in (Chat, Message, Turn):
            column = model.id if model is Chat else model.chat_id  # type: ignore[attr-defined]
            counts.append(
                (
                    await session.execute(
                        select(func.count()).select_from(model).where(column == chat_id)
                    )
                ).scalar_one()
            )
    return counts[0], counts[1], counts[2]


async def test_truncate_keeps_the_newest_messages(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = (await send(client, tenant, "one"))["chatId"]
    await send(client, tenant, "two", chat_id)
    await send(client, tenant, "three", chat_id)
    truncate = f"/v1/chats/{chat_id}/truncate"

    kept = await client.post(truncate, json={"keep": 3}, headers=tenant.headers)
    assert kept.json() == {"kept": 3, "deleted": 3}
    messages = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert [(m["role"], stored_text(m)) for m in messages] == [
        ("assistant", "two"),
        ("user", "three"),
        ("assistant", "three"),
    ]
    # The chat goes on from the kept messages.
    await send(client, tenant, "four", chat_id)
    assert len((await get_chat(client, tenant.headers, chat_id))["messages"]) == 5

    for bad in ({"keep": -1}, {"keep": "all"}, {}, {"keep": 1, "extra": True}):
        response = await client.post(truncate, json=bad, headers=tenant.headers)
        assert response.status_code == 422, bad

    async with client.stream(
        "POST", f"/v1/chats/{chat_id}", json={"message": "long", **LONG}, headers=tenant.headers
    ) as response:
        events = iter_sse(response)
        await anext(events)
        busy = await client.post(truncate, json={"keep": 0}, headers=tenant.headers)
        assert busy.status_code == 409
        await client.post(f"/v1/chats/{chat_id}/stop", headers=tenant.headers)
        [event async for event in events]
    await wait_for_settled_answer(client, tenant.headers, chat_id)

    emptied = await client.post(truncate, json={"keep": 0}, headers=tenant.headers)
    assert emptied.json() == {"kept": 0, "deleted": 7}
    assert (await get_chat(client, tenant.headers, chat_id))["messages"] == []
    await send(client, tenant, "fresh start", chat_id)
    assert len((await get_chat(client, tenant.headers, chat_id))["messages"]) == 2


async def test_messages_and_turns_pages(client: httpx.AsyncClient, tenant: Tenant) -> None:
    chat_id = (await send(client, tenant, "one"))["chatId"]
    await send(client, tenant, "two", chat_id)
    await send(client, tenant, "three", chat_id)
    messages_path = f"/v1/chats/{chat_id}/messages"

    last = (await client.get(messages_path, params={"limit": 2}, headers=tenant.headers)).json()
    assert [stored_text(m) for m in last["messages"]] == ["three", "three"]
    assert last["hasMore"] is True
    earlier = (
        await client.get(
            messages_path,
            params={"limit": 3, "before": last["messages"][0]["id"]},
            headers=tenant.headers,
        )
    ).json()
    assert [(m["role"], stored_text(m)) for m in earlier["messages"]] == [
        ("assistant", "one"),
        ("user", "two"),
        ("assistant", "two"),
    ]
    assert earlier["hasMore"] is True
    first = (
        await client.get(
            messages_path,
            params={"before": earlier["messages"][0]["id"]},
            headers=tenant.headers,
        )
    ).json()
    assert [stored_text(m) for m in first["messages"]] == ["one"]
    assert first["hasMore"] is False
    unknown = await client.get(messages_path, params={"before": "nope"}, headers=tenant.headers)
    assert unknown.status_code == 404

    turns = (
        await client.get(f"/v1/chats/{chat_id}/turns", params={"limit": 2}, headers=tenant.headers)
    ).json()
    assert turns["total"] == 3
    assert len(turns["items"]) == 2
    newest = turns["items"][0]
    assert newest["status"] == "completed"
    assert newest["attempts"] == 1
    assert newest["model"] == "local/echo"
    assert newest["workflowId"] == f"turn-{newest['id']}"
    assert newest["runId"]
    assert newest["usage"]["outputTokens"] >= 1
    assert newest["durationMs"] is not None
    assert newest["completedAt"] is not None


async def test_list_filters_by_folder_and_refuses_unknown_query_parameters(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    filed = (await send(client, tenant, "filed"))["chatId"]
    loose = (await send(client, tenant, "loose"))["chatId"]
    assert (await patch(client, tenant, filed, {"folder": "Work"})).status_code == 200
    in_folder = await client.get("/v1/chats", params={"folder": "Work"}, headers=tenant.headers)
    assert [item["id"] for item in in_folder.json()["items"]] == [filed]
    assert in_folder.json()["total"] == 1
    everything = await client.get("/v1/chats", headers=tenant.headers)
    assert {item["id"] for item in everything.json()["items"]} == {filed, loose}

    # A misspelt filter is refused like an unknown body field, never silently ignored.
    for path, params in (
        ("/v1/chats", {"folders": "Work"}),
        (f"/v1/chats/{filed}", {"verbose": "1"}),
        (f"/v1/chats/{filed}/messages", {"limit": "5", "after": "x"}),
        ("/v1/keys", {"include_revoked": "true"}),
    ):
        response = await client.get(path, params=params, headers=tenant.headers)
        problem = assert_problem(response, 422)
        unknown = [name for name in params if name not in ("limit",)]
        assert [error["loc"] for error in problem["errors"]] == [
            ["query", name] for name in unknown
        ]
    # Declared parameters, a dependency's included (`stream` on sends), still pass.
    sent = await client.post(
        f"/v1/chats/{loose}",
        params={"stream": "false"},
        json={"message": "still fine", "providerOptions": {"local": {"delayMs": 0}}},
        headers=tenant.headers,
    )
    assert sent.status_code == 200, sent.text
    refused = await client.post(
        f"/v1/chats/{loose}",
        params={"stream": "false", "strem": "no"},
        json={"message": "refused"},
        headers=tenant.headers,
    )
    assert_problem(refused, 422)
    assert (
        len((await client.get(f"/v1/chats/{loose}", headers=tenant.headers)).json()["messages"])
        == 4
    )
