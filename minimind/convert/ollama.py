"""The Ollama `Modelfile` written beside every GGUF export, so the file runs with `ollama create` / `ollama run`.

    ollama create minimind -f runs/Modelfile && ollama run minimind

It names the GGUF file (`FROM ./model.gguf`), gives the chat format as an Ollama TEMPLATE (Go template syntax:
`.System`, `.Tools`, `.Messages`, `.Think`), the tokens that end a reply (`PARAMETER stop`) and the sampling
defaults of the model's generation_config.json. The format is chosen from the tokenizer's chat template:

- minimind-3's (ChatML with a `<think>` block on every assistant turn): `<|im_start|>role\\n…<|im_end|>\\n`, the
  generation prompt `<think>\\n` with thinking on (`ollama run --think`, `"think": true`) and an empty think
  block without, tool results in user turns as `<tool_response>` blocks, as `MINIMIND3_CHAT_TEMPLATE` renders.
- any other (our MiniMind2-style template): `<s>role\\n…</s>\\n` with the tokenizer's own markers and our default
  system prompt when a chat has none.

Tools are offered in the words the tokenizer's own template uses, cut out of a rendering of it (so the wording
lives in one place); a template that does not take tools gives a Modelfile without them.
"""

from __future__ import annotations

import json
from pathlib import Path

from minimind.modeldir import adapter_source, read_json_object
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT, EMPTY_THINK, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# Go template pieces shared by both formats. Inside `range .Tools`, `.Function` prints as JSON.
_TOOL_LIST = '{{ range .Tools }}\n{"type": "function", "function": {{ .Function }}}{{ end }}'
# One assistant turn's tool calls: a newline before each unless it is the first and the turn has no text.
_TOOL_CALLS = (
    "{{ $content := .Content }}{{ range $j, $call := .ToolCalls }}{{ if or $content $j }}\n{{ end }}"
    + TOOL_CALL_OPEN + '\n{"name": "{{ $call.Function.Name }}", "arguments": {{ $call.Function.Arguments }}}\n'
    + TOOL_CALL_CLOSE + "{{ end }}"
)
GENERATION_CONFIG = "generation_config.json"
_SENTINEL_SYSTEM, _SENTINEL_TOOL = "SYSTEM_PROMPT_GOES_HERE", "TOOL_NAME_GOES_HERE"


def chatml_think_format(chat_template: str | None) -> bool:
    """Whether a chat template is minimind-3's ChatML-with-think format (else ours, the MiniMind2 style)."""
    return bool(chat_template) and "<|im_start|>" in chat_template and "<think>" in chat_template


def tools_preamble(tokenizer) -> tuple[str, str] | None:
    """(text between the system prompt and the first tool, text after the last tool) as the tokenizer's chat
    template writes them (each tool on a line of its own), or None when it offers no tools in that shape."""
    tool = {"type": "function", "function": {"name": _SENTINEL_TOOL, "parameters": {}}}
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _SENTINEL_SYSTEM}, {"role": "user", "content": "hi"}],
            tools=[tool], tokenize=False,
        )
    except Exception:  # noqa: BLE001 - a template of another project may reject tools in any way
        return None
    system, name = text.find(_SENTINEL_SYSTEM), text.find(_SENTINEL_TOOL)
    line_start, line_end = text.rfind("\n", 0, name), text.find("\n", name)
    close = text.find(tokenizer.eos_token, line_end) if tokenizer.eos_token and line_end >= 0 else -1
    if system < 0 or not system < line_start < name or close < 0:
        return None
    return text[system + len(_SENTINEL_SYSTEM) : line_start], text[line_end:close]


