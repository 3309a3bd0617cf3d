"""The OpenAPI document: FastAPI's generated spec, completed once for every route. Imports no router.

Routes declare only what is particular to them (which statuses, and why); this module makes the
document tell the truth about what every route shares: errors are `application/problem+json`
(validation errors included, which FastAPI would describe as its own `HTTPValidationError`), an
authenticated route can answer 401, streams are Server-Sent Events, and a 204 has no body.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from api.problems import LISTED_VALIDATION_ERRORS, PROBLEM_MEDIA_TYPE

SSE_MEDIA_TYPE = "text/event-stream"
_SCHEMAS = "#/components/schemas/"
# The descriptions FastAPI gives responses the route did not describe itself.
_GENERATED_DESCRIPTIONS = {"Successful Response", "Validation Error"}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem. Beside the standard members a problem may carry extension "
    "members: `turnId` and `chatId` (a busy chat, a failed turn), `availableModels` (an unknown "
    "model), `errors` and `errorCount` (a validation problem), `maxBytes`, `maxDepth` or "
    "`maxItems` (a body past a limit), `down` (readiness), and `budget`, `limitUsd`, `spentUsd`, "
    "`remainingUsd` and `resetsAt` (a spent budget, `/problems/budget-exceeded`).",
    "type": "object",
    "properties": {
        "type": {
            "type": "string",
            "description": "The problem type, `/problems/<name>`: `/problems/validation`, "
            "`/problems/not-found`, `/problems/method-not-allowed`, ...",
        },
        "title": {"type": "string", "description": "The type's short summary."},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string", "description": "What went wrong with this request."},
        "instance": {"type": "string", "description": "The occurrence, when it has an address."},
    },
    "required": ["type", "title", "status", "detail"],
    "additionalProperties": True,
}

VALIDATION_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "ValidationProblem",
    "description": "A 422 problem (`type: /problems/validation`): `detail` names the first error, "
    f"`errors` lists the first {LISTED_VALIDATION_ERRORS} and `errorCount` counts them all.",
    "allOf": [
        {"$ref": _SCHEMAS + "Problem"},
        {
            "type": "object",
            "properties": {
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "loc": {
                                "type": "array",
                                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                "description": "Where: `body`, `query`, `header` or `path`, then the field.",
                            },
                            "msg": {"type": "string"},
                            "type": {"type": "string"},
                        },
                        "required": ["loc", "msg", "type"],
                    },
                    "maxItems": LISTED_VALIDATION_ERRORS,
                },
                "errorCount": {"type": "integer", "minimum": 0},
            },
            "required": ["errors", "errorCount"],
        },
    ],
}

UI_MESSAGE_STREAM_EVENT_SCHEMA: dict[str, Any] = {
    "title": "UIMessageStreamEvent",
    "description": "One event of the AI SDK UI message stream (v1). Keep-alive pings are SSE comments.",
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "A UI message chunk as JSON (`start`, `text-delta`, `finish`, ...), or "
            "`[DONE]` after the last one.",
        },
        "event": {"type": "string"},
        "id": {
            "type": "string",
            "description": "The cursor `<turnId>:<entryId>`; send it back as `Last-Event-ID` to resume after it.",
        },
        "retry": {"type": "integer", "minimum": 0},
    },
    "required": ["data"],
}

_DEFAULT_DESCRIPTIONS = {
    "400": "Bad request: the body cannot be read, or its JSON nests too deep or holds too many items",
    "401": "Missing, invalid or revoked API key",
    "413": "The request body is larger than the limit",
    "422": "Invalid request: a parameter or the body does not match its schema",
    "503": "Postgres or Redis cannot be reached right now, or the Redis pool is exhausted; "
    "try again after `Retry-After` seconds",
}


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document at `/openapi.json` (and so at `/docs`)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # FastAPI caches what it generates in `app.openapi_schema`; complete that once, in place.
            complete_spec(generate())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def complete_spec(spec: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    schemas["ValidationProblem"] = VALIDATION_PROBLEM_SCHEMA
    schemas["UIMessageStreamEvent"] = UI_MESSAGE_STREAM_EVENT_SCHEMA
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            _complete_operation(operation)
    _drop_unreferenced(spec, ("HTTPValidationError", "ValidationError"))
    return spec


def _complete_operation(operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    if operation.get("security"):
        responses.setdefault("401", {})
        # Authentication reads Postgres, and every authenticated route needs Postgres or Redis:
        # while one is down the answer is a 503 problem (api/database_errors.py, api/unavailable.py).
        responses.setdefault("503", {})
    if "requestBody" in operation:
        # FastAPI answers a body it cannot decode at all (not UTF-8) with a 400, the body bounds
        # refuse JSON too deep or too large in items (400), and the size limit middleware answers
        # an oversized body (413), all before any route runs.
        responses.setdefault("400", {})
        responses.setdefault("413", {})
    for status, response in responses.items():
        if status in _DEFAULT_DESCRIPTIONS and (
            not response.get("description") or response["description"] in _GENERATED_DESCRIPTIONS
        ):
            response["description"] = _DEFAULT_DESCRIPTIONS[status]
        if status[0] in "45":
            schema = "ValidationProblem" if status == "422" else "Problem"
            response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": _SCHEMAS + schema}}}
        if status == "401":
            response.setdefault("headers", {})["WWW-Authenticate"] = {
                "description": "`Bearer`: the scheme to send the API key with",
                "schema": {"type": "string"},
            }
        if status == "503":
            response.setdefault("headers", {})["Retry-After"] = {
                "description": "Seconds to wait before trying again",
                "schema": {"type": "integer"},
            }
        if status == "204":
            response.pop("content", None)
        content: dict[str, Any] = response.get("content", {})
        if SSE_MEDIA_TYPE in content:
            # One schema per event (OpenAPI 3.2's `itemSchema`, which FastAPI's own SSE routes use);
            # the empty JSON body FastAPI adds by default is one this route never answers.
            content[SSE_MEDIA_TYPE] = {"itemSchema": {"$ref": _SCHEMAS + "UIMessageStreamEvent"}}
            if content.get("application/json", {}).get("schema") == {}:
                del content["application/json"]
    operation["responses"] = dict(sorted(responses.items()))


def _drop_unreferenced(spec: dict[str, Any], names: tuple[str, ...]) -> None:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    for name in names:
        others = {key: value for key, value in schemas.items() if key != name}
        text = json.dumps({"paths": spec.get("paths", {}), "schemas": others})
        if f'"{_SCHEMAS}{name}"' not in text:
            schemas.pop(name, None)
