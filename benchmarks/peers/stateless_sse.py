"""`python -m benchmarks.peers.stateless_sse --port P`: the stateless peer of the turn-latency benchmark.

A FastAPI app under uvicorn that answers `POST /v1/chats` as durachat's api does on the wire (the same
request body, headers and UI message stream chunks, built by the same `UiMessageBuilder` and sent by
the same sse-starlette response) with nothing durable behind it: the request handler runs the
`local/lorem` stream itself and turns each delta into chunks. No Temporal, Redis or Postgres, no
auth, limits or middleware; an answer lives only as long as its connection and cannot be resumed or
stopped from elsewhere. It is what streaming a model's answer over HTTP from Python costs before any
durability. Never opens a Redis or database connection.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from activities.ui_message import UiMessageBuilder
from api.relay import ui_message_stream_response
from core.ui_chunks import opening_chunks, usage_metadata
from providers.base import GenerationRequest, PromptMessage, ProviderError
from providers.local import LOCAL_PROVIDER_NAME, LOREM_MODEL, LocalOptions, LocalProvider
from storage.streams import encode_chunk

# durachat's default `stream_ping_seconds`: the same idle comment pings on an open stream.
PING_SECONDS = 15.0
# The api's own setting: stopping should not wait for every open stream.
GRACEFUL_SHUTDOWN_SECONDS = 5


class SendBody(BaseModel):
    """The part of durachat's send body this peer reads."""

    model_config = ConfigDict(populate_by_name=True)

    message: str = Field(min_length=1)
    model: str
    provider_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, alias="providerOptions"
    )


def create_app() -> FastAPI:
    provider = LocalProvider()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/readyz")
    async def ready() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.post("/v1/chats")
    async def send(body: SendBody) -> EventSourceResponse:
        provider_name, _, model = body.model.partition("/")
        if provider_name != LOCAL_PROVIDER_NAME or model != LOREM_MODEL:
            raise HTTPException(400, f"this peer serves only {LOCAL_PROVIDER_NAME}/{LOREM_MODEL}")
        options = body.provider_options.get(LOCAL_PROVIDER_NAME, {})
        try:
            # Refused before the stream opens, as durachat refuses bad options before accepting.
            LocalOptions.parse(options)
        except ProviderError as error:
            raise HTTPException(400, str(error)) from error
        request = GenerationRequest(
            model=model,
            messages=[PromptMessage(role="user", content=body.message)],
            options=options,
        )
        chat_id = str(uuid.uuid4())
        return ui_message_stream_response(
            _answer(provider, request, chat_id), chat_id=chat_id, ping_seconds=PING_SECONDS
        )

    return app


async def _answer(
    provider: LocalProvider, request: GenerationRequest, chat_id: str
) -> AsyncIterator[ServerSentEvent]:
    """The turn's whole stream: durachat's opening chunks, the deltas, its closing chunks, `[DONE]`."""
    opening = opening_chunks(
        str(uuid.uuid4()), chat_id, str(uuid.uuid4()), f"{LOCAL_PROVIDER_NAME}/{request.model}"
    )
    for chunk in opening:
        yield _event(chunk)
    builder = UiMessageBuilder(attempt=request.attempt)
    async with aclosing(provider.stream(request)) as events:
        async for event in events:
            for chunk in builder.on_event(event):
                yield _event(chunk)
    for chunk in builder.finish_step():
        yield _event(chunk)
    usage = builder.reported_usage
    metadata = {
        "finishReason": builder.finish_reason,
        "usage": usage_metadata(
            usage.input_tokens if usage else 0, usage.output_tokens if usage else 0, estimated=False
        ),
    }
    yield _event(
        {"type": "finish", "finishReason": builder.finish_reason, "messageMetadata": metadata}
    )
    yield ServerSentEvent(data="[DONE]")


def _event(chunk: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=encode_chunk(chunk))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.stateless_sse")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args(argv)
    uvicorn.run(
        create_app(),
        host=options.host,
        port=options.port,
        # As durachat's api runs: uvicorn's httptools protocol, no access log.
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


if __name__ == "__main__":
    main()
