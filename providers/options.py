"""Reading providerOptions, which API callers write freely. Never imports temporalio/fastapi/sqlalchemy/redis.

An adapter passes on only the options it allow-lists, each checked before anything is sent: a value
of the wrong type fails the request with PROVIDER_REJECTED, naming the option as the caller spelled
it (`providerOptions.<provider>.<key> must be ...`). A None value counts as not given, as the AI SDK
leaves unset options.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeGuard

from providers.base import ProviderError

Check = Callable[[object], bool]
# An allow-listed option: the name the provider's API takes, the check of its value, and what the
# check expects, in words for the error.
OptionSpec = tuple[str, Check, str]


class ProviderOptions:
    """One provider's entry of a request's providerOptions, read through checks."""

    def __init__(self, options: Mapping[str, Any], provider: str) -> None:
        self._options = options
        self._provider = provider

    def path(self, key: str) -> str:
        return f"providerOptions.{self._provider}.{key}"

    def refuse(self, key: str, expected: str) -> ProviderError:
        return ProviderError.rejected(f"{self.path(key)} must be {expected}")

    def given(self, *keys: str) -> tuple[str, object] | None:
        """The first of `keys` given a value, and that value; None when none is."""
        for key in keys:
            if self._options.get(key) is not None:
                return key, self._options[key]
        return None

    def checked(self, keys: Sequence[str], check: Check, expected: str) -> Any:
        """The value of the first of `keys` given (None when none is), refused unless `check`
        passes."""
        found = self.given(*keys)
        if found is None:
            return None
        key, value = found
        if not check(value):
            raise self.refuse(key, expected)
        return value

    def allow_listed(self, table: Mapping[str, OptionSpec]) -> dict[str, Any]:
        """Every option `table` names, checked, under the name the API takes; the rest are left
        behind. Of two spellings of one option, the later given wins."""
        selected: dict[str, Any] = {}
        for key, value in self._options.items():
            spec = table.get(key)
            if spec is None or value is None:
                continue
            wire, check, expected = spec
            if not check(value):
                raise self.refuse(key, expected)
            selected[wire] = value
        return selected


def option_table(*rows: tuple[str, Sequence[str], Check, str]) -> Mapping[str, OptionSpec]:
    """`ProviderOptions.allow_listed`'s table from rows of (wire name, other spellings, check,
    expected): AI SDK clients spell options in camelCase, and the wire names are accepted too."""
    return {
        spelling: (wire, check, expected)
        for wire, spellings, check, expected in rows
        for spelling in (wire, *spellings)
    }


def object_of(value: object, where: str, fields: Collection[str]) -> Mapping[Any, Any]:
    """`value` (the option at `where`) as an object having none but `fields`."""
    if not isinstance(value, Mapping):
        raise ProviderError.rejected(f"{where} must be an object")
    unknown = sorted(str(key) for key in value if key not in fields)
    if unknown:
        raise ProviderError.rejected(f"{where} has unknown fields: {', '.join(unknown)}")
    return value


# bool is an int subclass, and `true` for a number is a caller's mistake, not 1: every check of a
# number refuses booleans.


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_integer(value: object) -> TypeGuard[int]:
    return is_integer(value) and value > 0


def is_string(value: object) -> TypeGuard[str]:
    return isinstance(value, str)


def is_strings(value: object) -> TypeGuard[list[str]]:
    """A list of strings."""
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def is_string_or_strings(value: object) -> TypeGuard[str | list[str]]:
    return isinstance(value, str) or is_strings(value)
