"""Reading function calls back out of a generated reply: the inverse of the chat template's tool-call rendering.

The template writes each call of an assistant turn as
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Beijing"}}
    </tool_call>
after whatever text the turn says first. `parse_tool_calls` turns a reply of that shape into (text, calls);
anything else (no tags, JSON that does not parse, a call cut off by max_tokens, a function that was not
offered) is left as plain text, so a client never receives a call it cannot execute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from minimind.tokenizer.template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_PROBE = "minimind_probe_function"


@dataclass(frozen=True)
class ToolCall:
    """One function call: its name and its arguments as JSON text of an object (OpenAI's form)."""

    name: str
    arguments: str


def parse_tool_calls(reply: str, names: set[str] | frozenset[str] | None = None) -> tuple[str, list[ToolCall]] | None:
    """-> (the text before the first call, stripped; the calls), or None when the reply holds no well-formed
    call. `names`: the functions offered; a call to any other makes the whole reply plain text."""
    first = reply.find(TOOL_CALL_OPEN)
    if first < 0:
        return None
    calls = []
    rest = reply[first:]
    while rest.strip():
        rest = rest.lstrip()
        if not rest.startswith(TOOL_CALL_OPEN):
            return None  # text after a call: not the template's shape
        body, _, rest = rest[len(TOOL_CALL_OPEN):].partition(TOOL_CALL_CLOSE)  # the last one may lack its close
        call = _read_call(body)
        if call is None or (names is not None and call.name not in names):
            return None
        calls.append(call)
    return reply[:first].strip(), calls


def _read_call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some data writes the arguments as JSON text, as OpenAI's API does
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def safe_text_end(text: str) -> int:
    """How much of a reply being streamed can be sent as text now: up to the first `<tool_call>`, and short of a
    trailing piece that may still become one."""
    first = text.find(TOOL_CALL_OPEN)
    if first >= 0:
        return first
    for keep in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows the model the `tools` it is given (older templates drop them)."""
    tool = {"type": "function", "function": {"name": _PROBE, "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template failure means it cannot render tools
        return False
    return _PROBE in text
