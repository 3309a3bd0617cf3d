"""How an assistant message's steps read back to a model (tool outputs cut to the context budget,
errors and denials said as such, a retried step starting again from the steps before it), and which
built-in tools wait for approval."""

from __future__ import annotations

from activities.tool_context import DENIED_TEXT, NOT_RUN_TEXT, assistant_messages, parts_before_step
from activities.tool_set import ToolSet
from agent_tools.mcp import McpToolkits
from agent_tools.web import WebTools
from core.contracts import ToolRunner, TurnTools
from core.secrets import SecretBox
from core.settings import Settings

PARTS = [
    {"type": "step-start"},
    {"type": "text", "text": "Let me look.", "state": "done"},
    {
        "type": "tool-web_fetch",
        "toolCallId": "c1",
        "state": "output-available",
        "input": {"url": "https://example.com"},
        "output": {"text": "x" * 50_000},
    },
    {
        "type": "dynamic-tool",
        "toolName": "glossary__lookup",
        "toolCallId": "c2",
        "state": "output-denied",
        "input": {"term": "durable"},
        "approval": {"id": "apr_1", "approved": False, "reason": "not now"},
    },
    {
        "type": "tool-web_search",
        "toolCallId": "c3",
        "state": "output-error",
        "input": {"query": "q"},
        "errorText": "the backend failed",
    },
    {"type": "tool-web_search", "toolCallId": "c4", "state": "input-available", "input": {}},
    {"type": "step-start"},
    {"type": "source-url", "sourceId": "s", "url": "https://example.com"},
    {"type": "text", "text": "Done.", "state": "done"},
]


def test_outputs_enter_the_prompt_cut_to_the_budget_and_outcomes_read_as_they_ended() -> None:
    first, results, answer = assistant_messages(PARTS, output_chars=1_000)
    assert first.role == "assistant"
    assert first.content == "Let me look."
    assert [call.call_id for call in first.tool_calls] == ["c1", "c2", "c3", "c4"]
    assert [call.name for call in first.tool_calls][1] == "glossary__lookup"
    fetched, denied, failed, unrun = results.tool_results
    assert len(fetched.output) < 1_100
    assert "more characters not shown" in fetched.output
    assert not fetched.is_error
    assert denied.is_error
    assert DENIED_TEXT in denied.output
    assert "not now" in denied.output
    assert (failed.output, failed.is_error) == ("the backend failed", True)
    assert (unrun.output, unrun.is_error) == (NOT_RUN_TEXT, True)
    assert (answer.role, answer.content, answer.tool_calls) == ("assistant", "Done.", ())


def test_a_retried_step_starts_again_from_the_parts_of_the_steps_before_it() -> None:
    assert parts_before_step(PARTS, 1) == []
    assert parts_before_step(PARTS, 2) == PARTS[:6]
    assert parts_before_step(PARTS, 3) == PARTS


async def test_built_in_tools_named_in_settings_wait_for_approval() -> None:
    settings = Settings(searxng_url="http://search.invalid", tools_needing_approval=["web_fetch"])
    web = WebTools(settings)
    try:
        tool_set = ToolSet(
            None,  # type: ignore[arg-type]  # no toolkits in this turn: nothing is read
            web,
            McpToolkits.from_settings(settings),
            SecretBox.from_settings(settings),
            builtins_needing_approval=settings.tools_needing_approval,
        )
        offered = await tool_set.offered("org", TurnTools(web=True))
    finally:
        await web.aclose()
    assert {name: tool.needs_approval for name, tool in offered.items()} == {
        "web_search": False,
        "web_fetch": True,
    }
    assert {tool.runner for tool in offered.values()} == {ToolRunner.SERVER}
