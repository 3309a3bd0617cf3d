"""The S3 object store (attachments) on aiobotocore; every key begins with its organization id. Imports only core."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import structlog
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from core.settings import Settings

log = structlog.get_logger(__name__)

PART_SIZE = 8 * 1024 * 1024
DELETE_BATCH = 1000
_UNAVAILABLE_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class ObjectStoreUnavailable(Exception):
    """The store did not answer, or answered 5xx / SlowDown: callers retry."""


class ObjectNotFound(KeyError):
    """No object under this key."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    content_type: str
    etag: str


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return _status(exc) >= 500 or _error_code(exc) in _UNAVAILABLE_CODES
    return isinstance(
        exc,
        EndpointConnectionError
        | ConnectTimeoutError
        | ReadTimeoutError
        | ConnectionClosedError
        | BotoCoreError
        | OSError
        | TimeoutError,
    )


def _translate(exc: BaseException) -> BaseException:
    if _is_unavailable(exc):
        return ObjectStoreUnavailable(f"object store unavailable: {exc}")
    return exc


def _parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    # "bytes 0-99/1234"
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[len("bytes ") :].partition("/")
    start, _, end = span.partition("-")
    return int(start), int(end), int(total)


class ObjectBody:
    """An open GET: iterate over its bytes chunks; `async with` closes it."""

    def __init__(self, response: dict[str, Any]) -> None:
        self._stream = response["Body"]
        self.size: int = int(response.get("ContentLength", 0))
        self.content_type: str = str(response.get("ContentType", "application/octet-stream"))
        self.etag: str = str(response.get("ETag", "")).strip('"')
        parsed = _parse_content_range(response.get("ContentRange"))
        if parsed is None:
            self.content_range: tuple[int, int] | None = None
            self.total_size: int = self.size
        else:
            self.content_range = (parsed[0], parsed[1])
            self.total_size = parsed[2]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream.iter_chunks(64 * 1024):
                yield chunk
        except Exception as exc:
            raise _translate(exc) from exc

    async def read(self) -> bytes:
        try:
            data: bytes = await self._stream.read()
        except Exception as exc:
            raise _translate(exc) from exc
        return data

    async def aclose(self) -> None:
        self._stream.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class ObjectStore:
    """One aiobotocore S3 client per process, opened with `async with`."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        region: str,
        access_key_id: str,
        secret_access_key: str,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self._region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._config = Config(
            connect_timeout=connect_timeout_seconds,
            read_timeout=read_timeout_seconds,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client_context: Any = None
        self._client: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        return cls(
            endpoint_url=settings.resolved_s3_endpoint_url,
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key.get_secret_value(),
            connect_timeout_seconds=settings.s3_connect_timeout_seconds,
            read_timeout_seconds=settings.s3_read_timeout_seconds,
        )

    async def __aenter__(self) -> Self:
        self._client_context = get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self._region,
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            config=self._config,
        )
        self._client = await self._client_context.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context, self._client_context, self._client = self._client_context, None, None
        if context is not None:
            await context.__aexit__(exc_type, exc, tb)

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("ObjectStore used outside `async with`")
        return self._client

    async def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await getattr(self.client, operation)(**kwargs)
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        return result

    def key(self, organization_id: str, name: str) -> str:
        if not organization_id or "/" in organization_id or ".." in organization_id:
            raise ValueError(f"not an organization id for an object key: {organization_id!r}")
        if not name or name.startswith("/") or ".." in name:
            raise ValueError(f"not an object name: {name!r}")
        return f"{organization_id}/{name}"

    async def ensure_bucket(self) -> None:
        try:
            await self._call("head_bucket", Bucket=self.bucket)
            return
        except ClientError as exc:
            if _status(exc) != 404 and _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                raise
        try:
            await self._call("create_bucket", Bucket=self.bucket)
            log.info("objects.bucket_created", bucket=self.bucket)
        except ClientError as exc:
            # Another process created it first.
            if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    async def ensure_bucket_if_reachable(self) -> bool:
        """`ensure_bucket` at process start-up: a store that is down is logged, not fatal, so the
        process still serves what does not need it and /readyz names the store."""
        try:
            await self.ensure_bucket()
        except ObjectStoreUnavailable as exc:
            log.warning("objects.bucket_unchecked", bucket=self.bucket, error=str(exc))
            return False
        return True

    async def ping(self) -> None:
        try:
            await self._call("head_bucket", Bucket=self.bucket)
        except ClientError as exc:
            raise ObjectStoreUnavailable(f"object store bucket check failed: {exc}") from exc

    async def put_bytes(
        self, organization_id: str, name: str, data: bytes, *, content_type: str
    ) -> StoredObject:
        key = self.key(organization_id, name)
        await self._call(
            "put_object", Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
        )
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    async def put_stream(
        self,
        organization_id: str,
        name: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
    ) -> StoredObject:
        key = self.key(organization_id, name)
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []

        async def upload_part(data: bytes) -> None:
            response = await self._call(
                "upload_part",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=len(parts) + 1,
                Body=data,
            )
            parts.append({"ETag": response["ETag"], "PartNumber": len(parts) + 1})

        try:
            async for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                buffer += chunk
                while len(buffer) > PART_SIZE:
                    # Upload a part only once more data follows it, so the last part is never empty.
                    if upload_id is None:
                        created = await self._call(
                            "create_multipart_upload",
                            Bucket=self.bucket,
                            Key=key,
                            ContentType=content_type,
                        )
                        upload_id = str(created["UploadId"])
                    with memoryview(buffer) as view:
                        part = bytes(view[:PART_SIZE])
                    del buffer[:PART_SIZE]
                    await upload_part(part)
            if upload_id is None:
                await self._call(
                    "put_object",
                    Bucket=self.bucket,
                    Key=key,
                    Body=bytes(buffer),
                    ContentType=content_type,
                )
            else:
                await upload_part(bytes(buffer))
                buffer.clear()
                await self._call(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            if upload_id is not None:
                await self._abort_upload(key, upload_id)
            raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            # Shielded, so a cancelled upload still cleans up after itself.
            await asyncio.shield(
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            )
        except BaseException:
            log.warning("objects.abort_multipart_failed", key=key, upload_id=upload_id)

    async def open(
        self,
        organization_id: str,
        name: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
    ) -> ObjectBody:
        key = self.key(organization_id, name)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if byte_range is not None:
            start, end = byte_range
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            response = await self._call("get_object", **kwargs)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES or _status(exc) == 404:
                raise ObjectNotFound(key) from exc
            raise
        return ObjectBody(response)

    async def read_bytes(self, organization_id: str, name: str) -> bytes:
        async with await self.open(organization_id, name) as body:
            return await body.read()

    async def head(self, organization_id: str, name: str) -> ObjectInfo | None:
        key = self.key(organization_id, name)
        try:
            response = await self._call("head_object", Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES or _status(exc) == 404:
                return None
            raise
        return ObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            content_type=str(response.get("ContentType", "application/octet-stream")),
            etag=str(response.get("ETag", "")).strip('"'),
        )

    async def delete_many(self, organization_id: str, names: Iterable[str]) -> None:
        keys = [self.key(organization_id, name) for name in names]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            response = await self._call(
                "delete_objects",
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise RuntimeError(
                    f"object store refused to delete {len(errors)} keys; "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
