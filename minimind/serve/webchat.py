"""What the web chat page needs besides Streamlit: model discovery, the cached scheduler, prompts, thinking.

Kept apart from the page script (`minimind/serve/webui/page.py`) so it can be imported and tested without
running Streamlit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from minimind.infer.chat_cli import build_prompt
from minimind.infer.options import PREFIX_CACHE_TOKENS
from minimind.serve.scheduler import Scheduler
from minimind.tokenizer.thinking import THINK_CLOSE, THINK_OPEN, PromptThinking, prompt_ids_thinking

MODEL_FILES = ("config.json", "model.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a LoRA adapter loads with its base
ANSWER_TAGS = re.compile(r"</?answer>")


def find_models(models_dir: str | Path) -> list[Path]:
    """Model directories under `models_dir` (itself included): any folder with config.json + model.safetensors,
    or with a LoRA adapter (adapter_config.json + adapter_model.safetensors).

    Sorted by path; checkpoint folders inside runs are included, since each is a loadable model.
    """
    root = Path(models_dir)
    if not root.is_dir():
        return []
    found = [p.parent for files in (MODEL_FILES, ADAPTER_FILES) for p in root.rglob(files[0])
             if all((p.parent / f).is_file() for f in files)]
    return sorted(set(found))


def load_scheduler(model_dir: str, device: str = "auto", dtype: str | None = None, prepack: bool = True,
                   quantize: str | None = None, compile: bool | None = False,
                   prefix_cache_tokens: int = PREFIX_CACHE_TOKENS) -> Scheduler:
    """A started Scheduler over the model directory (all browser sessions share it and batch together); with
    `compile`, the decode step is compiled (or loaded from the compile cache) before it starts
    (Engine.warm_up), not in the first answer; None: the CLI's default (`compile_by_default`).
    `prefix_cache_tokens`: the engine's prefix cache bound (0 = off), so a conversation's next turn prefills only
    what its history does not already hold."""
    from minimind.infer.compile_cache import default_compile_cache
    from minimind.infer.engine import Engine
    from minimind.infer.options import compile_by_default, resolve_device

    resolved = resolve_device(device)
    compiled = compile_by_default(compile, resolved)
    engine = Engine.from_pretrained(model_dir, device=resolved, dtype=dtype, max_batch_size=8, prepack=prepack,
                                    quantize=quantize, compile=compiled,
                                    compile_cache=default_compile_cache() if compiled else None,
                                    prefix_cache_tokens=prefix_cache_tokens)
    engine.warm_up(batches=True)
    return Scheduler(engine, max_queue=32).start()


def history_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a message list that alternates user and assistant turns; earlier answers
    go back without their thinking, as reasoning models are trained to see them."""
    return [(messages[i]["content"], split_thinking(messages[i + 1]["content"]).answer)
            for i in range(0, len(messages) - 1, 2)
            if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant"]


def chat_prompt(scheduler: Scheduler, system: str, messages: list[dict], history_turns: int,
                max_new_tokens: int, think: bool | None = None) -> list[int] | None:
    """Token ids for answering the last user message of `messages` (history trimmed to turns and context);
    None if the message alone does not fit. `think`: the template's thinking switch (None: its default)."""
    *earlier, last = messages
    return build_prompt(scheduler.prompts, system.strip() or None, history_pairs(earlier), last["content"],
                        history_turns, max_new_tokens, think)


def reply_start(scheduler: Scheduler, ids: list[int]) -> str:
    """What the reply to prompt `ids` starts with before its first token: `<think>` when the prompt opened the
    think block (so the page folds the thinking while it streams), else nothing."""
    return THINK_OPEN if prompt_ids_thinking(scheduler.prompts.tokenizer, ids) is PromptThinking.OPEN else ""


@dataclass
class Thought:
    """An answer split into its `<think>` part (None without one) and the rest, `<answer>` tags removed."""

    thinking: str | None
    answer: str
    thinking_done: bool


def split_thinking(text: str) -> Thought:
    """Split model output like `<think>…</think><answer>…</answer>`; works on partial (streaming) text."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN):]
        if THINK_CLOSE not in body:
            return Thought(body.strip(), "", False)
        thinking, rest = body.split(THINK_CLOSE, 1)
        return Thought(thinking.strip(), ANSWER_TAGS.sub("", rest).strip(), True)
    if THINK_CLOSE in text:  # the template opened the block in the prompt; only its end is generated
        thinking, rest = text.split(THINK_CLOSE, 1)
        return Thought(thinking.strip(), ANSWER_TAGS.sub("", rest).strip(), True)
    return Thought(None, ANSWER_TAGS.sub("", text), True)
