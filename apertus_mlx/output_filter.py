"""The Apertus output filter: personal data removed from what the model says, as it streams.

The model cards ask every user to apply swiss-ai's output filter, which reflects data
protection deletion requests, and to refresh it every six months. This module sits between
the detokenizer and everything else (stdout, `--json`, the chat, the store):

    f = OutputFilter.installed()          # or OutputFilter.from_file(path); None: none installed
    s = f.stream()                        # one per answer
    for chunk in chunks: show(s.feed(chunk))
    show(s.flush())                       # f.apply(text) does the same for a whole text

A match (1..max_words consecutive words whose normalized form hashes to an entry, or a local
pattern, matched by RE2 in linear time) becomes "[removed]". Matching is leftmost-longest over
words, so a stream holds back only the last max_words words; whatever the chunks, the result
equals `apply` of the whole text, and no chunk shows part of a match removed later.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import threading
import unicodedata
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from .errors import FilterFormatError
from .filter_format import (
    DIGEST_SIZE,
    INSTALLED_NAME,
    FilterData,
    compile_pattern,
    read_filter,
    read_header,
)

MARKER = "[removed]"
PATTERN_WINDOW = 64  # a local pattern sees this many characters from where its match starts
_SENTINEL = "\x00"
_SURROGATES = re.compile("[\ud800-\udfff]")  # ours, trusted: linear
REFRESH_DAYS = 183  # the model cards: refresh the filter every six months
FILTER_URL = "https://huggingface.co/swiss-ai/Apertus-8B-Instruct-2509"


def installed_path() -> Path:
    from .paths import data_dir

    return data_dir() / INSTALLED_NAME


def _joins(c: str) -> bool:
    """True for a character that attaches to the one before it (combining mark, jamo vowel)."""
    return (
        bool(unicodedata.combining(c))
        or unicodedata.category(c)[0] == "M"
        or ("\u1160" <= c <= "\u11ff")
    )


def _clusters(text: str) -> list[str]:
    """Split into a base character plus what attaches to it: normalization works per cluster."""
    if text.isascii():
        return list(text)
    out: list[str] = []
    for c in text:
        if out and _joins(c):
            out[-1] += c
        else:
            out.append(c)
    return out


def _norm(cluster: str) -> str:
    if cluster.isascii():
        return cluster.lower()
    return unicodedata.normalize("NFKC", cluster).casefold()


def _is_word(c: str) -> bool:
    r"""`\w` (letters, digits, _) and combining marks: a Devanagari vowel sign or virama is
    part of its word, or a Hindi name would be cut into more words than max_words."""
    return c.isalnum() or c == "_" or (not c.isascii() and unicodedata.category(c)[0] == "M")


def words(text: str) -> list[str]:
    """The normalized words of `text`: NFKC and casefold per cluster, maximal runs of word
    characters."""
    norm = "".join(_norm(c) for c in _clusters(text))
    return "".join(ch if _is_word(ch) else " " for ch in norm).split()


def phrase_digest(phrase: str) -> str:
    """The hex entry that makes a filter remove `phrase` (how filter files are built)."""
    return hashlib.sha256(" ".join(words(phrase)).encode()).hexdigest()


class OutputFilter:
    """A loaded filter. `stream()` gives each answer its own state; `feed`/`flush` here use a
    default stream that `flush` resets, for callers with one answer at a time."""

    def __init__(self, data: FilterData):
        self.data = data
        self._digests = data.digests
        self._count = data.entries
        self._patterns = [
            compile_pattern(p, f"the filter's patterns[{i}]") for i, p in enumerate(data.patterns)
        ]
        self._any_pattern = None  # all of them as one alternation: one RE2 call a position
        if len(data.patterns) > 1:
            with contextlib.suppress(FilterFormatError):  # too large together: one at a time
                either = "|".join(f"(?:{p})" for p in data.patterns)
                self._any_pattern = compile_pattern(either, "the filter's patterns")
        self._default: FilterStream | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> OutputFilter:
        return cls(read_filter(path))

    @classmethod
    def installed(cls) -> OutputFilter | None:
        """The filter installed with `apertus-mlx filter install`, or None."""
        path = installed_path()
        return cls.from_file(path) if path.exists() else None

    def stream(self) -> FilterStream:
        return FilterStream(self)

    def feed(self, chunk: str) -> str:
        if self._default is None:
            self._default = self.stream()
        return self._default.feed(chunk)

    def flush(self) -> str:
        """End the answer fed so far: release what was held back, start afresh."""
        stream, self._default = self._default, None
        return stream.flush() if stream else ""

    def apply(self, text: str) -> str:
        s = self.stream()
        return s.feed(text) + s.flush()

    def matches(self, phrase_words: list[str]) -> bool:
        """Whether these normalized words are an entry (binary search over sorted digests)."""
        d = hashlib.sha256(" ".join(phrase_words).encode()).digest()
        blob, lo, hi = self._digests, 0, self._count
        while lo < hi:
            mid = (lo + hi) // 2
            if blob[mid * DIGEST_SIZE : (mid + 1) * DIGEST_SIZE] < d:
                lo = mid + 1
            else:
                hi = mid
        return lo < self._count and blob[lo * DIGEST_SIZE : (lo + 1) * DIGEST_SIZE] == d


class FilterStream:
    """One answer's filtering state: the word matcher, then the local patterns (if any)."""

    def __init__(self, f: OutputFilter):
        self._words = _WordStage(f)
        self._patterns = _PatternStage(f._patterns, f._any_pattern) if f._patterns else None

    @property
    def removed(self) -> int:
        """How many matches were replaced so far."""
        return self._words.removed + (self._patterns.removed if self._patterns else 0)

    def feed(self, chunk: str) -> str:
        """Add streamed text; return the text that is safe to show now."""
        out = self._words.feed(chunk)
        return self._patterns.feed(out) if self._patterns else out

    def flush(self) -> str:
        """The answer ended: release the held-back text, filtered."""
        out = self._words.flush()
        if self._patterns:
            out = self._patterns.feed(out) + self._patterns.flush()
        return out


