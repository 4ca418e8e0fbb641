"""Reading and writing output filter files; the matcher lives in `output_filter.py`.

A filter is published as JSON (see docs/output-filter.md): SHA-256 digests of normalized
phrases, never the phrases themselves, so the file does not itself publish the personal data
it removes. `filter install` validates that file once and stores it compiled: a one-line
header and the digests sorted, 32 bytes each, so every `generate` loads a million entries
by reading one file instead of parsing and sorting 68 MB of JSON.

Every reader returns the same `FilterData`; when swiss-ai publish their format, a reader for
it goes into `read_filter` beside the JSON one and the matcher stays as it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from .errors import FilterFormatError

ALGORITHM = "sha256"
DIGEST_SIZE = 32
NORMALIZATION = "nfkc-casefold-words"
MAX_WORDS_LIMIT = 16  # longer phrases would hold back too much of a streamed answer
INSTALLED_NAME = "output-filter.bin"
_MAGIC = b"apertus-mlx output filter 1\n"
REQUIRED = ("version", "published", "algorithm", "normalization", "max_words", "entries")


@dataclass(frozen=True)
class FilterData:
    """A filter as the matcher needs it, whatever file it came from."""

    version: str
    published: date
    max_words: int
    digests: bytes = field(repr=False)  # sorted, DIGEST_SIZE bytes each, no duplicates
    patterns: tuple[str, ...] = ()
    algorithm: str = ALGORITHM
    normalization: str = NORMALIZATION

    @property
    def entries(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def header(self) -> dict:
        """Everything but the digests: what `filter status` shows."""
        return {
            "version": self.version,
            "published": self.published.isoformat(),
            "algorithm": self.algorithm,
            "normalization": self.normalization,
            "max_words": self.max_words,
            "patterns": list(self.patterns),
            "entries": self.entries,
        }


def read_filter(path: str | Path) -> FilterData:
    """Read a published JSON filter or an installed (compiled) one; errors name the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FilterFormatError(f"cannot read the output filter {path}: {e.strerror}") from None
    if raw.startswith(_MAGIC):
        return _read_compiled(path, raw)
    return parse_json(raw, str(path))


def read_header(path: str | Path) -> dict:
    """The header of an installed filter, without loading its digests (cheap, for reminders)."""
    path = Path(path)
    with path.open("rb") as f:
        magic, line = f.readline(), f.readline()
    if magic != _MAGIC:
        raise FilterFormatError(f"{path} is not an installed output filter")
    return _header(path, line)


def parse_json(raw: bytes | str, name: str = "<filter>") -> FilterData:
    """Validate a filter in the published JSON format (one error line per problem found)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FilterFormatError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise FilterFormatError(f"{name}: expected a JSON object with {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise FilterFormatError(f"{name}: missing field(s) {', '.join(missing)}")
    meta = _check_meta(doc, name)
    entries = doc["entries"]
    if not isinstance(entries, list):
        raise FilterFormatError(f"{name}: entries must be a list of hex digests")
    return FilterData(digests=_digests(entries, name), **meta)


def write_compiled(data: FilterData, path: str | Path) -> None:
    """Store `data` in the installed form; replaces an earlier file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = json.dumps(data.header(), ensure_ascii=False).encode() + b"\n"
    try:
        with tmp.open("wb") as f:
            f.write(_MAGIC + header)
            f.write(data.digests)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves the old filter and no debris


def _read_compiled(path: Path, raw: bytes) -> FilterData:
    start = len(_MAGIC)
    end = raw.find(b"\n", start) + 1
    if end == 0:
        raise FilterFormatError(f"{path}: the installed filter is truncated; install it again")
    meta = _header(path, raw[start:end])
    digests = raw[end:]
    if len(digests) != meta.pop("entries") * DIGEST_SIZE:
        raise FilterFormatError(f"{path}: the installed filter is truncated; install it again")
    return FilterData(digests=digests, **meta)


def _header(path: Path, line: bytes) -> dict:
    try:
        doc = json.loads(line)
        meta = _check_meta(doc, str(path))
        meta["entries"] = int(doc["entries"])
    except (ValueError, KeyError, TypeError):
        raise FilterFormatError(
            f"{path}: the installed filter is damaged; install it again"
        ) from None
    return meta


def _check_meta(doc: dict, name: str) -> dict:
    if doc["algorithm"] != ALGORITHM:
        raise FilterFormatError(
            f"{name}: unknown algorithm {doc['algorithm']!r} (this version reads {ALGORITHM!r})"
        )
    if doc["normalization"] != NORMALIZATION:
        raise FilterFormatError(
            f"{name}: unknown normalization {doc['normalization']!r} "
            f"(this version reads {NORMALIZATION!r})"
        )
    words = doc["max_words"]
    if not isinstance(words, int) or isinstance(words, bool) or not 1 <= words <= MAX_WORDS_LIMIT:
        raise FilterFormatError(f"{name}: max_words must be a whole number 1-{MAX_WORDS_LIMIT}")
    try:
        published = date.fromisoformat(doc["published"])
    except (TypeError, ValueError):
        raise FilterFormatError(f"{name}: published must be a date like 2026-03-01") from None
    version = doc["version"]
    if not isinstance(version, (str, int)) or isinstance(version, bool):
        raise FilterFormatError(f"{name}: version must be a string or a number")
    patterns = doc.get("patterns", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise FilterFormatError(f"{name}: patterns must be a list of regular expressions")
    for i, p in enumerate(patterns):
        try:
            re.compile(p)
        except re.error as e:
            bad = f"{name}: patterns[{i}] is not a regular expression: {e}"
            raise FilterFormatError(bad) from None
    return {
        "version": str(version),
        "published": published,
        "max_words": words,
        "patterns": tuple(patterns),
        "algorithm": ALGORITHM,
        "normalization": NORMALIZATION,
    }


def _digests(entries: list, name: str) -> bytes:
    """Hex strings -> one sorted, de-duplicated bytes object (fast path first, then find why)."""
    width = 2 * DIGEST_SIZE
    try:
        if entries and set(map(len, entries)) != {width}:
            raise ValueError
        raw = bytes.fromhex("".join(entries))
        if len(raw) != len(entries) * DIGEST_SIZE:  # fromhex skips whitespace
            raise ValueError
    except (TypeError, ValueError):
        for i, e in enumerate(entries):
            if not (isinstance(e, str) and len(e) == width and _is_hex(e)):
                raise FilterFormatError(
                    f"{name}: entries[{i}] is not a {width}-digit hex {ALGORITHM} digest"
                ) from None
        raise FilterFormatError(f"{name}: entries are not hex digests") from None
    n = len(raw) // DIGEST_SIZE
    if n < 2:
        return raw
    import numpy as np  # install time only: sorts a million digests in a blink

    rows = np.unique(np.frombuffer(raw, dtype=f"V{DIGEST_SIZE}"))
    return rows.tobytes()


def _is_hex(s: str) -> bool:
    return re.fullmatch(r"[0-9a-fA-F]+", s) is not None
