"""Runs the real AI SDK client (`tests/js/ai_client.mjs`) as a subprocess.

Conformance tests use it to check the service against what `useChat` / `DefaultChatTransport`
actually do, not against our own reading of the protocol. The command and result shapes are
documented at the top of `ai_client.mjs`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).resolve().parent.parent / "js"
SCRIPT = JS_DIR / "ai_client.mjs"


class AIClientError(RuntimeError):
    """The harness produced no result (bad command, crash, timeout).

    A failed request or stream is not this: it is reported in the result's `error`.
    """


def ai_client_available() -> bool:
    """Whether Node and the `ai` package are installed (`make test` runs `npm ci` in tests/js)."""
    return shutil.which("node") is not None and (JS_DIR / "node_modules" / "ai").is_dir()


# ASYNC109 prefers callers to wrap the call in `asyncio.timeout`; a default bound here keeps every
# conformance test from hanging on a stream that never ends, which is the failure being tested for.
async def run_ai_client(command: dict[str, Any], timeout: float = 60) -> dict[str, Any]:  # noqa: ASYNC109
    """Send one command to the harness and return its result.

    Stream and HTTP failures are part of the result (`error`, `httpStatus`); this raises only when
    the harness did not produce a result.
    """
    node = shutil.which("node")
    if node is None:
        raise AIClientError("node is not on PATH")
    process = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        # Resolve `ai` from tests/js/node_modules whatever the caller's working directory.
        cwd=JS_DIR,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(json.dumps(command).encode()), timeout
        )
    except BaseException as error:
        # Timeout or cancellation of the test: never leave a Node process behind.
        if process.returncode is None:
            process.kill()
            await process.wait()
        if isinstance(error, TimeoutError):
            raise AIClientError(f"ai_client timed out after {timeout}s: {command!r}") from None
        raise

    if process.returncode != 0:
        raise AIClientError(
            f"ai_client exited with {process.returncode}: {stderr.decode(errors='replace')}"
        )
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError as error:
        raise AIClientError(
            f"ai_client printed no JSON result: {stdout!r}; "
            f"stderr: {stderr.decode(errors='replace')}"
        ) from error
    if not isinstance(result, dict):
        raise AIClientError(f"ai_client printed {type(result).__name__}, not an object: {result!r}")
    return result
