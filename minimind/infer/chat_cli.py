"""`minimind chat`: multi-turn chat in the terminal, answers streamed as they are generated.

    minimind chat --model runs/sft [--system "You are ..."] [--history-turns 4] [--temperature 0.7]

Type a message and press Enter. `/reset` forgets the conversation, `/think` turns thinking on or off, `/help`
lists the commands, `/exit` (or Ctrl-D, Ctrl-C) quits; another `/word` is refused as an unknown command (a
message that starts with a path such as `/etc/hosts` is sent).
`--hide-thinking` prints only the answer of a reasoning model's `<think>…</think><answer>…</answer>` replies
(a note shows while it thinks) and keeps only the answers in the history.
`--think` (or `/think`) turns on the thinking switch of templates that have one (minimind-3's `open_thinking`,
Qwen3's `enable_thinking`): the prompt opens a think block and the model reasons before it answers; earlier
answers go back into the history without their thinking. A template without the switch says so and goes on.
The conversation is rendered with the model's chat template each turn. `--history-turns N` keeps the last N
user/assistant pairs (-1 = all); older pairs are also dropped, oldest first, when the conversation would
leave less than `max_new_tokens` (at most half the context) of room for the answer.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import TextIO

from minimind.errors import UserError
from minimind.infer.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_engine,
    not_utf8,
    sampling_from_args,
    utf8_text,
)
from minimind.infer.sampling import SamplingParams
from minimind.tokenizer.template import split_thinking
from minimind.tokenizer.thinking import (
    THINK_OPEN,
    PromptThinking,
    has_thinking_switch,
    prompt_ids_thinking,
    thinking_kwargs,
)

BANNER = "MiniMind chat. /reset clears the conversation, /exit quits, /help lists the commands."
HELP = ("/think    turn thinking on or off (templates with a thinking switch)\n"
        "/reset    forget the conversation\n"
        "/help     this list\n"
        "/exit     quit (also /quit, Ctrl-D, Ctrl-C)\n")
NO_SWITCH = ("warning: this model's chat template has no thinking switch (open_thinking / enable_thinking); "
             "thinking on changes nothing")
# `/word` that is not one of the commands above (a path such as /etc/hosts is a message)
UNKNOWN_COMMAND = re.compile(r"/[A-Za-z]+")
USER_PROMPT = "you> "
MODEL_PROMPT = "minimind> "
THINKING_NOTE = "(thinking…) "
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the chat template's default system prompt)")
    parser.add_argument("--history-turns", type=int, default=-1,
                        help="user/assistant pairs of history sent with each message; -1 = all that fit")
    parser.add_argument("--hide-thinking", action="store_true",
                        help="print only the answer of <think>…</think><answer>…</answer> replies; keep only "
                             "answers in the history")
    add_think_argument(parser)
    add_sampling_arguments(parser)


def add_think_argument(parser: argparse.ArgumentParser) -> None:
    """`--think`, shared by `minimind chat` and `minimind generate --chat`."""
    parser.add_argument("--think", action="store_true", default=None,
                        help="turn on the chat template's thinking switch (minimind-3's open_thinking, Qwen3's "
                             "enable_thinking): the model reasons in a <think> block before it answers; without "
                             "the flag the template's default holds")


def thinking_switch(tokenizer, on: bool | None, warn: TextIO) -> bool | None:
    """`on` as given; when it is True and the template has no thinking switch, one warning line to `warn`."""
    if on and not has_thinking_switch(tokenizer):
        warn.write(NO_SWITCH + "\n")
    return on


def run(args: argparse.Namespace) -> int:
    if args.history_turns < -1:
        raise UserError(f"--history-turns is {args.history_turns}; expected -1 (all that fit) or a number >= 0")
    if args.system is not None:
        utf8_text(args.system, "--system")
    sampling = sampling_from_args(args)
    SamplingParams(**sampling)  # bad flags fail now, not at the first message
    engine = load_engine(args)
    think = thinking_switch(engine.tokenizer, args.think, sys.stderr)
    return chat_loop(engine, input, sys.stdout, args.system, args.history_turns, sampling, args.hide_thinking,
                     think)


def build_prompt(engine, system: str | None, history: list[tuple[str, str]], message: str,
                 history_turns: int, max_new_tokens: int, think: bool | None = None) -> list[int] | None:
    """Token ids for the next answer, history trimmed to `history_turns` and to the context; None if even
    the message alone does not fit. `think`: the template's thinking switch (None: its default)."""
    if history_turns < 0:
        pairs = history
    else:
        pairs = history[len(history) - history_turns :] if history_turns else []
    room = min(max_new_tokens, engine.max_seq_len // 2)
    while True:
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in pairs:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        ids = engine.chat_prompt(messages + [{"role": "user", "content": message}], **thinking_kwargs(think))
        if len(ids) + room <= engine.max_seq_len:
            return ids
        if not pairs:
            return ids if len(ids) < engine.max_seq_len else None
        pairs = pairs[1:]


class AnswerOnly:
    """What `--hide-thinking` prints of a streamed reply: the answer part, as it grows, never the thinking.

    Text that could be the start of a tag (`<`, `</thi`, ...) is held back until the next piece shows what it
    is, so a tag split across pieces is never printed half.
    """

    def __init__(self, opened: bool = False):
        """`opened`: the prompt opened the think block, so the reply starts inside it."""
        self.text, self.shown, self.noted = THINK_OPEN if opened else "", "", False

    def push(self, piece: str) -> str:
        """Add a streamed piece; -> the new text to print."""
        self.text += piece
        note = ""
        if "<think>" in self.text and not self.noted:
            self.noted, note = True, THINKING_NOTE
        return note + self._delta(self._without_partial_tag(self.text))

    def finish(self) -> str:
        """-> the rest to print once the reply is complete (held-back text that was not a tag)."""
        return self._delta(self.text)

    def answer(self) -> str:
        return split_thinking(self.text)[1]

    def _delta(self, text: str) -> str:
        visible = split_thinking(text)[1]
        if not visible.startswith(self.shown):
            return ""  # the answer moved (tags arrived after text); show nothing rather than garble
        delta, self.shown = visible[len(self.shown) :], visible
        return delta

    @staticmethod
    def _without_partial_tag(text: str) -> str:
        for tag in TAGS:
            for k in range(len(tag) - 1, 0, -1):
                if text.endswith(tag[:k]):
                    return text[: len(text) - k]
        return text


def chat_loop(
    engine,
    read_line: Callable[[str], str],
    out: TextIO,
    system: str | None = None,
    history_turns: int = -1,
    sampling: dict | None = None,
    hide_thinking: bool = False,
    think: bool | None = None,
) -> int:
    """Run the chat until /exit, end of input or Ctrl-C; -> exit code 0.

    `read_line(prompt)` returns one line or raises EOFError (the built-in `input` fits); answers stream
    to `out`. `think`: the template's thinking switch at the start (None: its default); `/think` flips it.
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
        except UnicodeDecodeError as err:  # a terminal that decodes strictly
            out.write(f"({not_utf8(err, 'the message')}; nothing sent)\n")
            continue
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        if message == "/help":
            out.write(HELP)
            continue
        if message == "/think":
            think = thinking_switch(engine.tokenizer, not think, out)
            out.write(f"(thinking {'on' if think else 'off'})\n")
            continue
        if UNKNOWN_COMMAND.fullmatch(message.split()[0]):
            out.write(f"(unknown command: {message}; /help lists the commands)\n")
            continue
        try:
            utf8_text(message, "the message")
        except UserError as err:
            out.write(f"({err}; nothing sent)\n")
            continue
        ids = build_prompt(engine, system, history, message, history_turns, sampling.get("max_new_tokens", 256),
                           think)
        if ids is None:
            out.write(f"(message too long: the model's context is {engine.max_seq_len} tokens)\n")
            continue
        opened = think is not None and prompt_ids_thinking(engine.tokenizer, ids) is PromptThinking.OPEN
        out.write(MODEL_PROMPT)
        pieces: list[str] = [THINK_OPEN] if opened else []  # the prompt's <think>, shown as the reply's start
        shown = AnswerOnly(opened) if hide_thinking else None
        if opened and not shown:
            out.write(THINK_OPEN)
        try:
            for piece in engine.stream(ids, **sampling):
                pieces.append(piece)
                out.write(shown.push(piece) if shown else piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        out.write((shown.finish() if shown else "") + "\n")
        reply = "".join(pieces)
        # a reply to a prompt that opened thinking goes back as its answer only, as such models are trained
        history.append((message, shown.answer() if shown else split_thinking(reply)[1] if opened else reply))
