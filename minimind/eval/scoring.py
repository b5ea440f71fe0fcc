"""Log-likelihood of chosen tokens of many sequences, batched: the core of perplexity and choice scoring.

A "scored sequence" is (ids, first): the model reads all of `ids`, and the log-probabilities of the tokens
at positions first, first+1, ..., len(ids)-1 (each predicted from everything before it) are summed.
Sequences are grouped by length into batches of at most `max_batch_tokens` padded tokens; padding is on the
right, where causal attention keeps it from touching real tokens, so no mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minimind.kernels.training import training_view


def batches_by_length(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so each batch's padded size (count x longest) stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def sum_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], int]],
    max_batch_tokens: int = 8192,
    progress=None,
) -> list[tuple[float, int]]:
    """For each (ids, first): (sum of log p(ids[t] | ids[:t]) for t >= first, number of such t).

    `model` is a MiniMind causal LM: it is asked for per-row sums through its `targets=` path, not for logits.

    `progress`, if given, is called with the number of sequences finished after each batch.
    """
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for batch in batches_by_length([len(ids) for ids, _ in sequences], max_batch_tokens):
        width = len(sequences[batch[0]][0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)  # -100 = not scored
        for row, i in enumerate(batch):
            seq, first = sequences[i]
            ids[row, : len(seq)] = torch.as_tensor(seq)
            targets[row, first : len(seq)] = torch.as_tensor(seq[first:])
        # Position t predicts token t+1; the model scores only the marked positions, a chunk at a time, without
        # keeping (tokens x vocab) logits (on CPU the unscored ones, e.g. a choice's question, skip the head).
        targets = torch.cat([targets[:, 1:], torch.full((len(batch), 1), -100)], dim=1).to(device)
        scored = targets != -100
        nll = training_view(model)(input_ids=ids.to(device), use_cache=False, targets=targets, target_weights=scored.float(),
                    per_row=True).loss
        sums = (-nll).tolist()
        counts = scored.sum(dim=1).tolist()
        for row, i in enumerate(batch):
            results[i] = (sums[row], counts[row])
        if progress is not None:
            progress(len(batch))
    return results
