"""Packed rows as separate documents, in the plain form: positions that restart per document and a
block-diagonal causal mask. Shipped in saved model directories with modeling_minimind.py: torch only.

The faster per-document attention for CPU training (each document gathered into its own row of a small batch)
is `minimind.kernels.documents.Documents`, which a trainer selects at set-up.
"""

from __future__ import annotations

import torch


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> bool (B, T), True where a document begins (every row's first position too)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document's first token: (B, T) -> (B, T)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    first = torch.cummax(torch.where(document_starts(doc_ids), index, torch.zeros_like(index)), dim=1).values
    return index - first


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool (B, 1, T, T): causal and within the same document (a padding run attends within itself)."""
    t = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]
