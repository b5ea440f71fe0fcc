"""Exact-match of greedy chat answers against references (the demo's held-out Q&A).

Record (SFT shape): {"conversations": [..., {"role": "assistant", "content": reference}], "answer"?: "42"}.
The prompt is every message before the last assistant turn; the model answers greedily with the chat
template. The answer counts as correct when the `answer` (or, without one, the whole reference) occurs in the reply
as whole words: both are compared after Unicode NFKC, case-folding, and punctuation turned into spaces, so
"Paris." matches "paris" and "４２" matches "42", while "Al" is not found inside "chemical" nor "62" inside
"162" (letters and digits glued to either end of a match refuse it; CJK text has no spaces, so its
characters do not). A reply's `<think>…</think>` part is ignored (only what follows it counts).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

from minimind.records import BadRecord, validate_rlaif
from minimind.train.rewards import contains_word


def normalize(text: str) -> str:
    """NFKC + casefold, without whitespace or punctuation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))


def words(text: str) -> str:
    """NFKC + casefold, punctuation as spaces, runs of whitespace as one space: the form answers are matched in."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def final_answer(reply: str) -> str:
    """The part of a reply after any reasoning block."""
    return reply.rsplit("</think>", 1)[-1]


def validate_exact(obj: Any) -> dict:
    """-> {"messages": prompt messages, "reference": last assistant content, "answer": str | None}."""
    messages, reference = validate_rlaif(obj)
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise BadRecord(f'field "answer" must be a string, got {type(answer).__name__}')
    expected = reference if answer is None else str(answer)
    if not normalize(expected):
        what = 'field "answer"' if answer is not None else "the reference answer (the last assistant turn)"
        raise BadRecord(f"{what} is empty once whitespace and punctuation are dropped; nothing to match")
    return {"messages": messages, "reference": reference, "answer": None if answer is None else str(answer)}


def evaluate_exact(engine, items: Sequence[dict], max_new_tokens: int = 128, batch_size: int = 16,
                   progress=None) -> dict:
    """-> {"task": "exact", "n", "correct", "accuracy", "samples"} for raw SFT-shaped records, answered
    greedily by `engine` in batches. `samples` lists (expected, reply, correct) for every item, in order."""
    clean = []
    for index, raw in enumerate(items):
        try:
            clean.append(validate_exact(raw))
        except BadRecord as err:
            raise BadRecord(f"item {index}: {err}") from None
    replies: list[str] = []
    for start in range(0, len(clean), batch_size):
        chunk = clean[start : start + batch_size]
        replies += engine.generate([engine.chat_prompt(item["messages"]) for item in chunk],
                                   max_new_tokens=max_new_tokens, temperature=0.0)
        if progress is not None:
            progress(len(chunk))
    samples, correct = [], 0
    for item, reply in zip(clean, replies):
        expected = item["answer"] if item["answer"] is not None else item["reference"]
        hit = contains_word(words(final_answer(reply)), words(expected))
        correct += hit
        samples.append({"expected": expected, "reply": reply, "correct": hit})
    return {
        "task": "exact",
        "n": len(clean),
        "correct": correct,
        "accuracy": correct / len(clean) if clean else 0.0,
        "samples": samples,
    }
