"""What the provider wire-format test servers share; each server's wire format stays in its own module.

Never imports providers/: a fake that shared code with the adapter it stands in front of could
agree with the adapter's mistakes.

`WireServer` runs a server's Starlette app with `BackgroundApp`, keeps the scripts registered with
`script()`, records every request, counts the requests to each model for `flaky-<n>`, and streams
answers, recording whether the client stayed to the end. `WireScript` reads the model-name
conventions every server follows:

    echo                  streams the last user message back, word by word
    reply-<words>         streams <words> with hyphens read as spaces: reply-hello-world
    slow / slow-<ms>      1000 words, one chunk per 50 ms (or <ms>): for stop and timeout tests
    fail-<status>         always that HTTP status, with the provider's error body
    flaky-<n>[-<tag>]     the provider's "try again" status for the first <n> requests to this
                          exact model name, then echo; a unique <tag> per test avoids sharing the
                          count (or call reset())
    calls-<tool_name>     calls <tool_name> with `{"query": <the last user message's text>}`, then,
                          once the conversation holds that call's result, replies "done: " and the
                          first 60 characters of the last tool result's text

Scripted tool calls (`WireScript.tool_steps`, or `calls-<tool_name>`): each server reads the tool
calls and results in a request's history into a `ToolHistory`, in its own wire format, and counts the
rounds of tool results after the last user message. While fewer rounds than steps are answered, the
next step's calls stream (after `text_before_calls`, if any) and the answer finishes with the
provider's tool-calls reason; then the reply streams as usual. `bad_input` makes the first call of
each step send input text that is not JSON, where the wire format carries input as text.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse

from tests.support.background_app import BackgroundApp

# Each piece owns the whitespace after its word (and the first piece any leading whitespace), so
# the pieces concatenate back to the exact text, as a model's deltas do.
_PIECE = re.compile(r"\s*\S+\s*|\s+\Z")

SLOW_REPLY = " ".join(f"w{index}" for index in range(1000))


def word_pieces(text: str) -> list[str]:
    """`text` in the pieces a server streams it in, one word each."""
    return _PIECE.findall(text)


def reasoning_about(words: str) -> str:
    """The reasoning a `thinking-<words>` (or `reasoning-<words>`) model streams before <words>."""
    return f"The user wants {words}. I will answer."


def model_name_parts(model: str) -> tuple[str, str, str]:
    """`reply-hello-world` as its convention (`reply`), argument (`hello-world`) and the
    argument's words (`hello world`)."""
    name, _, argument = model.partition("-")
    return name, argument, argument.replace("-", " ")


def json_pieces(text: str, count: int = 3) -> list[str]:
    """`text` cut into `count` pieces (fewer when it is shorter), as a model streams a tool call's
    input JSON."""
    size = max(1, math.ceil(len(text) / count))
    return [text[start : start + size] for start in range(0, len(text), size)]


# What a `bad_input` call sends as its input: cut off, so no JSON parser takes it.
BAD_INPUT_TEXT = '{"query": "unterminated'

# One step of scripted tool calls: each call's tool name and input.
ToolStep = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class SeenToolCall:
    """A tool call found in a request's history, in any wire format."""

    call_id: str | None  # None where the format carries no ids (Ollama)
    name: str
    input: object  # the object sent, or OpenAI's argument text parsed (the text itself if not JSON)


@dataclass(frozen=True)
class SeenToolResult:
    """A tool result found in a request's history, in any wire format."""

    call_id: str | None
    # Where a result names only its call (OpenAI, Anthropic), the name of the call with its id;
    # None when no earlier call has it.
    name: str | None
    output: str
    is_error: bool = False


class ToolHistory:
    """The tool calls and results of a request's history, in order, and how many rounds of results
    came after the last user message. Each server feeds it from its own wire format."""

    def __init__(self) -> None:
        self.calls: list[SeenToolCall] = []
        self.results: list[SeenToolResult] = []
        self.rounds = 0
        self._answering = False  # the last thing read was a tool result

    def user_said(self) -> None:
        """A user message with content of its own: a new turn, with no tool rounds yet."""
        self.rounds = 0
        self._answering = False

    def model_said(self) -> None:
        self._answering = False

    def called(self, call: SeenToolCall) -> None:
        self.calls.append(call)
        self._answering = False

    def answered(self, result: SeenToolResult) -> None:
        """A tool result; a run of them (one message or several in a row) is one round."""
        if result.name is None and result.call_id is not None:
            names = [call.name for call in self.calls if call.call_id == result.call_id]
            if names:
                result = SeenToolResult(result.call_id, names[-1], result.output, result.is_error)
        self.results.append(result)
        if not self._answering:
            self.rounds += 1
        self._answering = True

    def last_output(self) -> str | None:
        return self.results[-1].output if self.results else None


