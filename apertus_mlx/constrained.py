"""Answers that follow a grammar: a JSON schema (`response_format`) or a forced tool call
(`tool_choice` required or named), enforced token by token.

A logits processor for `generate` (`(tokens, logits) -> logits`) masks every token the
grammar does not allow next. The grammar engine is llguidance: it compiles JSON schemas and
Lark grammars with special tokens, refuses what it cannot enforce (so an unsupported schema is
a UsageError, never an unconstrained answer), computes a mask in microseconds and depends on
nothing else (xgrammar, the other candidate, requires torch; see docs/format.md).

"Whatever the weights" also means whatever the length: a model may wander in a string until
the token budget ends, which would cut the JSON. So near the end of the budget the processor
computes how many tokens the shortest way to finish takes (close the string, end arrays and
objects, fill required keys with the smallest values the grammar allows) and, once only that
many are left, writes it: the answer still parses and validates, and `closed_early` says it
was cut short.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import UsageError
from .format.stream import ControlIds
from .format.tools import normalize_tools

# JSON whitespace as a model writes it (a space, or a newline and indentation), bounded so a
# model cannot fill its budget with blanks.
WHITESPACE = r"[ ]?|\n[ \t]{0,24}"
CHECK_EVERY = 16  # tokens between two estimates of the shortest way to finish
ENDGAME = 16  # within this many tokens of it, every token chosen must leave room to finish
ENDGAME_CANDIDATES = 8  # the model's likeliest allowed tokens checked for that
MAX_CLOSING = 512  # tokens the shortest way to finish may take before we give up on it

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lltokenizer(tokenizer: Any, vocab_size: int, eos: tuple[int, ...]):
    """llguidance's view of the tokenizer (its token trie), built once per tokenizer."""
    import llguidance

    per = _tokenizers.setdefault(tokenizer, {})
    key = (vocab_size, eos)
    if key not in per:
        per[key] = llguidance.LLTokenizer(
            tokenizer.tokenizer_json(), n_vocab=vocab_size, eos_token=list(eos)
        )
    return per[key]


def _one_line(message: str) -> str:
    return " ".join(message.split())


