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

CHAT_TEMPLATE = (
    "{%- set show = show_thinking is not defined or show_thinking -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- bos_token + 'system\\n' + messages[0]['content'] + eos_token + '\\n' -}}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{- bos_token + 'system\\n" + DEFAULT_SYSTEM_PROMPT + "' + eos_token + '\\n' -}}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{{- bos_token + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
    " and message['reasoning_content'] and show -%}"
    "{{- '<think>' + message['reasoning_content'] + '</think><answer>' + message['content'] + '</answer>' -}}"
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
