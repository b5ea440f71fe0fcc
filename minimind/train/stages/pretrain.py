"""`minimind pretrain`: next-token prediction from scratch on `{"text"}` JSONL (packed rows, no padding).

    minimind pretrain --data pretrain.jsonl --tokenizer runs/tokenizer --preset small --out runs/pretrain
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minimind.data.datasets import PackedPretrainDataset, stack_collate
from minimind.data.shards import Shard
from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.model import PRESETS, MiniMindConfig, MiniMindForCausalLM
from minimind.modeldir import save_model_dir
from minimind.tokenizer import load_tokenizer
from minimind.train.args import StageOptions, TrainConfig, add_common_arguments, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import MaskedLM
from minimind.train.stages import parse_overrides, run_stage, stage_data
from minimind.train.trainer import StageRun

DEFAULTS = {"lr": 1e-3, "warmup_steps": 500, "batch_size": 32, "max_seq_len": 512, "epochs": 1}


@dataclass
class PretrainOptions(StageOptions):
    """The new model: tokenizer directory, preset, `--set` overrides, and whether attention stays per document."""

    tokenizer: str = ""
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    doc_mask: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "pretrain", DEFAULTS, needs_init=False)
    g = parser.add_argument_group("model")
    g.add_argument("--tokenizer", required=True, type=model_dir, help="tokenizer directory (from `minimind tokenizer`)")
    g.add_argument("--preset", default="small", choices=list(PRESETS), help="model shape (`minimind info --preset NAME` shows its size)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set n_layers=4 --set dropout=0.1 (repeatable)")
    g.add_argument("--doc-mask", action="store_true",
                   help="keep attention inside each packed document (default: documents attend across)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "pretrain", PretrainOptions.from_args(args, overrides=parse_overrides(args.set)))
    return run_stage(cfg, build)


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(PretrainOptions)
    tokenizer = load_tokenizer(options.tokenizer)
    try:
        config = MiniMindConfig.from_preset(options.preset, vocab_size=len(tokenizer), **options.overrides)
    except (TypeError, ValueError) as err:
        raise UserError(f"--preset/--set: {err}") from None
    config.max_seq_len = max(config.max_seq_len, cfg.max_seq_len)
    torch.manual_seed(cfg.seed)
    model = MiniMindForCausalLM(config)
    shard = stage_data(cfg, info, cfg.data, options.tokenizer, "pretrain")
    dataset = PackedPretrainDataset(shard, cfg.max_seq_len, tokenizer.bos_token_id, options.doc_mask)
    eval_shard = stage_data(cfg, info, cfg.eval_data, options.tokenizer, "pretrain") if cfg.eval_data else None
    eval_dataset = PackedPretrainDataset(eval_shard, cfg.max_seq_len, tokenizer.bos_token_id,
                                         options.doc_mask) if eval_shard else None

    def final_numbers(_model) -> dict:
        if eval_shard is None:
            return {}
        return {"unigram baseline loss (held-out)": unigram_loss(shard, eval_shard, len(tokenizer))}

    return StageRun(
        model=model, objective=MaskedLM(), dataset=dataset, collate=stack_collate,
        save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        final_numbers=final_numbers,
        notes=["Packed rows: documents are joined with <s>…</s> into full rows, so no compute goes to padding; "
               + ("attention stays inside each document (--doc-mask)." if options.doc_mask
                  else "attention crosses document boundaries inside a row (GPT-style).")],
    )


def unigram_loss(train: Shard, held_out: Shard, vocab_size: int) -> float:
    """Loss (nats/token) of predicting every held-out token by its training frequency (add-one smoothed):
    the bar a model must clear to have learned anything beyond token counts."""
    counts = np.bincount(np.asarray(train.tokens()), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    tokens = np.asarray(held_out.tokens())
    return float(-log_p[tokens[1:]].mean()) if len(tokens) > 1 else math.nan


