"""`minimind pretrain`: next-token prediction on `{"text"}` JSONL (packed rows, no padding), from scratch or
continuing a model (`--init`: a curriculum's next phase, or more text for a released model).

    minimind pretrain --data pretrain.jsonl --tokenizer runs/tokenizer --preset small --out runs/pretrain
    minimind pretrain --data more.jsonl --init runs/pretrain --out runs/pretrain-2
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
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.tokenizer import load_tokenizer
from minimind.train.args import StageOptions, TrainConfig, add_common_arguments, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import MaskedLM
from minimind.train.stages import parse_overrides, run_stage, stage_data
from minimind.train.trainer import StageRun

DEFAULTS = {"lr": 1e-3, "warmup_steps": 500, "batch_size": 32, "max_seq_len": 512, "epochs": 1}


@dataclass
class PretrainOptions(StageOptions):
    """The new model (tokenizer directory, preset, `--set` overrides) or, with `--init`, the model continued; and
    whether attention stays per document."""

    tokenizer: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    doc_mask: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "pretrain", DEFAULTS, needs_init=False)
    g = parser.add_argument_group("model (a new one: --tokenizer with --preset/--set; or --init)")
    g.add_argument("--tokenizer", type=model_dir, help="tokenizer directory (from `minimind tokenizer`)")
    g.add_argument("--preset", choices=list(PRESETS), help="model shape (`minimind info --preset NAME` shows its size) "
                   "(default: small)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set n_layers=4 --set dropout=0.1 (repeatable)")
    g.add_argument("--init", type=model_dir, help="continue pretraining this model directory, with its own shape and "
                   "tokenizer (then no --tokenizer, --preset or --set)")
    g.add_argument("--doc-mask", action="store_true",
                   help="keep attention inside each packed document (default: documents attend across)")


def run(args: argparse.Namespace) -> int:
    if args.init and (args.tokenizer or args.preset or args.set):
        raise UserError("pretrain: --init continues a model with its own tokenizer and shape; "
                        "drop --tokenizer, --preset and --set")
    if not args.init and not args.tokenizer:
        raise UserError("pretrain: give --tokenizer DIR (a new model) or --init DIR (continue pretraining a model)")
    cfg = config_from_args(args, "pretrain", PretrainOptions.from_args(args, overrides=parse_overrides(args.set)))
    return run_stage(cfg, build)


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(PretrainOptions)
    torch.manual_seed(cfg.seed)
    model, tokenizer, tokenizer_dir = new_or_continued(cfg, options)
    model.config.max_seq_len = max(model.config.max_seq_len, cfg.max_seq_len)
    shard = stage_data(cfg, info, cfg.data, tokenizer_dir, "pretrain")
    dataset = PackedPretrainDataset(shard, cfg.max_seq_len, tokenizer.bos_token_id, options.doc_mask)
    eval_shard = stage_data(cfg, info, cfg.eval_data, tokenizer_dir, "pretrain") if cfg.eval_data else None
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


def new_or_continued(cfg: TrainConfig, options: PretrainOptions):
    """-> (model, tokenizer, tokenizer directory): `--init`'s model and tokenizer, or a new model of the preset
    (`--set` applied) sized to the tokenizer."""
    if cfg.init:
        model, tokenizer = load_model_dir(cfg.init)
        return model, tokenizer, cfg.init
    tokenizer = load_tokenizer(options.tokenizer)
    try:
        config = MiniMindConfig.from_preset(options.preset or "small", vocab_size=len(tokenizer), **options.overrides)
    except (TypeError, ValueError) as err:
        raise UserError(f"--preset/--set: {err}") from None
    return MiniMindForCausalLM(config), tokenizer, options.tokenizer


def unigram_loss(train: Shard, held_out: Shard, vocab_size: int) -> float:
    """Loss (nats/token) of predicting every held-out token by its training frequency (add-one smoothed):
    the bar a model must clear to have learned anything beyond token counts."""
    counts = np.bincount(np.asarray(train.tokens()), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    tokens = np.asarray(held_out.tokens())
    return float(-log_p[tokens[1:]].mean()) if len(tokens) > 1 else math.nan


