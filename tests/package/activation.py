"""Socket activation as systemd does it, for tests: listening sockets made outside moatd and
handed to it as descriptors 3, 4, ... (with LISTEN_FDS and LISTEN_PID set by the command
that execs it). Standard library only: the package test runs it outside any virtualenv."""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Callable


def listening() -> socket.socket:
    """A listening TCP socket on a free loopback port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


def placing(passed: list[socket.socket]) -> Callable[[], None]:
    """A `preexec_fn` that puts `passed` on descriptors 3, 4, ... in the child; give the
    child `pass_fds=range(3, 3 + len(passed))` too."""
    sources = [s.fileno() for s in passed]

    def place() -> None:
        # Out of the way first, so that placing one cannot overwrite another.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in sources]
        for target, fd in enumerate(high, start=3):
            os.dup2(fd, target)

    return place
