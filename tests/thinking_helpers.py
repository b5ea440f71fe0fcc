"""A chat template with a thinking switch, written here so the switch's plumbing is tested apart from any
real template: like minimind-3's and Qwen3's, its generation prompt opens a think block (`<think>\n`) when
`open_thinking` (or `enable_thinking`) is true, and closes an empty one (`<think>\n\n</think>\n\n`) otherwise."""

from __future__ import annotations

import copy
import json
from pathlib import Path

THINKING_TEMPLATE = (
    "{%- set thinking = open_thinking if open_thinking is defined"
    " else (enable_thinking is defined and enable_thinking) -%}"
    "{%- for m in messages -%}{{- bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' -}}{%- endfor -%}"
    "{%- if note is defined -%}{{- note + '\\n' -}}{%- endif -%}"  # a variable a request may set to a wrong type
    "{%- if add_generation_prompt -%}{{- bos_token + 'assistant\\n' -}}"
    "{{- '<think>\\n' if thinking else '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
)


def with_thinking_template(tokenizer):
    """A copy of `tokenizer` whose chat template has the thinking switch."""
    switched = copy.deepcopy(tokenizer)
    switched.chat_template = THINKING_TEMPLATE
    return switched


def save_thinking_template(directory: Path) -> None:
    """Put the template with the switch into a saved model or tokenizer directory's tokenizer_config.json."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = THINKING_TEMPLATE
    config_path.write_text(json.dumps(config, ensure_ascii=False))
