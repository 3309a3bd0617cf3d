"""Child-process plumbing shared by the embedded services and the supervisor; never imports api, workflows or activities."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import pwd
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_Stream = int | IO[bytes] | None


class ServiceStartError(RuntimeError):
    """A child service could not be started or did not become ready; the message says why."""


@functools.cache
def _prctl() -> Callable[..., int] | None:
    # Resolved in the parent, before any fork: the code that runs between fork and exec must not
    # load libraries or take locks another thread may hold.
    if not sys.platform.startswith("linux"):
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def _die_with_parent(death_signal: signal.Signals) -> Callable[[], None] | None:
    """Build the preexec hook that makes the child receive `death_signal` when the launcher dies.

    Without it, a launcher killed with SIGKILL (OOM killer, `kill -9`, a crashed IDE) leaves servers
    running that hold the ports and the data directory, and the next `durachat dev` fails on them.
    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so children must be spawned
    from a thread that lives as long as they do (the main thread in practice), never from a pool.
    The hook runs after the uid switch in subprocess, so the setting survives a `user=` change.
    Other platforms have no equivalent; there a killed launcher can leave children behind.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent_pid = os.getpid()
    signum = int(death_signal)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        # The launcher may have died between fork and prctl; then nobody will ever send the signal.
        if os.getppid() != parent_pid:
            os._exit(1)

    return hook


def _primary_group(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def spawn(
    argv: Sequence[str],
    *,
    death_signal: signal.Signals,
    stdout: _Stream,
    stderr: _Stream,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` as a child that dies with the launcher and sits in its own process group.

    Its own process group keeps a terminal Ctrl-C (sent to the foreground group) away from the
    children: only the launcher gets it, and it stops the children in a deliberate order.
    """
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        user=user,
        # Also drop root's groups, so a server run as a dedicated user holds only that user's rights.
        group=_primary_group(user) if user is not None else None,
        extra_groups=[] if user is not None else None,
        process_group=0,
        # preexec_fn is unsafe only if the hook takes locks or allocates in ways that can deadlock
        # after fork; this one makes a single pre-resolved libc call.
        preexec_fn=_die_with_parent(death_signal),
    )


def stop_child(
    process: subprocess.Popen[bytes],
    *,
    name: str,
    stop_signal: signal.Signals,
    timeout: float,
    whole_group: bool = False,
) -> int:
    """Ask `process` to stop with `stop_signal`, SIGKILL its process group after `timeout`; return its exit code."""
    if process.poll() is not None:
        return process.returncode
    with contextlib.suppress(ProcessLookupError):
        if whole_group:
            os.killpg(process.pid, stop_signal)
        else:
            process.send_signal(stop_signal)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("devstack.process.kill", process=name, pid=process.pid, timeout_s=timeout)
        # The leader is not reaped yet, so its pid (the group id) cannot have been reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def ensure_port_free(service: str, host: str, port: int) -> None:
    """Fail early and clearly when `port` is taken, rather than after the child dies on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option the servers set, so a socket in TIME_WAIT from a previous run is not a conflict.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServiceStartError(
                f"{service} cannot listen on {host}:{port}: {error.strerror or error}. "
                "Another process holds the port (another durachat stack?); stop it or choose "
                "other ports for the embedded services."
            ) from error
