"""Text <-> token ids for Apertus checkpoints: `tokenizers`, the chat template, streaming decode.

Only `tokenizers`, `jinja2` and the standard library: loading a tokenizer must stay cheap.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders

from apertus_mlx.chat_template import APERTUS_TEMPLATE, compile_template, render_limited
from apertus_mlx.errors import TokenizerError
from apertus_mlx.format import RawJSON, normalize_messages, normalize_tools

_TURN_END = "<|assistant_end|>"
# Message fields whose strings are the user's text (never template syntax).
_TEXT_FIELDS = ("content", "reasoning_content", "thinking", "reasoning", "tool_calls")
# Keys inside structured content that templates compare against, so they stay as they are.
_STRUCTURAL_KEYS = ("type", "role", "name")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_MAX_RUNS = 8192  # encoded runs of template text remembered (a few MB at most)
_MAX_RUN_CHARS = 1 << 16  # longer runs are encoded each time


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); re-download the model.") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name} is not a JSON object ({path}); re-download the model.")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class StreamingDetokenizer:
    """Turns token ids into text as they arrive, never splitting a UTF-8 character.

    Each token maps to its bytes (byte-level BPE) and an incremental UTF-8 decoder holds back
    an incomplete tail, so the pieces concatenate to exactly `Tokenizer.decode(ids)`.
    Not `tokenizers.decoders.DecodeStream`: it is slower per token here (0.55 against 0.34 us
    on byte-level BPE), cannot flush a character held back at the end, and raises on byte-
    fallback runs that are not valid UTF-8.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer._special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        self._ids: list[int] = []  # only for tokenizers that are not byte-level
        self._emitted = ""

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (may be empty)."""
        token_id = int(token_id)  # accept numpy / MLX scalars
        if self._tokenizer._byte_level:
            if token_id in self._skip:
                return ""
            piece = self._utf8.decode(self._tokenizer._token_bytes(token_id))
        else:
            piece = self._fallback_add(token_id)
        if piece:
            self._pieces.append(piece)
        return piece

    def finalize(self) -> str:
        """Flush whatever is held back (an incomplete character becomes U+FFFD, as in decode)."""
        if self._tokenizer._byte_level:
            piece = self._utf8.decode(b"", final=True)
        else:
            full = self._tokenizer.decode(self._ids, skip_special_tokens=bool(self._skip))
            piece = full[len(self._emitted) :]
            self._emitted = full
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def _fallback_add(self, token_id: int) -> str:
        # Non-byte-level decoders: re-decode everything, emit only text that is settled.
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=bool(self._skip))
        if full.endswith("\ufffd") or not full.startswith(self._emitted):
            return ""
        piece, self._emitted = full[len(self._emitted) :], full
        return piece


class Tokenizer:
    """A checkpoint's tokenizer plus its chat template: tokenizing and rendering only (when to
    stop and how to sample is the model's `GenerationConfig`)."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template: str | None) -> None:
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # special strings in text are text
        self._config = config
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        specials = sorted((added[i].content for i in self._special_ids), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        # A special token can only begin with one of these: hidden in user text while the
        # template runs, no special string can start inside what the user typed.
        self._special_starts = "".join(sorted({t[0] for t in specials if t}))
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._bytes_cache: dict[int, bytes] = {}
        self._runs: dict[str, list[int]] = {}  # see `_encode_run`

        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        self.bos_token_id: int | None = self.token_to_id(self.bos_token) if self.bos_token else None

        self.has_chat_template: bool = chat_template is not None
        try:
            self._template = compile_template(chat_template or APERTUS_TEMPLATE)
        except (jinja2.TemplateError, RecursionError, MemoryError) as e:
            raise TokenizerError(
                f"the checkpoint's chat template does not compile ({_one_line(e)}); "
                "fix chat_template.jinja or use --no-chat-template."
            ) from None

    # -- plain text ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids for `text`; `add_special_tokens` adds BOS. Special-token strings stay plain text."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def tokenizer_json(self) -> str:
        """tokenizer.json as text (what a grammar engine builds its token trie from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def vocabulary(self) -> dict[str, int]:
        """Token -> id, added tokens included: equal maps give ids the same meaning."""
        return self._tok.get_vocab(with_added_tokens=True)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)

    def end_token_ids(self) -> tuple[int, ...]:
        """Ids that end a turn as far as the tokenizer knows: its eos token and Apertus's
        `<|assistant_end|>` (the model's GenerationConfig adds config.json's)."""
        tokens = (self.eos_token, _TURN_END)
        return tuple(sorted({i for t in tokens if t and (i := self.token_to_id(t)) is not None}))

    @property
    def max_token_id(self) -> int:
        """The largest id this tokenizer can produce (the model's embedding must cover it).

        From the counts, not a scan of the vocabulary (65 ms at 131k tokens, on every load):
        a BPE vocabulary's ids run from 0 without gaps; added tokens may sit anywhere.
        """
        added = self._tok.get_added_tokens_decoder()
        return max(self._tok.get_vocab_size(with_added_tokens=False) - 1, *added, -1)

    # -- chat ---------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text the chat template makes of `messages`."""
        messages, tools = _normalize(messages), normalize_tools(tools)
        return self._render(messages, add_generation_prompt, enable_thinking, tools, kwargs)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids for `messages`; only tokens the template itself writes become control ids.

        Whatever the template does to the texts (trim, upper, replace...), a user's typed
        `<|system_start|>` must stay text. So before rendering, each character a special
        token can start with is replaced in the user's texts by a private-use stand-in; no
        special string can then begin inside user text. The rendering is split on special
        strings (all the template's own), and each run between them gets its characters
        back and is encoded as plain text: for ordinary input the ids equal transformers'.
        Tool declarations and call arguments are the client's text too, and hidden alike.
        """
        kw = dict(enable_thinking=enable_thinking, tools=tools, **kwargs)
        return self.template_ids(messages, add_generation_prompt, **kw)[1]

    def template_ids(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        slots: dict[str, list[int]] | None = None,
        enable_thinking: bool = False,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[int]]:
        """(rendered text, ids) as `apply_chat_template`, where each string of `slots` that
        the rendering contains becomes the ids given for it instead of being encoded.

        A slot stands for a past answer as the tokens the model produced (`prompt.py`); its
        string must not occur in the messages otherwise. When the slot's ids end with the
        special token the template writes right after it (the model ended its turn itself),
        they stand for that token too.
        """
        messages, tools = _normalize(messages), normalize_tools(tools)
        stand_ins = _free_chars([messages, tools], len(self._special_starts))
        hide = str.maketrans(dict(zip(self._special_starts, stand_ins)))
        unhide = str.maketrans(dict(zip(stand_ins, self._special_starts)))
        escaped = [_escape(m, hide) for m in messages]
        tools = _escape_tree(tools, hide)
        rendered = self._render(escaped, add_generation_prompt, enable_thinking, tools, kwargs)
        slots = slots or {}
        pattern = self._special_re
        if slots:
            pattern = re.compile(
                "|".join(map(re.escape, sorted(slots, key=len, reverse=True)))
                + (f"|{self._special_re.pattern}" if self._special_re else "")
            )
        ids: list[int] = []
        pos = 0
        after_slot: list[int] = []  # the ids of a slot just written
        for m in pattern.finditer(rendered) if pattern else ():
            text = m.group()
            run = rendered[pos : m.start()].translate(unhide)  # split first: user text
            if run:  # never holds a special string, whatever it spelled before hiding
                ids += self._encode_run(run)
                after_slot = []
            if text in slots:
                after_slot = list(slots[text])
                ids += after_slot
            else:
                special = self._tok.token_to_id(text)
                if not (after_slot and after_slot[-1] == special and m.start() == pos):
                    ids.append(special)
                after_slot = []
            pos = m.end()
        ids += self._encode_run(rendered[pos:].translate(unhide))
        return rendered.translate(unhide), ids

    def _encode_run(self, text: str) -> list[int]:
        """`encode(text)`, remembered: a conversation's earlier turns, rendered again for the
        next one, are the same runs of text, so each turn encodes only what is new."""
        if len(text) > _MAX_RUN_CHARS:
            return self.encode(text)
        ids = self._runs.get(text)
        if ids is None:
            if len(self._runs) >= _MAX_RUNS:
                self._runs.clear()
            ids = self._runs[text] = self.encode(text)
        return list(ids)

    def _render(self, messages, add_generation_prompt, enable_thinking, tools, kwargs) -> str:
        if messages and messages[-1].get("role") == "tool":
            # Tool results sit inside the assistant turn that called: the model continues that
            # turn, as the template renders it in history, instead of reading the second
            # `<|assistant_start|>` the 2509 template would append (see docs/format.md).
            add_generation_prompt = False
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": _token_text(self._config.get("unk_token")),
            "pad_token": _token_text(self._config.get("pad_token")),
            **kwargs,
        }
        return render_limited(
            self._template,
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **context,
        )

    # -- internals ----------------------------------------------------------------------------

    def _token_bytes(self, token_id: int) -> bytes:
        """The bytes one token decodes to, as the ByteLevel decoder computes them."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        token = self._tok.id_to_token(token_id)
        if token is None:  # ids past the vocabulary (padded embeddings) decode to nothing
            data = b""
        elif all(c in _BYTE_OF_CHAR for c in token):
            data = bytes(_BYTE_OF_CHAR[c] for c in token)
        else:  # e.g. an added token with a real space: the decoder keeps its UTF-8 as is
            data = token.encode("utf-8")
        self._bytes_cache[token_id] = data
        return data


def _normalize(messages: list[dict]) -> list[dict]:
    """What transformers does before rendering (drop None fields, alias reasoning field
    names), then Apertus's own normalisation (`format.normalize_messages`: deliberation as
    blocks, tool calls and results as the template reads them)."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return normalize_messages(out)


def _free_chars(messages: list[dict], n: int) -> str:
    """`n` private-use characters that no message contains."""
    used = set(json.dumps(messages, ensure_ascii=False, default=str))
    free = (chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in used)
    return "".join(next(free) for _ in range(n))


def _escape(value: Any, table: dict[int, str], key: str | None = None) -> Any:
    """`value` with `table` applied to every user text inside a message."""
    if isinstance(value, str):
        if key in _STRUCTURAL_KEYS:
            return value
        text = value.translate(table)
        return RawJSON(text) if isinstance(value, RawJSON) else text
    if isinstance(value, dict):
        if key is None:  # the message itself: only its text fields are user text
            return {k: _escape(v, table, k) if k in _TEXT_FIELDS else v for k, v in value.items()}
        return {k: _escape(v, table, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v, table, "") for v in value]
    return value


def _escape_tree(value: Any, table: dict[int, str], key: str | None = None) -> Any:
    """`table` applied to every string of tool declarations, property names included, but
    `type` values, which the template compares (names are checked to need no hiding)."""
    if isinstance(value, str):
        return value if key == "type" else value.translate(table)
    if isinstance(value, dict):
        return {k.translate(table): _escape_tree(v, table, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_tree(v, table, key if key == "type" else None) for v in value]
    return value


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json, tokenizer_config.json and the chat template from `path`."""
    path = Path(path)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(f"no tokenizer.json in {path}; download the full model repository.")
    try:
        tokenizer = _HFTokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
        raise TokenizerError(f"{tokenizer_file} cannot be read ({e}); re-download it.") from e
    config = _read_json(path / "tokenizer_config.json")
    return Tokenizer(tokenizer, config, _find_template(path, config))


def _find_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {jinja_file} ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
