"""Mixture of experts: a softmax top-k router, routed SwiGLU experts, always-on shared experts (zero or more).

Copied into saved model directories as HF remote code: imports only torch and sibling model files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_minimind import MiniMindConfig
from .layers import FeedForward


class MoEGate(nn.Module):
    """Scores every token against every routed expert and keeps the top `num_experts_per_tok`."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        # Renormalise the k chosen weights to sum to 1. At top-1 that makes the weight exactly 1, which only
        # configs with `norm_top1_prob` do (minimind-3, Qwen3-MoE); MiniMind2-era top-1 models keep the router
        # probability as the expert's weight, as they were trained (configuration_minimind.py).
        self.renormalise = config.renormalises_top_k()
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        nn.init.normal_(self.weight, std=config.initializer_range)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> expert ids (B·T, k), their weights (B·T, k), and the load-balancing loss."""
        b, t, d = x.shape
        scores = F.linear(x.reshape(-1, d), self.weight).softmax(dim=-1)  # (N, E)
        weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training and self.alpha > 0:
            aux = self._balance_loss(scores, ids, b, t)
        else:
            aux = scores.new_zeros(())
        return ids, weights, aux

    def _balance_loss(self, scores: torch.Tensor, ids: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """alpha · Σ_e f_e · P_e, where f_e is expert e's share of routed slots (scaled so uniform = 1) and
        P_e its mean router probability; minimised by spreading tokens evenly. Only P_e carries gradient."""
        e, k = self.n_experts, self.top_k
        if self.seq_aux:  # balance within each sequence
            counts = scores.new_zeros(b, e).scatter_add_(1, ids.view(b, -1), scores.new_ones(b, t * k))
            f = counts / (t * k / e)
            p = scores.view(b, t, e).mean(dim=1)
            return (f * p).sum(dim=1).mean() * self.alpha
        f = F.one_hot(ids.view(-1), e).float().mean(0) * e  # balance over the whole batch
        return (f * scores.mean(0)).sum() * self.alpha


class MoEFeedForward(nn.Module):
    """y = Σ_top-k w_e·expert_e(x) + Σ shared(x).

    Training sends each expert the tokens routed to it (boolean selection, autograd-friendly). Inference
    sorts the (token, expert) pairs by expert once and runs each expert on one contiguous slice, skipping
    experts no token chose: the same numbers with one sort instead of E masks.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate = MoEGate(config)
        width = config.moe_intermediate_size
        self.experts = nn.ModuleList(FeedForward(config, width) for _ in range(config.n_routed_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))
        # (self, flat, ids, weights) -> routed output, in training and inference; minimind.kernels may install one
        self.dispatch_function = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> (output (B, T, dim), load-balancing loss)."""
        b, t, d = x.shape
        ids, weights, aux = self.gate(x)
        flat = x.reshape(-1, d)
        if self.dispatch_function is not None:
            routed = self.dispatch_function(self, flat, ids, weights)
        elif self.training:
            routed = self.dispatch_masked(flat, ids, weights)
        else:
            routed = self.dispatch_grouped(flat, ids, weights)
        out = routed.view(b, t, d)
        for shared in self.shared_experts:
            out = out + shared(x)
        return out, aux

    def dispatch_masked(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per expert: select its (token, slot) pairs with a boolean mask, run, scatter back weighted."""
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.nonzero(ids == e, as_tuple=True)
            # Every expert runs (possibly on zero rows) so all parameters join the graph, as DDP requires.
            y = expert(flat[token_idx]) * weights[token_idx, slot_idx, None].to(flat.dtype)
            out.index_add_(0, token_idx, y)
        return out

    @torch.no_grad()
    def dispatch_grouped(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sort (token, expert) pairs by expert; each expert processes one contiguous block."""
        k = ids.shape[1]
        order = ids.view(-1).argsort(stable=True)
        counts = torch.bincount(ids.view(-1), minlength=len(self.experts)).tolist()
        token_of = order // k  # which token each sorted pair belongs to
        pair_weights = weights.view(-1)[order].to(flat.dtype)
        out = torch.zeros_like(flat)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = token_of[start : start + n]
                out.index_add_(0, rows, self.experts[e](flat[rows]) * pair_weights[start : start + n, None])
            start += n
        return out
