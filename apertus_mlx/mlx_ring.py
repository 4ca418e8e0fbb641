"""What MLX's ring backend lacks, supplied from the outside: quiet failures, a way to unblock.

MLX's ring writes a dozen lines to stderr when a peer goes, and a receive from a peer that
went silent (rather than away) waits for ever. These two functions deal with both without
touching MLX: a filter on the C++ side's stderr, and shutting the ring's own sockets down
(found by the addresses in its hostfile) so that the waiting receive fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import socket
import stat
import sys
import threading


def shut_ring_sockets() -> None:
    """Shut down this process's connections of MLX's ring (found by the addresses in its
    hostfile), so that a send or receive waiting on one fails instead of waiting forever."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if not hostfile or not os.path.isfile(hostfile):
        return
    with open(hostfile) as f:
        nodes = json.load(f)
    addresses = set()
    for node in nodes:
        for address in node:
            ip, port = address.rsplit(":", 1)
            addresses.add((ip, int(port)))
    limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
    for fd in range(3, limit):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with s, contextlib.suppress(OSError):
            ends = {s.getsockname()[:2], s.getpeername()[:2]}
            if s.type == socket.SOCK_STREAM and ends & addresses:
                s.shutdown(socket.SHUT_RDWR)


_real_stderr: int | None = None


def stderr_fd() -> int:
    """The terminal's stderr, past the filter (for a last line written with os.write)."""
    return _real_stderr if _real_stderr is not None else 2


def quiet_ring_logs() -> None:
    """MLX's ring writes a dozen lines to stderr when a peer goes ('[ring] Socket 4 was closed
    by the peer', ...); our one line says it better. So the C++ side's stderr goes through a
    filter that drops those lines, and Python's sys.stderr writes to the terminal directly."""
    global _real_stderr
    if _real_stderr is not None:
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except (OSError, ValueError, AttributeError):
        return
    _real_stderr = real
    sys.stderr = io.TextIOWrapper(
        io.FileIO(real, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True,
    )  # fmt: skip

    def forward() -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not line.startswith((b"[ring]", b"[jaccl]")):
                    os.write(real, line)

    threading.Thread(target=forward, daemon=True).start()
