"""Start the other ranks of a run across hosts, the way `mlx.launch` starts them.

`mlx.launch` runs every rank, the first one too, as its child with its output piped: fine for
a script, not for a command whose first rank owns the terminal (the chat UI, Ctrl+C, a prompt
on stdin, exit statuses). So the first rank stays this process, and the others are started
here with the environment `mlx.launch` would give them (`MLX_RANK`; for the ring backend
`MLX_HOSTFILE`, a file of every rank's address; for JACCL `MLX_JACCL_COORDINATOR` and
`MLX_IBV_DEVICES`), locally for `127.0.0.1` entries, else over ssh. They run
`python -m apertus_mlx.rank`, which serves the first rank until it says to stop.

The hostfile is the JSON `mlx.distributed_config` writes: a list of hosts
`[{"ssh": "mac1", "ips": ["10.0.0.1"]}, ...]`, or an object with that list as `hosts` and
optionally `backend` ("ring", "jaccl" or "jaccl-ring") and `envs` (["NAME=value", ...], for
every rank).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

LOCAL = ("127.0.0.1", "localhost")
DEFAULT_PORT = 32323  # mlx.launch's first ring port; APERTUS_MLX_PORT moves it
BACKENDS = ("ring", "jaccl", "jaccl-ring")


@dataclass
class Host:
    ssh: str  # how to reach it (an ssh destination), or 127.0.0.1 for a local process
    ips: list[str]  # where its rank listens (the ring backend needs one per host)
    rdma: list[str | None] = field(default_factory=list)  # JACCL: its RDMA device to each host

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL


@dataclass
class Hostfile:
    hosts: list[Host]
    backend: str = "ring"
    envs: list[str] = field(default_factory=list)


def read_hostfile(path: str | Path) -> Hostfile:
    """Parse and check a hostfile; anything wrong is one UsageError naming the file."""
    path = Path(path)

    def bad(why: str) -> UsageError:
        return UsageError(f"hostfile {path}: {why}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    except ValueError as e:
        raise bad(f"not JSON ({e})") from None
    backend, envs = "ring", []
    if isinstance(data, dict):
        backend = data.get("backend") or "ring"
        envs = data.get("envs", [])
        data = data.get("hosts")
    if not isinstance(data, list) or not data:
        raise bad('expected a list of hosts, e.g. [{"ssh": "mac1", "ips": ["10.0.0.1"]}]')
    if backend not in BACKENDS:
        raise bad(
            f"backend {backend!r} is not started by apertus-mlx (ring, jaccl, jaccl-ring); "
            "start the ranks with mlx.launch instead"
        )
    if not isinstance(envs, list) or not all(isinstance(e, str) and "=" in e for e in envs):
        raise bad('"envs" must be a list of "NAME=value" strings')
    hosts = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
            raise bad(f'host {i} needs an "ssh" name (a string)')
        ips = entry.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise bad(f'host {i} ({entry["ssh"]}): "ips" must be a list of addresses')
        host = Host(entry["ssh"], ips or (["127.0.0.1"] if entry["ssh"] in LOCAL else []))
        host.rdma = entry.get("rdma") or []
        if not host.ips:
            raise bad(f"host {i} ({host.ssh}) has no ips: the ranks need an address to meet at")
        hosts.append(host)
    if backend != "ring" and not all(len(h.rdma) == len(hosts) for h in hosts):
        raise bad('the jaccl backend needs an "rdma" list per host, one entry per host')
    return Hostfile(hosts, backend, envs)


def _free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (all local ranks: no fixed port to collide with another run)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rank_environments(hostfile: Hostfile, workdir: Path) -> list[dict[str, str]]:
    """What each rank's environment adds: mlx.launch's variables and ours.

    Files the variables name (the ring's addresses, JACCL's devices) are written under
    `workdir` for local ranks; remote ranks get their content in `_FILES` and write it there.
    """
    hosts = hostfile.hosts
    count = sum(len(h.ips) for h in hosts) + 1  # one per address (as mlx.launch), one to watch
    if all(h.local for h in hosts):
        ports = _free_ports(count)
    else:
        base = int(os.environ.get("APERTUS_MLX_PORT", DEFAULT_PORT))
        ports = list(range(base, base + count))
    first_ip = hosts[0].ips[0]
    common = dict(e.split("=", 1) for e in hostfile.envs)
    common["APERTUS_MLX_BACKEND"] = "ring" if hostfile.backend == "ring" else "jaccl"
    common["APERTUS_MLX_WATCH"] = f"{first_ip}:{ports[-1]}"
    files: dict[str, str] = {}
    if hostfile.backend == "ring":  # every address of every host, as mlx.launch lists them
        free = iter(ports)
        files["MLX_HOSTFILE"] = json.dumps([[f"{ip}:{next(free)}" for ip in h.ips] for h in hosts])
    else:
        common["MLX_JACCL_COORDINATOR"] = f"{first_ip}:{ports[0]}"
        if hostfile.backend == "jaccl-ring":
            common["MLX_JACCL_RING"] = "1"
        files["MLX_IBV_DEVICES"] = json.dumps([h.rdma for h in hosts])
    for name, content in files.items():
        file = workdir / name.lower()
        file.write_text(content)
        common[name] = str(file)
    envs = []
    for rank, host in enumerate(hosts):
        env = {**common, "MLX_RANK": str(rank), "APERTUS_MLX_HOST": host.ssh}
        if not host.local:
            env["_FILES"] = json.dumps(files)
        envs.append(env)
    return envs


def _remote_command(env: dict[str, str], python: str) -> str:
    """A shell line for ssh: the rank's files and variables, then the rank itself."""
    files = json.loads(env.pop("_FILES"))
    script = [f"cd {shlex.quote(os.getcwd())} 2>/dev/null;"]
    for name, content in files.items():
        script.append(f"f=$(mktemp); printf %s {shlex.quote(content)} > $f; export {name}=$f;")
        env.pop(name, None)
    script += [f"export {k}={shlex.quote(v)};" for k, v in env.items()]
    script.append(f"exec {shlex.quote(python)} -m apertus_mlx.rank")
    return " ".join(script)


