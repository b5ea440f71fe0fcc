"""Multiple-choice accuracy by log-likelihood (C-Eval / CMMLU / MMLU formats).

Records, one of:
  C-Eval   {"question": "...", "A": "...", "B": "...", "C": "...", "D": "...", "answer": "B"}  (two or more of
           the option letters A-J; CMMLU's capitalised "Question"/"Answer" are read too)
  MMLU     {"question": "...", "choices": ["...", "..."], "answer": 1}  (answer: index or letter)
Each option is scored as a continuation of the question:

    context      = bos + "Question: {question}\\nAnswer:"
    continuation = " {option text}"

The score of an option is the mean log-probability per token of its continuation (length-normalised, so
short options get no advantage), or with score="sum" the total log-probability. The prediction is the
best-scoring option; accuracy = share of predictions equal to "answer". Context and continuation are
tokenized separately, so every option is scored on the same context tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from minimind.eval.scoring import sum_logprobs
from minimind.records import BadRecord

LETTERS = tuple("ABCDEFGHIJ")  # MMLU-Pro has ten options
CONTEXT = "Question: {question}\nAnswer:"
CONTINUATION = " {option}"


def validate_choice(obj: Any) -> dict:
    """-> {"question", "options": {letter: text}, "answer"}; raises BadRecord naming the bad field."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question", obj.get("Question"))
    if not isinstance(question, str) or not question.strip():
        raise BadRecord('field "question" must be a non-empty string')
    answer = obj.get("answer", obj.get("Answer"))
    if "choices" in obj:
        options = _listed_options(obj["choices"])
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
            answer = LETTERS[answer]
    else:
        options = _lettered_options(obj)
    if answer not in options:
        expected = ", ".join(options) + (f" or an index 0-{len(options) - 1}" if "choices" in obj else "")
        raise BadRecord(f'field "answer" is {answer!r}; expected one of {expected}')
    return {"question": question, "options": options, "answer": answer}


def _option_text(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise BadRecord(f"{name} must be a non-empty string")
    return str(value)


def _lettered_options(obj: dict) -> dict[str, str]:
    options = {letter: _option_text(obj[letter], f'option "{letter}"') for letter in LETTERS
               if obj.get(letter) is not None}
    if len(options) < 2:
        raise BadRecord('expected at least two options: keys "A", "B", "C", ... or a "choices" list')
    return options


def _listed_options(choices: Any) -> dict[str, str]:
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise BadRecord(f'field "choices" must be a list of 2 to {len(LETTERS)} options')
    return {letter: _option_text(value, f"choices[{i}]") for i, (letter, value) in enumerate(zip(LETTERS, choices))}


def evaluate_choice(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[dict],
    score: str = "mean",
    max_batch_tokens: int = 8192,
    progress=None,
) -> dict:
    """-> {"task": "choice", "n", "correct", "accuracy", "chance", "score", "predictions"} for raw C-Eval
    records (validated here; a bad one raises BadRecord, a ValueError, naming the item)."""
    if score not in ("mean", "sum"):
        raise ValueError(f"score must be 'mean' or 'sum', got {score!r}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    clean, sequences, owners = [], [], []
    for index, raw in enumerate(items):
        try:
            item = validate_choice(raw)
        except BadRecord as err:
            raise BadRecord(f"item {index}: {err}") from None
        clean.append(item)
        context = [start, *tokenizer.encode(CONTEXT.format(question=item["question"]), add_special_tokens=False)]
        for letter, text in item["options"].items():
            continuation = tokenizer.encode(CONTINUATION.format(option=text), add_special_tokens=False)
            sequences.append((context + continuation, len(context)))
            owners.append((index, letter))
    scores = sum_logprobs(model, sequences, max_batch_tokens, progress)
    best: dict[int, tuple[float, str]] = {}
    for (index, letter), (total, count) in zip(owners, scores):
        value = total / max(count, 1) if score == "mean" else total
        if index not in best or value > best[index][0]:
            best[index] = (value, letter)
    predictions = [best[i][1] for i in range(len(clean))]
    correct = sum(p == item["answer"] for p, item in zip(predictions, clean))
    return {
        "task": "choice",
        "n": len(clean),
        "correct": correct,
        "accuracy": correct / len(clean) if clean else 0.0,
        "chance": sum(1 / len(item["options"]) for item in clean) / len(clean) if clean else 0.0,
        "score": score,
        "predictions": predictions,
    }
