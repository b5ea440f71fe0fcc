"""`Engine(compile=True)`: the decode step through torch.compile, with shapes that do not change per token.

Eager decoding pays Python and one kernel launch per operation (~40 per layer); inductor fuses the small
operations into a few generated C++ loops. On CPU it can also write the one-row matmuls of batch-1
decoding as its own vectorised row-dot loops over the (out, in) weights (`decompose_mm_pass`, off by
default; the limit is raised here so the output head qualifies too), which read the weights faster than
the BLAS call: on the `small` model 9 ms per token against 20 ms eager in the same run (one thread,
docs/performance.md). Such a model keeps the weights' standard layout (`gemv_layout` is not applied).

Shapes stay fixed between tokens because a compiled decode attends over the cache's whole capacity with an
explicit mask (columns at or before each row's position), instead of over the longest row so far: one
compilation per (running rows, cache capacity) pair, reused for every token. Compiling takes 15-60 s on two
cores, which is why it is opt-in: for a fixed batch (the CLI, a benchmark, an eval) it pays back within a
few hundred tokens; a server whose batch size changes every step would recompile for each new size
(torch.compile gives up after `torch._dynamo.config.recompile_limit` shapes and runs those eagerly).
Prefill stays eager (prompt lengths vary).
"""

from __future__ import annotations

import torch

# M = 1 row only (batch-1 decoding); the other two dimensions up to this size (the head is vocab x dim).
DECODE_COMPILE_OPTIONS = {
    "post_grad_fusion_options": {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": 1 << 17}},
}


def compile_decoder(body: torch.nn.Module, device: torch.device):
    """The model body under torch.compile for fixed-shape decode steps (CPU options on CPU)."""
    options = DECODE_COMPILE_OPTIONS if device.type == "cpu" else None
    return torch.compile(body, dynamic=False, options=options)
