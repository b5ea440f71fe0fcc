"""`minimind generate`: complete one prompt with a model directory and print the answer as it is generated.

    minimind generate --model runs/pretrain --prompt "北京是" --max-new-tokens 64
    minimind generate --model runs/sft --chat --prompt "你好" --temperature 0
    echo "long prompt" | minimind generate --model runs/sft --prompt -
    minimind generate --model runs/sft --chat --prompt "..." --json-schema schema.json   # output valid JSON
    minimind generate --model minimind3-sft --chat --think --prompt "..."   # templates with a thinking switch

The completion goes to stdout (streamed, then a newline); token counts and tokens/s go to stderr, so
`> answer.txt` captures the answer alone. With `--think` the prompt opens a think block, so the completion is
printed after that `<think>`: the reasoning, `</think>`, then the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minimind.errors import UserError
from minimind.infer.chat_cli import add_think_argument, thinking_switch
from minimind.infer.grammar import json_grammar, regex_grammar
from minimind.infer.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_engine,
    not_utf8,
    sampling_from_args,
    utf8_text,
)
from minimind.infer.sampling import SamplingParams
from minimind.tokenizer.thinking import THINK_OPEN, PromptThinking, prompt_ids_thinking, thinking_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help='the prompt text; "-" reads it from stdin')
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message in the chat template (for SFT models)")
    parser.add_argument("--system", default=None,
                        help="system prompt with --chat (default: the template's default system prompt)")
    add_think_argument(parser)
    add_sampling_arguments(parser)
    shape = parser.add_argument_group("constrained output (decoding follows a grammar, so the output parses)")
    one = shape.add_mutually_exclusive_group()
    one.add_argument("--json", action="store_true", help="the output is one JSON object")
    one.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under this JSON schema file")
    one.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")


def output_grammar(args: argparse.Namespace) -> str | None:
    """The grammar the constrained-output flags ask for, if any."""
    if args.json_schema:
        path = Path(args.json_schema)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable JSON schema ({err})") from None
        if not isinstance(schema, dict):
            raise UserError(f"{path}: a JSON schema is an object, got {type(schema).__name__}")
        return json_grammar(schema)
    if args.json:
        return json_grammar(None)
    return regex_grammar(args.regex) if args.regex is not None else None


def read_prompt(flag: str) -> str:
    """The text of `--prompt` (stdin for "-"); UserError where it is not UTF-8."""
    if flag != "-":
        return utf8_text(flag, "--prompt")
    try:
        return utf8_text(sys.stdin.read(), "the prompt on stdin")
    except UnicodeDecodeError as err:  # a stdin that decodes strictly
        raise not_utf8(err, "the prompt on stdin") from None


def run(args: argparse.Namespace) -> int:
    if args.think and not args.chat:
        raise UserError("--think turns on the chat template's thinking switch; it needs --chat")
    if args.system is not None and not args.chat:
        raise UserError("--system is the chat template's system prompt; it needs --chat")
    prompt = read_prompt(args.prompt)
    if args.system is not None:
        utf8_text(args.system, "--system")
    sampling = sampling_from_args(args)
    grammar = output_grammar(args)
    if grammar is not None:
        sampling["grammar"] = grammar
    SamplingParams(**sampling)  # bad flags fail before the model loads
    engine = load_engine(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        think = thinking_switch(engine.tokenizer, args.think, sys.stderr)
        ids = engine.chat_prompt(messages + [{"role": "user", "content": prompt}], **thinking_kwargs(think))
        if think and prompt_ids_thinking(engine.tokenizer, ids) is PromptThinking.OPEN:
            sys.stdout.write(THINK_OPEN)  # the prompt's, so the printed reply reads whole
    else:
        ids = engine.encode(prompt)
    for piece in engine.stream(ids, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = engine.last_stats
    print(
        f"[{stats.prompt_tokens[0]} prompt tokens, {stats.completion_tokens[0]} generated, "
        f"{stats.tokens_per_second:.1f} tokens/s, finish: {stats.finish_reasons[0]}]",
        file=sys.stderr,
    )
    return 0
