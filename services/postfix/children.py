"""The helpers the Postfix container's supervisor keeps beside Postfix (the metrics agent,
the DNS forwarder, the MTA-STS resolver): each a child process run as a user of its own,
started again whenever it ends, so that no crash leaves Postfix without it."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from secumail.logs import log_event

log = logging.getLogger("secumail.postfix")


def in_container() -> bool:
    """Whether this is the Postfix container (the helpers that change the system's files,
    resolv.conf and /etc/postfix, run there only: not beside the tests' own Postfix)."""
    return Path("/.dockerenv").exists()


class ChildKeeper:
    """Runs `run_once` (which starts the child with `spawn` and returns its status) in a
    thread, again whenever it returns, until stopped."""

    RESTART_AFTER = 1.0

    def __init__(self, name: str, user: int | None) -> None:
        self.name = name
        self.user = user  # None: this process's own user
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True, name=name)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()

    def spawn(self, command: Sequence[str], pass_fds: Sequence[int] = (),
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        identity = {} if self.user is None else {
            "user": self.user, "group": self.user, "extra_groups": []}
        self.child = subprocess.Popen(
            list(command), pass_fds=pass_fds, stdin=subprocess.DEVNULL, env=env,
            **identity)  # type: ignore[call-overload]
        return self.child

    def run_once(self) -> int:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stopping:
            try:
                status: int | str = self.run_once()
            except (OSError, subprocess.SubprocessError) as error:
                status = f"{type(error).__name__}: {error}"
            if not self.stopping:
                log_event(log, f"{self.name} ended: starting it again", logging.ERROR,
                          status=status)
                time.sleep(self.RESTART_AFTER)


class CommandKeeper(ChildKeeper):
    """A child that is one fixed command."""

    def __init__(self, name: str, command: Sequence[str], user: int | None,
                 pass_fds: Sequence[int] = (), env: dict[str, str] | None = None) -> None:
        super().__init__(name, user)
        self.command = list(command)
        self.pass_fds = tuple(pass_fds)
        self.env = env

    def run_once(self) -> int:
        return self.spawn(self.command, self.pass_fds, self.env).wait()
