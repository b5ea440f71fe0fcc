"""`minimind lora`: SFT through low-rank adapters; the base model stays frozen and the adapter is saved alone.

    minimind lora --data sft.jsonl --init runs/sft --out runs/lora [--rank 16 --alpha 32 --target-modules q_proj,v_proj]

The run's `--out` ends as a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`, plus the
tokenizer files), loadable with `peft.PeftModel.from_pretrained(model, out)`; `minimind convert --merge-lora`
folds it into a full model directory. Checkpoints hold only the adapter (and its optimizer state): `--resume`
rebuilds the base from `--init`, wraps it again and loads them.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimind.data.datasets import stack_collate
from minimind.lora import DEFAULT_TARGETS, apply_lora, parse_targets, save_peft_adapter
from minimind.modeldir import TOKENIZER_FILES, load_model_dir
from minimind.train.args import StageOptions, TrainConfig, add_common_arguments, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import MaskedLM
from minimind.train.stages import run_stage
from minimind.train.stages.sft import sft_datasets
from minimind.train.trainer import StageRun

# The reference project's LoRA settings: lr 1e-3; its LoRA loop uses plain Adam, hence no weight decay on the adapter.
DEFAULTS = {"lr": 1e-3, "warmup_steps": 100, "batch_size": 16, "max_seq_len": 512, "epochs": 1, "weight_decay": 0.0}


@dataclass
class LoRAOptions(StageOptions):
    """The adapter: rank r, scale numerator alpha, input dropout, and the target modules (`parse_targets`: a list
    of name suffixes or one regex)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "lora", DEFAULTS)
    g = parser.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=16, help="adapter rank r")
    g.add_argument("--alpha", type=float, default=32.0, help="adapter scale numerator: updates are (alpha/r)·B·A")
    g.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input")
    g.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated linear-layer names (suffix match, PEFT's rule) or one regex matched "
                        "against the full module name, e.g. '.*self_attn\\.(q|v)_proj'")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "lora", LoRAOptions.from_args(args, targets=parse_targets(args.target_modules)))
    return run_stage(cfg, build)


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(LoRAOptions)
    torch.manual_seed(cfg.seed)  # the adapter's A init
    model, tokenizer = load_model_dir(cfg.init)
    model.config.max_seq_len = max(model.config.max_seq_len, cfg.max_seq_len)
    wrapped = apply_lora(model, options.rank, options.alpha, options.dropout, options.targets)
    dataset, eval_dataset = sft_datasets(cfg, info, tokenizer, cfg.init)
    base = str(Path(cfg.init).resolve())

    def save_final(trained: torch.nn.Module, out: Path) -> None:
        save_peft_adapter(trained, out, base, options.targets)
        for name in TOKENIZER_FILES:
            if (Path(cfg.init) / name).is_file():
                shutil.copyfile(Path(cfg.init) / name, out / name)

    return StageRun(
        model=model.train(), objective=MaskedLM(), dataset=dataset, collate=stack_collate, save_final=save_final,
        eval_dataset=eval_dataset, trainable_only_checkpoint=True,
        final_numbers=lambda _m: {"LoRA layers": len(wrapped), "LoRA rank / alpha": f"{options.rank} / "
                                  f"{options.alpha:g}"},
        notes=[f"LoRA on {len(wrapped)} linear layers (targets {options.targets}); base weights frozen, "
               f"only the adapter trained and saved (PEFT format, base {base})."],
    )
