"""The chat template (seed/SPEC §5) and the special tokens it is written against.

Rendered form, with a default system prompt when the conversation has none:
    <s>system\n{system}</s>\n<s>user\n{user}</s>\n<s>assistant\n{assistant}</s>\n
The template speaks of `bos_token`/`eos_token` rather than literal `<s>`/`</s>`, so a tokenizer whose
specials are, say, `<|im_start|>`/`<|im_end|>` gets the same ChatML structure with its own markers.
An assistant turn with `reasoning_content` renders as `<think>…</think><answer>…</answer>`; pass
`show_thinking=False` to `apply_chat_template` to drop the reasoning of earlier turns; `split_thinking(reply)` splits
a generated reply back into (thinking, answer).
"""

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [UNK, BOS, EOS]  # ids 0, 1, 2; <unk> doubles as padding
DEFAULT_SYSTEM_PROMPT = "你是MiniMind，一个乐于助人的AI助手。"

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# What the system turn says when tools are offered, as Jinja string literals (our wording; the <tools> and
# <tool_call> tags are the convention Qwen2.5, Hermes and MiniMind's tool data share, so parsers carry over).
_TOOLS_INTRO = "\\n\\n# Tools\\n\\nThese functions are available, one JSON schema a line:\\n<tools>"
_TOOLS_HOW = (
    "\\n</tools>\\n\\nTo call a function, answer with a JSON object of its name and arguments between tags, "
    "one block per call:\\n" + TOOL_CALL_OPEN + '\\n{"name": <function name>, "arguments": <arguments object>}\\n'
    + TOOL_CALL_CLOSE
)

CHAT_TEMPLATE = (
    "{%- set show = show_thinking is not defined or show_thinking -%}"
    # tools: the `tools` argument of apply_chat_template, or MiniMind's data form (a system turn's "functions")
    "{%- if tools is not defined or not tools -%}{%- set tools = none -%}"
    "{%- if messages and messages[0]['role'] == 'system' and messages[0]['functions'] is defined -%}"
    "{%- set tools = messages[0]['functions'] -%}"
    "{%- endif -%}{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- bos_token + 'system\\n' + system -}}"
    "{%- if tools -%}"
    "{{- '" + _TOOLS_INTRO + "' -}}"
    "{%- if tools is string -%}{{- '\\n' + tools -}}"  # JSON text, as some data keeps it
    "{%- else -%}{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}{%- endif -%}"
    "{{- '" + _TOOLS_HOW + "' -}}"
    "{%- endif -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- for message in turns -%}"
    "{{- bos_token + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] and show -%}"
    "{{- '<think>' + message['reasoning_content'] + '</think><answer>' + content + '</answer>' -}}"
    "{%- else -%}"
    "{{- content -}}"
    "{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '" + TOOL_CALL_OPEN + "\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}"
    "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}"
    "{%- elif fn['arguments'] is defined -%}{{- fn['arguments'] | tojson -}}"
    "{%- else -%}{{- '{}' -}}{%- endif -%}"
    "{{- '}\\n" + TOOL_CALL_CLOSE + "' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- message['content'] -}}"
    "{%- endif -%}"
    "{{- eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- bos_token + 'assistant\\n' -}}{%- endif -%}"
)


def split_thinking(reply: str) -> tuple[str | None, str]:
    """A generated reply -> (thinking or None, answer), the inverse of the template's reasoning rendering.

    `<think>a</think><answer>b</answer>` -> ("a", "b"); without answer tags the answer is what follows `</think>`;
    an unfinished `<think>…` is all thinking; a reply without tags is all answer. A chat front end hides the
    thinking by printing only the answer, and keeps the turn as {content: answer, reasoning_content: thinking} so
    `show_thinking=False` can drop it from the history.
    """
    thinking = None
    rest = reply
    if "<think>" in reply:
        before, _, after = reply.partition("<think>")
        thought, closed, rest = after.partition("</think>")
        thinking = thought.strip()
        rest = before + rest if closed else before
    if "<answer>" in rest:
        rest = rest.partition("<answer>")[2].partition("</answer>")[0]
    return thinking, rest.strip()
