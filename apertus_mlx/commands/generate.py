"""`apertus-mlx generate`: one prompt in, the answer streamed to stdout, nothing else there."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading

import click
from click.core import ParameterSource

from ..errors import StoreError, UsageError
from . import model_option
from .across_hosts import across_hosts


def utf8(text: str, what: str) -> str:
    """`text` if it is valid UTF-8: bytes that are not arrive from argv as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8") from None
    return text


def read_prompt(prompt: str | None) -> str:
    stdin = sys.stdin
    if prompt == "-" or (prompt is None and stdin is not None and not stdin.isatty()):
        if stdin is None:
            raise UsageError("stdin is closed: give the prompt as an argument")
        try:  # bytes, decoded strictly: the locale's decoder may let bad bytes through
            prompt = stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the prompt on stdin is not valid UTF-8") from None
    elif prompt is not None:
        utf8(prompt, "the prompt")
    if prompt is None:
        raise UsageError(
            "give a prompt, or pipe one on stdin (e.g. `echo hi | apertus-mlx generate -m M`)"
        )
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


def format_stats(stats, backend: str) -> str:
    cached = f", {stats.cached_tokens} cached" if stats.cached_tokens else ""
    read = stats.cached_tokens + stats.prefilled_tokens
    if read < stats.prompt_tokens:  # stopped while reading it
        cached += f", stopped after {read}"
    first = "no token" if stats.ttft_s is None else f"first token {stats.ttft_s:.2f} s"
    draft = ""
    if stats.num_draft_tokens:
        rate = stats.acceptance_rate or 0.0
        draft = (
            f" | draft: {stats.accepted_tokens}/{stats.draft_tokens} accepted ({rate:.0%}), "
            f"k={stats.num_draft_tokens}"
        )
    return (
        f"prompt: {stats.prompt_tokens} tokens{cached}, {stats.prefill_tps:.1f} tok/s | "
        f"answer: {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tok/s{draft} | "
        f"{first} | peak memory {stats.peak_memory_gb:.2f} GB | {backend}"
    )


