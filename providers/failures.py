"""How every adapter turns a provider's failure into a ProviderError. Never imports temporalio/fastapi/sqlalchemy/redis.

One classification for all providers: a 408, 429 or 5xx (and the provider-specific "try again"
answers each adapter names, such as Anthropic's overloaded or Groq's 498) may succeed on a later
attempt and is retryable, honouring the provider's `retry-after`; any other 4xx (bad request, auth,
unknown model, no credit) cannot, and carries the provider's own message. Messages are scrubbed of
the credential and bounded, because they travel into workflow history and to users.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Final

from providers.base import ProviderError

# A proxy in front of a model can answer with a whole HTML page; history keeps only this much.
MAX_MESSAGE_CHARS: Final = 600
RETRYABLE_STATUSES: Final = frozenset({408, 429})


def retryable_status(status: int, *, also: Collection[int] = ()) -> bool:
    """Whether an HTTP status means a later attempt may succeed (`also`: a provider's extra ones)."""
    return status in RETRYABLE_STATUSES or status >= 500 or status in also


def status_failure(
    message: str,
    status: int,
    *,
    retry_after: float | None = None,
    also_retryable: Collection[int] = (),
) -> ProviderError:
    """The ProviderError for an HTTP status answer; `message` already scrubbed."""
    if retryable_status(status, also=also_retryable):
        return ProviderError.unavailable(message, status_code=status, retry_after=retry_after)
    return ProviderError.rejected(message, status_code=status)


def timed_out(where: str) -> ProviderError:
    """A connect or a wait for the next bytes outlasted the adapter's timeout (`where`:
    provider/model)."""
    return ProviderError.unavailable(f"{where}: request timed out")


def connection_failed(where: str, cause: BaseException | str, *, secret: str) -> ProviderError:
    """The connection was refused, reset or cut off; `cause` is the transport's error or, when the
    SDK kept none, its own words. Transport messages can quote the request, so it is scrubbed."""
    reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    return ProviderError.unavailable(scrub(f"{where}: connection failed: {reason}", secret))


def scrub(text: str, secret: str) -> str:
    """`text` without `secret` (some gateways quote the key they rejected), bounded in length.

    Truncates only after redacting, so a cut cannot leave part of a key behind.
    """
    if len(secret) >= 4:
        text = text.replace(secret, "[redacted]")
    return text[:MAX_MESSAGE_CHARS]


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta-seconds or an HTTP date)."""
    milliseconds = _finite_non_negative(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _finite_non_negative(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; some servers drop the zone
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _finite_non_negative(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None
