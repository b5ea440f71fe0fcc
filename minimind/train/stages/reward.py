"""`minimind reward`: train a reward model on preference pairs (Bradley–Terry), for `--reward rm:DIR`.

    minimind reward --data dpo.jsonl --eval-data dpo_eval.jsonl --init runs/sft --out runs/rm

The model is `--init`'s transformer body with a linear score head (one output, zero at the start) read at each
conversation's last token: `MiniMindForSequenceClassification`. Per pair, with r the score of a whole chat
(prompt and reply):

    loss = −log σ(r(chosen) − r(rejected))

The data is DPO's (`{"chosen": [...], "rejected": [...]}` conversations). The run logs the pair accuracy (share of
pairs with r(chosen) > r(rejected)) and the mean margin, on training and `--eval-data` batches; report.md gives
the held-out accuracy of the trained model. The output is a model directory that transformers opens as
`AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)` and that GRPO/PPO take as
`--reward rm:OUT` (rendering each prompt and completion in this directory's chat template).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from minimind.data.datasets import PairDataset, pair_collate
from minimind.model import MiniMindConfig, MiniMindForSequenceClassification
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.train.args import StageOptions, TrainConfig, add_common_arguments, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import LossOutput, Objective
from minimind.train.stages import run_stage, stage_data
from minimind.train.trainer import StageRun

# A reward model starts from a trained chat model and learns a small head plus a gentle change of the body.
DEFAULTS = {"lr": 5e-5, "grad_clip": 1.0, "weight_decay": 0.0, "warmup_steps": 10, "batch_size": 8,
            "max_seq_len": 512, "epochs": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "reward", DEFAULTS)


def run(args: argparse.Namespace) -> int:
    return run_stage(config_from_args(args, "reward", StageOptions()), build)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_chosen − r_rejected), (N,), from the two scores (N,) each."""
    return -F.logsigmoid(chosen - rejected)


def whole_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's shifted rows (input_ids = ids[:-1]) back to whole conversations: each row gets its
    last token (the last label) appended, so the score is read at the conversation's final token, as a reward
    model reads a chat rendered in full. -> (ids, attention mask), both (B, T + 1)."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows = torch.arange(ids.shape[0], device=ids.device)
    lengths = mask.sum(-1)  # (B,) real tokens of each shifted row
    ids = torch.cat([ids, torch.zeros_like(ids[:, :1])], dim=1)
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    ids[rows, lengths] = labels[rows, lengths - 1]
    mask[rows, lengths] = 1
    return ids, mask


class BradleyTerry(Objective):
    """Batch = N chosen rows then N rejected rows (`pair_collate`); count = N pairs."""

    def count(self, batch: dict) -> torch.Tensor:
        """The number of pairs."""
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        ids, mask = whole_rows(batch)
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()  # (2N,)
        n = scores.shape[0] // 2
        margin = (scores[:n] - scores[n:]).detach()
        return LossOutput(bradley_terry_loss(scores[:n], scores[n:]).sum(), 0.0, {
            "pair_accuracy": (margin > 0).float().mean().item(), "score_margin": margin.mean().item(),
            "chosen_score": scores[:n].mean().item(), "rejected_score": scores[n:].mean().item()})


def reward_model_from(lm: torch.nn.Module) -> MiniMindForSequenceClassification:
    """A causal LM's body under a zero score head (every pair starts at margin 0, loss log 2)."""
    fields = {k: v for k, v in lm.config.to_dict().items() if k not in ("id2label", "label2id")}
    config = MiniMindConfig.from_dict({**fields, "num_labels": 1, "architectures": ["MiniMindForSequenceClassification"]})
    model = MiniMindForSequenceClassification(config)
    model.model.load_state_dict(lm.model.state_dict())
    torch.nn.init.zeros_(model.score.weight)
    return model


def held_out_accuracy(cfg: TrainConfig, eval_dataset: PairDataset | None, device: torch.device):
    """For report.md: the share of held-out pairs the trained reward model ranks right."""

    @torch.no_grad()
    def numbers(model: torch.nn.Module) -> dict:
        if eval_dataset is None:
            return {}
        was_training = model.training
        model.eval()
        right = total = 0
        for batch in DataLoader(eval_dataset, batch_size=cfg.batch_size, collate_fn=pair_collate):
            ids, mask = whole_rows(batch)
            scores = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
            n = scores.shape[0] // 2
            right += int((scores[:n] > scores[n:]).sum())
            total += n
        model.train(was_training)
        return {"held-out pair accuracy": right / max(total, 1), "held-out pairs": total}

    return numbers


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    torch.manual_seed(cfg.seed)
    lm, tokenizer = load_model_dir(cfg.init)
    model = reward_model_from(lm)
    model.config.max_seq_len = max(model.config.max_seq_len, cfg.max_seq_len)
    dataset = PairDataset(stage_data(cfg, info, cfg.data, cfg.init, "dpo"), cfg.max_seq_len)
    eval_dataset = None
    if cfg.eval_data:
        eval_dataset = PairDataset(stage_data(cfg, info, cfg.eval_data, cfg.init, "dpo"), cfg.max_seq_len)
    return StageRun(
        model=model.train(), objective=BradleyTerry(), dataset=dataset, collate=pair_collate,
        save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        final_numbers=held_out_accuracy(cfg, eval_dataset, info.device),
        notes=[f"Reward model (Bradley–Terry): {cfg.init}'s body under a zero-initialised score head read at "
               "each conversation's last token; loss −log σ(r(chosen) − r(rejected)). Use it with "
               f"`minimind grpo --reward rm:{cfg.out}` (or ppo)."],
    )
