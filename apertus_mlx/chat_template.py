"""Render chat templates the way transformers does, so prompts match the model's training format.

The checkpoint's own Jinja template is the authority; `APERTUS_TEMPLATE` is our copy of the
documented Apertus 2509 format for checkpoints that ship none.

A template is code from the checkpoint: it runs sandboxed (no attribute or file access, as in
transformers) and within limits, so a hostile or broken one fails in seconds with one line
instead of hanging or eating memory: a time budget per rendering, a cap on loop iterations,
on the size of strings and lists an operation may build, and on powers.
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TokenizerError
from .format.tools import RawJSON

RENDER_SECONDS = 5.0  # per rendering; the real Apertus template needs about a millisecond
MAX_LOOP_ITERATIONS = 1_000_000  # over all loops of one rendering
MAX_SIZE = 10_000_000  # characters of a built string, items of a built list
MAX_POWER_BITS = 4096  # size of the result of `**`

# Written from the format described in swiss-ai/apertus_format and the Apertus-8B-Instruct-2509
# model card: <s>, system block (a dated default when absent), developer block (deliberation and
# TypeScript tool declarations), user turns, assistant turns that also hold tool calls and outputs.
APERTUS_TEMPLATE = r"""
{%- macro ts_type(spec) -%}
  {%- if spec is not mapping or spec.oneOf is defined or spec.anyOf is defined -%}
    {{- 'any' -}}
  {%- elif spec.type is defined and spec.type is not string and spec.type is sequence -%}
    {{- spec.type | join(' | ') -}}
  {%- elif spec.type == 'string' and spec.enum is defined -%}
    {{- '"' ~ (spec.enum | join('" | "')) ~ '"' -}}
  {%- elif spec.type == 'string' -%}
    {{- 'string' -}}
  {%- elif spec.type in ['number', 'integer'] -%}
    {{- 'number' -}}
  {%- elif spec.type == 'boolean' -%}
    {{- 'boolean' -}}
  {%- elif spec.type == 'array' -%}
    {{- (ts_type(spec['items']) if spec['items'] is defined else 'any') ~ '[]' -}}
  {%- elif spec.type == 'object' and spec.properties -%}
    {%- set required = spec.required if spec.required is defined else [] -%}
    {{- '{' -}}
    {%- for name, sub in spec.properties.items() -%}
      {{- name ~ ('' if name in required else '?') ~ ': ' ~ ts_type(sub) -}}
      {{- ', ' if not loop.last else '' -}}
    {%- endfor -%}
    {{- '}' -}}
  {%- elif spec.type == 'object' -%}
    {{- 'object' -}}
  {%- else -%}
    {{- 'any' -}}
  {%- endif -%}
  {#- as the published template: only free strings and arrays say they may be null -#}
  {%- set nullable = spec.type in ['string', 'array'] and spec.enum is not defined -%}
  {{- ' | null' if spec is mapping and spec.nullable and nullable else '' -}}
{%- endmacro -%}

{%- macro ts_tool(tool) -%}
  {%- set fn = tool.function if tool.function is defined else tool -%}
  {%- set params = fn.parameters if fn.parameters is defined else {} -%}
  {{- '// ' ~ (fn.description if fn.description is defined else '') ~ '\n' -}}
  {{- 'type ' ~ fn.name ~ ' = ' -}}
  {%- if params.properties is defined and params.properties -%}
    {%- set required = params.required if params.required is defined else [] -%}
    {{- '(_: {\n' -}}
    {%- for name, spec in params.properties.items() -%}
      {%- if spec.description is defined and spec.description -%}
        {{- '// ' ~ spec.description ~ '\n' -}}
      {%- endif -%}
      {{- name ~ ('' if name in required else '?') ~ ': ' ~ ts_type(spec) -}}
      {%- if spec.default is defined -%}
        {{- ', // default: ' ~ (spec.default if spec.enum is defined else spec.default | tojson) -}}
      {%- endif -%}
      {{- ',\n' if not loop.last else '\n' -}}
    {%- endfor -%}
    {{- '}) => any;' -}}
  {%- else -%}
    {{- '() => any;' -}}
  {%- endif -%}
{%- endmacro -%}

{%- macro call_json(name, arguments) -%}
  {{- '{"' ~ name ~ '": ' ~ (arguments if arguments is string else (arguments | tojson)) ~ '}' -}}
{%- endmacro -%}

{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = messages[0].content -%}
  {{- '<|system_start|>' ~ (system.text if system is mapping else system) ~ '<|system_end|>' -}}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {{- '<|system_start|>You are Apertus, a helpful assistant created by the SwissAI initiative.\n'
      ~ 'Knowledge cutoff: 2024-04\nCurrent date: ' ~ strftime_now('%Y-%m-%d')
      ~ '<|system_end|>' -}}
  {%- set loop_messages = messages -%}
{%- endif -%}

{{- '<|developer_start|>Deliberation: '
    ~ ('enabled' if enable_thinking is defined and enable_thinking else 'disabled') ~ '\n' -}}
{%- if tools is defined and tools -%}
  {{- 'Tool Capabilities:\n' -}}
  {%- for tool in tools -%}
    {{- ts_tool(tool) ~ ('\n' if not loop.last else '') -}}
  {%- endfor -%}
{%- else -%}
  {{- 'Tool Capabilities: disabled' -}}
{%- endif -%}
{{- '<|developer_end|>' -}}

{%- set ns = namespace(in_assistant=false, in_tool=false, in_inner=false) -%}
{%- for message in loop_messages -%}
  {%- if message.role == 'system' -%}
    {{- raise_exception('Only the first message may be a system message.') -}}
  {%- elif message.role == 'user' -%}
    {%- if ns.in_tool -%}{{- ']' -}}{%- set ns.in_tool = false -%}{%- endif -%}
    {%- if ns.in_assistant -%}
      {{- '<|assistant_end|>' -}}{%- set ns.in_assistant = false -%}
    {%- endif -%}
    {%- set ns.in_inner = false -%}
    {{- '<|user_start|>' -}}
    {%- if message.content is string -%}
      {{- message.content -}}
    {%- else -%}
      {%- set parts = message.content.parts if message.content is mapping else message.content -%}
      {%- for part in parts -%}
        {%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|user_end|>' -}}
  {%- elif message.role == 'assistant' -%}
    {%- if ns.in_tool -%}{{- ']' -}}{%- set ns.in_tool = false -%}{%- endif -%}
    {%- if not ns.in_assistant -%}
      {{- '<|assistant_start|>' -}}{%- set ns.in_assistant = true -%}
    {%- endif -%}
    {%- if message.content is mapping -%}
      {%- for block in message.content.blocks -%}
        {%- if block.type == 'thoughts' -%}
          {%- if not ns.in_inner -%}
            {{- '<|inner_prefix|>' -}}{%- set ns.in_inner = true -%}
          {%- endif -%}
          {{- block.text -}}
        {%- elif block.type == 'tool_calls' -%}
          {%- if ns.in_inner and not loop.first and block.calls | length == 1
                and block.calls[0].name == 'display_answers' -%}
            {{- '<|inner_suffix|>' -}}{%- set ns.in_inner = false -%}
          {%- endif -%}
          {{- '<|tools_prefix|>[' -}}
          {%- for call in block.calls -%}
            {{- call_json(call.name, call.arguments) ~ (', ' if not loop.last else '') -}}
          {%- endfor -%}
          {{- ']<|tools_suffix|>' -}}
        {%- elif block.type == 'tool_outputs' -%}
          {{- '[' -}}
          {%- for out in block.outputs -%}
            {{- out.output ~ (', ' if not loop.last else '') -}}
          {%- endfor -%}
          {{- ']' -}}
        {%- elif block.type == 'response' -%}
          {%- if ns.in_inner -%}
            {{- '<|inner_suffix|>' -}}{%- set ns.in_inner = false -%}
          {%- endif -%}
          {{- block.text -}}
        {%- else -%}
          {{- raise_exception('Unknown assistant block type: ' ~ block.type) -}}
        {%- endif -%}
      {%- endfor -%}
    {%- elif message.content is defined and message.content is not none -%}
      {{- message.content -}}
    {%- endif -%}
    {%- if message.tool_calls is defined and message.tool_calls -%}
      {{- '<|tools_prefix|>[' -}}
      {%- for call in message.tool_calls -%}
        {%- set fn = call.function if call.function is defined else call -%}
        {{- call_json(fn.name, fn.arguments) ~ (', ' if not loop.last else '') -}}
      {%- endfor -%}
      {{- ']<|tools_suffix|>' -}}
    {%- endif -%}
  {%- elif message.role == 'tool' -%}
    {%- if not ns.in_assistant -%}
      {{- raise_exception('A tool message must follow an assistant message.') -}}
    {%- endif -%}
    {{- ', ' if ns.in_tool else '[' -}}
    {%- set ns.in_tool = true -%}
    {{- message.content -}}
  {%- else -%}
    {{- raise_exception('Unknown message role: ' ~ message.role) -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.in_tool -%}{{- ']' -}}{%- endif -%}
{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}
"""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Same as transformers' filter: Jinja's own escapes HTML characters. Call arguments are
    # RawJSON, JSON already: written as they are, never encoded a second time.
    if isinstance(x, RawJSON):
        return str(x)
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """Accept transformers' `{% generation %}` marker (for training masks); render its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """The template went past one of the limits above."""


@dataclass
class _Budget:
    deadline: float
    iterations: int = MAX_LOOP_ITERATIONS

    def tick(self, n: int = 1) -> None:
        self.iterations -= n
        if self.iterations < 0:
            raise TemplateLimitError(f"more than {MAX_LOOP_ITERATIONS:,} loop iterations")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"rendering took more than {RENDER_SECONDS:g} s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _tick(n: int = 1) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.tick(n)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


def _check_size(size: int) -> None:
    if size > MAX_SIZE:
        raise TemplateLimitError(f"a string or list of {size:,} items (limit {MAX_SIZE:,})")


_NUMBER = re.compile(r"\d{8,}")


def _check_format(fmt: Any) -> None:
    """A width or precision in a format string is a size too: `'%999999999d' % 1`."""
    if isinstance(fmt, str):
        for m in _NUMBER.finditer(fmt):
            _check_size(int(m.group()))


class _LimitedCodeGenerator(CodeGenerator):
    """Routes every `for` loop's iterable and every `~` through the environment's checks."""

    def visit_For(self, node: nodes.For, frame: Any) -> None:
        node.iter = nodes.Call(
            nodes.EnvironmentAttribute("limited_iter"), [node.iter], [], None, None
        )
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.limited_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus the time, loop and size limits of this module."""

    code_generator_class = _LimitedCodeGenerator
    # Intercepted operators are also never folded at compile time, so `7 ** 7 ** 12` in a
    # template cannot hang the load either.
    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick(0)
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > MAX_POWER_BITS:
                raise TemplateLimitError(f"{left} ** {right} is too large")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _check_size(_size(seq) * n)
        elif operator == "+":
            _check_size(_size(left) + _size(right))
        elif operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick(0)
        _check_ints((*args, *kwargs.values()))
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if getattr(method, "__name__", "") in ("format", "format_map"):
            _check_format(getattr(method, "__self__", None))
        return super().call(__context, __obj, *args, **kwargs)

    def limited_iter(self, iterable: Any) -> Any:
        """The loop's items, one budget tick each (also stops a loop that never ends)."""
        for item in iterable:
            _tick()
            yield item

    def limited_concat(self, values: tuple) -> str:
        parts = [str(v) for v in values]
        _check_size(sum(map(len, parts)))
        return "".join(parts)


def _check_ints(values: tuple) -> None:
    """An integer argument is a size or a width (`center`, `ljust`, `range`...)."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            _check_size(abs(value))


def _limited_filter(name: str, f: Any) -> Any:
    """A built-in filter whose numeric arguments are checked like a call's."""
    skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # (context/environment,) value, arguments

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _check_ints((*args[skip:], *kwargs.values()))
        if name == "format":
            _check_format(args[skip - 1])
        return f(*args, **kwargs)

    if hasattr(f, "jinja_pass_arg"):
        wrapped.jinja_pass_arg = f.jinja_pass_arg  # type: ignore[attr-defined]
    return wrapped


def compile_template(source: str) -> jinja2.Template:
    """Compile `source` in an environment equivalent to transformers' (sandboxed, same helpers)."""
    env = LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters = {name: _limited_filter(name, f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_limited(template: jinja2.Template, **context: Any) -> str:
    """Render within this module's limits; any failure is one TokenizerError."""
    token = _budget.set(_Budget(time.monotonic() + RENDER_SECONDS))
    try:
        return template.render(**context)
    except TemplateLimitError as e:
        raise TokenizerError(f"the chat template went past a limit: {e}") from None
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template refused this conversation: {e}") from None
    except RecursionError:
        raise TokenizerError("the chat template recursed too deep") from None
    except MemoryError:
        raise TokenizerError("the chat template ran out of memory") from None
    except Exception as e:  # noqa: BLE001 - template code may raise anything
        raise TokenizerError(
            f"the chat template failed: {type(e).__name__}: {' '.join(str(e).split())}"
        ) from None
    finally:
        _budget.reset(token)
