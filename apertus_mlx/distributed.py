"""One model across several processes (several Macs): who is who, and what happens when one goes.

A run across hosts is a group of ranks in MLX's distributed layer (`mx.distributed`: the ring
backend over TCP, JACCL over Thunderbolt 5, MPI); this module joins it and keeps it honest.
Rank 0 is the process the user talks to; every other rank serves it (`servant.py`) until it
says to stop. `pipeline.py` is what travels between them.

    start(hostfile, split)   at the top of a command: start the other ranks (or join, when
                             started by mlx.launch); ranks > 0 serve and never return
    active()                 rank 0's pipeline, once started; `apertus_mlx.load` uses it

Faults end in one line naming the host: a rank whose process ends is noticed by the ring at
once, a silent one by the heartbeats of `liveness.py` within `LOST_AFTER_S`; rank 0 keeps
the answer so far (stdout is flushed) and every rank exits. MLX's ring prints its own
diagnostics of a lost connection on stderr (a dozen lines); those are filtered out here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx

from .errors import ApertusError, UsageError
from .liveness import LOST_AFTER_S, Watch
from .mlx_ring import quiet_ring_logs, shut_ring_sockets, stderr_fd

if TYPE_CHECKING:
    from .launch import Rank
    from .pipeline import Pipeline

RECORD_BYTES = 2048  # one rank's part of an exchange (JSON, padded)
GRACE_S = 0.5  # how long a rank that lost a neighbour waits for the cause to be named
JOIN_TIMEOUT_S = 60.0  # for every rank to start and meet (ssh, imports, connections)

_pipeline: Pipeline | None = None


class RankLostError(ApertusError):
    """Another rank's process ended or its host stopped answering."""


class ClusterMismatchError(ApertusError):
    """The hosts do not run the same version or do not hold the same checkpoint."""

    exit_code = 2


def transport_error(e: BaseException) -> bool:
    """Whether MLX's distributed layer failed (a peer's connection went), not our code."""
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[jaccl]", "[mpi]"))


