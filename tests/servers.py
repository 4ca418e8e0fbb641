"""A real `apertus-mlx serve` on a free port, for the server tests and the benchmark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path


class Served:
    """A running server process: `url`, `base` (…/v1), its stderr lines so far (`log`)."""

    def __init__(self, model: Path | str, *flags: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apertus_mlx", "serve", "-m", str(model), "--port", "0", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        match = re.fullmatch(r"listening on (http://[\d.]+:\d+)\n", line)
        if match is None:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(5)
            raise RuntimeError(f"no `listening on` line: {line!r}; stderr: {self.log}")
        self.url = match.group(1)
        self.base = self.url + "/v1"

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def wait(self, timeout: float = 30) -> int:
        """The exit status, once the process ends by itself."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self, sig: int | None = None, timeout: float = 30) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code