@dataclass(frozen=True)
class PlannedCall:
    """A tool call a server is about to stream."""

    call_id: str
    name: str
    input: dict[str, Any]
    input_text: str  # the input's JSON text, or text that is not JSON for a `bad_input` call


def sse(data: dict[str, Any], *, event: str | None = None) -> bytes:
    """One server-sent event of compact JSON, named on an `event:` line when `event` is given."""
    named = f"event: {event}\n" if event is not None else ""
    return f"{named}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class WireScript:
    """How a server answers one model: the part every wire format shares."""

    # What `flaky-<n>` fails with: the provider's own "try again" status.
    FLAKY_STATUS: ClassVar[int] = 503

    reply: str | None = None  # None: echo the last user message
    chunk_delay: float = 0.0  # seconds between the chunks of the answer
    fail_status: int | None = None
    fail_first: int | None = None  # with fail_status: fail only the first n requests
    # The calls of each step, answered before the reply: step n streams while the history holds
    # fewer than n rounds of tool results after the last user message.
    tool_steps: list[ToolStep] = field(default_factory=list)
    text_before_calls: str = ""  # streamed before each step's calls
    bad_input: bool = False  # the first call of each step sends BAD_INPUT_TEXT as its input
    # `calls-<tool_name>`: one step calling this tool with the last user message as its query,
    # then a reply quoting the last tool result.
    calls_tool: str | None = None

    @classmethod
    def failing(cls, status: int) -> Self:
        """What `fail-<status>` answers; a server adds the retry hints its provider sends."""
        return cls(fail_status=status)

    @classmethod
    def by_convention(cls, model: str) -> Self | None:
        """The script a shared convention of the module docstring names, or None."""
        name, argument, words = model_name_parts(model)
        if model == "echo":
            return cls()
        if name == "reply" and argument:
            return cls(reply=words)
        if model == "slow" or (name == "slow" and argument.isdigit()):
            return cls(reply=SLOW_REPLY, chunk_delay=int(argument) / 1000 if argument else 0.05)
        if name == "fail" and argument.isdigit():
            return cls.failing(int(argument))
        if name == "calls" and argument:
            return cls(calls_tool=argument)
        failures, _, _tag = argument.partition("-")
        if name == "flaky" and failures.isdigit():
            return cls(fail_status=cls.FLAKY_STATUS, fail_first=int(failures))
        return None

    def due_calls(
        self, history: ToolHistory, asked: str, new_id: Callable[[], str]
    ) -> list[PlannedCall]:
        """The calls this request is answered with (`asked`: the last user message's text, named
        with `new_id`); none when every step has its results and the reply is due."""
        steps = self.tool_steps
        if self.calls_tool is not None:
            steps = [[(self.calls_tool, {"query": asked})]]
        if history.rounds >= len(steps):
            return []
        planned = []
        for position, (name, tool_input) in enumerate(steps[history.rounds]):
            text = BAD_INPUT_TEXT if self.bad_input and position == 0 else json.dumps(tool_input)
            planned.append(PlannedCall(new_id(), name, tool_input, text))
        return planned

    def reply_to(self, asked: str, history: ToolHistory) -> str:
        """The reply once no calls are due: `reply`, or what `asked` said, or for `calls-<tool>`
        "done: " and the start of the last tool result."""
        last_output = history.last_output()
        if self.calls_tool is not None and last_output is not None:
            return "done: " + last_output[:60]
        return self.reply if self.reply is not None else asked

    def failure_on(self, attempt: int) -> int | None:
        """The status the `attempt`-th request to this model fails with; None: it is answered."""
        if self.fail_first is not None and attempt > self.fail_first:
            return None
        return self.fail_status


@dataclass
class WireRequest:
    """One request a server received, as it arrived."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]  # {} when the body was not a JSON object
    finished: threading.Event = field(default_factory=threading.Event, kw_only=True)  # all sent
    disconnected: threading.Event = field(default_factory=threading.Event, kw_only=True)  # left

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class ChatRequest(WireRequest):
    """A request to a chat API whose body carries the conversation as `messages` (Anthropic's,
    OpenAI's, Ollama's)."""

    @classmethod
    def of(cls, request: Request, body: object) -> Self:
        """The record of `request`, whose body read as `body` (None when it was not JSON)."""
        return cls(
            path=request.url.path,
            headers=lower_headers(request),
            body=body if isinstance(body, dict) else {},
        )

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The body's messages that are objects."""
        messages = self.body.get("messages", [])
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    def last_user_content(self) -> object:
        """The `content` of the last user message, as sent; None when there is none."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message.get("content")
        return None


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed answer."""

    data: bytes | None  # None: the connection is cut here instead
    pause: float = 0.0  # seconds to wait before sending it