@across_hosts
@click.command()
@click.argument("prompt", required=False)
@model_option(required=False, extra_help=" Optional with --continue.")
@click.option("-s", "--system", help="System prompt (replaces the model's default one).")
@click.option(
    "--preset",
    metavar="NAME",
    help="Start from preset NAME (system prompt and sampling, made in the chat's Settings); "
    "the other options here override it.",
)
@click.option("--no-chat-template", is_flag=True, help="Raw completion: the prompt as plain text.")
@click.option("--think/--no-think", default=None, help="The model's deliberation (thinking) mode.")
@click.option(
    "-n",
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Most tokens to generate [default: 4096, within the model's context].",
)
@click.option(
    "-t",
    "--temp",
    "temperature",
    type=float,
    help=(
        "Temperature; 0 is greedy and deterministic"
        " [default: the checkpoint's generation config, else 0.8]."
    ),
)
@click.option(
    "--top-p",
    type=float,
    help=("Nucleus sampling mass [default: the checkpoint's generation config, else 0.9]."),
)
@click.option("--top-k", type=int, help="Sample among the k most likely tokens (0: off).")
@click.option("--min-p", type=float, help="Drop tokens below min-p times the top probability.")
@click.option("--repetition-penalty", type=float, help="Penalise recent tokens (1.0: off).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), help="Make sampling repeatable.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop at this text (repeatable).")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    help="Compute dtype [default: float32 on CPU, the checkpoint's on Metal].",
)
@click.option(
    "--kv-bits",
    type=click.Choice(["4", "8"]),
    help="Keep the KV cache quantized to 8 or 4 bits: long contexts in less memory.",
)
@click.option(
    "--draft-model",
    help="Speculative decoding: a smaller model with the same tokenizer proposes tokens.",
)
@click.option(
    "--num-draft-tokens",
    type=click.IntRange(1, 16),
    default=3,
    show_default=True,
    help="Tokens the draft model proposes per verification pass.",
)
@click.option(
    "--tools",
    "tools_file",
    type=click.Path(dir_okay=False),
    help="Offer these tools: a JSON list of tool schemas (OpenAI's or flat); calls print as JSON.",
)
@click.option(
    "--json-schema",
    "schema_file",
    type=click.Path(dir_okay=False),
    help="The answer is JSON following this JSON schema, always (constrained decoding).",
)
@click.option("--stats", is_flag=True, help="Print speed and memory to stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text and stats.")
@click.option("--no-output-filter", is_flag=True, help="Do not apply the installed output filter.")
@click.option("--save", is_flag=True, help="Save the exchange as a new conversation (see history).")
@click.option(
    "--continue",
    "continue_id",
    metavar="ID",
    help="Add a turn to saved conversation ID, with its model and settings unless given.",
)
def generate(
    prompt,
    model_name,
    system,
    preset,
    no_chat_template,
    think,
    max_tokens,
    temperature,
    top_p,
    top_k,
    min_p,
    repetition_penalty,
    seed,
    stop_strings,
    dtype,
    kv_bits,
    draft_model,
    num_draft_tokens,
    tools_file,
    schema_file,
    stats,
    as_json,
    no_output_filter,
    save,
    continue_id,
) -> None:
    """Answer PROMPT (or stdin when PROMPT is - or absent) with MODEL, streamed to stdout.

    Sampling defaults come from the checkpoint's generation_config.json, else the model card's
    temperature 0.8 / top-p 0.9. Ctrl+C stops the answer; what was generated is kept.
    --save and --continue write the exchange to the history as it streams.
    """
    from .. import load
    from ..format import Chunk, Thought, ThoughtEnd, ThoughtStart, ToolCall
    from ..generate import Done
    from ..hub import model_identity
    from ..settings import TurnSettings
    from ..turn import Note, Started, TurnRequest, TurnService
    from .filter import output_filter

    text = read_prompt(prompt)
    for value, what in ((system, "--system"), *((s, "--stop") for s in stop_strings)):
        utf8(value or "", what)
    flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens,
                 stop=stop_strings, system=system, thinking=think)  # fmt: skip
    config = None
    if preset is not None or not model_name:
        from ..user_config import AppConfig

        try:
            config = AppConfig.load()
        except UsageError:
            if preset is not None:  # needed: its error is the answer
                raise
    base = config.preset(preset) if preset is not None else TurnSettings()
    settings = base.merged(**flags)  # bad flags fail before the model loads
    stored = save or continue_id is not None
    if stored and no_chat_template:
        raise UsageError("--save and --continue keep chats: drop --no-chat-template")
    tools = _json_file(tools_file, "--tools", list) if tools_file else None
    schema = _json_file(schema_file, "--json-schema", dict) if schema_file else None
    if (tools or schema) and no_chat_template:
        raise UsageError("--tools and --json-schema need the chat template: drop "
                         "--no-chat-template")  # fmt: skip
    the_filter = output_filter(disabled=no_output_filter)
    store = saved = store_error = None
    if stored:
        store, saved, store_error, model_name = _open_history(continue_id, model_name)
    if not model_name and config is not None and config.last_model:
        model_name = config.last_model  # the chat's last model
    if not model_name:
        raise UsageError("no model given: use -m/--model (or set APERTUS_MLX_MODEL); "
                         "the chat has not chosen one yet")  # fmt: skip
    model, tokenizer = load(model_name, dtype=dtype)
    draft = None
    if draft_model:
        from ..speculative import load_draft

        draft = load_draft(draft_model, model, tokenizer, num_draft_tokens, dtype=dtype)
    model_id, revision = model_identity(model_name)
    service = TurnService(model, tokenizer, model_id=model_id, revision=revision, store=store,
                          saved=saved, output_filter=lambda: the_filter, draft=draft,
                          kv_bits=kv_bits and int(kv_bits))  # fmt: skip
    shape = dict(tools=tools, json_schema=schema)
    if no_chat_template:
        request = TurnRequest.raw(tokenizer.encode(text, add_special_tokens=True), settings)
    elif continue_id is not None:
        request = TurnRequest.follow(continue_id, text, overrides=flags, best_effort_store=True,
                                     **shape)  # fmt: skip
    elif save and store is not None:
        request = TurnRequest.new(text, settings, best_effort_store=True, **shape)
    else:
        messages = [{"role": "system", "content": settings.system}] if settings.system else []
        request = TurnRequest.chat([*messages, {"role": "user", "content": text}], settings,
                                   **shape)  # fmt: skip
    stop = threading.Event()
    turn = service.start(request, stop)
    done: Done | None = None
    thinking = _ThoughtsOnStderr(enabled=not as_json)

    def consume(events) -> None:
        nonlocal done
        for event in events:
            if isinstance(event, Chunk) and not as_json:
                thinking.close()
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, ThoughtStart | Thought | ThoughtEnd):
                thinking.show(event)
            elif isinstance(event, ToolCall) and not as_json:
                thinking.close()
            elif isinstance(event, Done):
                thinking.close()
                done = event
            elif isinstance(event, Note):
                click.echo(f"apertus-mlx: warning: {event.text}", err=True)
            elif isinstance(event, Started) and event.dropped:
                click.echo(
                    f"[the conversation is longer than the model's context "
                    f"({service.window} tokens): its {event.dropped} oldest messages are left "
                    "out of this prompt]",
                    err=True,
                )

    try:
        with _signals_stop(stop):
            consume(turn.events)
    except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
        turn.events.close()
        sys.stderr.close()
        sys.exit(0)
    s = done.stats
    calls = [_call_json(c) for c in done.tool_calls]
    if not as_json:
        if calls:
            sys.stdout.write(("\n" if done.text else "") + json.dumps(calls, ensure_ascii=False))
        sys.stdout.write("\n")
        sys.stdout.flush()
    cid = turn.conversation_id if stored else None
    store_error = store_error or turn.store_error
    if stored and store_error is None and not turn.deleted and not as_json:
        click.echo(f"saved as {cid}", err=True)
    if as_json:
        extra = {"conversation_id": cid} if stored else {}
        if done.reasoning is not None or settings.thinking:
            extra["reasoning"] = done.reasoning
        if tools is not None:
            extra["tool_calls"] = calls
        click.echo(
            json.dumps(
                {"text": done.text, **s.as_dict(), "backend": model.plan.describe(), **extra},
                ensure_ascii=False,
            )
        )
    context, limit = model.args.max_position_embeddings, turn.max_tokens
    if s.finish_reason == "length" and s.prompt_tokens + s.generated_tokens >= context:
        click.echo(f"[stopped: the conversation filled the model's context ({context} tokens)]",
                   err=True)  # fmt: skip
    elif s.finish_reason == "length":
        click.echo(
            f"[stopped: reached the limit of {limit} tokens; raise it with --max-tokens]", err=True
        )
    if stats:
        click.echo(format_stats(s, model.plan.describe()), err=True)
    if s.finish_reason == "interrupted":
        sys.exit(130)
    if store_error is not None:
        raise StoreError(f"history not saved: {store_error}")


