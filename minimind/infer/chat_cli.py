"""`minimind chat`: multi-turn chat in the terminal, answers streamed as they are generated.

    minimind chat --model runs/sft [--system "You are ..."] [--history-turns 4] [--temperature 0.7]

Type a message and press Enter. `/reset` forgets the conversation, `/exit` (or Ctrl-D, Ctrl-C) quits.
The conversation is rendered with the model's chat template each turn. `--history-turns N` keeps the last N
user/assistant pairs (-1 = all); older pairs are also dropped, oldest first, when the conversation would
leave less than `max_new_tokens` (at most half the context) of room for the answer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from minimind.infer.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_engine,
    sampling_from_args,
)
from minimind.infer.sampling import SamplingParams

BANNER = "MiniMind chat. /reset clears the conversation, /exit quits."
USER_PROMPT = "you> "
MODEL_PROMPT = "minimind> "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the chat template's default system prompt)")
    parser.add_argument("--history-turns", type=int, default=-1,
                        help="user/assistant pairs of history sent with each message; -1 = all that fit")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    SamplingParams(**sampling)  # bad flags fail now, not at the first message
    engine = load_engine(args)
    return chat_loop(engine, input, sys.stdout, args.system, args.history_turns, sampling)


def build_prompt(engine, system: str | None, history: list[tuple[str, str]], message: str,
                 history_turns: int, max_new_tokens: int) -> list[int] | None:
    """Token ids for the next answer, history trimmed to `history_turns` and to the context; None if even
    the message alone does not fit."""
    if history_turns < 0:
        pairs = history
    else:
        pairs = history[len(history) - history_turns :] if history_turns else []
    room = min(max_new_tokens, engine.max_seq_len // 2)
    while True:
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in pairs:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        ids = engine.chat_prompt(messages + [{"role": "user", "content": message}])
        if len(ids) + room <= engine.max_seq_len:
            return ids
        if not pairs:
            return ids if len(ids) < engine.max_seq_len else None
        pairs = pairs[1:]


def chat_loop(
    engine,
    read_line: Callable[[str], str],
    out: TextIO,
    system: str | None = None,
    history_turns: int = -1,
    sampling: dict | None = None,
) -> int:
    """Run the chat until /exit, end of input or Ctrl-C; -> exit code 0.

    `read_line(prompt)` returns one line or raises EOFError (the built-in `input` fits); answers stream
    to `out`.
    """
    sampling = dict(sampling or {})
    history: list[tuple[str, str]] = []
    out.write(BANNER + "\n")
    while True:
        try:
            message = read_line(USER_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        ids = build_prompt(engine, system, history, message, history_turns, sampling.get("max_new_tokens", 256))
        if ids is None:
            out.write(f"(message too long: the model's context is {engine.max_seq_len} tokens)\n")
            continue
        out.write(MODEL_PROMPT)
        pieces: list[str] = []
        try:
            for piece in engine.stream(ids, **sampling):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        out.write("\n")
        history.append((message, "".join(pieces)))
