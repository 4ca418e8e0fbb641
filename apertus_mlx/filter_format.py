"""Reading and writing output filter files; the matcher lives in `output_filter.py`.

A filter is published as JSON (see docs/output-filter.md): SHA-256 digests of normalized
phrases, never the phrases themselves, so the file does not itself publish the personal data
it removes. `filter install` validates that file once and stores it compiled: a one-line
header and the digests sorted, 32 bytes each, so every `generate` loads a million entries
by reading one file instead of parsing and sorting 68 MB of JSON.

Every reader returns the same `FilterData`; when swiss-ai publish their format, a reader for
it goes into `read_filter` beside the JSON one and the matcher stays as it is.

A filter file comes from outside, so reading one is bounded: only regular files (not
/dev/zero, a FIFO or a terminal), at most MAX_FILE_BYTES, JSON nested at most as deep as the
format needs, text that is valid Unicode, and local patterns that RE2 compiles. RE2 matches in
time linear in the text, whatever the pattern; Python's `re` backtracks, and `(a+)+$` takes
hours on 30 characters. The price: no look-around and no backreferences, refused at install.
"""

from __future__ import annotations

import json
import os
import re
import stat
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
MAX_FILE_BYTES = 512 * 2**20  # about 7.5 million entries in the published JSON form


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
    raw = read_bounded(path, "the output filter")
    if raw.startswith(_MAGIC):
        return _read_compiled(path, raw)
    return parse_json(raw, str(path))


def read_bounded(path: Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` (default MAX_FILE_BYTES) bytes;
    FilterFormatError otherwise.

    Opened without blocking (a FIFO would wait for a writer forever) and checked on the open
    descriptor, so what is read is what was checked; the read stops at `limit` + 1 bytes even
    where the size reported is wrong (files in /proc say 0)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise FilterFormatError(f"cannot read {what} {path}: {e.strerror or e}") from None
    limit = MAX_FILE_BYTES if limit is None else limit
    too_big = f"{path} is larger than {limit / 2**20:g} MB, more than {what} may be"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FilterFormatError(f"{path} is not a regular file: {what} must be a file")
        if info.st_size > limit:
            raise FilterFormatError(too_big)
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise FilterFormatError(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise FilterFormatError(too_big)
    return raw


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
    doc = _load_json(raw, name)
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


def _load_json(raw: bytes | str, name: str):
    """JSON that is valid text: deep nesting (RecursionError in the parser) and lone
    surrogates (`"\\ud800"`, which no UTF-8 file or RE2 pattern can hold) are refused here."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FilterFormatError(f"{name} is not valid JSON: {e}") from None
    except RecursionError:
        raise FilterFormatError(f"{name}: the JSON is nested too deeply for a filter") from None
    _check_text(doc, name)
    return doc


def _check_text(doc, name: str) -> None:
    """Every string of the top level (and of its lists) must encode as UTF-8. Deeper values
    are not part of the format and are never read."""
    values = doc.values() if isinstance(doc, dict) else ()
    for value in values:
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise FilterFormatError(
                        f"{name}: a string holds a lone surrogate ({item!a}), which is not text"
                    ) from None


def _header(path: Path, line: bytes) -> dict:
    """The installed header. Unreadable: damaged, install again. Readable but refused (a
    pattern that an older version, matching with Python's `re`, accepted): that reason."""
    damaged = f"{path}: the installed filter is damaged; install it again"
    try:
        doc = _load_json(line, str(path))
    except FilterFormatError:
        raise FilterFormatError(damaged) from None
    try:
        meta = _check_meta(doc, str(path))
        meta["entries"] = int(doc["entries"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FilterFormatError(damaged) from None
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
        compile_pattern(p, f"{name}: patterns[{i}]")
    return {
        "version": str(version),
        "published": published,
        "max_words": words,
        "patterns": tuple(patterns),
        "algorithm": ALGORITHM,
        "normalization": NORMALIZATION,
    }


# What RE2 leaves out, found by its error message and said in words a user can act on
# (trusted patterns of ours, run by Python's `re` on RE2's short error text).
_UNSUPPORTED = (
    (r"invalid perl operator: \(\?<[=!]", "look-behind ((?<=...), (?<!...))"),
    (r"invalid perl operator: \(\?[=!]", "look-ahead ((?=...), (?!...))"),
    (r"invalid perl operator: \(\?P(=|$)|invalid escape sequence: \\[1-9]", "a backreference"),
)


def compile_pattern(pattern: str, name: str):
    """`pattern` compiled by RE2 (linear-time matching); FilterFormatError naming `name` and
    what is wrong, with the constructs RE2 lacks said as such."""
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would print its own line on stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if isinstance(e.args[0], bytes) else str(e)
    except UnicodeEncodeError:
        reason = "it holds a lone surrogate, which is not text"
    for found, construct in _UNSUPPORTED:
        if re.match(found, reason):
            raise FilterFormatError(
                f"{name} uses {construct}, which RE2 does not support: filter patterns run in "
                "time linear in the text, so look-around and backreferences are refused"
            )
    raise FilterFormatError(f"{name} is not a regular expression RE2 accepts: {reason}")


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