def _open_history(continue_id: str | None, model_name: str | None):
    """(store, saved caches, the store's error, model) for --save / --continue: a store that
    cannot be opened is remembered for --save (the answer is still shown) and fatal for
    --continue; a continued conversation keeps its model unless -m is typed."""
    from ..saved_caches import SavedCaches
    from ..store import Store

    saved = SavedCaches()  # a bad budget value is refused before anything is written
    try:
        store = Store.open()
    except StoreError as e:
        if continue_id is not None:
            raise  # nothing to continue from
        return None, saved, e, model_name
    if continue_id is not None:
        conversation = store.get_conversation(continue_id)
        source = click.get_current_context().get_parameter_source("model_name")
        if source is not ParameterSource.COMMANDLINE:  # from the environment, or none
            model_name = conversation.model or model_name
    return store, saved, None, model_name


def _json_file(path: str, flag: str, kind: type):
    """The JSON in `path` (a list or an object, as `kind`); one line if it is not."""
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{flag}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise UsageError(
            f"{flag}: {path} must hold a JSON {kind.__name__.replace('dict', 'object')}"
        )
    return data


def _call_json(call) -> dict:
    """A tool call in OpenAI's shape, as `--json` and the server give it."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip


class _ThoughtsOnStderr:
    """The model's deliberation on stderr, dimmed and marked, apart from the answer on
    stdout (nothing when stdout is JSON)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.open = False
        self.style = sys.stderr.isatty()

    def show(self, event) -> None:
        from ..format import Thought, ThoughtEnd

        if isinstance(event, ThoughtEnd):
            self.close()
        if not (self.enabled and isinstance(event, Thought) and event.text):
            return
        if not self.open:
            click.echo(click.style("[thinking] ", dim=self.style), err=True, nl=False)
            self.open = True
        click.echo(click.style(event.text, dim=self.style), err=True, nl=False)

    def close(self) -> None:
        if self.open:
            click.echo(click.style(" [/thinking]", dim=self.style), err=True)
            self.open = False


@contextlib.contextmanager
def _signals_stop(stop: threading.Event):
    """While an answer streams, Ctrl+C, SIGTERM and SIGHUP set `stop` instead of raising
    wherever Python happens to be: generation ends at its next token (or prompt layer) as
    interrupted, and everything after it (the format parser, the filter, the store, the saved
    cache) finishes as usual. A second signal raises KeyboardInterrupt at once."""
    from ..cli import note_termination

    names = ("SIGINT", "SIGTERM", "SIGHUP")
    signals = [getattr(signal, n) for n in names if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in signals}

    def handle(signum: int, frame: object) -> None:
        if signum != signal.SIGINT:
            note_termination(signum)  # the exit status names it
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in signals:
        if saved[sig] is not signal.SIG_IGN:  # `nohup` keeps a hangup ignored
            signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
