"""Conversation history: one SQLite file, shared by the CLI and the chat, that a crash cannot lose.

Why it is built this way:
- WAL journal, `synchronous=NORMAL`: a killed process loses nothing committed and never leaves
  a corrupt file (a power cut may lose the last transactions, not the file); readers never
  block the writer.
- Every write is one short `BEGIN IMMEDIATE` transaction, waited for up to `timeout` seconds
  (`busy_timeout`) and retried, so several processes (two chats and a `generate --save`)
  can write at once without losing each other's rows.
- An answer is written while it streams (`AnswerWriter`, at least once a second), so a kill
  loses at most the last second of it.
- The schema (store_schema.py) is versioned with `PRAGMA user_version`: an ordered list of
  small steps, each applied once, inside the same transaction as the version bump.

Threads: a `Store` holds one connection opened with `check_same_thread=False`; every call
takes the store's lock, so one `Store` may be shared by the UI thread and a worker thread.
Every failure of SQLite or the file system is raised as `StoreError` with one readable line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import StoreError, UnknownConversationError
from .store_schema import SCHEMA_VERSION, check_version, migrate, rollback

DB_NAME = "history.db"
FLUSH_INTERVAL_S = 1.0  # an answer reaches the disk at least this often while it streams
STREAMING_SILENCE_S = 10 * FLUSH_INTERVAL_S  # unfinished and silent longer: its writer is gone
FINISH_REASONS = ("stop", "length", "interrupted", "error")
ROLES = ("user", "assistant", "system")
ID_CHARS = 8  # conversation ids: 8 lowercase hex digits
MIN_PREFIX = 4  # shortest prefix accepted for an id
TITLE_WORDS = 8
TITLE_CHARS = 60
_RETRIES = 3  # a write still busy after `timeout` is tried this many times in all
_SQLITE_READONLY, _SQLITE_IOERR_WRITE = 8, 778  # result codes (constants only from Python 3.11)
_TOKEN_TYPE = next(t for t in "IL" if array(t).itemsize == 4)  # uint32


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str | None
    model: str | None
    revision: str | None  # snapshot hash of a hub model, None for a local directory
    system: str | None
    settings: dict[str, Any]  # sampling settings (temperature, top_p, ..., seed, max_tokens)
    thinking: bool
    current_leaf: int | None  # last message of the current branch
    created_at: float  # Unix time, seconds
    updated_at: float
    damaged: str | None = None  # what could not be read from its row (shown, never fatal)


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: str
    parent_id: int | None
    role: str
    content: str
    tokens: list[int] | None  # the ids the model produced (assistant messages)
    settings: dict[str, Any] | None
    seed: int | None
    prompt_tokens: int | None
    answer_tokens: int | None
    tokens_per_s: float | None
    finish_reason: str | None  # None while the answer streams (or if its writer was killed)
    stats: dict[str, Any] | None
    created_at: float
    written_at: float | None = None  # an answer's last write while it streamed
    # An answer's blocks as the chat template reads them (thoughts, tool_calls, response);
    # None when it is plain text.
    parts: list[dict] | None = None
    damaged: str | None = None  # what could not be read from its row (shown, never fatal)

    def streaming(self, now: float | None = None) -> bool:
        """An unfinished answer still being written (by this process or another one)."""
        if self.role != "assistant" or self.finish_reason is not None:
            return False
        last = self.written_at or self.created_at
        return (now or time.time()) - last < STREAMING_SILENCE_S


@dataclass(frozen=True)
class SearchHit:
    conversation_id: str
    title: str | None
    message_id: int | None  # None when the title matched
    role: str | None
    snippet: str


def encode_tokens(tokens: Iterable[int]) -> bytes:
    """Token ids as little-endian uint32: 4 bytes a token, exact, cheap to rewrite."""
    a = array(_TOKEN_TYPE, tokens)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def decode_tokens(blob: bytes | None) -> list[int] | None:
    if blob is None:
        return None
    a = array(_TOKEN_TYPE)
    a.frombytes(blob)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def title_from(text: str) -> str:
    """The first words of a message, as a title until the user renames the conversation."""
    words = text.split()
    title = " ".join(words[:TITLE_WORDS])
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1].rstrip() + "…"
    elif len(words) > TITLE_WORDS:
        title += " …"
    return title or "(empty)"


def fts_query(text: str) -> str:
    """User text as an FTS5 query: every word quoted, so quotes and operators are plain text."""
    # SQLite ends a string at NUL; a lone surrogate (bytes from argv that are not UTF-8)
    # cannot be bound at all, and no stored text holds one
    text = text.encode("utf-8", "replace").decode("utf-8")
    words = text.replace("\x00", " ").split()
    return " ".join('"' + word.replace('"', '""') + '"' for word in words)


def _json(value: Any) -> str | None:
    if value is None:
        return None
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


class _Row:
    """One row's columns, decoded defensively: a value that is not what the schema promises
    (settings that are not a JSON object, a token blob of odd length: another tool, a bad
    disk, a hand edit) becomes a safe default and a note in `problems`. One damaged row must
    not make a whole history unreadable; it is shown as damaged, the rest as usual."""

    def __init__(self, row: sqlite3.Row):
        self.row = row
        self.problems: list[str] = []

    def damaged(self) -> str | None:
        return "; ".join(self.problems) or None

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.row[key]
        if value is None:
            return default
        if not isinstance(value, str):
            self.problems.append(f"{key} is not text")
            return default
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8 (see `_decode_text`)
                self.problems.append(f"{key} is not valid UTF-8")
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return value

    def number(self, key: str, kind: type = float, default: Any = None) -> Any:
        value = self.row[key]
        if value is None:
            return default
        if isinstance(value, int) or (
            isinstance(value, float) and (kind is float or value.is_integer())
        ):
            return kind(value)
        self.problems.append(f"{key} is not a {'whole ' if kind is int else ''}number")
        return default

    def json_value(self, key: str, kind: type, default: Any) -> Any:
        """The column's JSON, when it is a `kind` (dict, list); else `default`, noted."""
        raw = self.row[key]
        if raw is None or raw == "":
            return default
        try:
            value = json.loads(raw)
        except (ValueError, TypeError, RecursionError):
            self.problems.append(f"{key} are not JSON")
            return default
        if not isinstance(value, kind):
            self.problems.append(f"{key} are not a JSON {'object' if kind is dict else 'list'}")
            return default
        return value

    def parts(self) -> list[dict] | None:
        """An answer's blocks: a list of objects, or None (the text stands in for them)."""
        parts = self.json_value("parts", list, None)
        if parts is not None and not all(isinstance(p, dict) for p in parts):
            self.problems.append("parts are not a list of objects")
            return None
        return parts

    def tokens(self) -> list[int] | None:
        blob = self.row["tokens"]
        if blob is None:
            return None
        if not isinstance(blob, bytes) or len(blob) % 4:
            self.problems.append("token ids are damaged (the text stands in for them)")
            return None
        return decode_tokens(blob)


