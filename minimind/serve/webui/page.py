"""The Streamlit chat page behind `minimind web`.

    minimind web --models-dir runs
    streamlit run minimind/serve/webui/page.py -- --models-dir runs [--device cpu] [--dtype bf16] [--quantize int8]
        [--compile | --no-compile] [--no-prepack] [--prefix-cache-tokens N | --no-prefix-cache]

The sidebar picks a model directory found under --models-dir and sets temperature, top-p, max new tokens,
history turns, the system prompt, a seed and the thinking switch (for chat templates that have one: minimind-3's
`open_thinking`, Qwen3's `enable_thinking`; off leaves the template's default); Clear forgets the conversation, Regenerate answers the last message
again. Answers stream in as they are generated, with tokens/s under each; a `<think>` block is folded into
an expander. One Scheduler per model directory is cached for the process (`st.cache_resource`), so all
browser sessions share the weights and their requests are decoded together; its engine keeps a prefix cache
(as `chat` and `serve` do), so a next turn prefills only what its history does not already hold, and the stats
under an answer say how many prompt tokens came from it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import streamlit as st

from minimind.errors import UserError
from minimind.infer.options import add_engine_arguments, add_prefix_cache_arguments, generation_defaults
from minimind.infer.sampling import SamplingParams
from minimind.serve.scheduler import QueueFull, Scheduler
from minimind.serve.webchat import chat_prompt, find_models, load_scheduler, reply_start, split_thinking
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT
from minimind.tokenizer.thinking import has_thinking_switch

REDRAW_SECONDS = 0.05  # at most ~20 redraws a second while streaming


def page_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="page.py")
    parser.add_argument("--models-dir", default="runs")
    add_engine_arguments(parser)
    add_prefix_cache_arguments(parser)
    return parser.parse_known_args(sys.argv[1:])[0]


@st.cache_resource(show_spinner="Loading the model (the first start on this machine also compiles it, 15-60 s)…")
def cached_scheduler(model_dir: str, device: str, dtype: str | None, prepack: bool, quantize: str | None,
                     compile: bool | None, prefix_cache_tokens: int) -> Scheduler:
    return load_scheduler(model_dir, device, dtype, prepack, quantize, compile, prefix_cache_tokens)


def clear() -> None:
    st.session_state.messages = []


def regenerate() -> None:
    messages = st.session_state.get("messages", [])
    if messages and messages[-1]["role"] == "assistant":
        messages.pop()
    st.session_state.regenerate = bool(messages)


def sidebar(options: argparse.Namespace) -> tuple[Scheduler, dict]:
    """Model picker and settings; -> (the model's scheduler, settings). Stops the page if there is no model."""
    with st.sidebar:
        st.header("MiniMind")
        root = Path(options.models_dir)
        models = find_models(root)
        if not models:
            st.warning(f"No model directories (config.json + model.safetensors) under `{root}`. Train one, or "
                       "start with `minimind web --models-dir DIR`.")
            st.stop()
        names = [m.relative_to(root).as_posix() if m != root else root.name for m in models]
        model_dir = models[names.index(st.selectbox("Model", names))]
        try:
            defaults = generation_defaults(model_dir)
            scheduler = cached_scheduler(str(model_dir), options.device, options.dtype, not options.no_prepack,
                                         options.quantize, options.compile, options.prefix_cache_tokens)
        except UserError as err:
            st.error(str(err))
            st.stop()
        longest = max(16, scheduler.prompts.max_seq_len // 2)
        settings = {
            "temperature": st.slider("Temperature", 0.0, 2.0, float(defaults.get("temperature", 0.85)), 0.05,
                                     help="0 = always the most likely token"),
            "top_p": st.slider("Top-p", 0.05, 1.0, float(defaults.get("top_p", 0.85)), 0.05,
                               help="sample from the smallest set of tokens holding this much probability"),
            "max_new_tokens": st.slider("Max new tokens", 1, longest,
                                        min(int(defaults.get("max_new_tokens", 512)), longest)),
            "history_turns": st.slider("History turns", 0, 16, 4, help="earlier question/answer pairs sent along"),
            "system": st.text_area("System prompt", DEFAULT_SYSTEM_PROMPT),
            "seed": st.number_input("Seed", min_value=-1, value=-1, step=1,
                                    help="-1 = a fresh random seed for each answer; other values reproduce answers"),
            "think": thinking_toggle(scheduler),
        }
        left, right = st.columns(2)
        left.button("Clear", on_click=clear, width="stretch")
        right.button("Regenerate", on_click=regenerate, width="stretch")
    return scheduler, settings


def thinking_toggle(scheduler: Scheduler) -> bool | None:
    """The thinking switch: True (on) or None (the template's default); disabled when the template has none."""
    switch = has_thinking_switch(scheduler.prompts.tokenizer)
    on = st.toggle("Thinking", value=False, disabled=not switch,
                   help="the model reasons in a <think> block before it answers" if switch else
                   "this model's chat template has no thinking switch (open_thinking / enable_thinking)")
    return True if on and switch else None


def render_answer(text: str) -> None:
    """An answer, with its thinking folded (open while the model is still thinking)."""
    thought = split_thinking(text)
    if thought.thinking is not None:
        with st.expander("Thinking" if thought.thinking_done else "Thinking…", expanded=not thought.thinking_done):
            st.markdown(thought.thinking)
    st.markdown(thought.answer)


def respond(scheduler: Scheduler, settings: dict, messages: list[dict]) -> None:
    """Stream an answer to the last user message into the page and append it to `messages`."""
    ids = chat_prompt(scheduler, settings["system"], messages, settings["history_turns"], settings["max_new_tokens"],
                      settings["think"])
    with st.chat_message("assistant"):
        if ids is None:
            st.error(f"The message is too long for this model's context ({scheduler.prompts.max_seq_len} tokens).")
            messages.pop()
            return
        params = SamplingParams(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                                top_p=settings["top_p"], seed=None if settings["seed"] < 0 else int(settings["seed"]))
        box = st.empty()
        text, drawn, last, cached = reply_start(scheduler, ids), 0.0, None, 0
        start = time.perf_counter()
        try:
            for out in scheduler.stream(ids, params):
                if last is None:  # the first output says how much of the prompt the prefix cache gave
                    cached = out.cached_tokens
                text, last = text + out.text, out
                if out.finished or time.perf_counter() - drawn > REDRAW_SECONDS:
                    with box.container():
                        render_answer(text)
                    drawn = time.perf_counter()
        except QueueFull:
            st.warning("The model is busy with other sessions; try again in a moment.")
            messages.pop()
            return
        seconds = time.perf_counter() - start
        stats = (f"{last.completion_tokens} tokens · {last.completion_tokens / seconds:.1f} tokens/s · "
                 f"{last.finish_reason}")
        if cached:
            stats += f" · {cached} of {last.prompt_tokens} prompt tokens from the prefix cache"
        st.caption(stats)
    messages.append({"role": "assistant", "content": text, "stats": stats})


def main() -> None:
    st.set_page_config(page_title="MiniMind", page_icon="💬")
    scheduler, settings = sidebar(page_options())
    messages = st.session_state.setdefault("messages", [])
    for message in messages:
        with st.chat_message(message["role"]):
            if message["role"] == "assistant":
                render_answer(message["content"])
                st.caption(message["stats"])
            else:
                st.markdown(message["content"])
    prompt = st.chat_input("Message MiniMind")
    if prompt:
        messages.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(prompt)
        respond(scheduler, settings, messages)
    elif st.session_state.pop("regenerate", False):
        respond(scheduler, settings, messages)


main()