class _WordStage:
    """Leftmost-longest phrase matching over normalized words, holding back as little as it can.

    Text is cut into clusters (a character and its combining marks); the last one stays open
    until the next base character arrives, since a mark may still change it. Closed clusters
    are normalized into words. A word is decided once max_words complete words start at it:
    then the longest entry starting there (if any) is known and replaced by the marker, and
    every cluster before the first undecided word is released.
    """

    def __init__(self, f: OutputFilter):
        self._f = f
        self._max = f.data.max_words
        self._open = ""  # the last cluster, still open
        self._held: list[str] = []  # closed clusters not yet released; _held[0] is _base
        self._base = 0
        self._cut = 0  # clusters before this one are released or removed
        self._next = 0  # index of the next closed cluster
        self._word: list[str] = []  # normalized characters of the word in progress
        self._word_first = self._word_last = 0  # its first and last cluster
        self._pending: list[tuple[str, int, int]] = []  # complete words: (norm, first, last)
        self.removed = 0

    def feed(self, chunk: str) -> str:
        if not chunk:
            return ""
        clusters = _clusters(self._open + chunk)
        self._open = clusters.pop()
        for c in clusters:
            self._close(c)
        return self._decide(final=False)

    def flush(self) -> str:
        if self._open:
            self._close(self._open)
            self._open = ""
        self._end_word()
        return self._decide(final=True)

    def _close(self, cluster: str) -> None:
        i = self._next
        self._next += 1
        self._held.append(cluster)
        for ch in _norm(cluster):
            if _is_word(ch):
                if not self._word:
                    self._word_first = i
                self._word.append(ch)
                self._word_last = i
            elif self._word:
                self._end_word()

    def _end_word(self) -> None:
        if self._word:
            self._pending.append(("".join(self._word), self._word_first, self._word_last))
            self._word = []

    def _decide(self, final: bool) -> str:
        """Decide every word that can be decided now; return the text released by it.

        Index-based, with one cut of the lists at the end, so that a long text fed at once
        (`apply`) costs linear time."""
        out: list[str] = []
        pending, i, n = self._pending, 0, len(self._pending)
        while i < n and (final or n - i >= self._max):
            k = self._longest(pending, i)
            if k:
                out.append(self._take(pending[i][1]))
                self._cut = max(self._cut, pending[i + k - 1][2] + 1)
                out.append(MARKER)
                self.removed += 1
                i += k
            else:
                i += 1
        del pending[:i]
        if pending:
            upto = pending[0][1]
        elif self._word:
            upto = self._word_first
        else:
            upto = self._next
        out.append(self._take(upto))
        del self._held[: self._cut - self._base]
        self._base = self._cut
        return "".join(out)

    def _longest(self, pending: list[tuple[str, int, int]], i: int) -> int:
        """The most words from pending[i] on that form an entry (0: none)."""
        for k in range(min(self._max, len(pending) - i), 0, -1):
            if self._f.matches([w for w, _, _ in pending[i : i + k]]):
                return k
        return 0

    def _take(self, upto: int) -> str:
        """The held text from the cut up to cluster `upto`; the cut moves there."""
        if upto <= self._cut:
            return ""
        text = "".join(self._held[self._cut - self._base : upto - self._base])
        self._cut = upto
        return text


