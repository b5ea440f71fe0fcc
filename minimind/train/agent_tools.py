"""Tools for agentic RL (`minimind agent --tools tools.py`): loading a tools file, the JSON schemas the chat
template shows the model, checking a call's arguments, and running calls in a separate process with a timeout.

A tools file is a Python module. Its tools are the names in a `TOOLS` list when it has one (functions, or dicts
`{"function": f, "schema": {...}}` giving an explicit OpenAI-style schema), else every public function defined
in the module. A schema not given explicitly is read off the signature (annotations int/float/str/bool/list/dict
-> JSON types; a parameter without a default is required) and the docstring's first line (the description).

Calls run in one worker process (`python -c`, the tools file imported there, not in the trainer), one JSON line
per call and per answer. A call that raises gets an error answer; one that runs past the timeout, or kills its
process, gets an error answer too and the worker is restarted, so a bad tool costs its episode, not the run.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import select
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind.errors import UserError

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
# What a JSON value of each schema type may be in Python (bool is an int subclass: kept out of the numbers).
_ACCEPTS = {"integer": (int,), "number": (int, float), "string": (str,), "boolean": (bool,), "array": (list,),
            "object": (dict,)}
RESULT_CHARS = 1024  # a tool's answer is cut to this many characters before it goes back to the model


@dataclass
class Tool:
    """One tool: its name, the function, and the OpenAI-style schema the chat template renders."""

    name: str
    function: Callable
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}

    def check(self, arguments: dict) -> str | None:
        """None if `arguments` fit the schema (required present, no unknown names, JSON types), else why not."""
        params = self.schema["function"].get("parameters", {})
        properties = params.get("properties", {})
        missing = [p for p in params.get("required", []) if p not in arguments]
        if missing:
            return f"missing argument {missing[0]!r}"
        for key, value in arguments.items():
            if key not in properties:
                return f"unknown argument {key!r}"
            kind = properties[key].get("type")
            accepted = _ACCEPTS.get(kind)
            if accepted and (not isinstance(value, accepted) or (kind != "boolean" and isinstance(value, bool))):
                return f"argument {key!r} should be {kind}"
        return None


def schema_from_signature(name: str, function: Callable) -> dict:
    """An OpenAI-style function schema read off `function`'s signature and docstring."""
    properties, required = {}, []
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        spec = {}
        annotation = param.annotation
        if isinstance(annotation, str):  # `from __future__ import annotations` leaves the names as text
            annotation = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(
                annotation.split("|")[0].strip(), annotation)
        if annotation in _JSON_TYPES:
            spec["type"] = _JSON_TYPES[annotation]
        properties[param.name] = spec
        if param.default is param.empty:
            required.append(param.name)
    doc = inspect.getdoc(function) or ""
    return {"type": "function", "function": {
        "name": name, "description": doc.splitlines()[0] if doc else "",
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def _import_error(path: Path, err: BaseException) -> UserError:
    """One line naming the tools file's line where importing it failed."""
    line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    if line is None:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == path]
        line = frames[-1].lineno if frames else None
    where = f"{path}:{line}" if line else str(path)
    return UserError(f"{where}: the tools file does not import: {type(err).__name__}: {err}")


def load_tools(path: str | Path) -> dict[str, Tool]:
    """The tools a tools file defines, by name (see the module docstring), or a one-line error."""
    path = Path(path).resolve()
    if not path.is_file():
        raise UserError(f"--tools {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"minimind_user_tools_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as err:  # noqa: BLE001 - anything the user's module raises is their error to fix
        raise _import_error(path, err) from None
    entries = getattr(module, "TOOLS", None)
    if entries is None:
        entries = [f for n, f in vars(module).items() if inspect.isfunction(f) and not n.startswith("_")
                   and f.__module__ == module.__name__]
    if not isinstance(entries, (list, tuple)):
        raise UserError(f"{path}: TOOLS must be a list of functions or {{'function': f, 'schema': {{...}}}} dicts")
    tools = {}
    for i, entry in enumerate(entries):
        function, schema = (entry.get("function"), entry.get("schema")) if isinstance(entry, dict) else (entry, None)
        if not callable(function):
            raise UserError(f"{path}: TOOLS[{i}] is not a function or a {{'function': f, 'schema': {{...}}}} dict")
        if schema is None:
            name, schema = function.__name__, schema_from_signature(function.__name__, function)
        else:
            inner = schema.get("function", schema) if isinstance(schema, dict) else None
            name = inner.get("name") if isinstance(inner, dict) else None
            if not isinstance(name, str) or not name:
                raise UserError(f"{path}: TOOLS[{i}]['schema'] names no function (expected {{'type': 'function', "
                                "'function': {'name': ..., 'parameters': {...}}} or the inner object)")
            schema = {"type": "function", "function": inner}
        tools[name] = Tool(name, function, schema)
    if not tools:
        raise UserError(f"{path}: defines no tools (public functions, or a TOOLS list)")
    return tools


# The worker: imports the tools file, then answers one JSON line per call. The tool's own prints go to stderr
# (fd 1 is pointed there) so they cannot corrupt the answers, which use a copy of the original stdout.
_WORKER = r"""
import importlib.util, json, os, sys, traceback
answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)
spec = importlib.util.spec_from_file_location("minimind_tools_worker", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
entries = getattr(module, "TOOLS", None)
if entries is None:
    entries = [f for n, f in vars(module).items() if callable(f) and not n.startswith("_")]
functions = {}
for entry in entries:
    if isinstance(entry, dict):
        schema = entry.get("schema")
        functions[schema.get("function", schema)["name"] if schema else entry["function"].__name__] = entry["function"]
    else:
        functions[getattr(entry, "__name__", "")] = entry
answers.write("ready\n"); answers.flush()
for line in sys.stdin:
    call = json.loads(line)
    try:
        answer = {"result": functions[call["name"]](**call["arguments"])}
        json.dumps(answer)
    except BaseException as err:
        answer = {"error": f"{type(err).__name__}: {err}"}
    answers.write(json.dumps(answer, ensure_ascii=False, default=str) + "\n"); answers.flush()
"""


@dataclass
class ToolResult:
    """What a call returned: `text` for the tool turn, `failed` when the tool raised, timed out or died."""

    text: str
    failed: bool


class ToolRunner:
    """Runs tool calls in a worker process; a call past `timeout` seconds is killed and answered with an error."""

    def __init__(self, path: str | Path, timeout: float = 5.0):
        self.path, self.timeout = str(Path(path).resolve()), timeout
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, self.path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        if self._read(max(self.timeout, 30.0)) != "ready":
            self.close()
            raise UserError(f"{self.path}: the tools file does not import in a fresh Python process")

    def _read(self, timeout: float) -> str | None:
        """One line from the worker; None when it stayed silent for `timeout` s, "" when it exited."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline().rstrip("\n")

    def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Run one call; its result as JSON text (cut to RESULT_CHARS), or an error that says what went wrong."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"name": name, "arguments": arguments}) + "\n")
            self.proc.stdin.flush()
            line = self._read(self.timeout)
        except OSError:  # the worker is gone (a broken pipe)
            line = ""
        if not line:
            timed_out = line is None
            self.close()  # a hung or dead worker is replaced on the next call
            why = f"timed out after {self.timeout:g} s" if timed_out else "crashed (its process exited)"
            return ToolResult(json.dumps({"error": f"{name} {why}"}), failed=True)
        answer = json.loads(line)
        if "error" in answer:
            return ToolResult(json.dumps({"error": answer["error"]}, ensure_ascii=False)[:RESULT_CHARS], failed=True)
        result = answer["result"]
        text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        return ToolResult(text[:RESULT_CHARS], failed=False)

    def close(self) -> None:
        """Stop the worker (killed: a hung tool would never read its end of input)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None

    def __del__(self) -> None:
        self.close()

