"""Reading and validating the datasets (README, "Data formats"): one record a JSON line, Parquet row or dataset
row, from any source `minimind.sources` reads (JSONL, .jsonl.gz, .jsonl.zst, Parquet, a directory, a glob, hf:).

Every problem is reported as `file:line: what is wrong` (`file:row N: ...` for a Parquet or dataset row). With `skip_bad_lines` a bad line is counted and
skipped instead, and the caller reports the count at the end. Shapes (MiniMind2's):
  pretrain  {"text": "..."}
  sft       {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": "...", "reasoning_content"?}]}
            With function calling: the functions offered as a top-level "tools" list (OpenAI's form) or as the
            system turn's "functions" (MiniMind's form); an assistant turn may carry "tool_calls" (OpenAI's
            {"function": {"name", "arguments"}} or plain {"name", "arguments"}; its content may then be empty),
            and a "tool" turn holds a function's result.
  rlaif     same as sft; the last assistant turn holds the reference answer. A prompt alone (ending with a user
            turn), or a last assistant turn that is empty or MiniMind's placeholder "空" (its rlaif-mini.jsonl),
            has no reference answer (""). A top-level "gt" (minimind-3's rlaif*.jsonl and agent_rl*.jsonl) is
            the reference answer; a last assistant turn beside it is then only a slot and is dropped
  dpo       {"chosen": [messages], "rejected": [messages]}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind.errors import UserError
from minimind.sources import is_line, iter_items

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict[str, Any]]


class BadRecord(ValueError):
    """A record that does not have the expected shape; the message says what is wrong, without the location."""


def validate_text(obj: Any) -> str:
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj:
        raise BadRecord('missing field "text"')
    text = obj["text"]
    if not isinstance(text, str):
        raise BadRecord(f'field "text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise BadRecord('field "text" is empty')
    return text


def validate_messages(messages: Any, name: str = "conversations", need_assistant: bool = True) -> Messages:
    """Check a chat: a non-empty list of {role, content} with known roles, system only first."""
    if not isinstance(messages, list):
        raise BadRecord(f'field "{name}" must be a list of messages, got {type(messages).__name__}')
    if not messages:
        raise BadRecord(f'field "{name}" is an empty list')
    clean: Messages = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise BadRecord(f"{where} must be an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise BadRecord(f"{where} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise BadRecord(f"{where}: a system message may only come first")
        if role in ("assistant", "tool") and i == 0:
            article = "an" if role == "assistant" else "a"
            raise BadRecord(f"{where} is {article} {role} turn; a conversation starts with a system or user turn")
        calls = _tool_calls(message.get("tool_calls"), where) if role == "assistant" else None
        content = message.get("content")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise BadRecord(f'{where} field "content" must be a string, got {type(content).__name__}')
        # An empty system turn is harmless (tool data often has one that only carries the tools); an empty
        # user or assistant turn is a broken record.
        if not content.strip() and not calls and role != "system":
            raise BadRecord(f'{where} field "content" is empty')
        turn: dict[str, Any] = {"role": role, "content": content}
        if calls:
            turn["tool_calls"] = calls
        for key in ("functions", "tools"):  # MiniMind's SFT data says functions, its agentic data tools
            if role == "system" and message.get(key):
                turn["functions"] = offered_functions(message[key], f"{where}.{key}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant" or not isinstance(reasoning, str):
                raise BadRecord(f'{where} field "reasoning_content" must be a string on an assistant turn')
            # An empty one is kept where the content holds a </think>: minimind-3's template then renders the
            # content as written instead of reading reasoning out of it.
            if reasoning.strip() or (reasoning == "" and "</think>" in content):
                turn["reasoning_content"] = reasoning
        clean.append(turn)
    if need_assistant and not any(m["role"] == "assistant" for m in clean):
        raise BadRecord(f'field "{name}" has no assistant turn to learn from')
    if not any(m["role"] == "user" for m in clean):
        raise BadRecord(f'field "{name}" has no user turn')
    return clean


def _from_json_text(value: Any, what: str) -> Any:
    """A value some data writes as JSON text (tool lists, calls, arguments) decoded; other values as they are."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise BadRecord(f"{what} is a string but not valid JSON") from None


def _tool_calls(calls: Any, where: str) -> list[dict] | None:
    """An assistant turn's calls as [{"type": "function", "function": {"name", "arguments": {...}}}]."""
    if calls is None or calls == [] or calls == "":
        return None
    calls = _from_json_text(calls, f'{where} field "tool_calls"')
    if not isinstance(calls, list):
        raise BadRecord(f'{where} field "tool_calls" must be a list, got {type(calls).__name__}')
    clean = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRecord(f'{at} must be an object with a function "name"')
        arguments = _from_json_text(function.get("arguments", {}), f'{at} "arguments"')
        if not isinstance(arguments, dict):
            raise BadRecord(f'{at} "arguments" must be a JSON object, got {type(arguments).__name__}')
        clean.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return clean


def offered_functions(tools: Any, where: str) -> list[dict]:
    """The functions offered: a list (or its JSON text, as MiniMind's and HF's tool data write it) of objects,
    each a function schema or {"type": "function", "function": ...}."""
    tools = _from_json_text(tools, where)
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise BadRecord(f"{where} must be a list of function objects")
    for j, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRecord(f'{where}[{j}] has no function "name"')
    return tools


def _conversations(obj: Any) -> Any:
    """The (still unchecked) "conversations" field of a record that must be an object holding one."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" not in obj:
        raise BadRecord('missing field "conversations"')
    return obj["conversations"]


def _with_tools(obj: dict, messages: Messages) -> Messages:
    """A record's top-level "tools" ride on its first turn as "functions", where `chat.render` finds them."""
    if obj.get("tools"):
        messages[0]["functions"] = offered_functions(obj["tools"], "tools")
    return messages


