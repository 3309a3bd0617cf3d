"""The `durachat` command as a user runs it: `dev` end to end across a restart, `services`, `--help`.

Every launcher here gets its own data directory and free ports, and inherits no DURACHAT_* variable,
so it starts its own embedded services and never touches the session stack or a developer's stack.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from devstack.ports import free_port_block
from tests.support.processes import REPO_ROOT

T = TypeVar("T")

DEV_KEY = "dck_test-dev-key-0123456789abcdefghijklmnopqrstuv"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class StackPorts:
    api: int
    postgres: int
    redis: int
    temporal: int
    temporal_ui: int
    s3: int

    @classmethod
    def pick(cls) -> StackPorts:
        while True:
            ports = cls(
                api=free_port_block(),
                postgres=free_port_block(),
                redis=free_port_block(),
                temporal=free_port_block((0, 10, 11)),
                temporal_ui=free_port_block(),
                s3=free_port_block(tuple(range(10))),
            )
            used = [ports.api, ports.postgres, ports.redis, ports.temporal_ui]
            used += [ports.temporal, ports.temporal + 10, ports.temporal + 11]
            used += [ports.s3 + offset for offset in range(10)]
            if len(set(used)) == len(used):
                return ports


def launcher_environment(data_dir: Path, ports: StackPorts, **extra: str) -> dict[str, str]:
    """The user's environment minus every DURACHAT_* variable, plus this stack's own settings."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("DURACHAT_")
    }
    environment.update(
        {
            "DURACHAT_DATA_DIR": str(data_dir),
            "DURACHAT_API_PORT": str(ports.api),
            "DURACHAT_EMBEDDED_POSTGRES_PORT": str(ports.postgres),
            "DURACHAT_EMBEDDED_REDIS_PORT": str(ports.redis),
            "DURACHAT_EMBEDDED_TEMPORAL_PORT": str(ports.temporal),
            "DURACHAT_EMBEDDED_TEMPORAL_UI_PORT": str(ports.temporal_ui),
            "DURACHAT_EMBEDDED_S3_PORT": str(ports.s3),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return environment


@dataclass(frozen=True)
class Spawned:
    pid: int
    create_time: float

    def survives(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return (
                process.create_time() == self.create_time
                and process.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return False


class Launcher:
    """One `python -m cli <command>` run in its own session, with its output in a file."""

    def __init__(self, command: str, environment: dict[str, str], output: Path) -> None:
        self.output_path = output
        with output.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli", command],
                cwd=REPO_ROOT,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.offset = output.stat().st_size
        self.descendants: set[Spawned] = set()

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until the launcher prints `pattern`, recording its descendants meanwhile."""
        found = self._poll(lambda: re.search(pattern, self.output, re.MULTILINE), timeout)
        self.record_descendants()
        return found

    def wait_for(self, condition: Callable[[], T | None], timeout: float = START_TIMEOUT) -> T:
        return self._poll(condition, timeout)

    def record_descendants(self) -> None:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                self.descendants.add(Spawned(child.pid, child.create_time()))
            except psutil.NoSuchProcess:
                continue

    def interrupt(self, signum: signal.Signals) -> int:
        """Send `signum` to the launcher alone and return its exit code."""
        self.record_descendants()
        self.process.send_signal(signum)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {STOP_TIMEOUT}s of {signum.name}")

    def kill(self) -> None:
        """Last-resort cleanup when a test failed with the launcher still running."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _poll(self, condition: Callable[[], T | None], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            if self.process.poll() is not None:
                pytest.fail(
                    f"the launcher exited with {self.process.returncode}:\n{self.output[-6000:]}"
                )
            time.sleep(0.1)
        pytest.fail(f"condition not met within {timeout}s; launcher output:\n{self.output[-6000:]}")


def assert_clean_stop(exit_code: int, signum: signal.Signals) -> None:
    # A requested stop is a normal end: exit 0. Anything else (1: a child died; negative: the
    # launcher itself was killed by the signal) is a failed shutdown.
    assert exit_code == 0, f"exit code {exit_code} after {signum.name}"


def assert_no_strays(launcher: Launcher, data_dir: Path) -> None:
    """No descendant of the launcher, and no process mentioning its data directory, is still alive."""
    assert launcher.descendants, "no children were recorded"

    def strays() -> list[str]:
        alive = [f"pid {spawned.pid}" for spawned in launcher.descendants if spawned.survives()]
        for process in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if str(data_dir) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"pid {process.info['pid']}: {cmdline}")
        return alive

    # The launcher waits for its children before it exits; the grace is for the kernel to reap them.
    deadline = time.monotonic() + 5
    while (remaining := strays()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert remaining == [], f"processes survived the launcher:\n{remaining}"


@pytest.fixture
def run_launcher(tmp_path: Path) -> Iterator[Callable[[str, dict[str, str]], Launcher]]:
    started: list[Launcher] = []

    def start(command: str, environment: dict[str, str]) -> Launcher:
        launcher = Launcher(command, environment, tmp_path / f"{command}-{len(started)}.log")
        started.append(launcher)
        return launcher

    try:
        yield start
    finally:
        for launcher in started:
            launcher.kill()


def api_is_ready(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def send_message(api_url: str, message: str) -> str:
    """POST a new chat, read its UI message stream to the end, and return the chat id."""
    body = {"message": message, "providerOptions": {"local": {"delayMs": 0}}}
    headers = {"Authorization": f"Bearer {DEV_KEY}"}
    with httpx.stream(
        "POST", f"{api_url}/v1/chats", json=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200, response.read()
        chat_id = response.headers["x-chat-id"]
        data = [
            line.removeprefix("data: ")
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["type"] == "finish"
    return chat_id


def get_chat(api_url: str, chat_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{api_url}/v1/chats/{chat_id}", headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    chat: dict[str, Any] = response.json()
    return chat


async def turn_workflow_status(temporal_port: int, turn_id: str) -> WorkflowExecutionStatus | None:
    client = await Client.connect(f"127.0.0.1:{temporal_port}")
    description = await client.get_workflow_handle(f"turn-{turn_id}").describe()
    return description.status


def start_dev(
    run_launcher: Callable[[str, dict[str, str]], Launcher],
    environment: dict[str, str],
    api_url: str,
) -> Launcher:
    launcher = run_launcher("dev", environment)
    launcher.wait_for_output(r"^durachat is ready\.$")
    launcher.wait_for(lambda: api_is_ready(api_url), timeout=10)
    launcher.record_descendants()
    return launcher


def test_dev_serves_a_chat_stops_cleanly_and_keeps_it_across_restart(
    tmp_path: Path, run_launcher: Callable[[str, dict[str, str]], Launcher]
) -> None:
    data_dir = tmp_path / "data"
    ports = StackPorts.pick()
    environment = launcher_environment(data_dir, ports, DURACHAT_DEV_API_KEY=DEV_KEY)
    api_url = f"http://127.0.0.1:{ports.api}"

    first = start_dev(run_launcher, environment, api_url)
    banner = first.output
    assert api_url in banner
    assert f"http://127.0.0.1:{ports.temporal_ui}" in banner
    # The CLI's default address may be some other server: the banner names this one.
    assert f"Temporal     127.0.0.1:{ports.temporal} " in banner
    assert f"temporal workflow list --address 127.0.0.1:{ports.temporal}" in banner
    assert f"Object store http://127.0.0.1:{ports.s3} " in banner
    assert DEV_KEY in banner

    chat_id = send_message(api_url, "hi")

    def settled_chat() -> dict[str, Any] | None:
        chat = get_chat(api_url, chat_id)
        return chat if chat["messages"][-1]["status"] == "complete" else None

    chat = first.wait_for(settled_chat, timeout=30)
    user, assistant = chat["messages"]
    assert user["role"] == "user"
    assert assistant["role"] == "assistant"
    turn_id = assistant["metadata"]["turnId"]

    assert_clean_stop(first.interrupt(signal.SIGINT), signal.SIGINT)
    assert_no_strays(first, data_dir)

    second = start_dev(run_launcher, environment, api_url)
    assert get_chat(api_url, chat_id)["messages"] == chat["messages"]
    # The turn's workflow may still have been titling the new chat when the stack stopped; it
    # completes after the restart.
    second.wait_for(
        lambda: (
            asyncio.run(turn_workflow_status(ports.temporal, turn_id))
            == WorkflowExecutionStatus.COMPLETED
        ),
        timeout=30,
    )

    assert_clean_stop(second.interrupt(signal.SIGTERM), signal.SIGTERM)
    assert_no_strays(second, data_dir)


def test_services_prints_exports_and_stops_cleanly_on_interrupt(
    tmp_path: Path, run_launcher: Callable[[str, dict[str, str]], Launcher]
) -> None:
    data_dir = tmp_path / "data"
    ports = StackPorts.pick()
    launcher = run_launcher("services", launcher_environment(data_dir, ports))

    launcher.wait_for_output(r"^# Ctrl-C stops them\. A service that dies is started again\.$")
    exports = dict(re.findall(r"^export (DURACHAT_\w+)=(.*)$", launcher.output, re.MULTILINE))
    assert exports == {
        "DURACHAT_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{ports.postgres}/durachat",
        "DURACHAT_REDIS_URL": f"redis://127.0.0.1:{ports.redis}/0",
        "DURACHAT_TEMPORAL_ADDRESS": f"127.0.0.1:{ports.temporal}",
        "DURACHAT_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports.s3}",
    }
    assert f"# Temporal UI: http://127.0.0.1:{ports.temporal_ui}" in launcher.output
    assert f"# Object store (S3): http://127.0.0.1:{ports.s3}" in launcher.output

    assert launcher.interrupt(signal.SIGINT) == 0
    assert_no_strays(launcher, data_dir)


def test_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert listed == {
        "dev",
        "services",
        "api",
        "worker",
        "migrate",
        "keys",
        "chats",
        "bench",
        "discord-gateway",
    }
