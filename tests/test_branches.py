"""Regenerate and edit keep the tree: new messages are siblings, never overwrites; the chat shows the
active branch with each message's siblings, and any branch can be made active again."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import Tenant
from tests.support.ai_client import run_ai_client
from tests.support.chat_api import get_chat, send_and_collect, stored_text
from tests.support.sse import chunks_of, text_of

FAST = {"local": {"delayMs": 0}}


async def start_chat(client: httpx.AsyncClient, tenant: Tenant, *texts: str) -> str:
    response, _ = await send_and_collect(
        client, tenant.headers, {"message": texts[0], "providerOptions": FAST}
    )
    chat_id = response.headers["x-chat-id"]
    for text in texts[1:]:
        await send_and_collect(
            client,
            tenant.headers,
            {"message": text, "providerOptions": FAST},
            f"/v1/chats/{chat_id}",
        )
    return chat_id


async def test_regenerate_adds_a_sibling_answer_and_makes_it_active(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = await start_chat(client, tenant, "first question")
    before = (await get_chat(client, tenant.headers, chat_id))["messages"]
    old_answer = before[-1]
    response, events = await send_and_collect(
        client,
        tenant.headers,
        {"model": "local/lorem", "providerOptions": {"local": {"words": 5, "delayMs": 0}}},
        f"/v1/chats/{chat_id}/messages/{old_answer['id']}/regenerate",
    )
    assert response.status_code == 200, response.text
    new_id = chunks_of(events)[0]["messageId"]
    assert new_id != old_answer["id"]
    after = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert [m["id"] for m in after[:-1]] == [m["id"] for m in before[:-1]], (
        "the user message is shared"
    )
    assert after[-1]["id"] == new_id
    assert len(stored_text(after[-1]).split()) == 5
    assert after[-1]["siblingIds"] == [old_answer["id"], new_id]

    # The old answer is still there: switching back shows it.
    switched = await client.post(
        f"/v1/chats/{chat_id}/branch", json={"messageId": old_answer["id"]}, headers=tenant.headers
    )
    assert switched.status_code == 200, switched.text
    assert switched.json()["messages"][-1]["id"] == old_answer["id"]
    assert stored_text(switched.json()["messages"][-1]) == "first question"


async def test_edit_makes_a_sibling_user_message_and_answers_it(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = await start_chat(client, tenant, "one", "two", "three")
    before = (await get_chat(client, tenant.headers, chat_id))["messages"]
    second_user = before[2]
    response, events = await send_and_collect(
        client,
        tenant.headers,
        {"content": "two, edited", "providerOptions": FAST},
        f"/v1/chats/{chat_id}/messages/{second_user['id']}/edit",
    )
    assert response.status_code == 200, response.text
    assert text_of(chunks_of(events)) == "two, edited"
    after = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert [stored_text(m) for m in after] == ["one", "one", "two, edited", "two, edited"]
    assert after[2]["siblingIds"][0] == second_user["id"]
    assert len(after[2]["siblingIds"]) == 2

    # The original branch, with its later messages, is kept whole.
    restored = await client.post(
        f"/v1/chats/{chat_id}/branch", json={"messageId": second_user["id"]}, headers=tenant.headers
    )
    assert [stored_text(m) for m in restored.json()["messages"]] == [
        "one",
        "one",
        "two",
        "two",
        "three",
        "three",
    ]


async def test_editing_the_first_message_makes_a_new_root(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = await start_chat(client, tenant, "hello")
    first = (await get_chat(client, tenant.headers, chat_id))["messages"][0]
    await send_and_collect(
        client,
        tenant.headers,
        {"content": "hi", "providerOptions": FAST},
        f"/v1/chats/{chat_id}/messages/{first['id']}/edit",
    )
    messages = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert [stored_text(m) for m in messages] == ["hi", "hi"]
    assert messages[0]["siblingIds"] == [first["id"], messages[0]["id"]]


async def test_regenerate_and_edit_refuse_unknown_or_foreign_messages(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = await start_chat(client, tenant, "mine")
    other_chat = await start_chat(client, tenant, "elsewhere")
    foreign = (await get_chat(client, tenant.headers, other_chat))["messages"][0]["id"]
    answer = (await get_chat(client, tenant.headers, chat_id))["messages"][-1]["id"]
    for path, body in [
        (f"/v1/chats/{chat_id}/messages/nope/regenerate", {}),
        (f"/v1/chats/{chat_id}/messages/{foreign}/regenerate", {}),
        (f"/v1/chats/{chat_id}/messages/{foreign}/edit", {"content": "x"}),
        (
            f"/v1/chats/{chat_id}/messages/{answer}/edit",
            {"content": "an assistant message is not editable"},
        ),
    ]:
        response = await client.post(path, json=body, headers=tenant.headers)
        assert response.status_code == 404, (path, response.text)
    assert len((await get_chat(client, tenant.headers, chat_id))["messages"]) == 2
    bad = await client.post(
        f"/v1/chats/{chat_id}/branch", json={"messageId": foreign}, headers=tenant.headers
    )
    assert bad.status_code == 404


async def test_ai_sdk_regenerate_trigger_makes_a_sibling(
    api_url: str, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "say it twice"}]}
    base = {
        "mode": "send",
        "api": f"{api_url}/v1/chats",
        "headers": tenant.headers,
        "chatId": chat_id,
        "body": {"providerOptions": FAST},
    }
    first = await run_ai_client({**base, "messages": [user], "trigger": "submit-message"})
    old_id = first["message"]["id"]
    again = await run_ai_client(
        {**base, "messages": [user], "trigger": "regenerate-message", "messageId": old_id}
    )
    assert again["error"] is None, again
    messages = (await get_chat(client, tenant.headers, chat_id))["messages"]
    assert len(messages) == 2
    assert messages[-1]["id"] == again["message"]["id"] != old_id
    assert messages[-1]["siblingIds"] == [old_id, messages[-1]["id"]]
    assert {key: messages[-1][key] for key in ("id", "role", "parts", "metadata")} == again[
        "message"
    ]
