"""The history database's schema: an ordered list of small migrations, versioned with
`PRAGMA user_version`. Each step is applied once, in the same transaction as the version bump,
and is tested from every older version; only ever append to `MIGRATIONS`."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable

from .errors import StoreError


def _m1_tables(db: sqlite3.Connection) -> None:
    """Conversations and their messages; a message's parent makes edits and retries branches."""
    db.execute(
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT,
            model TEXT,
            revision TEXT,
            system TEXT,
            settings TEXT NOT NULL DEFAULT '{}',
            thinking INTEGER NOT NULL DEFAULT 0,
            current_leaf INTEGER,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL DEFAULT '',
            tokens BLOB,
            settings TEXT,
            seed INTEGER,
            prompt_tokens INTEGER,
            answer_tokens INTEGER,
            tokens_per_s REAL,
            finish_reason TEXT,
            stats TEXT,
            created_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id)")
    db.execute("CREATE INDEX messages_by_parent ON messages(parent_id)")
    db.execute("CREATE INDEX conversations_by_update ON conversations(updated_at)")


_TOKENIZE = "tokenize = 'unicode61 remove_diacritics 2'"  # "rosti" finds "Rösti"


def _m2_message_search(db: sqlite3.Connection) -> None:
    """Full-text search over message content, kept in sync by triggers."""
    db.execute(
        "CREATE VIRTUAL TABLE messages_fts USING fts5("
        f"content, content = 'messages', content_rowid = 'id', {_TOKENIZE})"
    )
    db.execute(
        "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN "
        "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END"
    )
    db.execute(
        "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, content) "
        "VALUES ('delete', old.id, old.content); END"
    )
    db.execute(
        "CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, content) "
        "VALUES ('delete', old.id, old.content); "
        "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END"
    )
    db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")


def _m3_title_search(db: sqlite3.Connection) -> None:
    """Titles become searchable too (their own small index: conversation ids are text)."""
    db.execute(f"CREATE VIRTUAL TABLE titles_fts USING fts5(id UNINDEXED, title, {_TOKENIZE})")
    db.execute(
        "CREATE TRIGGER titles_fts_insert AFTER INSERT ON conversations BEGIN "
        "INSERT INTO titles_fts(id, title) VALUES (new.id, new.title); END"
    )
    db.execute(
        "CREATE TRIGGER titles_fts_delete AFTER DELETE ON conversations BEGIN "
        "DELETE FROM titles_fts WHERE id = old.id; END"
    )
    db.execute(
        "CREATE TRIGGER titles_fts_update AFTER UPDATE OF title ON conversations BEGIN "
        "UPDATE titles_fts SET title = new.title WHERE id = new.id; END"
    )
    db.execute("INSERT INTO titles_fts(id, title) SELECT id, title FROM conversations")


def _m4_answer_heartbeat(db: sqlite3.Connection) -> None:
    """When a streaming answer was last written: an unfinished answer written to seconds ago
    is being generated (another turn branches beside it); one long silent was cut off."""
    db.execute("ALTER TABLE messages ADD COLUMN written_at REAL")
    db.execute("UPDATE messages SET written_at = created_at")


def _m5_answer_parts(db: sqlite3.Connection) -> None:
    """An answer's parts as the chat template reads them (deliberation, tool calls, the
    response), as JSON: `content` keeps the answer text alone, for showing and searching."""
    db.execute("ALTER TABLE messages ADD COLUMN parts TEXT")


# Ordered; entry i takes the schema from version i to i + 1. Only ever append.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m1_tables,
    _m2_message_search,
    _m3_title_search,
    _m4_answer_heartbeat,
    _m5_answer_parts,
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> None:
    """Bring the schema up to `target`, in one transaction (concurrent openers wait, then skip)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        check_version(version)
        for step in MIGRATIONS[version:target]:
            step(db)
        if target > version:
            db.execute(f"PRAGMA user_version = {int(target)}")
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise


def check_version(version: int) -> None:
    """StoreError for a database written by a newer apertus-mlx (its schema is unknown here)."""
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the history database has schema version {version}, newer than this "
            f"apertus-mlx knows ({SCHEMA_VERSION}): upgrade apertus-mlx"
        )


def rollback(db: sqlite3.Connection) -> None:
    """End the open transaction, if any, without raising: the first error is the one to report."""
    if db.in_transaction:
        # SQLite may have rolled back already (e.g. disk full)
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
