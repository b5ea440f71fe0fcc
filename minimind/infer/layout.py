"""Weight memory layout for CPU decoding: same values, same shapes, faster single-row matmuls.

`nn.Linear` stores its weight as (out, in) rows and computes x @ W.T. For one or a few rows of x (decoding),
the CPU BLAS path for that layout reads the matrix markedly slower than when the same matrix is stored as
(in, out) rows, i.e. when W.T is contiguous: on the `small` model's weight set 17.2 ms against 12.9 ms per
token at one thread, and 4x on the 6400 x 512 output head alone (docs/performance.md). Decoding one token
reads every weight once, so this is most of the decode time.

`gemv_layout` re-stores each projection weight in that layout in place: the parameter keeps its shape
(out, in), name, values and identity (optimizers still point at it); only its strides change, from (in, 1)
to (1, out). Training-size matmuls run at the same speed in either layout. A weight shared between modules
(the output head tied to the token embedding) is left alone, because HF `save_pretrained` cannot save a
tied tensor that is not contiguous; `OutputHead` instead keeps a transposed copy of it for decoding.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


@torch.no_grad()
def gemv_layout(model: nn.Module) -> int:
    """Re-store every untied float `nn.Linear` weight of a CPU model column-major; returns how many changed."""
    uses = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None or uses[id(weight)] > 1:
            continue
        if weight.device.type != "cpu" or not weight.is_floating_point() or weight.t().is_contiguous():
            continue
        weight.data = weight.data.t().contiguous().t()
        changed += 1
    return changed


class OutputHead:
    """logits = hidden @ W.T for the output head, with W.T stored contiguous on CPU.

    The copy is refreshed whenever the head's weight changes (its version counter moves with every
    in-place update, e.g. an optimizer step on a model that an RL stage also decodes with, and its
    storage changes when it is replaced), so it never serves stale weights. Heads that are not a plain
    float `nn.Linear` on CPU (int8, GPU) are called as they are.
    """

    def __init__(self, head: nn.Module):
        self.head = head
        weight = getattr(head, "weight", None)
        self.copy = (type(head) is nn.Linear and head.bias is None and weight.device.type == "cpu"
                     and weight.is_floating_point())
        self._key: tuple[int, int] | None = None
        self._weight_t: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, dim) -> logits (B, vocab)."""
        if not self.copy:
            return self.head(hidden)
        weight = self.head.weight
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            with torch.no_grad():
                self._weight_t = weight.detach().t().contiguous()  # (dim, vocab)
            self._key = key
        return hidden @ self._weight_t
