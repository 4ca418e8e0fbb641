"""Render chat templates the way transformers does, so prompts match the model's training format.

The checkpoint's own Jinja template is the authority; `APERTUS_TEMPLATE` is our copy of the
documented Apertus 2509 format for checkpoints that ship none.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Written from the format described in swiss-ai/apertus_format and the Apertus-8B-Instruct-2509
# model card: <s>, system block (a dated default when absent), developer block (deliberation and
# TypeScript tool declarations), user turns, assistant turns that also hold tool calls and outputs.
APERTUS_TEMPLATE = r"""
{%- macro ts_type(spec) -%}
  {%- if spec is not mapping or spec.oneOf is defined or spec.anyOf is defined -%}
    {{- 'any' -}}
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
  {{- ' | null' if spec is mapping and spec.nullable else '' -}}
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
    # Same as transformers' filter: Jinja's own escapes HTML characters.
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


def compile_template(source: str) -> jinja2.Template:
    """Compile `source` in an environment equivalent to transformers' (sandboxed, same helpers)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
