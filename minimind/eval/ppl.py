"""Perplexity and bits per byte of a model on plain text.

Each text is tokenized with the tokenizer's bos token in front (as the engine prompts and pretraining see
text; eos for a tokenizer without bos), and every text token is scored: NLL = -sum log p(token | everything before it in the text).
A text longer than the window (default: the model's max_seq_len) is scored with overlapping windows that
advance by half a window; each token is scored once, in the first window where it has at least half a
window of context (the usual sliding-window perplexity).

    ppl = exp(total NLL / scored tokens)
    bits per byte = total NLL / ln 2 / UTF-8 bytes of the texts   (tokenizer-independent)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from minimind.eval.scoring import sum_logprobs


def text_windows(ids: list[int], window: int) -> list[tuple[list[int], int]]:
    """(window ids, first scored position) covering ids[1:] exactly once, windows advancing by window // 2."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    stride = max(1, window // 2)
    pieces, start, scored_until = [], 0, 1
    while True:
        end = min(start + window, len(ids))
        pieces.append((ids[start:end], scored_until - start))
        scored_until = end
        if end == len(ids):
            return pieces
        start += stride


def evaluate_ppl(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    window: int | None = None,
    max_batch_tokens: int = 8192,
    progress=None,
) -> dict:
    """-> {"task": "ppl", "n", "tokens", "bytes", "nll", "ppl", "bits_per_byte"} over `texts`."""
    window = window or model.config.max_seq_len
    # The first text token needs something to be predicted from: bos, or eos for a tokenizer without bos.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pieces: list[tuple[list[int], int]] = []
    n_bytes = 0
    for text in texts:
        pieces += text_windows([start, *tokenizer.encode(text, add_special_tokens=False)], window)
        n_bytes += len(text.encode("utf-8"))
    scores = sum_logprobs(model, pieces, max_batch_tokens, progress)
    nll = -sum(s for s, _ in scores)
    tokens = sum(c for _, c in scores)
    return {
        "task": "ppl",
        "n": len(texts),
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": nll,
        "ppl": math.exp(nll / tokens) if tokens else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
    }
