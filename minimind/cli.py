"""`minimind <verb>`: one entry point for the whole pipeline (also `python -m minimind <verb>`).

Each verb lives in its own module exposing `add_arguments(parser)` and `run(args)`; the module is imported
only when its verb is used, so `minimind --help` stays fast and `serve` does not pay for training code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minimind.errors import UserError
from minimind.help_format import HelpFormatter

# verb -> (module, one-line help). Order is the pipeline's order.
VERBS: dict[str, tuple[str, str]] = {
    "info": ("minimind.info", "parameters, FLOPs per token and training memory of a preset"),
    "tokenizer": ("minimind.tokenizer.train", "train a byte-level BPE tokenizer from JSONL text"),
    "prepare": ("minimind.data.prepare", "tokenize a JSONL dataset once into memory-mapped shards"),
    "pretrain": ("minimind.train.stages.pretrain", "pretrain a model from scratch on {'text'} JSONL"),
    "sft": ("minimind.train.stages.sft", "supervised fine-tuning on {'conversations'} JSONL"),
    "lora": ("minimind.train.stages.lora", "LoRA fine-tuning: train a low-rank adapter, saved in PEFT format"),
    "dpo": ("minimind.train.stages.dpo", "direct preference optimisation on {'chosen','rejected'} pairs"),
    "distill": ("minimind.train.stages.distill", "distil a teacher into a student (white-box KL or reasoning SFT)"),
    "reward": ("minimind.train.stages.reward", "train a reward model on preference pairs (Bradley–Terry), for --reward rm:DIR"),
    "grpo": ("minimind.train.stages.grpo", "GRPO: RL from group-normalised rewards of sampled completions"),
    "ppo": ("minimind.train.stages.ppo", "PPO: RL with a value head, GAE and a clipped objective"),
    "agent": ("minimind.train.stages.agent", "agentic RL: GRPO over multi-turn episodes that call tools"),
    "generate": ("minimind.infer.generate_cli", "complete a prompt with a model directory"),
    "chat": ("minimind.infer.chat_cli", "multi-turn chat with a model in the terminal"),
    "serve": ("minimind.serve.serve_cli", "OpenAI-compatible API server for a model directory"),
    "web": ("minimind.serve.web_cli", "Streamlit web chat over the model directories found"),
    "eval": ("minimind.eval.cli", "perplexity, multiple-choice accuracy, or exact-match of answers"),
    "convert": ("minimind.convert.cli", "export/import between formats (HF Llama, Qwen3, GGUF, MiniMind2, minimind-3); merge LoRA"),
    "push": ("minimind.push", "upload a model directory to the Hugging Face Hub, with a model card"),
    "demo": ("minimind.demo", "the end-to-end pipeline on the bundled demo data"),
    "completion": ("minimind.completion", "print a shell completion script (bash, zsh or tcsh)"),
}


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The argument parser of one verb (imports the verb's module)."""
    parser = argparse.ArgumentParser(prog=f"minimind {verb}", description=VERBS[verb][1],
                                     formatter_class=HelpFormatter)
    importlib.import_module(VERBS[verb][0]).add_arguments(parser)
    parser.add_argument("--config", metavar="FILE",
                        help="read options from a YAML, TOML or JSON file (keys: option names with underscores, as "
                             "a run's train_config.json writes them); flags given here override it")
    return parser


def parse_verb_args(verb: str, argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """(parser, parsed options) of one verb: a `--config FILE`'s values as defaults, then the command line.
    A bad config file raises UserError; bad flags exit 2 as argparse does."""
    from minimind.config_file import apply_config, split_config

    parser = build_parser(verb)
    config, rest = split_config(argv)
    if config is not None:
        apply_config(parser, config, verb)
    args = parser.parse_args(rest)
    args.config = config
    return parser, args


TRAINING_STAGES = "minimind.train.stages."
DATA_FLAGS = ("--data", "--eval-data")


def _check_data_flags(argv: list[str]) -> None:
    """The data sources a training command names on its command line exist (the last of each flag counts, as in
    argparse); a `--config` file's are checked when the stage opens them. Nothing is checked for `--help`."""
    if "-h" in argv or "--help" in argv:
        return
    from minimind.sources import check_source

    given = {}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in DATA_FLAGS:
            if eq:
                given[flag] = value
            elif i + 1 < len(argv):
                given[flag] = argv[i + 1]
    for value in given.values():
        check_source(value)


def version() -> str:
    """The installed MiniMind's version, as `minimind --version` prints it."""
    from minimind import __version__

    return __version__


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: minimind <verb> [options]   (minimind <verb> --help for a verb's options)",
             "       minimind --version", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the verb, and return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"minimind {version()}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        print(f"minimind: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        if VERBS[verb][0].startswith(TRAINING_STAGES):
            _check_data_flags(argv[1:])  # before the stage's imports (seconds): a mistyped path fails at once
        module = importlib.import_module(VERBS[verb][0])
        parser, args = parse_verb_args(verb, argv[1:])
    except UserError as err:
        print(f"minimind {verb}: error: {err}", file=sys.stderr)
        return 2
    args.command_line = argv  # the verb and its flags, for hints that repeat the command (`… --resume`)
    try:
        # Options that take a model or tokenizer directory also take a hub id (org/name[@rev], ms:org/name).
        from minimind.hub import resolve_args

        resolve_args(parser, args)
        code = module.run(args)
    except UserError as err:
        print(f"minimind {verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minimind {verb}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
