"""The demo's child processes: each in its own process group, all killed on any exit.

Usage::

    procs = Processes(log_dir)
    server = procs.spawn("server", ["edgewise", "server", ...])
    ...
    procs.stop_all()   # SIGTERM, a grace period, then SIGKILL; also runs at exit

Every child is started with `start_new_session=True`, so signalling its process group
reaches whatever it spawned too. `stop_all` is idempotent and registered with `atexit`,
so an exception anywhere in the story still leaves no process behind; on Linux each
child also asks the kernel to SIGKILL it should the demo die without cleaning up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Child", "Processes", "edgewise_argv", "free_port"]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the demo itself is SIGKILLed (no
    # atexit, no finally), the kernel still takes its children down (Linux only).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def edgewise_argv() -> list[str]:
    """How to run the `edgewise` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("edgewise")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from edgewise.cli import main; main()"]


@dataclass
class Child:
    """One child process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.proc.poll() is None

    def tail(self, chars: int = 1500) -> str:
        """The end of its log, for error messages."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL its whole process group and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class Processes:
    """The set of children the demo started."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        atexit.register(self.stop_all)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        """Start `argv` in a new session, output appended to `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace_s: float = 5.0) -> None:
        """SIGTERM the child's group; SIGKILL it after `grace_s`."""
        if child.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=grace_s)
        # The leader may be gone while something it spawned still runs in its group.
        child.kill()

    def stop_all(self, grace_s: float = 5.0) -> None:
        """Stop every child: SIGTERM all groups at once, wait, SIGKILL what is left."""
        for child in self.children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in self.children:
            child.kill()

    def detach(self) -> None:
        """Leave the children running after this process exits (`--keep-running`)."""
        atexit.unregister(self.stop_all)
