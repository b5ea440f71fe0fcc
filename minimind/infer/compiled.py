"""`Engine(compile=True)`: single-sequence decode steps through torch.compile, compiled once.

Decoding one sequence reads every weight once per token and does little arithmetic, so eager PyTorch
loses on two counts: Python and one kernel launch per operation (~40 per layer), and the BLAS call for a
one-row matmul, which reads the weights slower than the memory allows. Inductor fuses the small operations
into a few generated C++ loops and, with `decompose_mm_pass` (off by default; its size limit is raised here
so the output head qualifies too), writes each one-row matmul as its own vectorised row-dot loop over the
(out, in) weights; int8 and int4 weights (`Int8Linear`, `Int4Linear`) call the VNNI kernels of
kernels/int_gemv.py inside the graph, a layer's q/k/v and gate/up products merged into one call each by a graph
pass (where the CPU lacks them: a row-dot converting each int8 byte as it reads it, PyTorch's packed int4
kernel).
The gain over the eager engine, float32 and int8, is in docs/performance.md. A compiled model keeps the weights' standard layout (`gemv_layout` is not applied).
Attention of the one new token is written out as products and sums (`minimind.kernels.attention.one_query`), so
the whole step (every layer, and an int8 output head) becomes one generated kernel instead of one SDPA call
per layer between kernels. The new token's keys and values are stored into the cache tensors in place
(infer/cache.py writes into the whole per-layer tensor, not a row slice of it: a store into a view of a graph
input made Inductor copy the whole cache out and back in every layer of every step, so a step's cost grew with
the cache's capacity). What a step is made of, by share of its time, is in docs/performance.md: the weights'
reads in the generated kernel and the float head's oneDNN matmul, then the Python around them (Dynamo's
guards, the wrapper's buffer allocations, the engine's sampling and detokenizing).

Only steps with one running sequence take this path: with several rows a matmul is a real GEMM, where the
eager oneDNN (prepacked weights, layout.py) / fbgemm kernels are as fast or faster, and compiling for every
batch size would recompile whenever a server's batch changes. The sizes that change between calls are
compiled as symbols, so one compilation serves every token and every cache: the number of columns attended
(the mask's width, the tokens so far) and the cache's capacity and rows (they grow geometrically when a
longer request or a larger batch arrives). Attending over the whole capacity instead, with fixed shapes, made a step's cost follow the
request's `max_tokens` rather than its length, and a cache that once grew kept every later request several
times slower per token (docs/performance.md).
Compiling takes 15-60 s on two cores; with a cache directory (compile_cache.py, what the CLI uses) only the
first start on a machine pays it (not for MoE models, whose routing breaks the graph: they compile at every
start). Prefill stays eager (prompt lengths vary).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from minimind.infer.compile_cache import compile_key, load_step, save_step
from minimind.infer.layout import OutputHead
from minimind.infer.quantize import QUANTIZED_LINEARS
from minimind.kernels import use_compiled_decode
from minimind.kernels.int_gemv import FuseSharedInput
from minimind.model.moe import MoEFeedForward

log = logging.getLogger(__name__)

DECODE_COMPILE_OPTIONS = {
    # M = 1 row only (batch-1 decoding); the other two dimensions up to this size (the head is vocab x dim).
    "post_grad_fusion_options": {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": 1 << 17}},
    # Store small pointwise results instead of recomputing them inside the loops that read them: without
    # this the one-query attention recomputes each query's RoPE (pow, cos, a gather) for every cached column.
    "realize_cpu_opcount_threshold": 8,
    # Dynamo's guards already check every input tensor's sizes and strides before the graph runs; Inductor's
    # own per-call asserts repeat that for ~150 inputs (parameters included), a visible share of a decode step.
    "size_asserts": False,
    # int8/int4 steps: one VNNI call for the products of one input with several matrices (q, k, v; gate, up)
    "post_grad_custom_post_pass": FuseSharedInput(),
}


class DecodeStep(nn.Module):
    """One decode step of a MiniMind body, with the output head inside the graph when one is given."""

    def __init__(self, body: nn.Module, head: nn.Module | None):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """ids (B, 1) -> hidden state (B, dim) of the new token, or its logits (B, vocab) with a head."""
        hidden = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True)[0][:, -1]
        return hidden if self.head is None else self.head(hidden)


class CompiledDecoder:
    """step(ids, mask, positions, cache) -> logits (B, vocab): the body (and an int8 head) compiled.

    The cache is bound with `kv_len=None` (every column) and `mask` (B, 1, 1, S) says which of the first S
    columns to attend; S and the cache's capacity and rows are symbolic in the compiled graph (rows only if
    there were at least 2 when it compiled: PyTorch specialises sizes of 1, hence `Engine.warm_up`).
    `output_head` is how the engine calls the model's output layer eagerly. An int8 head joins the graph (its
    row-dot reads the bytes faster than fbgemm's one-row kernel); a float head stays outside, where the
    oneDNN prepacked matmul (layout.py) beats the generated row-dot.

    With `cache_dir` (ignored for MoE models: `cacheable`), the step is compiled ahead of time at its first call and saved there, or loaded from
    there when an earlier start saved it (compile_cache.py): no tracing at all on later starts. `loaded` says
    which happened. If the saved step's guards ever refuse an input, or it cannot be built, the ordinary
    `torch.compile` path below serves instead.
    """

    def __init__(self, body: nn.Module, output_head: OutputHead, device: torch.device,
                 cache_dir: str | Path | None = None):
        use_compiled_decode(body)
        in_graph = isinstance(output_head.head, QUANTIZED_LINEARS)  # int8 or int4
        self.eager_head = None if in_graph else output_head
        self.options = DECODE_COMPILE_OPTIONS if device.type == "cpu" else None
        self.module = DecodeStep(body, output_head.head if in_graph else None)
        # dynamic=None: the dimensions marked in __call__ are symbolic from the first compilation on.
        self.step = torch.compile(self.module, dynamic=None, options=self.options)
        self._marked_keys: torch.Tensor | None = None
        self.cache_path: Path | None = None
        self._saved = None  # the ahead-of-time compiled step, called as _saved(module, ids, mask, positions, cache)
        # An MoE layer's routing turns its per-expert token counts into Python numbers, which breaks the graph: such
        # a step cannot be compiled ahead of time in one piece, so it is not cached and compiles at every start.
        self.cacheable = not any(isinstance(m, MoEFeedForward) for m in body.modules())
        if cache_dir is not None and self.cacheable:
            config = body.config.to_dict() if hasattr(body.config, "to_dict") else vars(body.config)
            # int8 and int4 steps differ in their weights' modules, not in the config
            # (and in whether they run the VNNI kernels, kernels/int_gemv.py)
            config = {**config, "quantized": sorted({type(m).__name__ + ("-vnni" if m.vnni else "")
                                                     for m in body.modules() if isinstance(m, QUANTIZED_LINEARS)})}
            dtype = next(body.parameters()).dtype
            self.cache_path = Path(cache_dir) / compile_key(config, device, dtype, in_graph, self.options).name
            self._saved = load_step(self.cache_path, self.module)
        self.loaded = self._saved is not None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        if self.cache_path is not None and self._saved is None:
            self._saved = self._compile_ahead(ids, mask, positions, cache)
            self.cache_path = None  # compiled (or failed) once: no second attempt
        out = None
        if self._saved is not None:
            try:
                out = self._saved(self.module, ids, mask, positions, cache)
            except RuntimeError as err:
                if not str(err).startswith("GuardManager check failed"):
                    raise
                log.warning("compiled decode: the saved step refused this input (%s); compiling it again", err)
                self._saved = None  # the step rewrites the same cache columns, so running it again is safe
        if out is None:
            out = self._compiled_call(ids, mask, positions, cache)
        return out if self.eager_head is None else self.eager_head(out)

    def _compiled_call(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        if cache.keys[0] is not self._marked_keys:  # a new allocation (the cache grew): mark rows, columns
            _mark_dynamic(cache, None)
            self._marked_keys = cache.keys[0]
        _mark_dynamic(None, mask)
        return self.step(ids, mask, positions, cache)

    def _compile_ahead(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        """Compile the step for inputs like these (rows, columns and width symbolic) and save it; None on failure.

        The example cache and mask are copies: the dimension marks compilation needs stay off the engine's
        own tensors, which a loaded step's guards would refuse (they were saved without marks).
        """
        example = copy.copy(cache)
        example.keys = [t.clone() for t in cache.keys]
        example.values = [t.clone() for t in cache.values]
        example_mask = mask.clone()
        _mark_dynamic(example, example_mask)
        path = self.cache_path
        try:
            compiled = torch.compile(DecodeStep.forward, fullgraph=True, dynamic=None, options=self.options)
            step = compiled.aot_compile(((self.module, ids, example_mask, positions, example), {}))
        except Exception as err:  # e.g. a model torch cannot capture in one graph: the ordinary path still works
            log.warning("compiled decode: ahead-of-time compilation failed (%s); compiling without the cache", err)
            return None
        save_step(step, path, self.module)
        return step


def _mark_dynamic(cache, mask: torch.Tensor | None) -> None:
    """Mark the sizes that change between calls as symbolic: the cache's rows and capacity, the mask's width."""
    for tensor in [] if cache is None else cache.keys + cache.values:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)  # stays fixed if it is 1 when first compiled
        torch._dynamo.maybe_mark_dynamic(tensor, 2)
    if mask is not None:
        torch._dynamo.maybe_mark_dynamic(mask, 3)