@dataclass
class Rank:
    """A started rank other than this process: its host and its process (or its ssh)."""

    rank: int
    host: Host
    process: subprocess.Popen


def launch(hostfile: Hostfile) -> list[Rank]:
    """Start ranks 1.. of `hostfile` and make this process rank 0 (its environment).

    Local ranks get a session of their own, so a Ctrl+C in the terminal reaches rank 0 alone,
    which stops them in order; they print nothing but their own failures (stderr is shared).
    A remote rank runs over `ssh -tt`: when the connection goes, its process goes with it.
    """
    workdir = Path(tempfile.mkdtemp(prefix="apertus-mlx-ranks-"))
    envs = rank_environments(hostfile, workdir)
    python = os.environ.get("APERTUS_MLX_PYTHON", sys.executable)
    ranks = []
    for rank, (host, env) in enumerate(zip(hostfile.hosts, envs)):
        if rank == 0:
            continue
        if host.local:
            command = [python, "-m", "apertus_mlx.rank"]
            full_env = {**os.environ, **env}
        else:
            line = _remote_command(env, python)
            command = ["ssh", "-tt", "-o", "BatchMode=yes", "-o", "LogLevel=QUIET",
                       "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3",
                       host.ssh, line]  # fmt: skip
            full_env = None
        try:
            process = subprocess.Popen(
                command,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            for started in ranks:
                started.process.kill()
            raise UsageError(f"cannot start rank {rank} on {host.ssh}: {e.strerror or e}") from None
        ranks.append(Rank(rank, host, process))
    env0 = envs[0]
    env0.pop("_FILES", None)
    os.environ.update(env0)
    return ranks