def validate_sft(obj: Any) -> Messages:
    return _with_tools(obj, validate_messages(_conversations(obj)))


# What an rlaif record's last assistant turn holds when it has no reference answer: nothing, or the placeholder
# MiniMind's rlaif-mini.jsonl writes ("空", "empty"), which would otherwise be matched as the answer.
NO_ANSWER = ("", "空")


def validate_rlaif(obj: Any) -> tuple[Messages, str]:
    """-> (prompt messages, reference answer or ""); the prompt is everything before the last assistant turn,
    or the whole conversation when it ends with a user turn."""
    messages = _conversations(obj)
    if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict):
        last = messages[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str) \
                and last["content"].strip() in NO_ANSWER:
            messages = messages[:-1]  # an answer slot left blank
    messages = _with_tools(obj, validate_messages(messages, need_assistant=False))
    answer = ""
    if messages[-1]["role"] == "assistant":
        answer, messages = messages[-1]["content"], messages[:-1]
    if messages[-1]["role"] != "user":
        raise BadRecord("the prompt must end with a user turn")
    if obj.get("gt") is not None:
        answer = _reference(obj["gt"])
    return messages, answer


def _reference(gt: Any) -> str:
    """minimind-3's "gt" field as the reference answer text (numbers written as JSON writes them)."""
    if isinstance(gt, str):
        return gt
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        return json.dumps(gt)
    raise BadRecord(f'field "gt" (the reference answer) must be a string or a number, got {type(gt).__name__}')


def validate_dpo(obj: Any) -> tuple[Messages, Messages]:
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise BadRecord(f'missing field "{key}"')
    chosen = validate_messages(obj["chosen"], "chosen")
    rejected = validate_messages(obj["rejected"], "rejected")
    return chosen, rejected


VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "pretrain": validate_text,
    "sft": validate_sft,
    "rlaif": validate_rlaif,
    "dpo": validate_dpo,
}


@dataclass
class ReadStats:
    """What a read saw: good records, skipped bad lines, and the first few skip reasons for the report."""

    good: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def reject(self, path: str | Path, lineno: int, reason: str, skip_bad_lines: bool, unit: str = "line") -> None:
        """Raise `file:line: reason` (`file:row N: reason` with unit "row"), or count the record as skipped."""
        if not skip_bad_lines:
            raise UserError(f"{path}:{lineno}: {reason}" if unit == "line" else f"{path}:{unit} {lineno}: {reason}")
        self.skipped += 1
        if len(self.examples) < 3:
            self.examples.append(f"{unit} {lineno}: {reason}")

    def check_any(self, path: str | Path, kind: str) -> None:
        if self.good == 0:
            detail = f" ({self.skipped} bad lines skipped)" if self.skipped else ""
            raise UserError(f"{path}: no usable {kind} records{detail}")

    def summary(self, path: str | Path) -> str:
        text = f"{path}: {self.good} records read, {self.skipped} bad lines skipped"
        if self.examples:
            text += " (first: " + "; ".join(self.examples) + ")"
        return text


def read_records(
    path: str | Path,
    kind: str,
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
    validate: Callable[[Any], Any] | None = None,
) -> Iterator[Any]:
    """Yield validated records of `kind` from a data source (a JSONL file, .jsonl.gz, .jsonl.zst, Parquet, a
    directory or glob of them, or hf:org/name), streaming (never loads a file whole).

    Raises UserError `file:line: problem` on the first bad record unless `skip_bad_lines`, in which case bad
    records are counted in `stats`. Blank lines are ignored. `validate` (raising BadRecord) reads a shape not
    in VALIDATORS, e.g. evaluation sets; `kind` then only names the records in messages.
    """
    if validate is None:
        if kind not in VALIDATORS:
            raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(VALIDATORS)}")
        validate = VALIDATORS[kind]
    stats = stats if stats is not None else ReadStats()
    for where, number, payload in iter_items(path):
        try:
            record = parse_item(payload, kind, validate)
        except BadRecord as err:
            stats.reject(where, number, str(err), skip_bad_lines, "line" if is_line(payload) else "row")
            continue
        if record is not None:
            stats.good += 1
            yield record
    stats.check_any(path, kind)


def parse_item(payload: Any, kind: str, validate: Callable[[Any], Any] | None = None) -> Any:
    """One item of a source (a raw JSON line, or a decoded Parquet/dataset row) -> a validated record of
    `kind`, None for a blank line; BadRecord says what is wrong."""
    if is_line(payload):
        return parse_record(payload, kind, validate)
    return (validate or VALIDATORS[kind])(payload)


def parse_record(raw: bytes, kind: str, validate: Callable[[Any], Any] | None = None) -> Any:
    """One JSONL line -> a validated record of `kind`, None for a blank line; BadRecord says what is wrong."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(f"not valid UTF-8 (byte {err.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRecord(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise BadRecord("JSON nested too deeply") from None
    except ValueError as err:  # an integer past Python's digit limit: "Exceeds the limit (4300 digits) ..."
        raise BadRecord(f"not valid JSON ({str(err).split(':')[0]})") from None
    if b"\\ud" in raw.lower():
        check_no_surrogates(obj)
    return (validate or VALIDATORS[kind])(obj)


def check_no_surrogates(obj: Any) -> None:
    """JSON may escape a lone UTF-16 surrogate (\\ud800) that no tokenizer can encode; refuse it here."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRecord(f"contains an unpaired surrogate escape ({err.object[err.start]!r}), which is not text") \
            from None
    except RecursionError:
        raise BadRecord("JSON nested too deeply") from None
