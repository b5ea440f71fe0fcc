"""Packed rows as separate documents: attention per document instead of one masked attention per row.

Packing puts several documents (conversations, texts) in one training row, and each may attend only to itself.
A block-diagonal (T x T) mask does that, but SDPA then still computes every query-key pair of the row's causal
triangle, most of them masked out: a 512-token row of ten 50-token conversations needs about a tenth of that.
`Documents` gathers each document into its own row of a small batch (one batch per power-of-two length bucket,
so padding costs at most 2x a document's own work), runs plain causal SDPA on each batch and scatters the
outputs back. Padding (document id -1) runs are documents too; their outputs are never read by a real token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minimind.model.documents import document_starts

MIN_WIDTH = 16  # shorter documents share one bucket: SDPA's fixed cost per call outweighs their padding


class Documents:
    """Where each document of a packed batch lies, grouped for batched per-document attention.

    Built once per forward from the document ids (B, T) and passed to every attention layer in place of a mask.
    """

    def __init__(self, doc_ids: torch.Tensor):
        b, t = doc_ids.shape
        device = doc_ids.device
        self.shape = (b, t)
        starts = document_starts(doc_ids).flatten().nonzero().squeeze(1)  # flat index of each document's start
        lengths = torch.diff(starts, append=torch.tensor([b * t], device=device))
        widths = (2 ** torch.ceil(torch.log2(lengths.double()))).long().clamp(min=MIN_WIDTH)
        # One (documents, width) index per bucket into the flattened rows, with the extra zero row (index b*t)
        # past each document's end; `order` lists the real positions in the order the outputs come out.
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        order = []
        for width in widths.unique().tolist():
            chosen = (widths == width).nonzero().squeeze(1)
            offsets = torch.arange(width, device=device)
            index = starts[chosen, None] + offsets
            valid = offsets < lengths[chosen, None]
            self.groups.append((torch.where(valid, index, b * t), valid))
            order.append(index[valid])
        taken = torch.cat(order)
        self.inverse = torch.empty_like(taken)
        self.inverse[taken] = torch.arange(taken.numel(), device=device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               causal_sdpa: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """q (B, H, T, D), k and v (B, H_kv, T, D) -> attention output (B, H, T, D), each document alone.

        `causal_sdpa(q, k, v)` is the layer's own causal attention over (N, heads, L, D) batches.
        """
        b, t = self.shape
        rows = [_as_rows(x) for x in (q, k, v)]
        outputs = []
        for index, valid in self.groups:
            qd, kd, vd = (r[index].transpose(1, 2) for r in rows)  # (documents, heads, width, D)
            outputs.append(causal_sdpa(qd, kd, vd).transpose(1, 2)[valid])  # (real positions, heads, D)
        out = torch.cat(outputs)[self.inverse]  # (B*T, heads, D), back in row order
        return out.view(b, t, *out.shape[1:]).transpose(1, 2)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B*T + 1, H, D): one row per position, plus a zero row that padding indexes point at."""
    b, h, t, d = x.shape
    flat = x.transpose(1, 2).reshape(b * t, h, d)
    return torch.cat([flat, flat.new_zeros(1, h, d)])
