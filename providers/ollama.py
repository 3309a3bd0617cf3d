"""Native Ollama adapter (`/api/chat`, NDJSON) on the `ollama` SDK. Never imports temporalio/fastapi/sqlalchemy/redis.

Tools go out as `function` tools (Ollama has no tool choice: the model decides). A call arrives
whole, in a line's `message.tool_calls`, with its arguments as an object; the SDK drops the id
Ollama sends, so each call gets one made up here. An answer with calls ends `done_reason: "stop"`,
which becomes "tool-calls". In a prompt, a step's calls ride on the assistant message and each
result is a role-`tool` message of its own, naming its tool (Ollama's conversation has no call ids).
Ollama reads a tool's schema into its own type (an object of properties, each with a type,
description, enum and items), as the SDK does before sending it: other JSON Schema keywords do not
reach the model.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from typing import Any, Final

import httpx
import ollama
import pydantic

from providers.base import (
    ConfiguredModels,
    DocumentInput,
    Finish,
    FinishReason,
    GenerationRequest,
    ImageInput,
    PromptInput,
    PromptMessage,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolDefinition,
    Usage,
    parse_tool_input,
    refuse_unaccepted_inputs,
)
from providers.endpoints import OLLAMA_BASE_URL
from providers.failures import connection_failed, scrub, status_failure, timed_out
from providers.options import (
    ProviderOptions,
    is_integer,
    is_number,
    is_string_or_strings,
    option_table,
)

DEFAULT_BASE_URL: Final = OLLAMA_BASE_URL

# `load` and `unload` answer requests that only (un)load a model; a chat never ends that way.
_FINISH_REASONS: Final[Mapping[str, FinishReason]] = {"stop": "stop", "length": "length"}

# What `think` takes besides a boolean; GPT-OSS models take only these levels.
THINK_LEVELS: Final = frozenset({"low", "medium", "high", "max"})


def _think(value: object) -> bool:
    # isinstance first: a list or object from a caller is unhashable, and must be refused, not raise.
    return isinstance(value, bool) or (isinstance(value, str) and value in THINK_LEVELS)


# providerOptions come from API callers, so only sampling knobs reach Ollama's `options`: the
# others there (num_gpu, use_mmap, num_thread, ...) reconfigure the server's model runner.
_OPTIONS: Final = option_table(
    ("temperature", (), is_number, "a number"),
    ("top_p", ("topP",), is_number, "a number"),
    ("top_k", ("topK",), is_integer, "an integer"),
    ("num_ctx", ("numCtx",), is_integer, "an integer"),
    ("num_predict", ("numPredict", "maxTokens"), is_integer, "an integer"),
    ("seed", (), is_integer, "an integer"),
    ("stop", (), is_string_or_strings, "a string or a list of strings"),
    # Not one of `options` but a parameter of its own, checked with them and then taken out.
    (
        "think",
        (),
        _think,
        f"true, false or one of {', '.join(repr(level) for level in sorted(THINK_LEVELS))}",
    ),
)


class OllamaProvider(ConfiguredModels):
    """One Ollama server (a local one, or ollama.com with a key), through its native chat API."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str,
        models: Sequence[str],
        timeout_seconds: float,
        image_models: Sequence[str] | None = None,
        document_models: Sequence[str] = (),
    ) -> None:
        if document_models:
            raise ValueError(
                f"provider {name!r}: Ollama takes no document inputs, so document_models must be "
                "empty (PDFs reach its models as extracted text)"
            )
        if not base_url:
            # The SDK would fall back to OLLAMA_HOST; settings are the only configuration.
            raise ValueError(f"provider {name!r}: an Ollama base_url is required")
        super().__init__(models, image_models=image_models, document_models=document_models)
        self.name = name
        self._api_key = api_key
        credentials: dict[str, Any]
        if api_key:
            # An explicit header also keeps the SDK from adding OLLAMA_API_KEY's.
            credentials = {"headers": {"Authorization": f"Bearer {api_key}"}}
        else:
            credentials = {"event_hooks": {"request": [_drop_ambient_credentials]}}
        self._client = ollama.AsyncClient(
            host=base_url,
            # The SDK's default is no timeout at all: a stalled server would hold the activity
            # until its own timeout. httpx applies this to the connect and to every read, so a
            # long answer is fine as long as lines keep arriving. The SDK never retries, which
            # leaves retries to Temporal, as for every provider.
            timeout=timeout_seconds,
            **credentials,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[ProviderEvent, None]:
        options, think = ollama_options(request.options, provider=self.name)
        refuse_unaccepted_inputs(self.name, request, self.input_kinds(request.model))
        # Images are handed over as bytes, which the SDK base64-encodes while it builds the body
        # (about 0.2 s of the event loop for 20 MB); its public API offers no way to do that
        # elsewhere, and pre-encoded strings are exactly what must never be passed.
        messages = [m for message in request.messages for m in _messages(message)]
        where = f"{self.name}/{request.model}"
        tools = [_tool(tool, where) for tool in request.tools]
        usage: Usage | None = None
        finish: FinishReason | None = None
        made_calls = False
        try:
            parts = await self._client.chat(
                model=request.model,
                messages=messages,
                tools=tools or None,
                stream=True,
                think=think,
                options=options or None,
            )
            try:
                async for part in parts:
                    if part.message.thinking:
                        yield ReasoningDelta(part.message.thinking)
                    if part.message.content:
                        yield TextDelta(part.message.content)
                    for call in part.message.tool_calls or ():
                        for event in _call_events(call):
                            yield event
                        made_calls = True
                    if part.done:
                        # Counts are omitted when zero; Ollama reports no cached tokens.
                        usage = Usage(
                            input_tokens=part.prompt_eval_count or 0,
                            output_tokens=part.eval_count or 0,
                        )
                        finish = _FINISH_REASONS.get(part.done_reason or "", "other")
                        if made_calls and finish == "stop":
                            # Ollama ends an answer that calls tools as any other.
                            finish = "tool-calls"
            finally:
                # Leaving the loop any way (end, error, aclose of this generator, cancellation)
                # closes the SDK's generator and with it the HTTP response, which is how Ollama
                # learns to stop generating.
                if isinstance(parts, AsyncGenerator):
                    await parts.aclose()
        # `from None`: a chained cause would carry request details into workflow history; only
        # the scrubbed translation leaves this module.
        except ollama.ResponseError as error:
            raise self._response_failure(error, where) from None
        except ollama.RequestError as error:
            raise ProviderError.rejected(self._scrub(f"{where}: {error.error}")) from None
        except httpx.TimeoutException:
            raise timed_out(where) from None
        except (httpx.RequestError, ConnectionError) as error:
            # A streamed call raises httpx's own errors (refused, reset, a cut-off body); the
            # SDK turns a refused connection into the builtin ConnectionError elsewhere.
            raise connection_failed(where, error, secret=self._api_key) from None
        except (json.JSONDecodeError, pydantic.ValidationError):
            # Not Ollama's NDJSON: a proxy answering for it, or a line cut short.
            raise ProviderError.unavailable(f"{where}: the server sent a malformed line") from None
        if finish is None:
            # Ollama always ends with a `done` line; without it the answer may be cut short.
            raise ProviderError.unavailable(f"{where}: the stream ended before its final line")
        if usage is not None:
            yield usage
        yield Finish(finish)

    async def aclose(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]  # unannotated in the SDK

    def _response_failure(self, error: ollama.ResponseError, where: str) -> ProviderError:
        detail = _error_detail(error.error)
        if error.status_code < 100:
            # The SDK's -1: an `{"error": ...}` line inside a 200 stream. Ollama validates a
            # request (model, options, think, images) before it answers 200, so what fails
            # after that is the run itself (the runner crashing or running out of memory, an
            # upstream cloud model failing), which a later attempt may survive. Always
            # retryable, then, rather than guessed from the message's text; the activity's
            # retry policy bounds the attempts.
            return ProviderError.unavailable(self._scrub(f"{where}: error in stream: {detail}"))
        # Ollama sends no retry-after, and the SDK keeps no headers to read one from.
        return status_failure(
            self._scrub(f"{where}: HTTP {error.status_code}: {detail}"), error.status_code
        )

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)