def _decode_text(raw: bytes) -> str:
    """TEXT as SQLite hands it over. Invalid UTF-8 would make sqlite3 raise while fetching,
    failing the whole query; kept as surrogates instead, `_Row.text` shows the row damaged."""
    return raw.decode("utf-8", "surrogateescape")


def _conversation(row: sqlite3.Row) -> Conversation:
    r = _Row(row)
    return Conversation(
        id=row["id"],
        title=r.text("title"),
        model=r.text("model"),
        revision=r.text("revision"),
        system=r.text("system"),
        settings=r.json_value("settings", dict, {}),
        thinking=bool(r.number("thinking", int, 0)),
        current_leaf=r.number("current_leaf", int),
        created_at=r.number("created_at", float, 0.0),
        updated_at=r.number("updated_at", float, 0.0),
        damaged=r.damaged(),
    )


def _message(row: sqlite3.Row) -> Message:
    r = _Row(row)
    role = r.text("role", "")
    if role not in ROLES:
        r.problems.append(f"unknown role {role!r}")
    finish_reason = r.text("finish_reason")
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        r.problems.append(f"unknown finish reason {finish_reason!r}")
        finish_reason = "error"
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        parent_id=r.number("parent_id", int),
        role=role,
        content=r.text("content", ""),
        tokens=r.tokens(),
        settings=r.json_value("settings", dict, None),
        seed=r.number("seed", int),
        prompt_tokens=r.number("prompt_tokens", int),
        answer_tokens=r.number("answer_tokens", int),
        tokens_per_s=r.number("tokens_per_s", float),
        finish_reason=finish_reason,
        stats=r.json_value("stats", dict, None),
        created_at=r.number("created_at", float, 0.0),
        written_at=r.number("written_at", float),
        parts=r.parts(),
        damaged=r.damaged(),
    )


