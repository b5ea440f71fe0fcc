"""`minimind generate`: complete one prompt with a model directory and print the answer as it is generated.

    minimind generate --model runs/pretrain --prompt "北京是" --max-new-tokens 64
    minimind generate --model runs/sft --chat --prompt "你好" --temperature 0
    echo "long prompt" | minimind generate --model runs/sft --prompt -

The completion goes to stdout (streamed, then a newline); token counts and tokens/s go to stderr, so
`> answer.txt` captures the answer alone.
"""

from __future__ import annotations

import argparse
import sys

from minimind.infer.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_engine,
    sampling_from_args,
)
from minimind.infer.sampling import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help='the prompt text; "-" reads it from stdin')
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message in the chat template (for SFT models)")
    parser.add_argument("--system", default=None,
                        help="system prompt with --chat (default: the template's default system prompt)")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = sampling_from_args(args)
    SamplingParams(**sampling)  # bad flags fail before the model loads
    engine = load_engine(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = engine.chat_prompt(messages + [{"role": "user", "content": prompt}])
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
