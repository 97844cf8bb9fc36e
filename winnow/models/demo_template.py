"""The demo model's Mistral-v3-style chat template (Jinja, rendered by transformers' sandbox).

Layout: `<s>` then, per message:
- user: `[INST] {content}[/INST]`. All system messages, joined by a blank line, are prepended to
  the LAST user message (as mistral_common does), separated from it by a blank line; with no user
  message they form their own `[INST] ...[/INST]` turn at the start.
- `tools` (OpenAI format, as given): `[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]` right before the
  last user message.
- assistant: ` {content}</s>`; with `tool_calls`: ` {content}` if any, then
  `[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}]</s>`. `arguments` may be an
  object or (OpenAI style) a JSON string, which is inserted verbatim.
- tool: `[TOOL_RESULTS] {"content": ..., "call_id": ...}[/TOOL_RESULTS]`.
The generation prompt adds nothing: the assistant turn starts right after `[/INST]` or
`[/TOOL_RESULTS]`. Content may be a string or a list of OpenAI `{"type": "text"}` parts.
"""

DEMO_CHAT_TEMPLATE = r"""
{%- macro text(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable -%}
        {%- for part in content if part.type == "text" -%}
            {{- part.text -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system="", last_user=-1) -%}
{%- for message in messages -%}
    {%- if message.role == "system" -%}
        {%- set ns.system = ns.system ~ ("\n\n" if ns.system else "") ~ text(message.content) -%}
    {%- elif message.role == "user" -%}
        {%- set ns.last_user = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- if ns.last_user < 0 and ns.system -%}
    {{- "[INST] " ~ ns.system ~ "[/INST]" -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == "user" -%}
        {%- if loop.index0 == ns.last_user -%}
            {%- if tools -%}
                {{- "[AVAILABLE_TOOLS] " ~ (tools | tojson) ~ "[/AVAILABLE_TOOLS]" -}}
            {%- endif -%}
            {%- set prefix = ns.system ~ "\n\n" if ns.system else "" -%}
        {%- else -%}
            {%- set prefix = "" -%}
        {%- endif -%}
        {{- "[INST] " ~ prefix ~ text(message.content) ~ "[/INST]" -}}
    {%- elif message.role == "assistant" -%}
        {%- set content = text(message.content) -%}
        {%- if content -%}
            {{- " " ~ content -}}
        {%- endif -%}
        {%- if message.tool_calls -%}
            {{- "[TOOL_CALLS] [" -}}
            {%- for call in message.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- set args = fn.arguments if fn.arguments is defined else {} -%}
                {{- '{"name": ' ~ (fn.name | tojson) ~ ', "arguments": ' -}}
                {{- args if args is string else (args | tojson) -}}
                {%- if call.id is defined and call.id -%}
                    {{- ', "id": ' ~ (call.id | tojson) -}}
                {%- endif -%}
                {{- "}" ~ (", " if not loop.last else "") -}}
            {%- endfor -%}
            {{- "]" -}}
        {%- endif -%}
        {{- eos_token -}}
    {%- elif message.role == "tool" -%}
        {{- '[TOOL_RESULTS] {"content": ' ~ (text(message.content) | tojson) -}}
        {%- if message.tool_call_id is defined and message.tool_call_id -%}
            {{- ', "call_id": ' ~ (message.tool_call_id | tojson) -}}
        {%- endif -%}
        {{- "}[/TOOL_RESULTS]" -}}
    {%- elif message.role != "system" -%}
        {{- raise_exception("unsupported message role: " ~ message.role) -}}
    {%- endif -%}
{%- endfor -%}
"""