def chatml_template(tools: tuple[str, str] | None) -> str:
    """minimind-3's chat format in Go template syntax (system and tools first, consecutive tool results in one
    user turn, reasoning of earlier turns from `.Thinking`)."""
    if tools:  # minimind-3 separates a system prompt from the tools by a blank line, and has none without one
        before = tools[0].removeprefix("\n\n")
        separator = "{{ if .System }}" + tools[0][: len(tools[0]) - len(before)] + "{{ end }}"
        system = "{{ .System }}{{ if .Tools }}" + separator + before + _TOOL_LIST + tools[1] + "{{ end }}"
        head = "{{ if or .System .Tools }}<|im_start|>system\n" + system + "<|im_end|>\n{{ end }}"
    else:
        head = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    turns = (
        '{{ $prev := "" }}{{ range .Messages }}'
        '{{ if and (eq $prev "tool") (ne .Role "tool") }}<|im_end|>\n{{ end }}'
        '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n<think>\n{{ .Thinking }}\n</think>\n\n'
        "{{ .Content }}" + _TOOL_CALLS + "<|im_end|>\n"
        '{{ else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}'
        "\n<tool_response>\n{{ .Content }}\n</tool_response>{{ end }}"
        '{{ if ne .Role "system" }}{{ $prev = .Role }}{{ end }}{{ end }}'
        '{{ if eq $prev "tool" }}<|im_end|>\n{{ end }}'
    )
    prompt = '{{ if ne $prev "assistant" }}<|im_start|>assistant\n{{ if $.Think }}<think>\n{{ else }}' + \
        EMPTY_THINK + "{{ end }}{{ end }}"
    return head + turns + prompt


def seed_template(bos: str, eos: str, tools: tuple[str, str] | None) -> str:
    """Our chat format in Go template syntax: `{bos}role\\n{content}{eos}\\n` per turn, our default system
    prompt when none is given, tool calls as `<tool_call>` blocks."""
    system = "{{ if .System }}{{ .System }}{{ else }}" + DEFAULT_SYSTEM_PROMPT + "{{ end }}"
    if tools:
        system += "{{ if .Tools }}" + tools[0] + _TOOL_LIST + tools[1] + "{{ end }}"
    turns = (
        '{{ $prev := "" }}{{ range .Messages }}{{ if ne .Role "system" }}'
        + bos + "{{ .Role }}\n{{ .Content }}" + _TOOL_CALLS + eos + "\n{{ $prev = .Role }}{{ end }}{{ end }}"
    )
    return bos + "system\n" + system + eos + "\n" + turns + '{{ if ne $prev "assistant" }}' + bos + \
        "assistant\n{{ end }}"


def generation_config(model_dir: Path) -> dict:
    """The model's generation_config.json (an adapter's is its base's), or {} when it has none."""
    path = adapter_source(model_dir, (GENERATION_CONFIG,)) / GENERATION_CONFIG
    return read_json_object(path) if path.is_file() else {}


def sampling_parameters(model_dir: Path) -> dict[str, float]:
    """Ollama's names for the sampling defaults in generation_config.json (greedy when do_sample is false)."""
    config = generation_config(model_dir)
    if config.get("do_sample") is False:
        return {"temperature": 0}
    ollama_names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repeat_penalty"}
    return {ollama: config[hf] for hf, ollama in ollama_names.items() if isinstance(config.get(hf), (int, float))}


def stop_tokens(model_dir: Path, tokenizer) -> list[str]:
    """The reply's end markers: the tokenizer's eos, generation_config.json's eos ids, and the marker that opens a
    turn (a model that starts a new turn has finished its reply)."""
    ids = generation_config(model_dir).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
    opener = "<|im_start|>" if chatml_think_format(tokenizer.chat_template) else tokenizer.bos_token
    tokens = [tokenizer.eos_token, *tokenizer.convert_ids_to_tokens(ids), opener]
    return list(dict.fromkeys(t for t in tokens if t))  # in order, once each


def modelfile_text(model_dir: Path, gguf_file: Path, tokenizer) -> str:
    """The Modelfile for `gguf_file` (exported from `model_dir`, whose tokenizer is `tokenizer`)."""
    tools = tools_preamble(tokenizer)
    if chatml_think_format(tokenizer.chat_template):
        template = chatml_template(tools)
    else:
        template = seed_template(tokenizer.bos_token or "", tokenizer.eos_token or "", tools)
    lines = [f"FROM ./{gguf_file.name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stop_tokens(model_dir, tokenizer)]
    lines += [f"PARAMETER {name} {value}" for name, value in sampling_parameters(model_dir).items()]
    return "\n".join(lines) + "\n"


def write_modelfile(model_dir: str | Path, gguf_file: str | Path, tokenizer) -> Path:
    """Write `Modelfile` next to `gguf_file`; returns its path."""
    gguf_file = Path(gguf_file)
    path = gguf_file.with_name("Modelfile")
    path.write_text(modelfile_text(Path(model_dir), gguf_file, tokenizer), encoding="utf-8")
    return path