class _PatternStage:
    """Local regular expressions over text, streamed with a bounded look-ahead.

    At each position the patterns are tried in order on the next PATTERN_WINDOW characters
    only (with up to as many before it as context), so a decision never depends on how the
    text was cut; the price is that the last PATTERN_WINDOW characters wait for more text or
    the end. The first pattern with a non-empty match there wins.

    `any_pattern`, the patterns as one alternation `(?:p1)|(?:p2)|...`, finds the same match
    in one call: RE2's alternation is leftmost-first, so at a position the first pattern in
    file order that matches wins, as in the loop. Only when that match is empty (a pattern
    that can match nothing) are the patterns tried one by one for a later, non-empty one.
    """

    def __init__(self, patterns: list, any_pattern=None):
        self._patterns = patterns
        self._any = any_pattern
        # _buf[0] is a sentinel, so `^` never matches wherever the buffer was trimmed
        self._buf = _SENTINEL
        self._pos = 1  # first undecided character of _buf; before it: context only
        self.removed = 0

    def feed(self, text: str, final: bool = False) -> str:
        buf, pos, w = self._buf + text, self._pos, PATTERN_WINDOW
        n, start, out = len(buf), pos, []
        seen = buf  # what the patterns see: a lone surrogate (undecodable input) is no text
        if not buf.isascii() and _SURROGATES.search(buf):  # RE2 takes UTF-8 only
            seen = _SURROGATES.sub("\ufffd", buf)  # one for one: offsets stay
        while pos < n and (final or n - pos >= w):
            end = self._match(seen, pos, min(n, pos + w))
            if end:
                out.append(buf[start:pos])
                out.append(MARKER)
                self.removed += 1
                pos = start = end
            else:
                pos += 1
        out.append(buf[start:pos])
        keep = max(1, pos - w)  # keep some context for look-behind and \b
        self._buf, self._pos = _SENTINEL + buf[keep:], pos - keep + 1
        return "".join(out)

    def _match(self, buf: str, pos: int, endpos: int) -> int:
        """Where the first pattern matching at `pos` ends; 0 when none does (or only empty).

        The patterns see a slice of at most two windows: RE2's Python binding encodes the
        whole string it is given on every call, and `apply` of a long text would otherwise
        cost time quadratic in its length."""
        lo = max(0, pos - PATTERN_WINDOW)
        window, at = buf[lo:endpos], pos - lo
        if self._any is not None:
            m = self._any.match(window, at)
            if m is None:
                return 0
            if m.end() > at:
                return lo + m.end()
        for rx in self._patterns:
            m = rx.match(window, at)
            if m and m.end() > at:
                return lo + m.end()
        return 0

    def flush(self) -> str:
        out = self.feed("", final=True)
        self._buf, self._pos = _SENTINEL, 1
        return out


