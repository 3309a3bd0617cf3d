"""Typed keys of the custom search attributes a turn sets, so operators can find a chat's turns. No I/O."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

from core.contracts import SEARCH_ATTRIBUTE_NAMES

ORGANIZATION_ID = SearchAttributeKey.for_keyword("DurachatOrganizationId")
CHAT_ID = SearchAttributeKey.for_keyword("DurachatChatId")
TURN_ID = SearchAttributeKey.for_keyword("DurachatTurnId")
MODEL = SearchAttributeKey.for_keyword("DurachatModel")
PROVIDER = SearchAttributeKey.for_keyword("DurachatProvider")
STATUS = SearchAttributeKey.for_keyword("DurachatStatus")

assert {key.name for key in (ORGANIZATION_ID, CHAT_ID, TURN_ID, MODEL, PROVIDER, STATUS)} == set(
    SEARCH_ATTRIBUTE_NAMES
)
