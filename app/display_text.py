"""Model output made safe to draw: the text an answer shows, never the text it stores.

Model output is untrusted. Control characters reach Textual's renderers (a backspace inside a
code block once crashed one), control tokens read as noise, and a line of 100,000 characters
costs every redraw. So, for display only:
- C0 and C1 control characters (and DEL) other than newline and tab become their visible
  pictures (U+2400 block) or a `\\x..` escape; bidirectional overrides are escaped likewise,
  so they cannot reorder what follows them; a CR before a newline goes;
- special tokens such as `<|inner_prefix|>` or `<SPECIAL_12>` become a short marker
  `⟨inner_prefix⟩` (a plain-text Markdown view has no dim style to give them);
- a line longer than MAX_LINE is cut, with a note of how much was left out.
`DisplayFilter` does this as text streams in, keeping back the start of a token cut between
chunks, so the result is the same however the text is split (tested as a property).
"""

from __future__ import annotations

import re

MAX_LINE = 2000
# Apertus's control tokens (`<|inner_prefix|>`) and its reserved ones (`<SPECIAL_12>`)
_TOKEN = re.compile(r"<\|([A-Za-z0-9_]{1,40})\|>|<(SPECIAL_\d{1,6})>")
# the start of one of those, cut at the chunk's end: held back until the next chunk
_TOKEN_START = re.compile(r"<(\|[A-Za-z0-9_]{0,40}\|?|S(P(E(C(I(A(L(_\d{0,6})?)?)?)?)?)?)?)?$")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _char(c: str) -> str:
    o = ord(c)
    if c in "\n\t":
        return c
    if o < 0x20:
        return chr(0x2400 + o)  # ␀ … ␟
    if o == 0x7F:
        return "␡"
    if 0x80 <= o <= 0x9F or c in _BIDI:
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"
    return c


_SAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(text: str) -> str:
    text = text.replace("\r\n", "\n")
    if not _SAFE.search(text):
        return text
    return _SAFE.sub(lambda m: _char(m.group()), text)


class DisplayFilter:
    """Feed chunks, get text safe to show; `flush()` at the end."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._held = ""  # a possible token start, or a CR that may precede a newline
        self._column = 0  # characters shown on the current line
        self._cut = 0  # characters left out of the current line

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        self._held = ""
        m = _TOKEN_START.search(text)
        if m is not None:
            text, self._held = text[: m.start()], text[m.start() :]
        elif text.endswith("\r"):
            text, self._held = text[:-1], "\r"
        return self._lines(_TOKEN.sub(lambda t: f"⟨{t.group(1) or t.group(2)}⟩", _escape(text)))

    def flush(self) -> str:
        held, self._held = self._held, ""
        out = self._lines(_escape(held))
        return out + self._end_line()

    def _end_line(self) -> str:
        cut, self._cut, self._column = self._cut, 0, 0
        return f" … ({cut} more characters)" if cut else ""

    def _lines(self, text: str) -> str:
        out = []
        for i, part in enumerate(text.split("\n")):
            if i:
                out.append(self._end_line() + "\n")
            room = self.max_line - self._column
            out.append(part[:room])
            self._column += min(len(part), max(room, 0))
            self._cut += max(len(part) - max(room, 0), 0)
        return "".join(out)


def for_display(text: str, max_line: int = MAX_LINE) -> str:
    """The whole text at once, as DisplayFilter would show it streamed."""
    f = DisplayFilter(max_line)
    return f.feed(text) + f.flush()
