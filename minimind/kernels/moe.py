"""MoE expert dispatch grouped by expert, with gradients (`sorted_dispatch`).

The plain model (minimind/model/moe.py) trains with one boolean selection per expert: every expert scans all
(token, slot) pairs with `nonzero`, gathers its rows, and scatters its output back with `index_add_`, whose
backward gathers again; E passes over the tokens each way. This one sorts the pairs by expert once, gathers
the tokens once into expert-contiguous order, runs each expert on a view of its slice (its GEMMs over exactly
its tokens, no per-token loop, no all-experts compute), weights the outputs and puts them back in pair order
with one `index_copy` (whose backward is one gather), then sums each token's k slots. The same numbers as the
plain path up to the order of the k-term sum (tests/test_moe_kernels.py).
"""

from __future__ import annotations

import torch

from minimind.model.moe import MoEFeedForward


def sorted_dispatch(moe: MoEFeedForward, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """flat (N, dim), ids (N, k) expert of each slot, weights (N, k) -> Σ_slots weight · expert(token) (N, dim).

    Differentiable in `flat`, `weights` and the experts' parameters. Every expert runs, on zero rows if no token
    chose it, so all parameters join the graph (DDP requires it)."""
    n, k = ids.shape
    pairs = ids.reshape(-1)  # (N·k,) expert of each (token, slot) pair, token-major
    order = pairs.argsort(stable=True)  # (N·k,) pair indices grouped by expert
    counts = torch.bincount(pairs, minlength=len(moe.experts)).tolist()  # one host sync per layer
    grouped = flat[order // k] if k > 1 else flat[order]  # (N·k, dim), expert-contiguous
    outputs = [expert(rows) for expert, rows in zip(moe.experts, grouped.split(counts), strict=True)]
    y = torch.cat(outputs) * weights.reshape(-1)[order, None].to(flat.dtype)  # (N·k, dim)
    y = torch.empty_like(y).index_copy(0, order, y)  # back to pair order: row i·k + s is token i's slot s
    return y.view(n, k, -1).sum(dim=1) if k > 1 else y