def _is_busy(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(e) or "busy" in str(e)


# -- the store --------------------------------------------------------------------------------


class Store:
    """The history database. Open with `Store.open()`; usable as a context manager."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db = db
        self.path = path
        self._lock = threading.RLock()

    @classmethod
    def open(
        cls, path: str | Path | None = None, *, timeout: float = 5.0, readonly: bool = False
    ) -> Store:
        """Open (creating the file and its directory) and migrate the history database.

        path: default `paths.data_dir() / "history.db"`. timeout: seconds a write waits for
        another process's transaction before it fails with StoreError. readonly: for commands
        that only read (see `_open_readonly`): never waits for a writer, works in a read-only
        directory, creates nothing.
        """
        if path is None:
            from .paths import data_dir

            path = data_dir() / DB_NAME
        path = Path(path).expanduser()
        if readonly:
            return cls._open_readonly(path, timeout)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # conversations are private
        except OSError as e:
            raise StoreError(
                f"cannot create the history directory {path.parent}: {e.strerror or e}"
            ) from None
        db = None
        try:
            db = sqlite3.connect(
                path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            db.row_factory = sqlite3.Row
            db.text_factory = _decode_text
            db.execute("PRAGMA foreign_keys = ON")
            # A deleted conversation is overwritten, not only unlinked from the b-tree.
            db.execute("PRAGMA secure_delete = ON")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            migrate(db)
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise _store_error(path, e) from None
        except StoreError:
            if db is not None:
                db.close()
            raise
        return cls(db, path)

    @classmethod
    def _open_readonly(cls, path: Path, timeout: float) -> Store:
        """The database as it is, through SQLite's `mode=ro`.

        In WAL mode a reader needs no lock a writer holds, so `history list` reads while a chat
        writes; and nothing is written, so a read-only directory reads too (with `immutable`
        when SQLite cannot create its shared-memory file there and no writer's log exists).
        No migration runs here, except the one an older database needs before this version
        can read it: that upgrade is a write, done once, and fails in one line where the
        database cannot be written. A missing database is an empty history.
        """
        if not path.exists():
            if path.parent.exists() and not path.parent.is_dir():
                raise StoreError(
                    f"cannot read the history directory {path.parent}: not a directory"
                )
            store = cls.open(":memory:")
            store.path = path
            return store
        uri = path.resolve().as_uri()
        db = None
        try:
            try:
                db = cls._connect_readonly(f"{uri}?mode=ro", timeout)
            except sqlite3.OperationalError:
                wal = path.with_name(path.name + "-wal")
                if wal.exists() or os.access(path.parent, os.W_OK):
                    raise
                db = cls._connect_readonly(f"{uri}?mode=ro&immutable=1", timeout)
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise _store_error(path, e) from None
        try:
            check_version(version)
        except StoreError:
            db.close()
            raise
        if version < SCHEMA_VERSION:  # written by an older apertus-mlx: upgrade it once
            db.close()
            try:
                return cls.open(path, timeout=timeout)
            except StoreError as e:
                raise StoreError(f"{e} (the database is from an older apertus-mlx: reading it "
                                 "needs a one-time upgrade, which writes)") from None  # fmt: skip
        return cls(db, path)

    @staticmethod
    def _connect_readonly(uri: str, timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(
            uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.row_factory = sqlite3.Row
            db.text_factory = _decode_text
            db.execute("PRAGMA schema_version").fetchone()  # opens the file now: errors here
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run fn in one short write transaction; busy databases are waited for and retried."""
        for attempt in range(_RETRIES):
            with self._lock:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    result = fn(self._db)
                    self._db.execute("COMMIT")
                    return result
                except sqlite3.Error as e:
                    rollback(self._db)
                    if _is_busy(e) and attempt + 1 < _RETRIES:
                        continue
                    raise _store_error(self.path, e) from None
                except BaseException:
                    rollback(self._db)
                    raise
        raise AssertionError("unreachable")

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as e:
                raise _store_error(self.path, e) from None

    # -- conversations

    def create_conversation(
        self,
        *,
        model: str | None = None,
        revision: str | None = None,
        system: str | None = None,
        settings: dict[str, Any] | None = None,
        thinking: bool = False,
        title: str | None = None,
    ) -> Conversation:
        """A new, empty conversation. Its title, unless given, comes from the first user message."""
        now = time.time()

        def insert(db: sqlite3.Connection) -> str:
            while True:
                cid = secrets.token_hex(ID_CHARS // 2)
                try:
                    db.execute(
                        "INSERT INTO conversations (id, title, model, revision, system, settings,"
                        " thinking, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            cid,
                            title,
                            model,
                            revision,
                            system,
                            _json(settings or {}),
                            int(thinking),
                            now,
                            now,
                        ),
                    )
                    return cid
                except sqlite3.IntegrityError:  # that id is taken: draw another
                    continue

        return self.get_conversation(self._write(insert))

    def get_conversation(self, id_or_prefix: str) -> Conversation:
        """The conversation whose id is, or starts with, `id_or_prefix` (at least 4 characters).

        UnknownConversationError (exit status 2) when none or several match.
        """
        key = id_or_prefix.strip().lower()
        if len(key) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in key):
            raise UnknownConversationError(
                f"no conversation {id_or_prefix!r}: ids are {ID_CHARS} hex digits "
                f"(a unique prefix of {MIN_PREFIX} or more will do; see `apertus-mlx history list`)"
            )
        rows = self._read(
            "SELECT * FROM conversations WHERE substr(id, 1, ?) = ? LIMIT 2", (len(key), key)
        )
        if not rows:
            raise UnknownConversationError(
                f"no conversation {id_or_prefix!r} (see `apertus-mlx history list`)"
            )
        if len(rows) > 1:
            raise UnknownConversationError(
                f"{id_or_prefix!r} matches several conversations: type more of the id"
            )
        return _conversation(rows[0])

    def list_conversations(self, limit: int | None = None) -> list[Conversation]:
        """Conversations, the most recently updated first."""
        sql = "SELECT * FROM conversations ORDER BY updated_at DESC, rowid DESC"
        args: tuple = ()
        if limit is not None:
            sql += " LIMIT ?"
            args = (limit,)
        return [_conversation(r) for r in self._read(sql, args)]

    def update_conversation(self, conversation_id: str, **fields: Any) -> Conversation:
        """Change model, revision, system, settings, thinking or title (others are refused)."""
        allowed = {"model", "revision", "system", "settings", "thinking", "title"}
        unknown = set(fields) - allowed
        if unknown:
            raise TypeError(f"cannot update {', '.join(sorted(unknown))}")
        cid = self.get_conversation(conversation_id).id
        if "settings" in fields:
            fields["settings"] = _json(fields["settings"] or {})
        if "thinking" in fields:
            fields["thinking"] = int(bool(fields["thinking"]))
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{name} = ?" for name in fields)
        self._write(
            lambda db: db.execute(
                f"UPDATE conversations SET {columns} WHERE id = ?", (*fields.values(), cid)
            )
        )
        return self.get_conversation(cid)

    def rename(self, conversation_id: str, title: str) -> Conversation:
        """Give a conversation its own title (it no longer follows the first message)."""
        return self.update_conversation(conversation_id, title=title)

    def delete(self, conversation_id: str) -> Conversation:
        """Delete a conversation's rows: all its messages and their search entries; return
        what was deleted. Its saved KV cache is not the store's: see
        `saved_caches.delete_conversation`, which deletes both."""
        conversation = self.get_conversation(conversation_id)

        def delete(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation.id,))
            # FTS5 only marks deleted entries; merging drops their terms from the index.
            db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")
            db.execute("INSERT INTO titles_fts(titles_fts) VALUES ('optimize')")

        self._write(delete)
        # Old page images stay in the WAL until a checkpoint: write them back now (readers may
        # hold the WAL; then the next checkpoint overwrites it).
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return conversation

    def exists(self, conversation_id: str) -> bool:
        """Whether the conversation (an exact id) is still there: a turn asks before it
        saves anything beside the rows."""
        return bool(self._read("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)))

    # -- messages

    def add_message(
        self,
        conversation_id: str,
        role: str,
        content: str,
        parent_id: int | None | Literal["leaf"] = "leaf",
        *,
        tokens: Iterable[int] | None = None,
        settings: dict[str, Any] | None = None,
        seed: int | None = None,
        finish_reason: str | None = None,
        stats: Any = None,
    ) -> Message:
        """Add a finished message and make it the conversation's current leaf.

        parent_id: "leaf" (default) continues the current branch; a message id starts a new
        branch after that message (an edit: the edited message's parent); None starts one at
        the root. A conversation without a title takes the first words of its first user message.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if finish_reason is not None and finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}")
        cid = self.get_conversation(conversation_id).id
        s = _stats_dict(stats)
        row = (
            role,
            content,
            None if tokens is None else encode_tokens(tokens),
            _json(settings),
            seed,
            s.get("prompt_tokens"),
            s.get("generated_tokens"),
            s.get("decode_tps"),
            finish_reason,
            _json(s or None),
        )
        mid = self._write(lambda db: self._insert_message(db, cid, parent_id, row))
        return self.message(mid)

    def start_answer(
        self,
        conversation_id: str,
        parent_id: int | None | Literal["leaf"] = "leaf",
        *,
        settings: dict[str, Any] | None = None,
        seed: int | None = None,
        interval: float = FLUSH_INTERVAL_S,
        on_error: Callable[[StoreError], None] | None = None,
        question: str | None = None,
    ) -> AnswerWriter:
        """Create the assistant message (empty, finish_reason None) and a writer that streams
        into it. parent_id as for `add_message`; a second answer to the same user message is a
        regeneration: a sibling branch. With `question`, the user message it answers goes in
        first, after parent_id, in the same transaction (its id: `writer.question_id`), so no
        other process ever finds that question as the leaf and writes its own after it.
        Raises StoreError if even the empty row cannot be written; after that, the writer
        reports failures instead of raising them."""
        cid = self.get_conversation(conversation_id).id
        row = (
            "assistant",
            "",
            encode_tokens([]),
            _json(settings),
            seed,
            None,
            None,
            None,
            None,
            None,
        )

        def insert(db: sqlite3.Connection) -> tuple[int | None, int]:
            question_id, parent = None, parent_id
            if question is not None:
                asked = ("user", question, *(None,) * 8)
                question_id = parent = self._insert_message(db, cid, parent_id, asked)
            return question_id, self._insert_message(db, cid, parent, row)

        question_id, mid = self._write(insert)
        writer = AnswerWriter(self, mid, cid, interval=interval, on_error=on_error)
        writer.question_id = question_id
        return writer

    def _insert_message(self, db: sqlite3.Connection, cid: str, parent_id: Any, row: tuple) -> int:
        conv = db.execute("SELECT current_leaf, title FROM conversations WHERE id = ?", (cid,))
        leaf, title = conv.fetchone()
        if parent_id == "leaf":
            parent_id = leaf
        elif parent_id is not None:
            owner = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (parent_id,))
            found = owner.fetchone()
            if found is None or found[0] != cid:
                raise ValueError(f"message {parent_id} is not in conversation {cid}")
        now = time.time()
        cur = db.execute(
            "INSERT INTO messages (conversation_id, parent_id, role, content, tokens, settings,"
            " seed, prompt_tokens, answer_tokens, tokens_per_s, finish_reason, stats, created_at,"
            " written_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, parent_id, *row, now, now),
        )
        mid = cur.lastrowid
        new_title = title_from(row[1]) if title is None and row[0] == "user" else title
        db.execute(
            "UPDATE conversations SET current_leaf = ?, updated_at = ?, title = ? WHERE id = ?",
            (mid, now, new_title, cid),
        )
        return mid

    def message(self, message_id: int) -> Message:
        rows = self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise KeyError(f"no message {message_id}")
        return _message(rows[0])

    def branch(self, conversation_id: str) -> list[Message]:
        """The current branch: messages from the root to the current leaf, in order."""
        conversation = self.get_conversation(conversation_id)
        if conversation.current_leaf is None:
            return []
        return self.path_to(conversation.current_leaf)

    def path_to(self, message_id: int) -> list[Message]:
        """The messages from the root to `message_id`, in order (empty if there is none)."""
        # A damaged row could make the parents a loop: no path is longer than its
        # conversation's message count, and only that conversation's messages are on it.
        rows = self._read(
            "WITH conv(id) AS (SELECT conversation_id FROM messages WHERE id = ?),"
            " path(id, depth) AS ("
            " SELECT ?, 0 UNION ALL"
            " SELECT m.parent_id, path.depth + 1 FROM messages m JOIN path ON m.id = path.id"
            " WHERE m.parent_id IS NOT NULL AND path.depth + 1 <"
            "  (SELECT count(*) FROM messages WHERE conversation_id = (SELECT id FROM conv)))"
            " SELECT messages.* FROM path JOIN messages USING (id)"
            " WHERE messages.conversation_id = (SELECT id FROM conv) ORDER BY path.depth DESC",
            (message_id, message_id),
        )
        return [_message(r) for r in rows]

    def messages(self, conversation_id: str) -> list[Message]:
        """Every message of a conversation, all branches, oldest first."""
        cid = self.get_conversation(conversation_id).id
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (cid,))
        return [_message(r) for r in rows]

    def children(self, message_id: int) -> list[Message]:
        """The answers to (or edits after) a message, oldest first: the branches that fork there."""
        rows = self._read("SELECT * FROM messages WHERE parent_id = ? ORDER BY id", (message_id,))
        return [_message(r) for r in rows]

    def siblings(self, message_id: int) -> list[Message]:
        """A message and its alternatives (same parent, roots included), oldest first."""
        m = self.message(message_id)
        if m.parent_id is not None:
            return self.children(m.parent_id)
        rows = self._read(
            "SELECT * FROM messages WHERE conversation_id = ? AND parent_id IS NULL ORDER BY id",
            (m.conversation_id,),
        )
        return [_message(r) for r in rows]

    def latest_leaf(self, message_id: int) -> int:
        """The end of the newest branch below a message: where to go when the user picks it."""
        seen = {message_id}  # damaged parents could make a loop
        while True:
            rows = self._read(
                "SELECT id FROM messages WHERE parent_id = ? ORDER BY id DESC LIMIT 1",
                (message_id,),
            )
            if not rows or rows[0]["id"] in seen:
                return message_id
            message_id = rows[0]["id"]
            seen.add(message_id)

    def set_current_leaf(self, conversation_id: str, message_id: int) -> None:
        """Make the branch ending at `message_id` the conversation's current one."""
        cid = self.get_conversation(conversation_id).id
        if self.message(message_id).conversation_id != cid:
            raise ValueError(f"message {message_id} is not in conversation {cid}")
        self._write(
            lambda db: db.execute(
                "UPDATE conversations SET current_leaf = ?, updated_at = ? WHERE id = ?",
                (message_id, time.time(), cid),
            )
        )

    # -- search

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Messages and titles containing every word of `text` (any text is safe), best first."""
        query = fts_query(text)
        if not query:
            return []
        rows = self._read(
            "SELECT * FROM ("
            " SELECT c.id AS cid, c.title, NULL AS mid, NULL AS role,"
            "  snippet(titles_fts, 1, '[', ']', '…', 12) AS snip, bm25(titles_fts) AS score,"
            "  c.updated_at AS updated"
            " FROM titles_fts JOIN conversations c ON c.id = titles_fts.id"
            " WHERE titles_fts MATCH ?"
            " UNION ALL"
            " SELECT c.id, c.title, m.id, m.role,"
            "  snippet(messages_fts, 0, '[', ']', '…', 12), bm25(messages_fts), c.updated_at"
            " FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE messages_fts MATCH ?)"
            " ORDER BY score, updated DESC LIMIT ?",
            (query, query, limit),
        )
        return [
            SearchHit(r["cid"], _Row(r).text("title"), r["mid"], r["role"], _Row(r).text("snip"))
            for r in rows
        ]


def _stats_dict(stats: Any) -> dict[str, Any]:
    if stats is None:
        return {}
    if isinstance(stats, dict):
        return dict(stats)
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    return asdict(stats)


def _store_error(path: Path, e: sqlite3.Error) -> StoreError:
    reason = str(e) or type(e).__name__
    code = getattr(e, "sqlite_errorcode", None) or 0
    if _is_busy(e):
        reason += " (another apertus-mlx is writing to it; try again)"
    elif code == _SQLITE_IOERR_WRITE:  # e.g. EFBIG or ENOSPC on a write
        reason += " (is the disk full?)"
    elif code & 0xFF == _SQLITE_READONLY:
        reason += " (is the file or its directory read-only?)"
    return StoreError(f"history database {path}: {reason}")


# -- streaming answers ------------------------------------------------------------------------


class AnswerWriter:
    """Writes an answer into its message while it streams, so a crash loses at most a second.

    `append` only buffers; a background thread writes the whole answer so far (text and token
    ids) in its own short transaction every `interval` seconds when something changed, and
    `finish` writes the rest with the finish reason and stats. A failed write never raises: it
    is kept in `error` (None again once a later write succeeds, since every write carries the
    whole answer) and passed to `on_error`, and generation goes on.
    """

    def __init__(
        self,
        store: Store,
        message_id: int,
        conversation_id: str,
        *,
        interval: float = FLUSH_INTERVAL_S,
        on_error: Callable[[StoreError], None] | None = None,
    ):
        self.store = store
        self.message_id = message_id
        self.question_id: int | None = None  # the user message written with it, if any
        self.conversation_id = conversation_id
        self.interval = interval
        self.error: StoreError | None = None
        self.deleted = False  # the answer's row is gone: nothing more is written
        self._parts_json: str | None = None
        self.flushes = 0  # successful writes, for tests and measurements
        self._on_error = on_error
        self._parts: list[str] = []
        self._tokens: list[int] = []
        self._dirty = False
        self._finished = False
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one write at a time, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="answer-writer", daemon=True)
        self._thread.start()

    @property
    def text(self) -> str:
        with self._buffer_lock:
            return "".join(self._parts)

    def append(self, text: str, tokens: int | Iterable[int] = ()) -> None:
        """Add streamed text and the token ids that produced it (negative ids are skipped)."""
        if isinstance(tokens, int):
            tokens = (tokens,)
        with self._buffer_lock:
            if self._finished:
                raise RuntimeError("the answer is finished")
            self._parts.append(text)
            self._tokens.extend(t for t in tokens if t >= 0)
            self._dirty = True

    def flush(self) -> bool:
        """Write what is buffered now; True when the answer on disk is up to date."""
        return self._save(None, None)

    def finish(
        self,
        finish_reason: str,
        stats: Any = None,
        tokens: Iterable[int] | None = None,
        text: str | None = None,
        parts: list[dict] | None = None,
    ) -> StoreError | None:
        """Write the whole answer with its finish reason and stats (a `generate.Stats` or a
        dict). tokens, text: the final answer, when the caller has it (`generate`'s `Done`);
        it replaces what was streamed; parts: its blocks, when it deliberated or called
        tools. Returns the write error, or None when it is saved."""
        self._parts_json = _json(parts) if parts else None
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}")
        with self._buffer_lock:
            self._finished = True
            if tokens is not None:
                self._tokens = [t for t in tokens if t >= 0]
            if text is not None:
                self._parts = [text]
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._save(finish_reason, _stats_dict(stats))
        return self.error

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._save(None, None)  # with nothing new, a heartbeat: the answer is alive

    def _save(self, finish_reason: str | None, stats: dict[str, Any] | None) -> bool:
        with self._write_lock:
            if self.deleted:
                return True  # nothing to keep up to date
            with self._buffer_lock:
                changed = self._dirty or finish_reason is not None
                text, blob = "".join(self._parts), encode_tokens(self._tokens)
                self._dirty = False
            now = time.time()

            def write(db: sqlite3.Connection) -> None:
                if changed:
                    cur = db.execute(
                        "UPDATE messages SET content = ?, tokens = ?, written_at = ? WHERE id = ?",
                        (text, blob, now, self.message_id),
                    )
                else:  # nothing new: only say the answer is still being written
                    cur = db.execute(
                        "UPDATE messages SET written_at = ? WHERE id = ?", (now, self.message_id)
                    )
                if cur.rowcount == 0:  # its conversation was deleted, here or elsewhere
                    self.deleted = True
                    return
                if not changed:
                    return
                if finish_reason is not None:
                    s = stats or {}
                    db.execute(
                        "UPDATE messages SET finish_reason = ?, prompt_tokens = ?,"
                        " answer_tokens = ?, tokens_per_s = ?, stats = ?, parts = ? WHERE id = ?",
                        (
                            finish_reason,
                            s.get("prompt_tokens"),
                            s.get("generated_tokens"),
                            s.get("decode_tps"),
                            _json(s or None),
                            self._parts_json,
                            self.message_id,
                        ),
                    )
                db.execute(
                    "UPDATE conversations SET updated_at = ? WHERE id = ?",
                    (now, self.conversation_id),
                )

            try:
                self.store._write(write)
            except StoreError as e:
                with self._buffer_lock:
                    self._dirty = True  # try again on the next tick: every write is complete
                self.error = e
                if self._on_error is not None:
                    self._on_error(e)
                return False
            self.error = None
            self.flushes += changed
            return True
