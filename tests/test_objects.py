"""The object store against the session's embedded SeaweedFS: keys, streaming uploads, ranges, deletes, outages."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from core.settings import Settings
from devstack.ports import free_port_block
from storage.objects import (
    PART_SIZE,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
)

MIB = 1024 * 1024


def _org() -> str:
    return f"org_{uuid.uuid4().hex[:12]}"


async def test_put_bytes_reads_back_equal(object_store: ObjectStore) -> None:
    org = _org()
    data = os.urandom(4096)
    stored = await object_store.put_bytes(org, "notes/a.bin", data, content_type="image/png")
    assert stored.key == f"{org}/notes/a.bin"
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await object_store.read_bytes(org, "notes/a.bin") == data
    info = await object_store.head(org, "notes/a.bin")
    assert info is not None
    assert (info.key, info.size, info.content_type) == (stored.key, len(data), "image/png")


async def test_put_stream_uploads_parts_while_holding_at_most_one(
    object_store: ObjectStore,
) -> None:
    org = _org()
    expected = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(48):
            chunk = os.urandom(MIB)
            expected.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        stored = await object_store.put_stream(
            org, "big.bin", chunks(), content_type="application/octet-stream"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The buffered part plus the copies botocore and aiohttp make of the part in flight: a bound
    # that does not grow with the object (measured about 35 MB for 20 and for 40 MiB), well
    # below the 48 MiB streamed.
    assert peak < 5 * PART_SIZE, peak
    assert stored.size == 48 * MIB
    assert stored.sha256 == expected.hexdigest()
    info = await object_store.head(org, "big.bin")
    assert info is not None
    assert info.size == 48 * MIB
    # A multipart ETag ends with the number of parts: six of 8 MiB.
    assert info.etag.endswith("-6")
    digest = hashlib.sha256()
    async with await object_store.open(org, "big.bin") as body:
        async for piece in body:
            assert len(piece) <= PART_SIZE
            digest.update(piece)
    assert digest.hexdigest() == stored.sha256


async def test_put_stream_below_one_part_is_a_single_put(object_store: ObjectStore) -> None:
    org = _org()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * MIB
        yield b"b" * MIB

    stored = await object_store.put_stream(org, "small.bin", chunks(), content_type="text/plain")
    info = await object_store.head(org, "small.bin")
    assert info is not None
    assert "-" not in info.etag
    assert stored.size == 2 * MIB
    assert await object_store.read_bytes(org, "small.bin") == b"a" * MIB + b"b" * MIB


async def test_aborted_put_stream_leaves_no_object_and_no_upload(
    object_store: ObjectStore,
) -> None:
    org = _org()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(12):
            yield os.urandom(MIB)
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        await object_store.put_stream(org, "half.bin", chunks(), content_type="text/plain")
    assert await object_store.head(org, "half.bin") is None
    uploads = await object_store.client.list_multipart_uploads(
        Bucket=object_store.bucket, Prefix=f"{org}/"
    )
    assert uploads.get("Uploads", []) == []


async def test_ranged_open_returns_the_inclusive_range(object_store: ObjectStore) -> None:
    org = _org()
    data = bytes(range(256)) * 4
    await object_store.put_bytes(org, "r.bin", data, content_type="application/octet-stream")
    async with await object_store.open(org, "r.bin", byte_range=(10, 19)) as body:
        assert (body.size, body.total_size, body.content_range) == (10, len(data), (10, 19))
        assert await body.read() == data[10:20]
    async with await object_store.open(org, "r.bin", byte_range=(1000, None)) as body:
        assert body.content_range == (1000, len(data) - 1)
        assert await body.read() == data[1000:]


async def test_missing_keys(object_store: ObjectStore) -> None:
    org = _org()
    assert await object_store.head(org, "nothing") is None
    with pytest.raises(ObjectNotFound):
        await object_store.open(org, "nothing")


async def test_delete_many_in_batches_counts_missing_keys_as_deleted(
    object_store: ObjectStore,
) -> None:
    org = _org()
    present = [f"k/{index}" for index in range(0, 1500, 100)]
    for name in present:
        await object_store.put_bytes(org, name, b"x", content_type="text/plain")
    await object_store.delete_many(org, [f"k/{index}" for index in range(1500)])
    for name in present:
        assert await object_store.head(org, name) is None


def test_keys_begin_with_the_organization_and_bad_names_are_refused(
    object_store: ObjectStore,
) -> None:
    assert object_store.key("org1", "attachments/a.png") == "org1/attachments/a.png"
    for organization_id, name in [
        ("", "a"),
        ("org/1", "a"),
        ("org1", "/a"),
        ("org1", "a/../../org2/b"),
        ("org1", ""),
    ]:
        with pytest.raises(ValueError, match="not an"):
            object_store.key(organization_id, name)


async def test_a_wrong_secret_key_is_refused(settings: Settings) -> None:
    wrong = settings.model_copy(update={"s3_secret_access_key": SecretStr("not-the-secret")})
    async with ObjectStore.from_settings(wrong) as store:
        with pytest.raises(ClientError, match=r"SignatureDoesNotMatch|AccessDenied") as raised:
            await store.put_bytes("org1", "a", b"x", content_type="text/plain")
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


async def test_a_store_that_is_down_is_unavailable_quickly(settings: Settings) -> None:
    closed = settings.model_copy(
        update={
            "s3_endpoint_url": f"http://127.0.0.1:{free_port_block()}",
            "s3_connect_timeout_seconds": 1.0,
        }
    )
    async with ObjectStore.from_settings(closed) as store:
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            await store.ping()
        with pytest.raises(ObjectStoreUnavailable):
            await store.put_bytes("org1", "a", b"x", content_type="text/plain")
        assert time.monotonic() - started < 5


async def test_readyz_reports_the_object_store(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["objects"] == "ok"


def test_production_needs_an_external_object_store() -> None:
    external = {
        "environment": "production",
        "database_url": "postgresql+asyncpg://u@db/durachat",
        "redis_url": "redis://redis:6379/0",
        "temporal_address": "temporal:7233",
        "file_url_secret": "a-long-random-secret",
        "secrets_key": "a-fernet-key",
    }
    with pytest.raises(ValueError, match="DURACHAT_S3_ENDPOINT_URL"):
        Settings.model_validate(external)
    settings = Settings.model_validate({**external, "s3_endpoint_url": "https://s3.internal"})
    assert settings.resolved_s3_endpoint_url == "https://s3.internal"


def test_production_needs_a_file_link_secret() -> None:
    external = {
        "environment": "production",
        "database_url": "postgresql+asyncpg://u@db/durachat",
        "redis_url": "redis://redis:6379/0",
        "temporal_address": "temporal:7233",
        "s3_endpoint_url": "https://s3.internal",
        "secrets_key": "a-fernet-key",
    }
    with pytest.raises(ValueError, match="DURACHAT_FILE_URL_SECRET"):
        Settings.model_validate(external)
    settings = Settings.model_validate({**external, "file_url_secret": "s3cret-" * 6})
    assert settings.file_url_signing_key == ("s3cret-" * 6).encode()