def launched_as_rank() -> bool:
    """Whether this process was started as one rank of a group (by us or by mlx.launch)."""
    return any(v in os.environ for v in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


def parse_split(split: str | None) -> list[int] | None:
    """`--split 40,40`: layers per rank, in rank order."""
    if split is None:
        return None
    try:
        counts = [int(x) for x in split.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise UsageError(f"--split takes layers per rank, like 40,40; got {split!r}")
    return counts


def start(hostfile: str | None = None, split: str | None = None) -> None:
    """Make this process a rank when asked to: the hook at the top of a command.

    With `hostfile` (and not already started as a rank), start the other ranks and become
    rank 0. Started as a rank (by us, or by hand under `mlx.launch`), join the group: rank 0
    returns and runs the command; the other ranks serve rank 0 and exit, never returning.
    Neither: nothing happens (one process).
    """
    global _pipeline
    counts = parse_split(split)
    if _pipeline is not None:  # started already (a second command in the same process)
        return
    ranks: list[Rank] = []
    if not launched_as_rank():
        if hostfile is None:
            if counts is not None:
                raise UsageError("--split needs --hostfile (or ranks started by mlx.launch)")
            return
        from .launch import launch, read_hostfile

        hosts = read_hostfile(hostfile)
        if counts is not None and len(counts) != len(hosts.hosts):
            raise UsageError(
                f"--split has {len(counts)} entries for {len(hosts.hosts)} hosts in {hostfile}"
            )
        if len(hosts.hosts) == 1:
            return  # this machine alone: one process, as mlx.launch runs one host
        ranks = launch(hosts)
    try:
        cluster = join(ranks)
    except BaseException:
        for started in ranks:  # they would wait for us until their own time-out
            started.process.kill()
        raise
    if cluster is None:
        return
    if cluster.rank != 0:
        from .servant import serve

        code = serve(cluster)
        cluster.close()
        sys.stdout.flush()
        os._exit(code)  # MLX's group would otherwise wait in its destructors for peers
    from .pipeline import Pipeline

    _pipeline = Pipeline(cluster, counts)
    atexit.register(_pipeline.close)


def active() -> Pipeline | None:
    """Rank 0's pipeline when this process is rank 0 of several, else None."""
    return _pipeline


@dataclass
class Cluster:
    """This process's place in the group, its links' health and how to leave."""

    group: mx.distributed.Group | None  # None until MLX's group is up
    rank: int
    size: int
    host: str
    children: list[Rank] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # every rank's host name, once exchanged
    watch: Watch | None = None
    lost: tuple[int, str] | None = None  # (rank, why) of the first rank lost
    closing: bool = False
    _failing: threading.Lock = field(default_factory=threading.Lock)

    def host_of(self, rank: int) -> str:
        name = self.hosts[rank] if rank < len(self.hosts) else "?"
        return f"host {name} (rank {rank})"

    def exchange(self, record: dict) -> list[dict]:
        """Every rank's `record` (JSON, up to RECORD_BYTES), in rank order, on every rank."""
        data = json.dumps(record).encode()
        if len(data) > RECORD_BYTES:  # a long error message: cut it, keep it valid JSON
            record = {**record, "error": str(record.get("error"))[: RECORD_BYTES // 2]}
            data = json.dumps(record).encode()
        padded = mx.array(list(data.ljust(RECORD_BYTES)), dtype=mx.uint8)
        gathered = self.call(lambda: mx.distributed.all_gather(padded, group=self.group))
        raw = bytes(gathered.tolist())
        return [json.loads(raw[i : i + RECORD_BYTES]) for i in range(0, len(raw), RECORD_BYTES)]

    def call(self, make):
        """Evaluate `make()`'s arrays; a broken link becomes RankLostError naming the rank."""
        try:
            out = make()
            mx.eval(out)
            return out
        except RuntimeError as e:
            if not transport_error(e):
                raise
        raise self.link_broken()

    def link_broken(self) -> RankLostError:
        """The error for a transport failure: the rank the heartbeats lost first, if any."""
        deadline = time.monotonic() + GRACE_S + LOST_AFTER_S
        while self.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.closing = True
        if self.lost is None:
            return RankLostError("lost the connection to the other ranks")
        rank, why = self.lost
        return RankLostError(f"lost {self.host_of(rank)}: {why}")

    def on_lost(self, rank: int, why: str) -> None:
        """From the watch thread: remember the first loss; if the main thread has not ended
        the process within the grace period (it is stuck in a receive), end it here."""
        if self.closing or self.lost is not None:
            return
        self.lost = (rank, why)
        if self.rank != 0:
            time.sleep(GRACE_S)  # rank 0 may have said EXIT just before going: let it arrive
            if not self.closing:
                os._exit(1)  # rank 0 went: it has said why, or nobody is listening
            return
        # The main thread may wait in a receive from a silent peer, which MLX never times out.
        # Shutting the ring's sockets down fails that receive, and the main thread ends the
        # command as after any error (history finished, exit status); else end it from here.
        shut_ring_sockets()
        deadline = time.monotonic() + 2 * GRACE_S
        while not self.closing and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.closing:
            self.fail(f"lost {self.host_of(rank)}: {why}")

    def fail(self, message: str) -> None:
        """Say `message` in one line, keep what was printed, end the process (status 1)."""
        if not self._failing.acquire(blocking=False):
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        with contextlib.suppress(OSError):
            os.write(stderr_fd(), f"apertus-mlx: error: {message}\n".encode())
        for child in self.children:  # a stopped one would outlive us, holding our stderr
            child.process.kill()
        os._exit(1)

    def close(self) -> None:
        """Stop watching and end the local ranks this process started (they were told to
        exit already, or their peers are gone)."""
        self.closing = True
        if self.watch is not None:
            self.watch.stop()
        deadline = time.monotonic() + (0.0 if self.lost else 2.0)  # told to exit, or nothing
        for child in self.children:  # left to save: a stopped one would outlive us
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - whatever it is, it must not outlive us
                child.process.kill()


def join(children: list[Rank] | None = None) -> Cluster | None:
    """Join the group this process was started in; None when it is a group of one.

    Where the environment says who is who (the ring's and JACCL's variables), the ranks meet
    on the heartbeat connections first, and start MLX's group only when all are there: MLX's
    start-up waits for ever for a rank that never comes, holding Python's lock all the while
    (no thread can run, report or time out), so a rank that fails to start is named here.
    """
    backend = os.environ.get("APERTUS_MLX_BACKEND", "any")
    host = os.environ.get("APERTUS_MLX_HOST") or socket.gethostname()
    quiet_ring_logs()
    cluster = None
    known = _rank_and_size()
    if known is not None and known[1] > 1:
        cluster = Cluster(None, *known, host, children or [])
        if children:
            cluster.hosts = [host] + [c.host.ssh for c in children]
        _watch(cluster)
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)  # the waits below are in C++
    try:
        if cluster is not None and cluster.watch is not None:
            _meet(cluster)
        group = mx.distributed.init(strict=backend != "any", backend=backend)
        if group.size() == 1:
            return None
        if cluster is None:
            cluster = Cluster(group, group.rank(), group.size(), host, children or [])
            _watch(cluster)
        cluster.group = group
        if cluster.rank != 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop
            previous = signal.SIG_IGN
        return cluster
    except RuntimeError as e:
        raise ApertusError(
            f"cannot join the other ranks: {e} (the hostfile's first host is this machine, and "
            "the others reach it at its ips)"
        ) from None
    finally:
        signal.signal(signal.SIGINT, previous)


def _rank_and_size() -> tuple[int, int] | None:
    """This rank and the group's size, from mlx.launch's variables, before MLX reads them."""
    rank = os.environ.get("MLX_RANK")
    listed = os.environ.get("MLX_HOSTFILE") or os.environ.get("MLX_IBV_DEVICES")
    if rank is None or not listed or not os.path.isfile(listed):
        return None
    try:
        with open(listed) as f:
            return int(rank), len(json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _meet(cluster: Cluster) -> None:
    """Every rank connected to rank 0's heartbeats before any starts MLX's group: rank 0 waits
    for them all (its watch threads end the process if one cannot start) and rings; the others
    wait for the ring."""
    watch = cluster.watch
    if cluster.rank != 0:
        watch.wait_bell()
        return
    while len(watch.joined) < cluster.size - 1:
        time.sleep(0.02)
    watch.ring()


def _watch(cluster: Cluster) -> None:
    address = _watch_address()
    if address is not None:
        cluster.watch = Watch(cluster.rank, cluster.size, address, cluster.on_lost)
    _watch_children(cluster)


def _watch_children(cluster: Cluster) -> None:
    """Rank 0 started these processes: one that ends early (ssh cannot connect, python is
    missing, the host refused) is a lost rank at once, and nobody joining in time too."""
    if not cluster.children:
        return

    def watch() -> None:
        started = time.monotonic()
        while not cluster.closing:
            for child in cluster.children:
                code = child.process.poll()
                if code is not None and not cluster.closing:
                    why = (
                        "ssh could not connect"
                        if code == 255 and not child.host.local
                        else (f"its process ended with status {code}")
                    )
                    cluster.on_lost(child.rank, why)
            w = cluster.watch
            if w is not None and time.monotonic() - started > JOIN_TIMEOUT_S:
                missing = [c for c in cluster.children if c.rank not in w.joined]
                if missing and not cluster.closing:
                    cluster.on_lost(missing[0].rank, f"it did not start in {JOIN_TIMEOUT_S:g} s")
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def _watch_address() -> tuple[str, int] | None:
    """Where rank 0 listens for heartbeats: set by our launcher, else next to the ring's or
    JACCL's own address (under mlx.launch); MPI runs without heartbeats."""
    given = os.environ.get("APERTUS_MLX_WATCH")
    if given:
        ip, port = given.rsplit(":", 1)
        return ip, int(port)
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile):
        with open(hostfile) as f:
            nodes = json.load(f)
        ports = [int(a.rsplit(":", 1)[1]) for node in nodes for a in node]
        return nodes[0][0].rsplit(":", 1)[0], max(ports) + 1
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR")
    if coordinator:
        ip, port = coordinator.rsplit(":", 1)
        return ip, int(port) + 1
    return None
