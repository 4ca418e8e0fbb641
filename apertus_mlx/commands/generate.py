"""`apertus-mlx generate`: one prompt in, the answer streamed to stdout, nothing else there."""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from ..errors import UsageError
from . import model_option


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


def prompt_ids(tokenizer, prompt: str, system: str | None, raw: bool, think: bool) -> list[int]:
    if raw:
        return tokenizer.encode(prompt, add_special_tokens=True)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=think
    )


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


@click.command()
@click.argument("prompt", required=False)
@model_option(required=False, extra_help=" Optional with --continue.")
@click.option("-s", "--system", help="System prompt (replaces the model's default one).")
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
    from ..config import GenerationConfig
    from ..generate import DEFAULT_MAX_TOKENS, Chunk, Done, generate, wind_down
    from ..sampling import SamplingParams
    from .filter import output_filter

    text = read_prompt(prompt)
    for value, what in ((system, "--system"), *((s, "--stop") for s in stop_strings)):
        utf8(value or "", what)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
    SamplingParams.from_defaults(GenerationConfig(), **sampling)  # bad flags fail before the load
    wrap = output_filter(disabled=no_output_filter)
    rec = None
    if save or continue_id is not None:
        from ..recording import Recorder

        rec = Recorder(continue_id, raw=no_chat_template)
        source = click.get_current_context().get_parameter_source("model_name")
        model_name, system, think, max_tokens, stop_strings = rec.merge(
            sampling,
            model_name,
            system,
            think,
            max_tokens,
            stop_strings,
            model_typed=source is ParameterSource.COMMANDLINE,
        )
    if not model_name:
        raise UsageError("no model given: use -m/--model (or set APERTUS_MLX_MODEL)")
    model, tokenizer = load(model_name, dtype=dtype)
    draft = None
    if draft_model:
        from ..speculative import load_draft

        draft = load_draft(draft_model, model, tokenizer, num_draft_tokens, dtype=dtype)
    params = SamplingParams.from_defaults(model.generation, **sampling)
    if rec:
        window = model.args.max_position_embeddings
        reserve = min(max_tokens or DEFAULT_MAX_TOKENS, window // 4)
        ids = rec.prompt_ids(tokenizer, text, system, bool(think), window, reserve)
        rec.begin(text, model_name, system, bool(think), params, max_tokens, stop_strings)
    else:
        ids = prompt_ids(tokenizer, text, system, no_chat_template, bool(think))
    limit = max_tokens or DEFAULT_MAX_TOKENS
    cache = rec.saved_cache(model, ids) if rec else None
    cache = cache if cache is not None else model.make_cache(bits=kv_bits and int(kv_bits))
    events = generate(
        model,
        tokenizer,
        ids,
        params=params,
        max_tokens=limit,
        stop_strings=stop_strings,
        cache=cache,
        draft=draft,
    )
    events = wrap(events)
    done = None

    def consume(events) -> None:
        nonlocal done
        for event in events:
            if isinstance(event, Chunk) and not as_json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Done):
                done = event
            if rec:
                rec.feed(event)

    try:
        try:
            consume(events)
        except KeyboardInterrupt:  # it landed here, not in the generator: let that finish
            consume(wind_down(events))
    except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
        if rec:
            rec.close("interrupted")
        sys.stderr.close()
        sys.exit(0)
    except BaseException:
        if rec:
            rec.close("error")
        raise
    s = done.stats
    s.history_rerendered = bool(rec and rec.history_rerendered)
    if not as_json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    saved = rec.report(as_json) if rec else {}
    if as_json:
        click.echo(
            json.dumps(
                {"text": done.text, **s.as_dict(), "backend": model.plan.describe(), **saved},
                ensure_ascii=False,
            )
        )
    context = model.args.max_position_embeddings
    if s.finish_reason == "length" and s.prompt_tokens + s.generated_tokens >= context:
        click.echo(f"[stopped: the conversation filled the model's context ({context} tokens)]",
                   err=True)  # fmt: skip
    elif s.finish_reason == "length":
        click.echo(
            f"[stopped: reached the limit of {limit} tokens; raise it with --max-tokens]", err=True
        )
    if stats:
        click.echo(format_stats(s, model.plan.describe()), err=True)
    if rec:
        rec.save_cache(model, cache, (ids + done.tokens)[: cache.offset])
    if s.finish_reason == "interrupted":
        sys.exit(130)
    if rec:
        rec.raise_error()