def filtered(events: Iterator, f: OutputFilter) -> Iterator:
    """`generate`'s events with every Chunk's text filtered and a Done whose text is the
    filtered whole.

    When anything was removed, the Done's `tokens` are emptied: the token ids would otherwise
    let the removed text be decoded again from what a caller stores. For the same reason every
    filtered Chunk carries token -1: a chunk's token may belong to text that is held back and
    removed later, and the history writes streamed ids to disk as they come. A
    KeyboardInterrupt thrown into this generator (`wind_down`) is handed on to the one it wraps;
    one that arrives while the filter works on a chunk waits until the chunk is done (see
    `_HeldSignals`), so it too reaches the generator, which ends the answer as interrupted.
    """
    from .generate import Chunk, Done

    s = f.stream()
    parts: list[str] = []
    held = _HeldSignals()
    thrown: BaseException | None = None
    while True:
        try:
            event = events.throw(thrown) if thrown is not None else next(events)
        except StopIteration:
            return
        thrown = None
        with held:
            if isinstance(event, Done):
                tail = s.flush()
                if tail:
                    parts.append(tail)
                tokens = [] if s.removed else event.tokens
                done = Done("".join(parts), event.stats, tokens)
            elif isinstance(event, Chunk):
                text = s.feed(event.text)
                parts.append(text)
                event = Chunk(text, -1)
        if isinstance(event, Done):
            if tail:
                yield Chunk(tail, -1)
            yield done
            held.replay()  # after the answer's end: as if it came a moment later
            return
        try:
            yield event
            held.replay()
        except KeyboardInterrupt as e:
            thrown = e


class _HeldSignals:
    """While entered (in the main thread), Ctrl+C, SIGTERM and SIGHUP are noted instead of
    raising; `replay` then runs their handlers as they would have run.

    Python raises KeyboardInterrupt wherever the main thread is; inside the filter that would
    leave a stream half-updated and the answer cut off with nothing to end it, stored empty
    with finish reason "error". Holding them costs a few system calls a chunk. Other threads
    never receive signals in Python, so there is nothing to hold there.
    """

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
    )

    def __init__(self) -> None:
        self._pending: list[tuple[int, object]] = []
        self._saved: dict[int, object] = {}  # while entered
        self._handlers: dict[int, object] = {}  # the handlers to replay with

    def __enter__(self) -> _HeldSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                handler = signal.getsignal(sig)
                if callable(handler):  # SIG_DFL and SIG_IGN never raise into Python code
                    self._saved[sig] = handler
                    signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self._pending.append((signum, frame))

    def __exit__(self, *exc: object) -> None:
        saved, self._saved = self._saved, {}
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        self._handlers = saved

    def replay(self) -> None:
        """Run the handlers of the signals that arrived while held (raising, as they do)."""
        pending, self._pending = self._pending, []
        for signum, frame in pending:
            self._handlers[signum](signum, frame)


def reminder(today: date | None = None) -> str | None:
    """One line to show once per run when no filter is installed or it is past six months
    old; None when all is well. Reads only the installed file's header."""
    path = installed_path()
    how = f"get it from {FILTER_URL} and run `apertus-mlx filter install FILE`"
    if not path.exists():
        return (
            "no output filter installed: the Apertus model cards ask you to apply swiss-ai's "
            f"filter, which removes personal data from answers; {how}"
        )
    try:
        published = read_header(path)["published"]
    except Exception:
        return f"the installed output filter is damaged; {how}"
    age = ((today or date.today()) - published).days
    if age > REFRESH_DAYS:
        return (
            f"the output filter is {age} days old (published {published}); the model cards ask "
            f"to refresh it every six months: {how}"
        )
    return None


class InstalledFilter:
    """The installed filter as it is now: read again once the file is replaced or removed, so a
    long-running chat or server applies the filter the user just installed.

    Calling it gives the filter (None when none is installed); a file that cannot be read
    raises FilterInstallError: no answer goes out unfiltered by accident.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or installed_path()
        self._loaded: tuple[int, OutputFilter] | None = None  # (file mtime, filter)

    def __call__(self) -> OutputFilter | None:
        from .errors import FilterFormatError, FilterInstallError

        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            self._loaded = None
            return None
        if self._loaded is None or self._loaded[0] != stamp:
            try:
                self._loaded = (stamp, OutputFilter.from_file(self.path))
            except FilterFormatError as e:
                raise FilterInstallError(
                    f"{e} (fix it with `apertus-mlx filter install FILE` or `filter rm`)"
                ) from None
        return self._loaded[1]
