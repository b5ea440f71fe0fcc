"""`minimind sft`: supervised fine-tuning on `{"conversations"}` JSONL, loss on assistant replies only.

    minimind sft --data sft.jsonl --init runs/pretrain --out runs/sft

Conversations are packed into rows with attention kept inside each conversation.
minimind-3's loader augmentations are here as options, off by default: `--add-system-ratio 0.2` gives a random
system prompt to that share of the chats without tools, `--empty-think-ratio 0.2` keeps the empty
`<think>\n\n</think>\n\n` in that share of rendered chats and removes it from the rest (the choice per line
follows from --seed).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from minimind.data.chat import ChatAugment
from minimind.data.datasets import PackedSFTDataset, stack_collate
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.train.args import StageOptions, TrainConfig, add_common_arguments, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import MaskedLM
from minimind.train.stages import run_stage, stage_data
from minimind.train.trainer import StageRun

DEFAULTS = {"lr": 5e-4, "warmup_steps": 100, "batch_size": 16, "max_seq_len": 512, "epochs": 1}


@dataclass
class SFTOptions(StageOptions):
    """minimind-3's loader augmentations (`ChatAugment`); the defaults leave every chat as it is."""

    add_system_ratio: float = 0.0
    empty_think_ratio: float = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "sft", DEFAULTS)
    g = parser.add_argument_group("data augmentation (minimind-3's SFT recipe: 0.2 and 0.2; off by default)")
    g.add_argument("--add-system-ratio", type=float, default=0.0,
                   help="share of chats without a system turn or tools that get a random system prompt")
    g.add_argument("--empty-think-ratio", type=float, default=1.0,
                   help="share of rendered chats that keep their empty <think>\\n\\n</think>\\n\\n blocks; the "
                   "rest lose them (1 = off)")


def run(args: argparse.Namespace) -> int:
    ChatAugment(args.add_system_ratio, args.empty_think_ratio)  # a ratio outside [0, 1] is refused before set-up
    return run_stage(config_from_args(args, "sft", SFTOptions.from_args(args)), build)


def sft_datasets(cfg: TrainConfig, info: DistInfo, tokenizer, tokenizer_dir: str,
                 options: SFTOptions | None = None):
    """Packed SFT train (and optional eval) datasets, shared by the sft, lora and distill stages (the latter two
    without augmentations: `options` None)."""
    options = options or SFTOptions()
    augment = ChatAugment(options.add_system_ratio, options.empty_think_ratio, cfg.seed)
    shard = stage_data(cfg, info, cfg.data, tokenizer_dir, "sft", augment)
    dataset = PackedSFTDataset(shard, cfg.max_seq_len, tokenizer.pad_token_id)
    eval_dataset = None
    if cfg.eval_data:
        eval_dataset = PackedSFTDataset(stage_data(cfg, info, cfg.eval_data, tokenizer_dir, "sft"), cfg.max_seq_len,
                                        tokenizer.pad_token_id)
    if dataset.dropped and info.is_main:
        print(f"{cfg.data}: {dataset.dropped} conversations have no reply within --max-seq-len "
              f"{cfg.max_seq_len} and were left out", flush=True)
    return dataset, eval_dataset


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.init)
    model.config.max_seq_len = max(model.config.max_seq_len, cfg.max_seq_len)
    dataset, eval_dataset = sft_datasets(cfg, info, tokenizer, cfg.init, cfg.stage_options(SFTOptions))
    return StageRun(
        model=model.train(), objective=MaskedLM(), dataset=dataset, collate=stack_collate,
        save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        notes=["Loss on assistant content and its closing end-of-turn token only; conversations packed into "
               "rows with attention and positions kept per conversation."],
    )
