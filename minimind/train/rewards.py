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

- `rm:DIR`: a sequence-classification reward model with its own tokenizer (any transformers
  `AutoModelForSequenceClassification` directory with one label, e.g. an InternLM2-style reward model, or what
  `minimind reward` trains): prompt and completion are rendered as a chat in the reward model's own chat template
  (plain "role: text" lines if it has none), tokenized with its tokenizer, and its score is the reward.
- `FILE.py:FUNCTION` or `package.module:FUNCTION`: a Python function you bring, called with keyword arguments
  `prompts` (each prompt's messages, a list of {"role", "content"} dicts), `completions` (the sampled texts) and
  `answers` (the reference answers, "" where a record has none), one entry per completion, plus `**kwargs` for
  forward compatibility; it returns one number per completion (a list or a tensor).

Several rewards add up with weights: repeat `--reward` or separate specs with commas, a weight after `@`
(`--reward exact --reward my_rewards.py:brevity@0.5`); each term's mean is logged as `reward/<name>`.
A reward that raises, returns the wrong number of values or a NaN stops the run with a checkpoint.

A reward is any callable (rollout, completion texts, reference answers, prompts) -> rewards (N,). One that runs a
model says what that costs with a `flops(counts)` method (counts as `forward_flops` takes them), which the
logged `mfu` adds; a reward without one is taken to cost nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from minimind.errors import StepError, UserError
from minimind.hub import resolve_model_dir
from minimind.info import forward_flops
from minimind.tokenizer.template import split_thinking
from minimind.train.reference import completion_head_logprobs, load_frozen

if TYPE_CHECKING:
    from minimind.train.rollout import Rollout

_EDGE_PUNCTUATION = " \t\n.,!?;:'\"`()[]{}<>“”‘’。，！？；：、（）《》「」"


class Reward(Protocol):
    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str],
                 prompts: list[list[dict]] | None = None) -> torch.Tensor: ...


class RewardError(StepError):
    """A reward failed during training (raised, wrong length, NaN): the trainer saves a checkpoint, then stops."""


def normalize(text: str) -> str:
    """Case-, width- and whitespace-insensitive form: NFKC, casefold, runs of space -> one, edge punctuation off."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION)


def _word_char(c: str) -> bool:
    return c.isascii() and c.isalnum()


def answer_correct(completion: str, reference: str) -> bool:
    """True if the normalised reference occurs in the normalised answer part of the completion, as a whole word."""
    return contains_word(normalize(split_thinking(completion)[1]), normalize(reference))


def contains_word(text: str, ref: str) -> bool:
    """True if `ref` occurs in `text` with no ASCII letter or digit glued to either end of it ("4" is in
    "is 4." but not in "42"; "al" is not in "chemical"). Characters of other scripts (CJK) count as boundaries,
    since those scripts write no spaces between words."""
    if not ref:
        return False
    start = text.find(ref)
    while start >= 0:
        before = text[start - 1] if start > 0 else ""
        after = text[start + len(ref)] if start + len(ref) < len(text) else ""
        if not (_word_char(ref[0]) and _word_char(before)) and not (_word_char(ref[-1]) and _word_char(after)):
            return True
        start = text.find(ref, start + 1)
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

    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str],
                 prompts: list[list[dict]] | None = None) -> torch.Tensor:
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
    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str],
                 prompts: list[list[dict]] | None = None) -> torch.Tensor:
        logp = self.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, use_cache=False,
                          head_loss_fn=partial(completion_head_logprobs, completion_ids=rollout.completion_ids)).loss
        mask = rollout.completion_mask.float()
        return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)

    def flops(self, counts: tuple[int, int, int]) -> float:
        """The scoring forward over the sampled sequences, the head at the completion positions (as the policy's)."""
        return forward_flops(self.model.config, *counts)


def _load_function(spec: str) -> Callable:
    """`FILE.py:NAME` or `package.module:NAME` -> the function, or a one-line error naming the spec."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"--reward {spec}: no file {target}")
            module_name = f"minimind_reward_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # so dataclasses/pickle inside it can find their module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as e:  # the user's module failed to import: say where, in one line
        raise UserError(f"--reward {spec}: importing {target} failed: {type(e).__name__}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--reward {spec}: {target} has no function {name!r}")
    return function


def _checked(values: Any, n: int, name: str) -> torch.Tensor:
    """A reward's output as (n,) float32, or a RewardError saying what was wrong with it."""
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RewardError(f"reward {name} returned {type(values).__name__}, not one number per completion: {e}") from None
    if tensor.numel() != n:
        raise RewardError(f"reward {name} returned {tensor.numel()} values for {n} completions")
    bad = (~torch.isfinite(tensor)).nonzero()
    if len(bad):
        raise RewardError(f"reward {name} returned {tensor[bad[0, 0]].item()} for completion {bad[0, 0].item()} "
                          "(rewards must be finite numbers)")
    return tensor


class FunctionReward:
    """A Python function you bring (see the module doc for its keyword arguments)."""

    def __init__(self, spec: str):
        self.spec, self.function = spec, _load_function(spec)

    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str],
                 prompts: list[list[dict]] | None = None) -> torch.Tensor:
        try:
            values = self.function(prompts=list(prompts or [[] for _ in texts]), completions=list(texts),
                                   answers=list(answers))
        except Exception as e:  # the user's code failed: one line naming it, then the trainer saves and stops
            raise RewardError(f"reward {self.spec} raised {type(e).__name__}: {e}") from None
        except SystemExit as e:  # sys.exit() in a reward ends the reward, not the run
            raise RewardError(f"reward {self.spec} called sys.exit({e.code!r})") from None
        return _checked(values, len(texts), self.spec)


