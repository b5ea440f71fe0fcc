"""What constrained decoding costs: Engine tokens/s with a JSON grammar against the same decode without one.

    python bench/grammar.py                        # preset small, random weights, demo tokenizer, 128 tokens
    python bench/grammar.py --quick                # tiny shapes, one repetition: does it run

Both cases decode greedily from the same prompts for exactly --new-tokens tokens (the guided one under a JSON
schema for a string of at least 8 characters per token, so it cannot end early), interleaved, best of each.
The guided case pays for llguidance's token mask (computed on the CPU every step for every guided row) and
the masking of the logits. Last line: `grammar: ratio=<guided/free> (ours <tok/s>, peer <tok/s>)` at batch 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_bench_arguments, demo_tokenizer, interleaved, machine_line, preset_model, ratio_line  # noqa: E402

from minimind.infer import Engine  # noqa: E402
from minimind.infer.grammar import json_grammar  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    add_bench_arguments(parser, repeats=(3, None), quick="tiny preset, 16 tokens, one repetition")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.new_tokens, args.repeats, args.batch_sizes = "tiny", 16, 1, [1, 2]
    print(machine_line())
    tokenizer, _ = demo_tokenizer()
    model = preset_model(args.preset).eval()
    engine = Engine(model, tokenizer, max_batch_size=max(args.batch_sizes))
    grammar = json_grammar({"type": "string", "minLength": 8 * args.new_tokens})
    ids = torch.randint(3, tokenizer.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    speeds = {}
    for batch in args.batch_sizes:
        prompts = [ids] * batch
        cases = {
            "free": lambda p=prompts: engine.completions(p, max_new_tokens=args.new_tokens, ignore_eos=True),
            "guided": lambda p=prompts: engine.completions(p, max_new_tokens=args.new_tokens, ignore_eos=True,
                                                           grammar=grammar),
        }
        lengths = [len(r.token_ids) for r in cases["guided"]()]
        assert lengths == [args.new_tokens] * batch, lengths  # the guided rows ran the whole length
        times = interleaved(cases, args.repeats)
        for name, seconds in times.items():
            speeds[batch, name] = batch * args.new_tokens / min(seconds)
            print(f"batch {batch} {name}: {speeds[batch, name]:.1f} tokens/s")
    first = args.batch_sizes[0]
    print(ratio_line("grammar", speeds[first, "guided"], speeds[first, "free"], "tokens/s"))


if __name__ == "__main__":
    main()
