"""Pluggable rewards for GRPO and PPO, chosen with `--reward`.

- `rule` (default): correct × (1 − 0.05 × length / max_new_tokens) − 0.1 × [no eos within max_new_tokens]
  − 0.1 × share of repeated 3-grams. `correct` is 1 if the reference answer occurs in the reply's answer part
  (after `</think>` / inside `<answer>` when present), compared after normalising case, width and whitespace
  and only at word boundaries (so "4" is not found in "14"); it alone is what `accuracy` reports.
  The format terms are penalties and the length term only ranks correct replies: GRPO normalises rewards
  within a group, so any bonus a wrong reply could earn (for being short, say) would be blown up into the
  whole advantage of an all-wrong group and the policy would learn to say nothing.
- `exact`: 1 if the reference answer is in the reply, else 0 (the `correct` term alone). Groups whose answers
  are all wrong (or all right) then have no advantage and no gradient, so updates come only from prompts the
  policy sometimes solves; with `rule`, the format terms still rank the replies of an all-wrong group.
- `model:DIR`: a sequence-scoring model: the mean log-probability per token of the completion (eos included)
  given the prompt, under the language model in DIR (e.g. a larger or better-aligned model acting as judge).
  It must share the policy's vocabulary. `accuracy` is still the rule's exact-answer check.

A reward is any callable (rollout, completion texts, reference answers) -> rewards (N,). One that runs a
model says what that costs with a `flops(counts)` method (counts as `forward_flops` takes them), which the
logged `mfu` adds; a reward without one is taken to cost nothing.
"""

from __future__ import annotations

import re
import unicodedata
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch

from minimind.errors import UserError
from minimind.info import forward_flops
from minimind.tokenizer.template import split_thinking
from minimind.train.reference import completion_head_logprobs, load_frozen

if TYPE_CHECKING:
    from minimind.train.rollout import Rollout

_EDGE_PUNCTUATION = " \t\n.,!?;:'\"`()[]{}<>“”‘’。，！？；：、（）《》「」"


class Reward(Protocol):
    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str]) -> torch.Tensor: ...


def normalize(text: str) -> str:
    """Case-, width- and whitespace-insensitive form: NFKC, casefold, runs of space -> one, edge punctuation off."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION)


def _word_char(c: str) -> bool:
    return c.isascii() and c.isalnum()


def answer_correct(completion: str, reference: str) -> bool:
    """True if the normalised reference occurs in the normalised answer part of the completion, as a whole word."""
    answer, ref = normalize(split_thinking(completion)[1]), normalize(reference)
    if not ref:
        return False
    start = answer.find(ref)
    while start >= 0:
        before = answer[start - 1] if start > 0 else ""
        after = answer[start + len(ref)] if start + len(ref) < len(answer) else ""
        if not (_word_char(ref[0]) and _word_char(before)) and not (_word_char(ref[-1]) and _word_char(after)):
            return True
        start = answer.find(ref, start + 1)
    return False


def repetition(ids: list[int], n: int = 3) -> float:
    """Share of the n-grams of `ids` that repeat an earlier one (0 = no repetition)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class RuleReward:
    """correct × (1 − 0.05 × length / max_new_tokens) − 0.1 × unfinished − 0.1 × repetition (see the module doc)."""

    def __init__(self, max_new_tokens: int, format_weight: float = 0.1, repetition_weight: float = 0.1,
                 length_weight: float = 0.05):
        self.max_new_tokens = max_new_tokens
        self.format_weight, self.repetition_weight, self.length_weight = format_weight, repetition_weight, length_weight

    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str]) -> torch.Tensor:
        lengths = rollout.lengths().tolist()
        ids = rollout.completion_ids.tolist()
        rewards = []
        for i, (text, answer) in enumerate(zip(texts, answers)):
            n = int(lengths[i])
            correct = float(answer_correct(text, answer))
            rewards.append(correct * (1.0 - self.length_weight * n / self.max_new_tokens)
                           - self.format_weight * float(not rollout.finished[i])
                           - self.repetition_weight * repetition(ids[i][:n]))
        return torch.tensor(rewards)


class ModelReward:
    """Mean per-token log-prob of each completion given its prompt, under a frozen scoring model."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        self.model = load_frozen(path, device)

    @torch.no_grad()
    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str]) -> torch.Tensor:
        logp = self.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, use_cache=False,
                          head_loss_fn=partial(completion_head_logprobs, completion_ids=rollout.completion_ids)).loss
        mask = rollout.completion_mask.float()
        return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)

    def flops(self, counts: tuple[int, int, int]) -> float:
        """The scoring forward over the sampled sequences, the head at the completion positions (as the policy's)."""
        return forward_flops(self.model.config, *counts)


def make_reward(spec: str, max_new_tokens: int, vocab_size: int, device: torch.device | str = "cpu") -> Reward:
    """`--reward` value -> a reward callable, or a one-line error."""
    if spec == "rule":
        return RuleReward(max_new_tokens)
    if spec == "exact":  # correctness alone: a group of all-wrong answers then carries no advantage at all
        return RuleReward(max_new_tokens, format_weight=0.0, repetition_weight=0.0, length_weight=0.0)
    if spec.startswith("model:") and len(spec) > len("model:"):
        reward = ModelReward(spec[len("model:") :], device)
        if reward.model.config.vocab_size != vocab_size:
            raise UserError(f"--reward {spec}: the scoring model's vocab_size is {reward.model.config.vocab_size}, "
                            f"the policy's is {vocab_size}; they must share a tokenizer")
        return reward
    raise UserError(f"--reward must be 'rule', 'exact' or 'model:DIR', got {spec!r}")
