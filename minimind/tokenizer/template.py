"""The chat templates and the special tokens they are written against: ours (MiniMind2-style, the default) and
minimind-3's (ChatML with a `<think>` block on every assistant turn and a thinking switch), further down.

Our rendered form, with a default system prompt when the conversation has none:
    <s>system\n{system}</s>\n<s>user\n{user}</s>\n<s>assistant\n{assistant}</s>\n
The template speaks of `bos_token`/`eos_token` rather than literal `<s>`/`</s>`, so a tokenizer whose
specials are, say, `<|im_start|>`/`<|im_end|>` gets the same ChatML structure with its own markers.
An assistant turn with `reasoning_content` renders as `<think>…</think><answer>…</answer>`; pass
`show_thinking=False` to `apply_chat_template` to drop the reasoning of earlier turns; `split_thinking(reply)` splits
a generated reply back into (thinking, answer).
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ---- minimind-3's chat format ---------------------------------------------------------------------------------
# The 36 added tokens of today's MiniMind (minimind-3) tokenizer, at ids 0..35. The first MINIMIND3_N_SPECIAL are
# special (skipped when decoding with skip_special_tokens); the tool, think and buffer tokens are plain added tokens.
MINIMIND3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    *[f"<|buffer{i}|>" for i in range(1, 10)],
]
MINIMIND3_N_SPECIAL = 21
MINIMIND3_BOS, MINIMIND3_EOS, MINIMIND3_PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what an assistant turn without reasoning opens with

# The tools preamble is part of the rendered text a minimind-3 model was trained on, so it is kept word for word.
_M3_TOOLS_INTRO = (
    "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
)
_M3_TOOLS_HOW = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call>"
)

# Rendered form (the ChatML of Qwen3, which minimind-3 follows):
#   [<|im_start|>system\n{system}[\n\n{tools preamble}]<|im_end|>\n]      only when there is a system turn or tools
#   <|im_start|>user\n{user}<|im_end|>\n
#   <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{answer}[\n<tool_call>…</tool_call>]<|im_end|>\n
#   <|im_start|>user\n<tool_response>\n{result}\n</tool_response>[…]<|im_end|>\n   consecutive tool turns, merged
# Reasoning comes from `reasoning_content`, or from a `<think>…</think>` written into the content. The generation
# prompt is `<|im_start|>assistant\n` and then an empty think block, or only `<think>\n` when thinking is switched
# on: `open_thinking=True` (minimind-3's name) or `enable_thinking=True` (Qwen3's); off when neither is given.
MINIMIND3_CHAT_TEMPLATE = (
    "{%- set first = messages[0] if messages else none -%}"
    "{%- set opens_with_system = first is not none and first['role'] == 'system' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if opens_with_system -%}{{- first['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '" + _M3_TOOLS_INTRO + "' -}}"
    "{%- if tools is string -%}{{- '\\n' + tools -}}"  # JSON text, as some data keeps it
    "{%- else -%}{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}{%- endif -%}"
    "{{- '" + _M3_TOOLS_HOW + "<|im_end|>\\n' -}}"
    "{%- elif opens_with_system -%}"
    "{{- '<|im_start|>system\\n' + first['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- set text = message['content'] if message['content'] is string else '' -%}"
    "{%- if role == 'user' or (role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + role + '\\n' + text + '<|im_end|>\\n' -}}"
    "{%- elif role == 'assistant' -%}"
    "{%- if message['reasoning_content'] is string -%}"
    "{%- set thought = message['reasoning_content'] -%}"
    "{%- elif '</think>' in text -%}"  # reasoning written inline: <think>…</think> then the answer
    "{%- set thought = text.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set text = text.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- else -%}"
    "{%- set thought = '' -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + text.lstrip('\\n') -}}"
    "{%- for call in (message['tool_calls'] or []) -%}"
    "{%- if text or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set fn = call['function'] if call['function'] is defined and call['function'] else call -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' -}}"
    "{{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif role == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + text + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if open_thinking is defined -%}{%- set thinking = open_thinking is true -%}"
    "{%- else -%}{%- set thinking = enable_thinking is defined and enable_thinking is true -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' + ('<think>\\n' if thinking else '" + "<think>\\n\\n</think>\\n\\n" + "') -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class TokenizerFormat:
    """What a tokenizer trained for one chat format holds: its added tokens at ids 0..n-1 (the first `n_special`
    of them special), its markers and its chat template."""

    name: str
    added_tokens: tuple[str, ...]
    n_special: int
    bos: str
    eos: str
    unk: str
    pad: str
    chat_template: str
    additional_special_tokens: tuple[str, ...] = ()


FORMATS = {
    "minimind2": TokenizerFormat("minimind2", tuple(SPECIAL_TOKENS), len(SPECIAL_TOKENS), BOS, EOS, UNK, UNK,
                                 CHAT_TEMPLATE),
    "minimind3": TokenizerFormat("minimind3", tuple(MINIMIND3_SPECIAL_TOKENS), MINIMIND3_N_SPECIAL, MINIMIND3_BOS,
                                 MINIMIND3_EOS, MINIMIND3_PAD, MINIMIND3_PAD, MINIMIND3_CHAT_TEMPLATE,
                                 tuple(MINIMIND3_SPECIAL_TOKENS[1:MINIMIND3_N_SPECIAL])),
}