def schema_from_response_format(response_format: Any) -> dict | None:
    """OpenAI's `response_format` -> the JSON schema to enforce (None for plain text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise UsageError("response_format must be a JSON object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None and isinstance(spec, dict) and "name" not in spec:
            schema = spec  # a bare schema where OpenAI nests it
        if not isinstance(schema, dict):
            raise UsageError("response_format json_schema needs a 'schema' object")
        return schema
    raise UsageError(f"unsupported response_format type {kind!r} (text, json_object, json_schema)")


def _json_rule(schema: dict) -> str:
    """A `%json` rule for `schema`, checked on its own first so an unsupported feature is
    reported as the engine words it, in one line."""
    import llguidance

    if not isinstance(schema, dict):
        raise UsageError("a JSON schema must be a JSON object")
    schema = {**schema, "x-guidance": {"whitespace_pattern": WHITESPACE}}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    except ValueError as e:
        raise UsageError(f"the JSON schema cannot be used: {_one_line(str(e))}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise UsageError(f"the JSON schema uses what we cannot enforce: {_one_line(error)}")
    return "%json " + json.dumps(schema)


def _thought_rule(control: ControlIds, thinking: bool) -> str:
    """An optional deliberation before the constrained part, when deliberation is on."""
    if not thinking or control.inner_prefix is None or control.inner_suffix is None:
        return ""
    return f"thought: <[{control.inner_prefix}]> /(.|\\n)*/ <[{control.inner_suffix}]>\n"


def json_schema_grammar(schema: dict, control: ControlIds, thinking: bool = False) -> str:
    """The grammar of an answer that is one JSON value following `schema` (after an optional
    deliberation when `thinking`)."""
    thought = _thought_rule(control, thinking)
    start = "start: thought? answer\n" if thought else "start: answer\n"
    return start + thought + "answer: " + _json_rule(schema) + "\n"


def tool_call_grammar(
    tools: list[dict],
    control: ControlIds,
    *,
    name: str | None = None,
    parallel: bool = True,
    thinking: bool = False,
) -> str:
    """The grammar of an answer that is a call list, `<|tools_prefix|>[{"name": {arguments
    per its schema}}, ...]<|tools_suffix|>`: `tool_choice` "required" (any offered tool, one or
    more) or a named function (that one, once)."""
    tools = normalize_tools(tools) or []
    if control.tools_prefix is None or control.tools_suffix is None:
        raise UsageError("this tokenizer has no tool-call tokens")
    if name is not None:
        tools = [t for t in tools if t["name"] == name]
        if not tools:
            raise UsageError(f"tool_choice names {name!r}, which is not among the tools")
        parallel = False
    if not tools:
        raise UsageError("tool_choice requires a tool call but no tools are offered")
    items = [
        {
            "type": "object",
            "properties": {t["name"]: t.get("parameters") or {"type": "object"}},
            "required": [t["name"]],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict = {"type": "array", "minItems": 1}
    schema["items"] = items[0] if len(items) == 1 else {"anyOf": items}
    if not parallel:
        schema["maxItems"] = 1
    thought = _thought_rule(control, thinking)
    start = f"<[{control.tools_prefix}]> calls <[{control.tools_suffix}]>"
    return f"start: {'thought? ' if thought else ''}{start}\n{thought}calls: {_json_rule(schema)}\n"


@dataclass
class Constraint:
    """A grammar compiled for one model and tokenizer; `processor()` makes the per-answer
    logits processor (answers cannot share one: it follows the tokens of its own)."""

    grammar: str
    tokenizer: Any
    vocab_size: int
    end_tokens: tuple[int, ...]
    context: int
    _closers: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, grammar: str, model: Any, tokenizer: Any, end_tokens=None) -> Constraint:
        """Compile `grammar` for `model`'s vocabulary; its answers end with one of
        `end_tokens` (default: the model's), which `generate` must also stop on."""
        import llguidance

        end = tuple(sorted(model.generation.eos_token_ids if end_tokens is None else end_tokens))
        if not end:
            raise UsageError("a constrained answer needs an end token")
        llt = _lltokenizer(tokenizer, model.args.vocab_size, end)
        error = llguidance.LLMatcher.validate_grammar(grammar, llt)
        if error:
            raise UsageError(f"the grammar cannot be used: {_one_line(error)}")
        c = cls(grammar, tokenizer, model.args.vocab_size, end, model.args.max_position_embeddings)
        c._closers = _closer_tokens(tokenizer)
        return c

    def processor(self, max_tokens: int) -> GrammarProcessor:
        """A fresh processor for one answer of at most `max_tokens` tokens (the budget given
        to `generate`; the model's context is taken into account as `generate` does)."""
        import llguidance

        llt = _lltokenizer(self.tokenizer, self.vocab_size, self.end_tokens)
        matcher = llguidance.LLMatcher(llt, self.grammar, log_level=0)
        if matcher.is_error():
            raise UsageError(f"the grammar cannot be used: {_one_line(matcher.get_error())}")
        control = ControlIds.from_tokenizer(self.tokenizer)
        specials = {i for i in vars(control).values() if i is not None}
        return GrammarProcessor(
            matcher, llt, self, max_tokens, self._closers, specials | set(self.end_tokens)
        )


def _closer_tokens(tokenizer: Any) -> list[int]:
    """Single-token spellings of the characters that end JSON values soonest."""
    out = []
    for ch in ('"', "}", "]", ",", "0", "1"):
        ids = tokenizer.encode(ch)
        out.append(ids[0] if len(ids) == 1 else -1)
    return out


class _Strings:
    """Whether the JSON written so far ends inside a string (a closing `}` would be text
    there): a quote/escape scanner, reset by control tokens."""

    __slots__ = ("inside", "escape")

    def __init__(self, inside: bool = False, escape: bool = False):
        self.inside, self.escape = inside, escape

    def copy(self) -> _Strings:
        return _Strings(self.inside, self.escape)

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.escape:
                self.escape = False
            elif self.inside and b == 0x5C:
                self.escape = True
            elif b == 0x22:
                self.inside = not self.inside


class GrammarProcessor:
    """The logits processor of one constrained answer (see the module docstring)."""

    def __init__(self, matcher, llt, constraint: Constraint, max_tokens, closers, specials):
        self.matcher, self._llt, self._c = matcher, llt, constraint
        self._max_tokens = max_tokens
        self._quote, self._rbrace, self._rbracket, self._comma, self._zero, self._one = closers
        self._specials = specials
        control = ControlIds.from_tokenizer(constraint.tokenizer)
        self._inner_suffix = control.inner_suffix
        turn_end = constraint.tokenizer.token_to_id("<|assistant_end|>")
        ends = constraint.end_tokens
        self._end = turn_end if turn_end in ends else ends[0]
        self._strings = _Strings()
        self._start: int | None = None
        self._seen = 0
        self._budget = 0
        self._next_check = 0  # remaining budget at which to estimate the way to finish again
        self._need: int | None = None  # tokens the shortest way to finish takes
        self.closed_early = False  # the shortest way to finish was written for want of budget
        self.mask_seconds = 0.0  # time spent on the grammar (not waiting for the model)
        self.endgame_steps = 0  # steps near the end of the budget (see `_endgame`)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # the forward pass runs while the mask is computed
        n = tokens.shape[0]
        new = [] if self._start is None else tokens[self._seen :].tolist()
        started = time.perf_counter()
        first = self._start is None
        if first:
            self._start = n
            self._budget = self._next_check = min(self._max_tokens, self._c.context - n)
        for token in new:
            self._consume(token)
        self._seen = n
        remaining = self._budget - (n - self._start)  # tokens left, this one included
        if remaining <= self._next_check:
            self._plan(remaining, first)
        if self._need is not None and remaining <= self._need + ENDGAME:
            allowed = self._endgame(logits, remaining)
            self.endgame_steps += 1
        else:
            allowed = mx.array(self._allowed(self.matcher))
        self.mask_seconds += time.perf_counter() - started
        return mx.where(allowed, logits, -mx.inf)

    def _endgame(self, logits: mx.array, remaining: int) -> mx.array:
        """Near the end of the budget: of the model's likeliest allowed tokens (up to 99% of
        the probability, at most ENDGAME_CANDIDATES), those after which the shortest way to
        finish still fits, else the shortest way itself."""
        ids = np.arange(logits.shape[-1])
        allowed = ids[self._allowed(self.matcher)]
        waited = time.perf_counter()
        scores = np.array(logits.reshape(-1).astype(mx.float32))[allowed]  # waits for the model
        self.mask_seconds -= time.perf_counter() - waited
        order = np.argsort(-scores)[:ENDGAME_CANDIDATES]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= np.exp(scores - scores[order[0]]).sum()
        fitting, covered = [], 0.0
        for token, p in zip(allowed[order].tolist(), probs.tolist()):
            need = 0 if token == self._end else self._closing_length(after=token)
            if need is not None and need <= remaining - 1:
                fitting.append(token)
            covered += p
            if covered >= 0.99:  # the rest would hardly ever be drawn
                break
        if not fitting:
            forced = self._closing_token(self.matcher, self._strings)
            if forced is None:  # nothing finishes in time: the answer will be cut
                return mx.array(self._allowed(self.matcher))
            self.closed_early = self.closed_early or forced != self._end
            fitting = [forced]
        return mx.array(np.isin(ids, fitting))

    def _allowed(self, matcher) -> np.ndarray:
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self._c.vocab_size].astype(bool)

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar engine: {_one_line(self.matcher.get_error())}")
        self._advance(self._strings, token)

    def _advance(self, strings: _Strings, token: int) -> None:
        if token in self._specials:
            strings.inside = strings.escape = False
        else:
            strings.feed(self._llt.decode_bytes([token]))

    def _plan(self, remaining: int, first: bool) -> None:
        """Estimate how many tokens the shortest way to finish takes: every CHECK_EVERY
        tokens, then every token once the budget gets near it."""
        self._need = need = self._closing_length()
        if first and need is not None and need > remaining:
            raise UsageError(
                f"the shortest answer this grammar allows takes {need} tokens, more than the "
                f"{remaining} this answer may have; raise max tokens"
            )
        near = need is not None and remaining <= need + ENDGAME + CHECK_EVERY
        self._next_check = remaining - 1 if near else remaining - CHECK_EVERY

    def _closing_length(self, after: int | None = None) -> int | None:
        """Tokens the shortest way to finish takes (the end token included), from here or
        after `after`; None when none is found."""
        matcher, strings = self.matcher.deep_copy(), self._strings.copy()
        if after is not None:
            if not matcher.consume_token(after):
                return None
            self._advance(strings, after)
        for steps in range(1, MAX_CLOSING + 1):
            token = self._closing_token(matcher, strings)
            if token is None:
                return None
            if token == self._end:
                return steps
            matcher.consume_token(token)
            self._advance(strings, token)
        return None

    def _closing_token(self, matcher, strings: _Strings) -> int | None:
        """The token that finishes soonest: the end token once the grammar is complete, the
        end of a deliberation, a closing quote in a string, else a bracket, comma or digit,
        else the first token the grammar allows."""
        if matcher.is_error():
            return None
        if matcher.is_accepting():
            return self._end
        order = [self._inner_suffix]
        order += [self._quote] if strings.inside else [self._rbrace, self._rbracket, self._quote]
        order += [self._comma, self._zero, self._one]
        for token in order:
            if token is not None and token >= 0 and matcher.validate_tokens([token]) == 1:
                return token
        allowed = np.flatnonzero(self._allowed(matcher))
        return int(allowed[0]) if len(allowed) else None
