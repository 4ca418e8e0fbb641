"""Generated tokens -> thoughts, tool calls and answer text, as they arrive.

Apertus marks its deliberation with `<|inner_prefix|>...<|inner_suffix|>` and its tool calls
with `<|tools_prefix|>[{"name": {arguments}}, ...]<|tools_suffix|>`. The parser keys on the
ids of those control tokens, never on their spelling, so text that merely looks like a marker
(typed by a user, quoted by the model) can never open a call. A call is held until its list
closes and is then checked as a whole: bad JSON or a tool that was not offered comes back as
the text the model wrote plus a one-line `FormatWarning`, never an exception and never lost.

    parser = FormatParser(tokenizer, tools)
    for event in parse_generation(generate(...), parser): ...

Only the standard library here: the tokenizer imports this package.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

INNER_PREFIX, INNER_SUFFIX = "<|inner_prefix|>", "<|inner_suffix|>"
TOOLS_PREFIX, TOOLS_SUFFIX = "<|tools_prefix|>", "<|tools_suffix|>"
ASSISTANT_START = "<|assistant_start|>"


@dataclass(frozen=True)
class Thought:
    """Deliberation text (inside `<|inner_prefix|>...<|inner_suffix|>`)."""

    text: str


@dataclass(frozen=True)
class ThoughtStart:
    """The deliberation opened (`<|inner_prefix|>`)."""


@dataclass(frozen=True)
class ThoughtEnd:
    """The deliberation closed (`<|inner_suffix|>`): a UI folds the thought block here."""


@dataclass(frozen=True)
class Chunk:
    """Answer text."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """One call. `arguments` is the JSON object exactly as the model wrote it (OpenAI's
    string form); `batch` counts the `<|tools_prefix|>` lists of this answer, so calls made
    in parallel share one."""

    id: str
    name: str
    arguments: str
    batch: int = 0

    @property
    def parsed(self) -> dict:
        return json.loads(self.arguments)


@dataclass(frozen=True)
class FormatWarning:
    """Something the model wrote did not follow the format; it was kept as text."""

    message: str


FormatEvent = Thought | ThoughtStart | ThoughtEnd | Chunk | ToolCall | FormatWarning


@dataclass(frozen=True)
class ControlIds:
    """The ids of the four format tokens in this vocabulary (None where it has no such
    token: such a tokenizer's output is all answer text)."""

    inner_prefix: int | None
    inner_suffix: int | None
    tools_prefix: int | None
    tools_suffix: int | None
    assistant_start: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ControlIds:
        names = (INNER_PREFIX, INNER_SUFFIX, TOOLS_PREFIX, TOOLS_SUFFIX, ASSISTANT_START)
        return cls(*(tokenizer.token_to_id(t) for t in names))


def end_tokens(tokenizer: Any, base: Iterable[int], tools_offered: bool) -> tuple[int, ...]:
    """The end tokens to pass to `generate`: `base` (the model's), plus `<|tools_suffix|>`
    when tools are offered, so a turn that calls tools stops as soon as its call list
    closes and the caller can run them."""
    out = set(base)
    suffix = ControlIds.from_tokenizer(tokenizer).tools_suffix
    if tools_offered and suffix is not None:
        out.add(suffix)
    return tuple(sorted(out))


class MalformedCall(ValueError):
    pass


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _expect(s: str, i: int, char: str) -> int:
    i = _skip_ws(s, i)
    if i >= len(s) or s[i] != char:
        found = repr(s[i]) if i < len(s) else "the end"
        raise MalformedCall(f"expected {char!r} at character {i}, found {found}")
    return i + 1


def _reject_constant(name: str) -> None:
    raise MalformedCall(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode(s: str, i: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(s, _skip_ws(s, i))
    except json.JSONDecodeError as e:
        raise MalformedCall(f"{e.msg} at character {e.pos}") from None


def split_calls(text: str) -> list[tuple[str, str]]:
    """`[{"name": {arguments}}, ...]` -> [(name, the arguments' JSON text as written)].

    Written over `json.JSONDecoder.raw_decode` rather than `json.loads`, because the
    arguments must come back as the model spelled them (a later prompt renders them again).
    """
    calls = []
    i = _expect(text, 0, "[")
    if text[_skip_ws(text, i) : _skip_ws(text, i) + 1] == "]":
        raise MalformedCall("the call list is empty")
    while True:
        i = _expect(text, i, "{")
        name, i = _decode(text, i)
        if not isinstance(name, str):
            raise MalformedCall("a call's key must be the tool's name")
        i = _expect(text, i, ":")
        start = _skip_ws(text, i)
        arguments, i = _decode(text, start)
        if not isinstance(arguments, dict):
            raise MalformedCall(f"the arguments of {name!r} are not a JSON object")
        calls.append((name, text[start:i]))
        i = _expect(text, i, "}")
        i = _skip_ws(text, i)
        if text[i : i + 1] == ",":
            i += 1
            continue
        i = _expect(text, i, "]")
        if _skip_ws(text, i) != len(text):
            raise MalformedCall(f"unexpected text after the call list at character {i}")
        return calls


def _random_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class FormatParser:
    """Feed it each generated token id with its text; it returns the events that token
    completes. State: inside a thought or not, inside a call list or not.

    `tools` are the (normalized) tools offered; a call naming any other comes back as text.
    `in_thought` is where the prompt leaves the model (see `thought_open`): after tool
    results, a turn that called from inside its deliberation continues there.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        tools: Iterable[dict] | None = None,
        *,
        control: ControlIds | None = None,
        in_thought: bool = False,
        call_id: Callable[[], str] = _random_call_id,
    ) -> None:
        if control is None:
            control = ControlIds.from_tokenizer(tokenizer)
        self.control = control
        self._controls = {i for i in vars(control).values() if i is not None} - {
            control.assistant_start
        }
        self.tool_names = frozenset(t["name"] for t in tools or ())
        self.in_thought = in_thought
        self._call_id = call_id
        self._call: list[str] | None = None  # the text of an open call list
        self._batches = 0

    def feed(self, token: int, text: str) -> list[FormatEvent]:
        c = self.control
        if self._call is not None:
            if token == c.tools_suffix and token is not None:
                return self._close_call(_before(text, TOOLS_SUFFIX))
            self._call.append(text)
            return []
        if token not in self._controls:
            return self._text(text)
        if token == c.tools_prefix:
            events = self._text(_before(text, TOOLS_PREFIX))
            self._call = []
            return events
        if token == c.inner_prefix:
            events = self._text(_before(text, INNER_PREFIX))
            if not self.in_thought:
                self.in_thought = True
                events.append(ThoughtStart())
            return events
        if token == c.inner_suffix:
            events = self._text(_before(text, INNER_SUFFIX))
            if self.in_thought:
                self.in_thought = False
                events.append(ThoughtEnd())
            return events
        # a `<|tools_suffix|>` with no list open
        return [*self._text(text), FormatWarning("the model closed a tool call it never opened")]

    def finish(self) -> list[FormatEvent]:
        """The end of the answer: a call list still open was cut off; it becomes text."""
        if self._call is None:
            return []
        raw, self._call = "".join(self._call), None
        return [
            *self._text(TOOLS_PREFIX + raw),
            FormatWarning("the answer ended inside a tool call; it is shown as text"),
        ]

    def _text(self, text: str) -> list[FormatEvent]:
        if not text:
            return []
        return [Thought(text) if self.in_thought else Chunk(text)]

    def _close_call(self, tail: str) -> list[FormatEvent]:
        raw = "".join(self._call or ()) + tail
        self._call = None
        try:
            calls = split_calls(raw)
            unknown = [name for name, _ in calls if name not in self.tool_names]
            if unknown:
                offered = ", ".join(sorted(self.tool_names)) or "none"
                raise MalformedCall(f"it names {unknown[0]!r}, not an offered tool ({offered})")
        except MalformedCall as e:
            return [
                *self._text(TOOLS_PREFIX + raw + TOOLS_SUFFIX),
                FormatWarning(f"the model's tool call is not valid ({e}); it is shown as text"),
            ]
        batch, self._batches = self._batches, self._batches + 1
        return [ToolCall(self._call_id(), name, args, batch) for name, args in calls]


def _before(text: str, marker: str) -> str:
    """The text a control token's piece carries before the marker itself (a character the
    detokenizer held back), or all of it when the piece is not the marker's spelling."""
    return text[: -len(marker)] if text.endswith(marker) else text


def thought_open(prompt_ids: Iterable[int], control: ControlIds) -> bool:
    """Whether the prompt ends inside an open deliberation: since the last
    `<|assistant_start|>`, the last inner marker is `<|inner_prefix|>` (a prompt that ends
    with tool results of a call made while deliberating)."""
    state = False
    for token in prompt_ids:
        if token == control.inner_prefix:
            state = True
        elif token in (control.inner_suffix, control.assistant_start):
            state = False
    return state


def parse_generation(events: Iterable[Any], parser: FormatParser) -> Iterator[Any]:
    """`generate`'s events -> format events, then `generate`'s `Done` (passed through last).

    An end token the parser must see (`<|tools_suffix|>`, which `generate` consumes
    without a `Chunk`) is taken from `Done.tokens`.
    """
    from ..generate import Chunk as TokenChunk
    from ..generate import Done

    control = parser.control
    for event in events:
        if isinstance(event, TokenChunk):
            yield from parser.feed(event.token, event.text)
        elif isinstance(event, Done):
            last = event.tokens[-1] if event.tokens else None
            if event.stats.finish_reason == "stop" and last == control.tools_suffix:
                yield from parser.feed(last, "")
            yield from parser.finish()
            yield event
        else:
            yield event


def filter_events(events: Iterable[Any], output_filter: Any) -> Iterator[Any]:
    """Apply an `OutputFilter` to thoughts and answer text alike, each run of one kind as
    its own stream (held-back text is released before the other kind or a call starts, so
    the order of events stays the model's). Other events pass through unchanged."""
    kind: type | None = None
    stream = None
    for event in events:
        if getattr(event, "pending", False):  # a batch's wait: nothing to release yet
            yield event
            continue
        if isinstance(event, Thought | Chunk):
            if type(event) is not kind:
                if stream is not None and (rest := stream.flush()):
                    yield kind(rest)
                kind, stream = type(event), output_filter.stream()
            if text := stream.feed(event.text):
                yield kind(text)
            continue
        if stream is not None:
            if rest := stream.flush():
                yield kind(rest)
            kind, stream = None, None
        yield event
    if stream is not None and (rest := stream.flush()):
        yield kind(rest)