def ollama_options(
    options: Mapping[str, Any], *, provider: str
) -> tuple[dict[str, Any], bool | str | None]:
    """The allow-listed providerOptions as Ollama `options`, and `think`; rejects ill-typed values."""
    selected = ProviderOptions(options, provider).allow_listed(_OPTIONS)
    think: bool | str | None = selected.pop("think", None)
    if isinstance(selected.get("stop"), str):
        # Ollama's `stop` is a list; one string is one stop sequence.
        selected["stop"] = [selected["stop"]]
    return selected, think


def _messages(message: PromptMessage) -> list[ollama.Message]:
    if message.role == "tool":
        # One message per result, naming its tool. The wire has no error flag: an error's text
        # says so.
        return [
            ollama.Message(role="tool", content=result.output, tool_name=result.name)
            for result in message.tool_results
        ]
    images = [_image(item) for item in message.inputs]
    calls = [
        ollama.Message.ToolCall(
            function=ollama.Message.ToolCall.Function(name=call.name, arguments=call.input)
        )
        for call in message.tool_calls
    ]
    return [
        ollama.Message(
            role=message.role,
            content=message.content,
            images=images or None,
            tool_calls=calls or None,
        )
    ]


def _tool(tool: ToolDefinition, where: str) -> ollama.Tool:
    function = {"name": tool.name, "description": tool.description, "parameters": tool.input_schema}
    try:
        return ollama.Tool.model_validate({"type": "function", "function": function})
    except pydantic.ValidationError:
        # The SDK's type takes only an object schema of properties; nothing was sent yet.
        raise ProviderError.rejected(
            f"{where}: the input schema of tool {tool.name!r} is not one Ollama takes "
            "(an object of typed properties)"
        ) from None


def _call_events(call: ollama.Message.ToolCall) -> Iterator[ProviderEvent]:
    # Whole, never streamed: its input is one delta.
    call_id = f"call_{uuid.uuid4().hex}"  # the SDK drops the id Ollama sends
    text = json.dumps(dict(call.function.arguments), ensure_ascii=False)
    yield ToolCallStart(call_id, call.function.name)
    yield ToolCallDelta(call_id, text)
    yield ToolCall(call_id, call.function.name, parse_tool_input(text), text)


def _image(item: PromptInput) -> ollama.Image:
    match item:
        case ImageInput():
            # Bytes, never a string: the SDK reads a string naming an existing file from disk
            # and uploads that file. Bytes it base64-encodes as they are.
            return ollama.Image(value=item.data)
        case DocumentInput():
            # refuse_unaccepted_inputs has refused these already; never drop one silently.
            raise ProviderError.rejected("Ollama takes no document inputs")


async def _drop_ambient_credentials(request: httpx.Request) -> None:
    # With no key configured the SDK sends OLLAMA_API_KEY's from the environment to whatever
    # host this is; settings are the only configuration, so a keyless provider sends none.
    request.headers.pop("authorization", None)


def _error_detail(error: object) -> str:
    # The SDK unwraps Ollama's `{"error": "..."}`; a proxy in front may nest an object instead.
    if isinstance(error, Mapping) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error)
