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


class NotFoundError(DurachatError):
    status_code = 404
    title = "Not Found"
    problem_type = "/problems/not-found"


class ConflictError(DurachatError):
    status_code = 409
    title = "Conflict"
    problem_type = "/problems/conflict"


class ContentTooLargeError(DurachatError):
    status_code = 413
    title = "Content Too Large"
    problem_type = "/problems/content-too-large"


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
