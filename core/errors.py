"""The error vocabulary: one base class carrying its HTTP status, and the ApplicationError types the api matches on."""

from __future__ import annotations


class ErrorType:
    """`ApplicationError.type` values raised by workflows and activities; the api matches on these, never on text."""

    CHAT_NOT_FOUND = "ChatNotFound"
    CHAT_BUSY = "ChatBusy"
    MESSAGE_NOT_FOUND = "MessageNotFound"
    PROVIDER_REJECTED = "ProviderRejected"
    PROVIDER_UNAVAILABLE = "ProviderUnavailable"
    INVALID_TURN = "InvalidTurn"
    # An `Idempotency-Key` sent again with another request than the one it first came with.
    IDEMPOTENCY_KEY_REUSED = "IdempotencyKeyReused"
    # The workflow failure of a turn that ended `failed` (its outcome is stored and its stream ended).
    TURN_FAILED = "TurnFailed"
    # An attachment that cannot be used: a remote file answering 4xx, refused by the outbound
    # guard, too large, or of a type not accepted. Final: the turn fails with its message.
    ATTACHMENT_REFUSED = "AttachmentRefused"
    # A remote file's server or the network failed for now (5xx, timeout, reset): retried.
    REMOTE_FILE_UNAVAILABLE = "RemoteFileUnavailable"
    # A tool's backend failed for now (a timeout, a 5xx, the network): the call is run again.
    TOOL_UNAVAILABLE = "ToolUnavailable"
    # A decision on an approval the turn is not waiting for (unknown, or decided already).
    APPROVAL_NOT_PENDING = "ApprovalNotPending"


class DurachatError(Exception):
    """A failure the api reports as an `application/problem+json` response."""

    status_code: int = 500
    title: str = "Internal Server Error"
    problem_type: str = "/problems/internal-server-error"

    def __init__(
        self,
        detail: str,
        *,
        extra: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}
        self.headers = headers or {}


class BadRequestError(DurachatError):
    status_code = 400
    title = "Bad Request"
    problem_type = "/problems/bad-request"


class UnauthorizedError(DurachatError):
    status_code = 401
    title = "Unauthorized"
    problem_type = "/problems/unauthorized"


class ForbiddenError(DurachatError):
    status_code = 403
    title = "Forbidden"
    problem_type = "/problems/forbidden"


class BudgetExceededError(ForbiddenError):
    """A spending budget is spent, so the turn is refused. `budget` names it
    (`organization.weekly`, `organization.perChat`, `user.weekly`, `user.perChat`); amounts are
    exact USD decimal strings; `resetsAt` is when a weekly budget starts again (null for a chat's)."""

    title = "Budget Exceeded"
    problem_type = "/problems/budget-exceeded"

    def __init__(
        self,
        detail: str,
        *,
        budget: str,
        limit_usd: str,
        spent_usd: str,
        remaining_usd: str,
        resets_at: str | None,
    ) -> None:
        super().__init__(
            detail,
            extra={
                "budget": budget,
                "limitUsd": limit_usd,
                "spentUsd": spent_usd,
                "remainingUsd": remaining_usd,
                "resetsAt": resets_at,
            },
        )


class NotFoundError(DurachatError):
    status_code = 404
    title = "Not Found"
    problem_type = "/problems/not-found"


class UnprocessableContentError(DurachatError):
    status_code = 422
    title = "Unprocessable Content"
    problem_type = "/problems/unprocessable"


class IdempotencyKeyReusedError(UnprocessableContentError):
    """The same `Idempotency-Key` with a different chat, path or body than its first request.

    Like every 422 it lists what is wrong in `errors`: here the header itself. `chatId` and
    `turnId` name the earlier request's chat and turn.
    """

    problem_type = "/problems/idempotency-key-reused"

    def __init__(self, *, chat_id: str | None, turn_id: str | None) -> None:
        detail = "this Idempotency-Key was used with a different request (chat, path or body)"
        super().__init__(
            detail,
            extra={
                "chatId": chat_id,
                "turnId": turn_id,
                "errors": [
                    {
                        "loc": ["header", "Idempotency-Key"],
                        "msg": detail,
                        "type": "idempotency_key_reused",
                    }
                ],
                "errorCount": 1,
            },
        )


class ConflictError(DurachatError):
    status_code = 409
    title = "Conflict"
    problem_type = "/problems/conflict"


class ContentTooLargeError(DurachatError):
    status_code = 413
    title = "Content Too Large"
    problem_type = "/problems/content-too-large"


class UnsupportedMediaTypeError(DurachatError):
    status_code = 415
    title = "Unsupported Media Type"
    problem_type = "/problems/unsupported-media-type"


class RangeNotSatisfiableError(DurachatError):
    status_code = 416
    title = "Range Not Satisfiable"
    problem_type = "/problems/range-not-satisfiable"


class TooManyRequestsError(DurachatError):
    """A rate limit or a concurrency cap refused the request; `Retry-After` says when to try again."""

    status_code = 429
    title = "Too Many Requests"
    problem_type = "/problems/too-many-requests"

    def __init__(self, detail: str, *, limit: str, retry_after_seconds: int) -> None:
        super().__init__(
            detail,
            extra={"limit": limit, "retryAfter": retry_after_seconds},
            headers={"Retry-After": str(retry_after_seconds)},
        )


class ServiceUnavailableError(DurachatError):
    status_code = 503
    title = "Service Unavailable"
    problem_type = "/problems/service-unavailable"


class UpstreamError(DurachatError):
    status_code = 502
    title = "Bad Gateway"
    problem_type = "/problems/upstream"
