"""`Engine(compile=True)`: single-sequence decode steps through torch.compile, with fixed shapes.

Decoding one sequence reads every weight once per token and does little arithmetic, so eager PyTorch
loses on two counts: Python and one kernel launch per operation (~40 per layer), and the BLAS call for a
one-row matmul, which reads the weights slower than the memory allows. Inductor fuses the small operations
into a few generated C++ loops and, with `decompose_mm_pass` (off by default; its size limit is raised here
so the output head qualifies too), writes each one-row matmul as its own vectorised row-dot loop over the
(out, in) weights; int8 weights (`Int8Linear`) become a row-dot that converts each byte as it reads it.
Measured on `small` at one thread: 97 against 59 tokens/s fp32, 231 against 153 int8
(docs/performance.md). A compiled model keeps the weights' standard layout (`gemv_layout` is not applied).

Only steps with one running sequence take this path: with several rows a matmul is a real GEMM, where the
eager oneDNN (prepacked weights, layout.py) / fbgemm kernels are as fast or faster, and compiling for every
batch size would recompile whenever a server's batch changes. Shapes stay fixed between tokens because the
compiled step attends over the cache's whole capacity with an explicit mask (columns at or before the
position) instead of over the tokens so far: one compilation per cache capacity (which grows geometrically), reused for every token.
Compiling takes 15-60 s on two cores, which is why it is opt-in; prefill stays eager (prompt lengths vary).
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
