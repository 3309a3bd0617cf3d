"""Replay: recorded turn histories must replay against the current ChatTurnWorkflow code, so a change
that would break running workflows fails CI. Set DURACHAT_RECORD_HISTORIES=1 to refresh the recordings."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.worker import Replayer

from core.settings import Settings
from tests.conftest import Tenant
from tests.support.chat_api import send_and_collect
from tests.support.sse import chunks_of
from workflows.chat_turn import ChatTurnWorkflow

HISTORIES = Path(__file__).parent / "histories"

# A 2x2 PNG, for a turn whose message carries a file (it takes the prepare-attachments step).
TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="

# One turn per path through the workflow: completed, retried then completed, failed, with a file.
SCENARIOS = {
    "completed": {"message": "replay me", "providerOptions": {"local": {"delayMs": 0}}},
    "retried": {
        "message": "one two three",
        "providerOptions": {"local": {"delayMs": 0, "failAfterWords": 1, "failTimes": 1}},
    },
    "failed": {"message": "no", "model": "mock/fail-400"},
    "with-file": {
        "message": "what is this",
        "image": TINY_PNG,
        "imageMimeType": "image/png",
        "providerOptions": {"local": {"delayMs": 0}},
    },
}


def recorded_histories() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


@pytest.mark.parametrize("path", recorded_histories(), ids=lambda path: path.stem)
async def test_recorded_history_replays_on_current_code(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=[ChatTurnWorkflow]).replay_workflow(history)


def test_recordings_cover_every_scenario() -> None:
    assert {path.stem for path in recorded_histories()} >= set(SCENARIOS)


async def test_fresh_histories_replay_on_current_code(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    temporal = await Client.connect(settings.resolved_temporal_address)
    for name, body in SCENARIOS.items():
        _response, events = await send_and_collect(client, tenant.headers, body)
        turn_id = chunks_of(events)[0]["messageMetadata"]["turnId"]
        handle = temporal.get_workflow_handle(f"turn-{turn_id}")
        # A failed turn fails its workflow (older recordings completed it: failed-completed-workflow).
        with contextlib.suppress(WorkflowFailureError):
            await handle.result()
        history = await handle.fetch_history()
        await Replayer(workflows=[ChatTurnWorkflow]).replay_workflow(history)
        if os.environ.get("DURACHAT_RECORD_HISTORIES") == "1":
            (HISTORIES / f"{name}.json").write_text(history.to_json())
