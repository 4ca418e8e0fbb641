"""Heartbeats between rank 0 and every other rank: a lost host is noticed within seconds.

MLX's transports have no timeouts: a rank whose host sleeps or whose cable is pulled leaves
its neighbours waiting in a receive forever, and a rank that dies is noticed only by the one
that next talks to it. So each rank keeps one small TCP connection to rank 0 beside MLX's
own, and each side writes a byte every `BEAT_S` seconds. Silence for `LOST_AFTER_S`, or the
connection closing, is a lost rank. No model data travels here: this is a fault detector,
not a transport.

The same connection rings a bell. A receive waiting in MLX's ring polls its socket without
pause, a CPU core per waiting rank; fine for the milliseconds of a step, not for the minutes
a chat waits for its user. So rank 0 tells the other ranks when it goes idle, they wait for
the bell (`wait_bell`, no CPU) instead of a message, and rank 0 rings it (`ring`) before it
speaks again.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

BEAT_S = 0.5
LOST_AFTER_S = 3.0


class Watch:
    """Rank 0's side listens at `address` for the others; theirs connect to it.

    `on_lost(rank, reason)` is called once per lost rank, from a watch thread; on ranks > 0
    the only rank watched is 0. `stop()` ends the watching quietly (a normal shutdown).
    """

    def __init__(self, rank: int, size: int, address: tuple[str, int], on_lost: LostHandler):
        self.rank, self.size, self.address = rank, size, address
        self.on_lost = on_lost
        self.joined: set[int] = set()  # ranks whose connection arrived (rank 0's side)
        self._bells = threading.Semaphore(0)  # rung and not yet answered (ranks > 0)
        self._peers: list[socket.socket] = []  # the other ranks' connections (rank 0)
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        if rank == 0:
            server = socket.create_server(address, reuse_port=False, backlog=size)
            self._sockets.append(server)
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        else:
            threading.Thread(target=self._connect, daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def ring(self) -> None:
        """Rank 0: wake every resting rank (see `wait_bell`)."""
        deadline = time.monotonic() + LOST_AFTER_S
        while len(self._peers) < self.size - 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # a rank resting already has connected: this is start-up only
        for conn in list(self._peers):
            with contextlib.suppress(OSError):  # its reader reports the loss
                conn.sendall(b"!")

    def wait_bell(self) -> None:
        """Ranks > 0: wait, without using the CPU, until rank 0 rings (or the watch stops)."""
        while not self._bells.acquire(timeout=BEAT_S):
            if self._stopping.is_set():
                return

    def _accept(self, server: socket.socket) -> None:
        while not self._stopping.is_set() and len(self.joined) < self.size - 1:
            try:
                conn, _ = server.accept()
                conn.settimeout(LOST_AFTER_S)
                (rank,) = struct.unpack("<i", _read_exactly(conn, 4))
            except OSError:
                continue
            with self._lock:
                self.joined.add(rank)
                self._sockets.append(conn)
                self._peers.append(conn)
            self._beat(conn, rank)

    def _connect(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stopping.is_set():
            try:
                conn = socket.create_connection(self.address, timeout=LOST_AFTER_S)
                conn.settimeout(LOST_AFTER_S)
                conn.sendall(struct.pack("<i", self.rank))
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._lost(0, "it cannot be reached")
                    return
                time.sleep(0.1)
        else:
            return
        with self._lock:
            self._sockets.append(conn)
        self._beat(conn, 0)

    def _beat(self, conn: socket.socket, peer: int) -> None:
        def send() -> None:
            while not self._stopping.is_set():
                try:
                    conn.sendall(b".")
                except OSError:
                    return  # the reader sees it too
                self._stopping.wait(BEAT_S)

        def receive() -> None:
            while not self._stopping.is_set():
                try:
                    data = conn.recv(64)
                except TimeoutError:
                    self._lost(peer, f"no sign of life for {LOST_AFTER_S:g} s")
                    return
                except OSError:
                    data = b""
                if not data:
                    self._lost(peer, "its process ended")
                    return
                for _ in range(data.count(b"!")):
                    self._bells.release()

        threading.Thread(target=send, daemon=True).start()
        threading.Thread(target=receive, daemon=True).start()

    def _lost(self, peer: int, reason: str) -> None:
        if not self._stopping.is_set():
            self.on_lost(peer, reason)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


LostHandler = Callable[[int, str], None]
