"""Attachments end to end, against the running stack: the embedded SeaweedFS, the OpenAI-wire test
server (which records what reaches the model), a local file server for remote URLs, and the real
`ai` client. Files go in every way the api takes them and come back out by signed link; refusals
leave nothing behind; the outbound guard refuses private addresses; deletion empties the store."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from api.file_links import FileLinks
from core.contracts import PurgeDeletedChatsInput, turn_workflow_id
from core.settings import Settings
from devstack.embedded import EmbeddedSeaweedFS
from devstack.stack import ServiceStack
from storage.models import Attachment
from storage.objects import ObjectStore
from tests.conftest import MAX_TEST_ATTACHMENT_BYTES, REMOTE_FILES_HOST, Tenant, make_tenant
from tests.support.ai_client import ai_client_available, run_ai_client
from tests.support.chat_api import assert_problem, get_chat, send_and_collect
from tests.support.file_server import FileServer
from tests.support.openai_server import OpenAICompatibleServer
from workflows.maintenance import PurgeDeletedChatsWorkflow

ECHO = "mock/echo"


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def pdf_with_text(text: str) -> bytes:
    writer = PdfWriter()
    page = writer.add_blank_page(width=300, height=200)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})}
    )
    content = DecodedStreamObject()
    content.set_data(f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode())
    page[NameObject("/Contents")] = writer._add_object(content)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def requests_saying(server: OpenAICompatibleServer, marker: str) -> list[Any]:
    """The answering model's requests whose user message says `marker` (not the titler's)."""
    return [
        request
        for request in server.requests_for("echo")
        if any(marker in str(part.get("text", "")) for part in request.user_content_parts())
    ]


async def stored_state(
    sessions: async_sessionmaker[AsyncSession], object_store: ObjectStore, organization_id: str
) -> tuple[int, int]:
    """(attachment rows, objects) the organization has."""
    async with sessions() as session:
        rows = (
            await session.execute(
                select(func.count())
                .select_from(Attachment)
                .where(Attachment.organization_id == organization_id)
            )
        ).scalar_one()
    listed = await object_store.client.list_objects_v2(
        Bucket=object_store.bucket, Prefix=f"{organization_id}/"
    )
    return rows, int(listed.get("KeyCount", 0))


async def send_json(
    client: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any], path: str = "/v1/chats"
) -> httpx.Response:
    return await client.post(f"{path}?stream=false", json=body, headers=tenant.headers, timeout=60)


def user_message(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"m_{uuid.uuid4().hex[:8]}", "role": "user", "parts": list(parts)}


@pytest.fixture(scope="module")
def file_server() -> Iterator[FileServer]:
    with FileServer(REMOTE_FILES_HOST) as server:
        yield server


# --- in through useChat, out through signed links -------------------------------------------------


@pytest.mark.skipif(not ai_client_available(), reason="needs node and tests/js/node_modules")
async def test_a_use_chat_image_reaches_the_model_and_reads_back_by_signed_link(
    api_url: str,
    client: httpx.AsyncClient,
    tenant: Tenant,
    provider_server: OpenAICompatibleServer,
    settings: Settings,
) -> None:
    chat_id = f"chat_{uuid.uuid4().hex[:12]}"
    marker = f"describe-{uuid.uuid4().hex[:8]}"
    original = png(2400, 1200)
    image_part = {
        "type": "file",
        "mediaType": "image/png",
        "filename": "wide.png",
        "url": data_url(original, "image/png"),
    }
    result = await run_ai_client(
        {
            "mode": "chat",
            "api": f"{api_url}/v1/chats",
            "headers": tenant.headers,
            "chatId": chat_id,
            "body": {"model": ECHO},
            "actions": [
                {"do": "send", "text": marker, "files": [image_part]},
                {"do": "regenerate"},
            ],
        },
        timeout=120,
    )
    assert result["error"] is None, result

    # The model got the image both times (the regeneration reuses the stored attachment), as an
    # image input downscaled to a 1568 px long edge.
    seen = requests_saying(provider_server, marker)
    assert len(seen) == 2
    for request in seen:
        [(media_type, sent)] = request.images()
        assert media_type == "image/jpeg"
        assert Image.open(io.BytesIO(sent)).size == (1568, 784)

    chat = await get_chat(client, tenant.headers, chat_id)
    assert "data:" not in json.dumps(chat)
    [user, _answer] = chat["messages"]
    [file_part] = [part for part in user["parts"] if part["type"] == "file"]
    assert file_part["mediaType"] == "image/png"
    assert file_part["filename"] == "wide.png"
    link = file_part["url"]
    assert link.startswith(f"{api_url}/v1/chats/{chat_id}/images/")
    attachment_id = file_part["providerMetadata"]["durachat"]["attachmentId"]
    assert chat["attachments"] == [
        {
            "id": attachment_id,
            "filename": "wide.png",
            "mediaType": "image/png",
            "size": len(original),
        }
    ]

    # The link works without any header, as an <img src> would use it, and serves the original.
    async with httpx.AsyncClient(timeout=30) as browser:
        shown = await browser.get(link)
        assert shown.status_code == 200, shown.text
        assert shown.content == original
        assert shown.headers["content-type"] == "image/png"
        assert shown.headers["x-content-type-options"] == "nosniff"
        assert shown.headers["content-disposition"].startswith("inline")
        etag = shown.headers["etag"]
        ranged = await browser.get(link, headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 206
        assert ranged.content == original[:10]
        assert ranged.headers["content-range"] == f"bytes 0-9/{len(original)}"
        assert (await browser.get(link, headers={"If-None-Match": etag})).status_code == 304

        tampered = link[:-4] + ("0000" if not link.endswith("0000") else "1111")
        assert_problem(await browser.get(tampered), 404)
        expired = FileLinks(settings.file_url_signing_key, -60, api_url).url(
            tenant.organization_id, chat_id, _attachment(attachment_id, "image/png", "wide.png")
        )
        assert_problem(await browser.get(expired), 404)
        assert_problem(await browser.get(link.split("?")[0]), 401)

    # No attachment bytes in the turn's workflow history: activities passed ids.
    temporal = await Client.connect(settings.resolved_temporal_address)
    turn_ids = [
        turn["id"]
        for turn in (await client.get(f"/v1/chats/{chat_id}/turns", headers=tenant.headers)).json()[
            "items"
        ]
    ]
    fingerprint = base64.b64encode(original).decode()[200:260]
    for turn_id in turn_ids:
        history = await temporal.get_workflow_handle(turn_workflow_id(turn_id)).fetch_history()
        assert fingerprint not in history.to_json()
        assert "base64," not in history.to_json()


def _attachment(attachment_id: str, media_type: str, filename: str) -> Attachment:
    return Attachment(id=attachment_id, media_type=media_type, filename=filename)


# --- uploads, fileIds and the walls -------------------------------------------------------------


async def test_an_upload_is_sent_by_file_id_and_stays_behind_the_walls(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: async_sessionmaker[AsyncSession],
    provider_server: OpenAICompatibleServer,
) -> None:
    notes = b"# Notes\n\nThe launch code is swordfish.\n"
    uploaded = await client.post(
        "/v1/files",
        files={"file": ("notes.md", notes, "text/markdown")},
        headers=tenant.headers,
    )
    assert uploaded.status_code == 201, uploaded.text
    upload = uploaded.json()
    assert upload["mediaType"] == "text/markdown"
    assert upload["size"] == len(notes)
    read_back = await client.get(upload["url"], headers=tenant.headers)
    assert read_back.content == notes

    marker = f"summarize-{uuid.uuid4().hex[:8]}"
    sent = await send_json(
        client, tenant, {"message": marker, "model": ECHO, "fileIds": [upload["id"]]}
    )
    assert sent.status_code == 200, sent.text
    chat_id = sent.json()["chatId"]
    [request] = requests_saying(provider_server, marker)
    assert "The launch code is swordfish." in request.user_content_parts()[0]["text"]

    # A chat upload answers a signed link; another organization reaches neither file.
    chat_upload = await client.post(
        f"/v1/chats/{chat_id}/attachments",
        files={"file": ("dot.png", png(4, 4), "image/png")},
        headers=tenant.headers,
    )
    assert chat_upload.status_code == 201, chat_upload.text
    async with httpx.AsyncClient(timeout=30) as browser:
        assert (await browser.get(chat_upload.json()["url"])).status_code == 200
    stranger = await make_tenant(sessions)
    chat = await get_chat(client, tenant.headers, chat_id)
    file_link = next(p for p in chat["messages"][0]["parts"] if p["type"] == "file")["url"]
    unsigned = file_link.split("?")[0]
    assert (await client.get(unsigned, headers=tenant.headers)).status_code == 200
    assert_problem(await client.get(unsigned, headers=stranger.headers), 404)
    image_path = f"/v1/chats/{chat_id}/images/{chat_upload.json()['id']}"
    assert_problem(await client.get(image_path, headers=stranger.headers), 404)
    assert_problem(await client.get(f"/v1/files/{upload['id']}", headers=stranger.headers), 404)
    refused = await send_json(client, stranger, {"message": "mine?", "fileIds": [upload["id"]]})
    assert_problem(refused, 400)

    # In a user-keyed organization, another user of the same organization sees nothing either.
    alice = await make_tenant(sessions, user_id="alice")
    async with sessions.begin() as session:
        from storage import api_keys

        bob_key = await api_keys.create_key(session, alice.organization_id, user_id="bob")
    bob = {"Authorization": f"Bearer {bob_key.secret}"}
    alices = await client.post(
        "/v1/files", files={"file": ("a.txt", b"alice's", "text/plain")}, headers=alice.headers
    )
    assert alices.status_code == 201
    assert_problem(await client.get(alices.json()["url"], headers=bob), 404)


# --- refusals -------------------------------------------------------------------------------------


def _bomb() -> bytes:
    # A tiny PNG that decodes to far more pixels than Pillow's guard allows.
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        out = io.BytesIO()
        Image.new("1", (20_000, 20_000)).save(out, format="PNG")
        return out.getvalue()
    finally:
        Image.MAX_IMAGE_PIXELS = limit


REFUSED_UPLOADS = {
    "too large": (("big.txt", b"a" * (MAX_TEST_ATTACHMENT_BYTES + 1), "text/plain"), 413),
    "svg": (("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "image/svg+xml"), 415),
    "html": (("x.html", b"<!doctype html><script>alert(1)</script>", "text/html"), 415),
    "mismatched": (("x.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "image/png"), 415),
    "binary garbage": (("x.bin", bytes(range(256)) * 8, "application/octet-stream"), 415),
}


@pytest.mark.parametrize("case", list(REFUSED_UPLOADS))
async def test_a_refused_upload_leaves_nothing_behind(
    case: str,
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: async_sessionmaker[AsyncSession],
    object_store: ObjectStore,
) -> None:
    file, status = REFUSED_UPLOADS[case]
    assert_problem(
        await client.post("/v1/files", files={"file": file}, headers=tenant.headers), status
    )
    assert await stored_state(sessions, object_store, tenant.organization_id) == (0, 0)


async def test_refused_sends_leave_nothing_behind(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessions: async_sessionmaker[AsyncSession],
    object_store: ObjectStore,
) -> None:
    small = {"type": "file", "mediaType": "image/png", "url": data_url(png(8, 8), "image/png")}
    cases: list[tuple[dict[str, Any], int]] = [
        (
            {"messages": [user_message(small, small, small, small, {"type": "text", "text": "4"})]},
            400,
        ),
        (
            {
                "messages": [
                    user_message(
                        small,
                        {
                            "type": "file",
                            "mediaType": "text/plain",
                            "url": data_url(b"x" * (MAX_TEST_ATTACHMENT_BYTES + 10), "text/plain"),
                        },
                    )
                ]
            },
            413,
        ),
        (
            {
                "messages": [
                    user_message(
                        small,
                        {
                            "type": "file",
                            "mediaType": "image/png",
                            "url": data_url(_bomb(), "image/png"),
                        },
                    )
                ]
            },
            415,
        ),
        (
            {
                "message": "look",
                "image": base64.b64encode(b"<svg></svg>").decode(),
                "imageMimeType": "image/svg+xml",
            },
            415,
        ),
        (
            {
                "message": "look",
                "model": "local/lorem",
                "image": base64.b64encode(png(8, 8)).decode(),
                "imageMimeType": "image/png",
            },
            400,
        ),
        ({"message": "look", "fileIds": ["no-such-file"]}, 400),
        (
            {
                "messages": [
                    user_message(
                        {"type": "file", "mediaType": "image/png", "url": "ftp://example.com/x.png"}
                    )
                ]
            },
            422,
        ),
    ]
    for body, status in cases:
        problem = assert_problem(await send_json(client, tenant, body), status)
        assert await stored_state(sessions, object_store, tenant.organization_id) == (0, 0), problem
    listed = (await client.get("/v1/chats", headers=tenant.headers)).json()
    assert listed["total"] == 0


async def test_an_upload_past_the_request_limit_is_refused_while_it_streams(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    too_big = settings.max_upload_request_bytes + 1

    async def body() -> Any:
        boundary = b"--x\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
        sent = 0
        while sent < too_big:
            yield b"a" * 1_000_000
            sent += 1_000_000
        yield b"\r\n--x--\r\n"

    response = await client.post(
        "/v1/files",
        content=body(),
        headers={**tenant.headers, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert_problem(response, 413)


# --- remote files and the outbound guard ---------------------------------------------------------


async def test_a_remote_file_is_fetched_and_persisted(
    client: httpx.AsyncClient,
    tenant: Tenant,
    file_server: FileServer,
    provider_server: OpenAICompatibleServer,
    object_store: ObjectStore,
) -> None:
    report = pdf_with_text("Quarterly revenue grew by 42 percent")
    url = file_server.serve(f"/{uuid.uuid4().hex}/report.pdf", report, "application/pdf")
    file_server.fail(url.removeprefix(file_server.base_url), 503, 1)  # retried
    marker = f"read-{uuid.uuid4().hex[:8]}"
    sent = await send_json(
        client,
        tenant,
        {
            "model": ECHO,
            "messages": [
                user_message(
                    {"type": "file", "mediaType": "application/pdf", "url": url},
                    {"type": "text", "text": marker},
                )
            ],
        },
    )
    assert sent.status_code == 200, sent.text
    # The model takes no documents: it got the PDF's text.
    [request] = requests_saying(provider_server, marker)
    assert "Quarterly revenue grew by 42 percent" in request.user_content_parts()[0]["text"]

    chat = await get_chat(client, tenant.headers, sent.json()["chatId"])
    assert url not in json.dumps(chat)
    [stored] = chat["attachments"]
    assert (stored["filename"], stored["mediaType"], stored["size"]) == (
        "report.pdf",
        "application/pdf",
        len(report),
    )
    link = next(p for p in chat["messages"][0]["parts"] if p["type"] == "file")["url"]
    downloaded = await client.get(link)
    assert downloaded.content == report
    assert downloaded.headers["content-disposition"].startswith("attachment")


@pytest.mark.parametrize(
    "target",
    ["loopback", "metadata", "redirect to loopback", "redirect to metadata", "not found"],
)
async def test_remote_files_at_refused_addresses_fail_the_turn(
    target: str,
    client: httpx.AsyncClient,
    tenant: Tenant,
    file_server: FileServer,
) -> None:
    token = uuid.uuid4().hex
    urls = {
        "loopback": f"http://127.0.0.1:{file_server.port}/{token}",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "redirect to loopback": file_server.redirect(
            f"/{token}/hop", f"http://127.0.0.1:{file_server.port}/{token}"
        ),
        "redirect to metadata": file_server.redirect(
            f"/{token}/meta", "http://169.254.169.254/latest/meta-data/"
        ),
        "not found": f"{file_server.base_url}/{token}/missing.png",
    }
    response, events = await send_and_collect(
        client,
        tenant.headers,
        {
            "model": ECHO,
            "messages": [
                user_message(
                    {"type": "file", "mediaType": "image/png", "url": urls[target]},
                    {"type": "text", "text": "what is this"},
                )
            ],
        },
    )
    assert response.status_code == 200, response.text
    chunks = [event.chunk for event in events if event.data != "[DONE]"]
    [error] = [chunk for chunk in chunks if chunk.get("type") == "error"]
    expected = "HTTP 404" if target == "not found" else "not allowed"
    assert expected in error["errorText"], error
    chat_id = response.headers["x-chat-id"]
    [turn] = (await client.get(f"/v1/chats/{chat_id}/turns", headers=tenant.headers)).json()[
        "items"
    ]
    assert turn["status"] == "failed"
    assert expected in turn["error"]


# --- deletion -------------------------------------------------------------------------------------


async def test_truncate_and_purge_delete_the_files(
    client: httpx.AsyncClient,
    tenant: Tenant,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    object_store: ObjectStore,
) -> None:
    image = {"type": "file", "mediaType": "image/png", "url": data_url(png(40, 30), "image/png")}
    first = await send_json(
        client, tenant, {"messages": [user_message(image, {"type": "text", "text": "one"})]}
    )
    assert first.status_code == 200, first.text
    chat_id = first.json()["chatId"]
    second = await send_json(
        client,
        tenant,
        {"messages": [user_message(image, {"type": "text", "text": "two"})]},
        path=f"/v1/chats/{chat_id}",
    )
    assert second.status_code == 200, second.text
    # Two attachments, each with its original and its model copy.
    assert await stored_state(sessions, object_store, tenant.organization_id) == (2, 4)

    truncated = await client.post(
        f"/v1/chats/{chat_id}/truncate", json={"keep": 2}, headers=tenant.headers
    )
    assert truncated.status_code == 200, truncated.text
    assert await stored_state(sessions, object_store, tenant.organization_id) == (1, 2)

    assert (await client.delete(f"/v1/chats/{chat_id}", headers=tenant.headers)).status_code == 204
    # Unreachable at once, before any purge.
    assert_problem(await client.get(f"/v1/chats/{chat_id}", headers=tenant.headers), 404)
    temporal = await Client.connect(settings.resolved_temporal_address)
    purged = await temporal.execute_workflow(
        PurgeDeletedChatsWorkflow.run,
        PurgeDeletedChatsInput(retention_seconds=0, organization_id=tenant.organization_id),
        id=f"purge-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.temporal_task_queue,
    )
    assert purged == 1
    assert await stored_state(sessions, object_store, tenant.organization_id) == (0, 0)


async def test_uploads_never_sent_are_swept(
    client: httpx.AsyncClient,
    tenant: Tenant,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    object_store: ObjectStore,
) -> None:
    uploaded = await client.post(
        "/v1/files", files={"file": ("n.txt", b"never sent", "text/plain")}, headers=tenant.headers
    )
    assert uploaded.status_code == 201
    temporal = await Client.connect(settings.resolved_temporal_address)
    await temporal.execute_workflow(
        PurgeDeletedChatsWorkflow.run,
        PurgeDeletedChatsInput(
            retention_seconds=3600,
            organization_id=tenant.organization_id,
            unattached_file_retention_seconds=0,
        ),
        id=f"purge-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.temporal_task_queue,
    )
    assert await stored_state(sessions, object_store, tenant.organization_id) == (0, 0)


# --- the store away mid-turn ----------------------------------------------------------------------


async def test_a_turn_waits_for_the_store_and_completes(
    client: httpx.AsyncClient,
    tenant: Tenant,
    file_server: FileServer,
    service_stack: ServiceStack,
    provider_server: OpenAICompatibleServer,
) -> None:
    store = next(s for s in service_stack.services if isinstance(s, EmbeddedSeaweedFS))
    photo = png(64, 48, (10, 120, 200))
    url = file_server.serve(f"/{uuid.uuid4().hex}/photo.png", photo, "image/png")
    marker = f"store-away-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(store.stop)
    try:
        sending = asyncio.create_task(
            send_json(
                client,
                tenant,
                {
                    "model": ECHO,
                    "messages": [
                        user_message(
                            {"type": "file", "mediaType": "image/png", "url": url},
                            {"type": "text", "text": marker},
                        )
                    ],
                },
            )
        )
        # The turn is accepted (the api needs no store for a remote file) and waits.
        started = time.monotonic()
        while not any(path.endswith("photo.png") for path in file_server.requests):
            assert time.monotonic() - started < 30, "the turn never tried the fetch"
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        assert not sending.done()
    finally:
        store.start()
        await asyncio.to_thread(store.wait_ready, 60)
    sent = await sending
    assert sent.status_code == 200, sent.text
    assert sent.json()["status"] == "completed"
    [request] = requests_saying(provider_server, marker)
    assert len(request.images()) == 1


async def test_an_edit_keeps_the_original_files_unless_it_names_its_own(
    client: httpx.AsyncClient, tenant: Tenant, provider_server: OpenAICompatibleServer
) -> None:
    image = {"type": "file", "mediaType": "image/png", "url": data_url(png(30, 20), "image/png")}
    first = await send_json(
        client,
        tenant,
        {"model": ECHO, "messages": [user_message(image, {"type": "text", "text": "first"})]},
    )
    assert first.status_code == 200, first.text
    chat_id = first.json()["chatId"]
    user_id = (await get_chat(client, tenant.headers, chat_id))["messages"][0]["id"]

    kept_marker = f"edited-{uuid.uuid4().hex[:8]}"
    kept = await send_json(
        client,
        tenant,
        {"content": kept_marker, "model": ECHO},
        path=f"/v1/chats/{chat_id}/messages/{user_id}/edit",
    )
    assert kept.status_code == 200, kept.text
    [request] = requests_saying(provider_server, kept_marker)
    assert len(request.images()) == 1

    dropped_marker = f"no-files-{uuid.uuid4().hex[:8]}"
    dropped = await send_json(
        client,
        tenant,
        {"content": dropped_marker, "model": ECHO, "fileIds": []},
        path=f"/v1/chats/{chat_id}/messages/{user_id}/edit",
    )
    assert dropped.status_code == 200, dropped.text
    [request] = requests_saying(provider_server, dropped_marker)
    assert request.images() == []
