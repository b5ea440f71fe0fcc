"""`minimind distill`: knowledge distillation from a frozen teacher, and reasoning distillation.

    minimind distill --teacher runs/big --init runs/small --data sft.jsonl --out runs/distill [--alpha 0.5 --temperature 2]
    minimind distill --reasoning --init runs/sft --data reasoning.jsonl --out runs/reason [--tag-weight 10]

White-box (with `--teacher`): on the SFT targets (assistant tokens), per token
    loss = α·CE(student, data) + (1 − α)·T²·KL(teacher_T ‖ student_T)
where _T means softmax(logits / T); T² keeps the soft term's gradient scale independent of T (Hinton et al.).
Teacher and student may differ in size but must share the tokenizer (the KL is over the same vocabulary).

Reasoning (`--reasoning`): SFT on replies written as `<think>…</think><answer>…</answer>`, with the CE of every
target token that is part of a tag multiplied by `--tag-weight`, so a small model learns the format early
(MiniMind2's reasoning recipe; the loss is still divided by the number of targets, not by the weights). With a
`--teacher` as well, the soft KL term is added as above. Tags are found on the token strings, so a tag split into
several BPE pieces is weighted on every piece and nowhere else.

Showing or hiding the thinking: the chat template renders an assistant turn's `reasoning_content` as
`<think>…</think><answer>…</answer>`; `apply_chat_template(..., show_thinking=False)` leaves it out of earlier
turns. `minimind.tokenizer.template.split_thinking(reply)` splits a generated reply into (thinking, answer), so a
chat front end can print only the answer and keep the history as {content: answer, reasoning_content: thinking}.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import Dataset

from minimind.data.datasets import stack_collate
from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.info import forward_flops
from minimind.kernels.training import training_view
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.tokenizer import load_tokenizer
from minimind.train.args import StageOptions, TrainConfig, add_common_arguments, config_from_args
from minimind.train.distill_loss import distill_head_loss
from minimind.train.distributed import DistInfo
from minimind.train.objective import LossOutput, Objective, model_inputs
from minimind.train.reference import load_frozen
from minimind.train.stages import run_stage
from minimind.train.stages.sft import sft_datasets
from minimind.train.trainer import StageRun

DEFAULTS = {"lr": 5e-4, "warmup_steps": 100, "batch_size": 16, "max_seq_len": 512, "epochs": 1}  # as sft
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass
class DistillOptions(StageOptions):
    """The teacher (None: reasoning distillation alone), the CE weight alpha, the KL temperature, and the
    reasoning tags with their CE weight."""

    teacher: str | None = None
    alpha: float = 0.5
    temperature: float = 2.0
    reasoning: bool = False
    tag_weight: float = 10.0
    tags: tuple[str, ...] = REASONING_TAGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "distill", DEFAULTS)
    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, type=model_dir, help="teacher model directory (required unless --reasoning)")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE; 1 − alpha weighs the KL")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KL term")
    g.add_argument("--reasoning", action="store_true",
                   help="reasoning distillation: extra loss weight on the <think>/<answer> tag tokens")
    g.add_argument("--tag-weight", type=float, default=10.0, help="loss weight of tag tokens with --reasoning")
    g.add_argument("--tags", default=",".join(REASONING_TAGS), help="comma-separated tags weighted by --reasoning")


def run(args: argparse.Namespace) -> int:
    if args.teacher is None and not args.reasoning:
        raise UserError("--teacher is required (a model directory), unless --reasoning is given")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    tags = tuple(t.strip() for t in args.tags.split(",") if t.strip())
    cfg = config_from_args(args, "distill", DistillOptions.from_args(args, tags=tags))
    return run_stage(cfg, build)


class Distill(Objective):
    """α·(weighted) CE + (1 − α)·T²·KL on the loss mask; count = number of targets (Σ loss_mask).

    Without a teacher this is SFT with optional per-token weights (`loss_weight` in the batch).
    """

    def __init__(self, teacher: torch.nn.Module | None, alpha: float = 0.5, temperature: float = 2.0):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    def frozen_flops(self, counts: tuple[int, int, int]) -> float:
        """The teacher's forward over the same rows (its head at the loss positions, as the student's)."""
        return 0.0 if self.teacher is None else forward_flops(self.teacher.config, *counts)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        inputs = model_inputs(batch)
        n = batch["loss_mask"].sum().clamp(min=1.0)
        teacher_hidden = teacher_head = None
        alpha = 1.0 if self.teacher is None else self.alpha
        if self.teacher is not None:
            with torch.no_grad():
                teacher_hidden, teacher_head = self.teacher.model(**inputs)[0], self.teacher.lm_head
        # Inside the student's forward (DDP/FSDP see one forward); no logits of either model are kept.
        loss_fn = partial(distill_head_loss, targets=batch["labels"], mask=batch["loss_mask"], alpha=alpha,
                          temperature=self.temperature, ce_weights=batch.get("loss_weight"),
                          teacher_hidden=teacher_hidden, teacher_head=teacher_head)
        out = training_view(model)(**inputs, head_loss_fn=loss_fn)
        loss, nll_sum, kl_sum = out.loss
        metrics = {"ce": (nll_sum / n).item()}
        if self.teacher is not None:
            metrics["kl"] = (kl_sum / n).item()
        return LossOutput(loss, out.aux_loss, metrics)


class TagFinder:
    """Marks the tokens of a sequence that overlap any of the tags, e.g. `<think>` cut into `<`, `think`, `>`.

    Works on the tokenizer's token strings: byte-level BPE keeps printable ASCII as itself, so an ASCII tag
    appears verbatim in the joined strings and nothing else can imitate it.
    """

    def __init__(self, tokenizer, tags: tuple[str, ...] = REASONING_TAGS):
        self.pieces = [p or "" for p in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        self.pattern = re.compile("|".join(re.escape(t) for t in tags))

    def __call__(self, ids: list[int]) -> np.ndarray:
        pieces = [self.pieces[i] for i in ids]
        ends = np.cumsum([len(p) for p in pieces])
        starts = ends - np.array([len(p) for p in pieces])
        marked = np.zeros(len(ids), dtype=bool)
        for match in self.pattern.finditer("".join(pieces)):
            marked |= (starts < match.end()) & (ends > match.start())
        return marked


class TagWeighted(Dataset):
    """Adds `loss_weight` (1, or `weight` where the target token is part of a tag) to packed SFT rows."""

    def __init__(self, base: Dataset, finder: TagFinder, weight: float):
        self.base, self.finder, self.weight = base, finder, weight

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.base[i])
        row = torch.cat([item["input_ids"][:1], item["labels"]]).tolist()  # the packed row, so tags are whole
        tag = torch.from_numpy(self.finder(row)[1:])
        item["loss_weight"] = torch.where(tag, self.weight, 1.0).float()
        return item


def _check_tags(dataset: TagWeighted, path: str, tags: tuple[str, ...]) -> None:
    for i in range(min(len(dataset), 64)):
        item = dataset[i]
        if ((item["loss_weight"] != 1.0) & (item["loss_mask"] > 0)).any():
            return
    raise UserError(f"{path}: --reasoning found none of the tags {', '.join(tags)} in the replies of the first "
                    f"{min(len(dataset), 64)} rows; reasoning data needs <think>…</think><answer>…</answer> replies")


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(DistillOptions)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.init)
    model.config.max_seq_len = max(model.config.max_seq_len, cfg.max_seq_len)
    teacher = None
    if options.teacher:
        teacher = load_frozen(options.teacher, info.device)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise UserError(f"--teacher {options.teacher} has vocab_size {teacher.config.vocab_size} but --init "
                            f"{cfg.init} has {model.config.vocab_size}; distillation needs one shared tokenizer")
        if load_tokenizer(options.teacher).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"--teacher {options.teacher} and --init {cfg.init} have different tokenizers; "
                            "distillation needs one shared tokenizer")
    dataset, eval_dataset = sft_datasets(cfg, info, tokenizer, cfg.init)
    notes = []
    if options.reasoning:
        finder = TagFinder(tokenizer, options.tags)
        dataset = TagWeighted(dataset, finder, options.tag_weight)
        _check_tags(dataset, cfg.data, options.tags)
        eval_dataset = TagWeighted(eval_dataset, finder, options.tag_weight) if eval_dataset is not None else None
        notes.append(f"Reasoning distillation: tag tokens ({', '.join(options.tags)}) weigh "
                     f"{options.tag_weight:g}x in the CE.")
    if teacher is not None:
        notes.append(f"White-box distillation from {options.teacher}: α = {options.alpha:g} CE + (1 − α)·T²·KL "
                     f"with T = {options.temperature:g}; `kl` is the mean KL(teacher ‖ student) per target at T.")
    alpha = options.alpha if teacher is not None else 1.0
    return StageRun(
        model=model.train(), objective=Distill(teacher, alpha, options.temperature), dataset=dataset,
        collate=stack_collate, save_final=lambda m, out: save_model_dir(m, tokenizer, out),
        eval_dataset=eval_dataset, notes=notes,
    )