def render_for(tokenizer, prompt: list[dict], completion: str) -> str:
    """A prompt's messages plus the completion as the assistant's reply, in `tokenizer`'s own chat template
    (or "role: text" lines when it has none)."""
    messages = [{"role": m["role"], "content": m.get("content") or ""} for m in prompt]
    messages.append({"role": "assistant", "content": completion})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class ClassifierReward:
    """A sequence-classification reward model with its own tokenizer: the score of each re-rendered chat."""

    def __init__(self, path: str, device: torch.device | str = "cpu", batch_size: int = 16, max_length: int = 2048):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        except (OSError, ValueError) as e:
            raise UserError(f"--reward rm:{path}: not a model directory transformers can open: "
                            f"{str(e).splitlines()[0]}") from None
        architectures = getattr(config, "architectures", None) or []
        if not any(a.endswith(("ForSequenceClassification", "ForRewardModel")) for a in architectures):
            raise UserError(f"--reward rm:{path}: config.json's architectures are {architectures or 'missing'}; a "
                            "reward model must be a sequence classifier (…ForSequenceClassification, one label)")
        if getattr(config, "num_labels", 1) != 1:
            raise UserError(f"--reward rm:{path}: the classifier has {config.num_labels} labels; a reward model "
                            "has one (its score)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"--reward rm:{path}: no tokenizer transformers can load there (a reward model brings its "
                            f"own): {str(e).splitlines()[0]}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).to(device).eval()
        if self.model.config.pad_token_id is None:  # HF classifiers find each row's last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.path, self.device, self.batch_size, self.max_length = path, device, batch_size, max_length

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> torch.Tensor:
        """(N,) scores of already rendered texts, in batches."""
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            scores.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(scores)

    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str],
                 prompts: list[list[dict]] | None = None) -> torch.Tensor:
        prompts = prompts or [[] for _ in texts]
        return _checked(self.score_texts([render_for(self.tokenizer, p, t) for p, t in zip(prompts, texts)]),
                        len(texts), f"rm:{self.path}")


