"""Runs the real `durachat api` and `durachat worker` as child processes of the test suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """One `python -m cli <role>` process with its output in a log file."""

    def __init__(self, role: str, environment: dict[str, str], log_dir: Path) -> None:
        self.role = role
        self.environment = environment
        self.log_path = log_dir / f"{role}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", self.role],
            cwd=REPO_ROOT,
            env={**os.environ, **self.environment, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, characters: int = 4000) -> str:
        return (
            self.log_path.read_text(errors="replace")[-characters:]
            if self.log_path.exists()
            else ""
        )


def wait_until_ready(base_url: str, process: ServiceProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.role} exited early:\n{process.log_tail()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.role} not ready in {timeout}s:\n{process.log_tail()}")
