"""A Hugging Face hub in miniature, on 127.0.0.1, for testing downloads with the real client.

Serves repos from local directories through the endpoints `huggingface_hub.snapshot_download`
uses: repo info, the file tree, and `resolve` (HEAD for metadata, GET with Range for data).
Hand-written because no package provides one; it covers public model repos, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = hashlib.sha1(b"apertus-mlx test snapshot").hexdigest()
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def point_client_at(monkeypatch, url: str) -> None:
    """Point huggingface_hub in this process at the hub at `url` (plain HTTP, no Xet)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


class FakeHub:
    """`FakeHub({"org/name": directory})`; `url` once started. `cut[file] = n` makes the next
    download of `file` stop after n bytes (a dropped connection), once; `before[file] = fn`
    runs fn() before the bytes of `file` are sent (the client waits for them meanwhile).
    `requests` lists every request, `downloads` every file download as (file, the first byte
    asked for)."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo: Path(d) for repo, d in repos.items()}
        self.cut: dict[str, int] = {}
        self.before: dict[str, Callable[[], None]] = {}
        self.requests: list[str] = []
        self.downloads: list[tuple[str, int]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            if m := _INFO.match(path):
                return self._info(m[1])
            if m := _TREE.match(path):
                return self._tree(m[1])
            if m := _RESOLVE.match(path):
                return self._resolve(m[1], m[3], body)
            self._error(404, "EntryNotFound", "no such endpoint")

        def _info(self, repo: str) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            root = hub.repos[repo]
            siblings = [{"rfilename": str(p.relative_to(root))} for p in hub.files(repo)]
            self._json({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings})

        def _tree(self, repo: str) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            root = hub.repos[repo]
            entries = [
                {
                    "type": "file",
                    "path": str(p.relative_to(root)),
                    "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                }
                for p in hub.files(repo)
            ]
            self._json(entries)

        def _resolve(self, repo: str, name: str, body: bool) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo} not found")
            file = hub.repos[repo] / name
            if not file.is_file():
                return self._error(404, "EntryNotFound", f"{name} not in {repo}")
            data = file.read_bytes()
            start = 0
            if m := re.match(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start = int(m[1])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            hub.downloads.append((name, start))
            if name in hub.before:
                hub.before[name]()
            limit = hub.cut.pop(name, None)
            if limit is not None:  # a dropped connection mid-file
                self.wfile.write(data[start : start + limit])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(data[start:])

        def _json(self, value) -> None:
            payload = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

        def _error(self, status: int, code: str, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

    return Handler