@dataclass
class RewardTerm:
    """One `--reward` spec with its weight."""

    name: str
    weight: float
    reward: Reward


class CombinedReward:
    """Σ weight · term over several rewards; `last_terms` holds each term's mean of the latest call, for the log."""

    def __init__(self, terms: list[RewardTerm]):
        self.terms, self.last_terms = terms, {}

    def __call__(self, rollout: Rollout, texts: list[str], answers: list[str],
                 prompts: list[list[dict]] | None = None) -> torch.Tensor:
        total = torch.zeros(len(texts))
        for term in self.terms:
            values = _checked(term.reward(rollout, texts, answers, prompts), len(texts), term.name)
            self.last_terms[f"reward/{term.name}"] = values.mean().item()
            total += term.weight * values
        return total

    def flops(self, counts: tuple[int, int, int]) -> float:
        """What the terms that run a model cost."""
        return sum(term.reward.flops(counts) for term in self.terms if hasattr(term.reward, "flops"))


def split_specs(value: str) -> list[tuple[str, float]]:
    """'exact,my.py:fn@0.5' -> [("exact", 1.0), ("my.py:fn", 0.5)]."""
    specs = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            raise UserError(f"--reward {value!r}: an empty reward in the list")
        name, at, weight = part.rpartition("@")
        if at and name:
            try:
                number = float(weight)
            except ValueError:
                number = None  # an '@' that is part of a path or a revision, not a weight
            if number is not None:
                if not math.isfinite(number):
                    raise UserError(f"--reward {part!r}: the weight after '@' must be a finite number")
                specs.append((name, number))
                continue
        specs.append((part, 1.0))
    return specs


def make_reward(spec: str, max_new_tokens: int, vocab_size: int, device: torch.device | str = "cpu") -> Reward:
    """`--reward` value (one spec, or several with weights) -> a reward callable, or a one-line error."""
    terms = [RewardTerm(name, weight, _one_reward(name, max_new_tokens, vocab_size, device))
             for name, weight in split_specs(spec)]
    if len(terms) == 1 and terms[0].weight == 1.0:
        return terms[0].reward  # alone and unweighted: nothing to add up or to log apart
    return CombinedReward(terms)


def _reward_dir(spec: str, prefix: str) -> str:
    """The local directory of a `model:` / `rm:` spec (a Hub id's snapshot); a path that is not there is refused
    here rather than tried as a Hub name by transformers."""
    path = resolve_model_dir(spec[len(prefix) :], "--reward")
    if not Path(path).is_dir():
        raise UserError(f"--reward {spec}: no such directory (a Hub model is named ORG/NAME)")
    return path


def _one_reward(spec: str, max_new_tokens: int, vocab_size: int, device: torch.device | str) -> Reward:
    if spec == "rule":
        return RuleReward(max_new_tokens)
    if spec == "exact":  # correctness alone: a group of all-wrong answers then carries no advantage at all
        return RuleReward(max_new_tokens, format_weight=0.0, repetition_weight=0.0, length_weight=0.0)
    if spec.startswith("model:") and len(spec) > len("model:"):
        reward = ModelReward(_reward_dir(spec, "model:"), device)
        if reward.model.config.vocab_size != vocab_size:
            raise UserError(f"--reward {spec}: the scoring model's vocab_size is {reward.model.config.vocab_size}, "
                            f"the policy's is {vocab_size}; they must share a tokenizer (or use rm:DIR, a reward "
                            "model with its own tokenizer)")
        return reward
    if spec.startswith("rm:") and len(spec) > len("rm:"):
        return ClassifierReward(_reward_dir(spec, "rm:"), device)
    if ":" in spec and not spec.startswith(("model:", "rm:")):
        return FunctionReward(spec)
    raise UserError(f"--reward must be 'rule', 'exact', 'model:DIR', 'rm:DIR' or 'FILE.py:FUNCTION' (several "
                    f"with commas, weights after '@'), got {spec!r}")
