"""`Engine(compile_batched=True)`: decode steps of several rows at once through torch.compile (RL rollouts).

An RL rollout decodes a fixed batch of rows (prompts x group size) in lockstep for tens of steps. At the tiny
preset's width a step is ~30 matmuls of 32 rows and ~150 small operations (norms, RoPE, residual adds, SwiGLU,
the cache writes), so eager PyTorch spends as long launching the small operations as computing the matmuls.
Compiled, the small operations fuse into a few generated loops around the matmuls (still BLAS calls) and
attention is a kernel call: `one_query_attention` for float32 where the CPU kernels are built (about a third
of SDPA's time at 32 rows), SDPA otherwise (written out as products and sums, as the one-row step does, it is
several times slower at 32 rows).

The weights are graph inputs, not constants, so an optimizer step (RL trains the policy between rollouts)
never needs a recompilation. The step reads its own copy of the body's projection weights, stored transposed
((in, out) rows: the 32-row BLAS matmul runs faster on that layout), which it copies again from the Engine's
weights whenever their version counters move and at every `refresh` (`Engine.refresh_weights`, called at each
rollout, since a fused optimizer step updates weights without moving their counters): a rollout after an
optimizer step samples from the new weights (tests/test_rollout_compiled.py).

The sizes that change between calls are symbolic, so one compilation serves a whole run: the rows (rows leave at eos; at least 2, single rows decode eagerly),
the columns attended (the tokens so far) and the cache's capacity. The step's cache (`BoundRows`) writes into
the whole cache tensors and slices the rows by a tensor's size, so no Python integer that changes per step
reaches the graph (each one would be a guard, and a recompilation when it changes). The output head stays
outside the graph (a plain matmul on the Engine's transposed copy).
"""

from __future__ import annotations

import torch
from torch import nn

from minimind.infer.compiled import DecodeStep
from minimind.infer.layout import engine_copy
from minimind.kernels import set_attention, use_decode_kernels
from minimind.model.layers import Attention


class FirstColumns:
    """An attention implementation over the first S cache columns only, S the mask's width: the compiled step
    hands attention the whole cache, k and v (B, H_kv, capacity + 1, D), and a mask (B, 1, 1, S), so that
    the cache's capacity is the only size it involves."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
        if mask is not None and q.shape[2] == 1:
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        return self.inner(module, q, k, v, mask, dropout)


class BoundRows:
    """The cache seen by one compiled step: the rows [0, B) of the Engine's `SlotKVCache`, each writing its new
    key/value at its own column (duck-typed HF cache interface: `update`, `get_seq_length`)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: torch.Tensor,
                 positions: torch.Tensor):
        self.keys, self.values = keys, values  # per layer (allocated rows, n_kv_heads, capacity + 1, head_dim)
        self.rows, self.positions = rows, positions  # (B, 1) row numbers [0, B) and write columns

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store (B, n_kv_heads, 1, head_dim) keys/values; return the B rows' (B, n_kv_heads, capacity + 1,
        head_dim). The store goes into the whole tensor: a store into a row slice of a graph input is made on a
        copy of the whole cache that is then copied back."""
        n = self.rows.shape[0]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.positions] = key.transpose(1, 2)  # advanced indices first: target (B, 1, H, D)
        values[self.rows, :, self.positions] = value.transpose(1, 2)
        return keys[:n], values[:n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused with explicit positions and a mask; a constant, so that the graph does not depend on it."""
        return 0


class BatchedDecoder:
    """step(ids, mask, positions, cache) -> hidden (B, dim) of the new tokens: the body compiled for B >= 2 rows.

    The body is a copy over the same weights (`engine_copy`: new modules, shared parameters) whose attention is
    `FirstColumns` of the Engine's eager one (SDPA, or the float32 kernel), so the Engine's own modules (and the
    one-row compiled step's attention) stay as they were.
    """

    def __init__(self, body: nn.Module, device: torch.device):
        body = engine_copy(body)
        set_attention(body, "sdpa")  # not the one-row step's written-out attention
        use_decode_kernels(body, device, next(body.parameters()).dtype)  # on a CPU: the float32 kernel, bf16 matmuls
        for module in body.modules():
            if isinstance(module, Attention):
                module.attention_function = FirstColumns(module.attention_function)
        # (the Engine's weight, this step's copy of it stored transposed) for every float projection
        self.copies = [(module.weight, _transposed_copy(module)) for module in body.modules()
                       if _projection(module)]
        self._key: list[tuple[int, int]] | None = None
        self.module = DecodeStep(body, None)
        self.step = torch.compile(self.module, dynamic=None)
        self.compiled_calls = 0

    def refresh(self) -> None:
        """Copy the weights again at the next call, whatever their version counters say (a fused optimizer step
        updates weights without moving them; `Engine.refresh_weights`)."""
        self._key = None

    @torch.no_grad()
    def _sync(self) -> None:
        key = [(weight.data_ptr(), weight._version) for weight, _ in self.copies]
        if key != self._key:
            for weight, copy in self.copies:
                copy.copy_(weight)
            self._key = key

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """ids, positions (B, 1); mask (B, 1, 1, S) bool over the first S columns; cache: the Engine's
        `SlotKVCache` (its rows [0, B) are the batch)."""
        self._sync()
        rows = cache._row_numbers[: ids.shape[0]]  # (B, 1)
        bound = BoundRows(cache.keys, cache.values, rows, positions)
        for tensor in (ids, positions, rows, mask):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        for tensor in cache.keys + cache.values:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch._dynamo.maybe_mark_dynamic(tensor, 2)
        self.compiled_calls += 1
        return self.step(ids, mask, positions, bound)


def _projection(module: nn.Module) -> bool:
    """A plain float CPU `nn.Linear` (the output head is not in the body)."""
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and weight.device.type == "cpu" and weight.is_floating_point())


def _transposed_copy(module: nn.Linear) -> torch.Tensor:
    """Give `module` its own copy of its weight, the same (out, in) values stored as (in, out) rows, and return it.

    At a few dozen rows the BLAS matmul x @ W.T runs markedly faster with W.T contiguous than with W contiguous
    (docs/performance.md, rollout section); the copy is what it costs: one more copy of the body's projections."""
    weight = module.weight
    copy = weight.detach().t().contiguous().t()
    module.weight = nn.Parameter(copy, requires_grad=False)
    return module.weight