def evenly_paced(body: Iterable[bytes | None], pause: float) -> list[Chunk]:
    """`body` with `pause` before every piece but the first."""
    return [Chunk(data, pause if index else 0.0) for index, data in enumerate(body)]


async def read_json(request: Request) -> Any:
    """The request's JSON body, or None when it is not JSON."""
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def lower_headers(request: Request) -> dict[str, str]:
    return {key.lower(): value for key, value in request.headers.items()}


class DroppedConnection(Exception):
    """Raised inside a streaming body so uvicorn aborts the connection mid-response."""


RecordT = TypeVar("RecordT", bound=WireRequest)
ScriptT = TypeVar("ScriptT", bound=WireScript)


class WireServer(Generic[RecordT, ScriptT]):
    """`with Server(...) as server:` then point an adapter at `server.base_url`."""

    NAME: ClassVar[str]  # the server thread's name, and how a failure to start names it
    PROVIDER_TYPE: ClassVar[str]  # the `type` of a DURACHAT_PROVIDERS entry for this server

    def __init__(self) -> None:
        self.api_key: str | None = None
        self._scripts: dict[str, ScriptT] = {}
        self._attempts: dict[str, int] = {}
        self._requests: list[RecordT] = []
        self._lock = threading.Lock()
        self._background: BackgroundApp | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        # The origin: the provider SDKs append the API's version and path themselves.
        return f"http://127.0.0.1:{self.port}"

    def script(self, model: str, script: ScriptT) -> None:
        """Answer `model` with `script`, taking precedence over the model-name conventions."""
        with self._lock:
            self._scripts[model] = script

    def forget_script(self, model: str) -> None:
        """Drop a script registered with `script()`; the model-name conventions apply again."""
        with self._lock:
            self._scripts.pop(model, None)

    @property
    def requests(self) -> list[RecordT]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, model: str) -> list[RecordT]:
        return [request for request in self.requests if request.model == model]

    def reset(self) -> None:
        """Forget recorded requests and flaky-model counters (scripts stay)."""
        with self._lock:
            self._requests.clear()
            self._attempts.clear()

    def providers_entry(self, models: list[str], *, api_key: str | None = None) -> dict[str, Any]:
        """One `DURACHAT_PROVIDERS` entry configuring this server (with its own key, or
        `api_key`)."""
        return {"type": self.PROVIDER_TYPE, **self._endpoint(models, api_key)}

    def start(self) -> None:
        self._background = BackgroundApp(self._app(), name=self.NAME)
        self._background.start()
        self.port = self._background.port

    def stop(self) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _app(self) -> Starlette:
        raise NotImplementedError

    def _script_for_model(self, model: str) -> ScriptT | None:
        """The script a model name asks for by this server's conventions, or None."""
        raise NotImplementedError

    def _endpoint(self, models: list[str], api_key: str | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"base_url": self.base_url, "models": models}
        key = api_key if api_key is not None else self.api_key
        if key:
            entry["api_key"] = key
        return entry

    def _record(self, record: RecordT) -> RecordT:
        with self._lock:
            self._requests.append(record)
        return record

    def _script_and_attempt(self, model: str) -> tuple[ScriptT | None, int]:
        """The script `model` is answered with, and which request to it this is (from 1)."""
        with self._lock:
            script = self._scripts.get(model) or self._script_for_model(model)
            self._attempts[model] = attempt = self._attempts.get(model, 0) + 1
        return script, attempt

    def _streamed(
        self,
        record: RecordT,
        chunks: Iterable[Chunk],
        *,
        media_type: str = "text/event-stream",
        headers: dict[str, str] | None = None,
    ) -> StreamingResponse:
        return StreamingResponse(_sent(record, chunks), media_type=media_type, headers=headers)


async def _sent(record: WireRequest, chunks: Iterable[Chunk]) -> AsyncIterator[bytes]:
    try:
        for chunk in chunks:
            if chunk.data is None:
                raise DroppedConnection
            if chunk.pause:
                await asyncio.sleep(chunk.pause)
            yield chunk.data
        record.finished.set()
    finally:
        # Starlette cancels this generator when the client disconnects mid-stream.
        if not record.finished.is_set():
            record.disconnected.set()
