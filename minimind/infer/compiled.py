"""`Engine(compile=True)`: single-sequence decode steps compiled once, into one C++ function.

Decoding one sequence reads every weight once per token and does little arithmetic, so eager PyTorch
loses on two counts: Python and one kernel launch per operation (~40 per layer), and the BLAS call for a
one-row matmul, which reads the weights slower than the memory allows. Inductor fuses the small operations
into a few generated C++ loops and, with `decompose_mm_pass` (off by default; its size limit is raised here
so the output head qualifies too), writes each one-row matmul as its own vectorised row-dot loop over the
(out, in) weights; int8 and int4 weights (`Int8Linear`, `Int4Linear`) call the VNNI kernels of
kernels/int_gemv.py inside the graph, a layer's q/k/v and gate/up products merged into one call each by a graph
pass (where the CPU lacks them: a row-dot converting each int8 byte as it reads it, PyTorch's packed int4
kernel). A compiled model keeps the weights' standard layout (`gemv_layout` is not applied).
Attention of the one new token is written out as products and sums (`minimind.kernels.attention.one_query`), so
the whole step (every layer, and an int8 output head) becomes one generated kernel instead of one SDPA call
per layer between kernels. The new token's keys and values are stored into the cache tensors in place
(infer/cache.py writes into the whole per-layer tensor, not a row slice of it: a store into a view of a graph
input made Inductor copy the whole cache out and back in every layer of every step, so a step's cost grew with
the cache's capacity).

The step is exported (torch.export) and compiled by AOTInductor into a shared library whose one entry point
takes the tensors and runs every kernel: no Dynamo guards, no Python wrapper around the kernels. Those cost
0.3-0.6 ms a token under `torch.compile`, as much as the int8 weights' reads themselves; the gain, float32,
int8 and int4, is in docs/performance.md. MoE models are the exception: their routing turns per-expert token
counts into Python numbers, which no single graph holds, so their step goes through `torch.compile`.

Steps of one running sequence take this path; so do steps of 2 to FLOAT_ROWS rows of a float32 model where
the kernels run, through a second package whose row count is a symbol (`ready_for`; its products read each
weight row once for all rows). Other batches (more rows, int8/int4, no kernels) run eagerly, where a matmul of
many rows is a real GEMM for the oneDNN (prepacked weights, layout.py) / fbgemm kernels. The sizes that change
between calls are compiled as symbols, so one compilation serves every token and every cache: the number of columns attended
(the mask's width, the tokens so far) and the cache's capacity and rows (they grow geometrically when a
longer request or a larger batch arrives). Attending over the whole capacity instead, with fixed shapes, made a
step's cost follow the request's `max_tokens` rather than its length, and a cache that once grew kept every later
request several times slower per token (docs/performance.md).
Compiling takes 15-60 s on two cores; with a cache directory (compile_cache.py, what the CLI uses) only the
first start on a machine pays it, later ones load the package in milliseconds (not MoE models: they compile at
every start). Prefill stays eager (prompt lengths vary).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from minimind.infer.cache import SlotKVCache
from minimind.infer.compile_cache import PACKAGE_OPTIONS, compile_key, load_package, save_package
from minimind.infer.layout import OutputHead
from minimind.infer.quantize import QUANTIZED_LINEARS
from minimind.kernels import int_gemv, use_compiled_decode
from minimind.kernels.int_gemv import FloatGemv, FuseSharedInput
from minimind.model.moe import MoEFeedForward

log = logging.getLogger(__name__)

DECODE_COMPILE_OPTIONS = {
    # M = 1 row only (batch-1 decoding); the other two dimensions up to this size (the head is vocab x dim).
    "post_grad_fusion_options": {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": 1 << 17}},
    # Store small pointwise results instead of recomputing them inside the loops that read them: without
    # this the one-query attention recomputes each query's RoPE (pow, cos, a gather) for every cached column.
    "realize_cpu_opcount_threshold": 8,
    # no per-call asserts of the ~150 inputs' sizes and strides (parameters included), a visible share of a step:
    # the engine hands the step the same cache tensors every call (and under torch.compile, Dynamo's guards check)
    "size_asserts": False,
    # float32 steps: the products of one row with a weight matrix through the kernel of kernels/int_gemv.py
    "post_grad_custom_pre_pass": FloatGemv(),
    # one kernel call for the products of one input with several matrices (q, k, v; gate, up)
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


class FlatDecodeStep(nn.Module):
    """The decode step over plain tensors, as torch.export takes it: (ids, mask, positions, keys, values) with the
    cache's per-layer key and value tensors as two lists; the new token's keys and values are stored into them."""

    def __init__(self, step: DecodeStep):
        super().__init__()
        self.step = step

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        for tensor in keys + values:  # the mask never reaches past the cache's columns, nor the batch its rows
            torch._check(mask.shape[-1] <= tensor.shape[2])
            torch._check(ids.shape[0] <= tensor.shape[0])
        cache = SlotKVCache.over(keys, values, positions, past=mask.shape[-1] - 1)
        return self.step(ids, mask, positions, cache)


class CompiledDecoder:
    """step(ids, mask, positions, cache) -> logits (B, vocab): the body (and an int8 head) compiled.

    The cache is bound with `kv_len=None` (every column) and `mask` (B, 1, 1, S) says which of the first S
    columns to attend; S and the cache's capacity and rows are symbolic in the compiled code.
    `output_head` is how the engine calls the model's output layer eagerly. An int8/int4 head joins the graph (its
    kernel reads the bytes faster than fbgemm's one-row kernel), and so does a float32 one where `f32_gemv` reads
    it (`float_kernels`); otherwise a float head stays outside, where the oneDNN prepacked matmul (layout.py)
    beats Inductor's generated row-dot.

    How it is compiled (`packaged` says which):
    - packaged (every model but MoE ones): exported with torch.export and compiled by AOTInductor into a shared
      library, loaded with the model's own weights and buffers (not copies: updated in place, they are seen).
      A call is one C++ function over a flat list of tensors: no guards, no Python wrapper, which is most of what
      a one-token step costs beside the weights' reads. With `cache_dir` the package is saved there and loaded
      by later starts (compile_cache.py; `loaded` says it was), else built in a temporary directory.
    - `torch.compile` (MoE models: their routing turns per-expert token counts into Python numbers, which no
      single graph can hold; and any model whose export or packaging fails, with a warning): Dynamo traces at
      the first call of every start (rows only symbolic if there were at least 2 then: PyTorch specialises sizes
      of 1, hence `Engine.warm_up`).
    """

    def __init__(self, body: nn.Module, output_head: OutputHead, device: torch.device,
                 cache_dir: str | Path | None = None):
        use_compiled_decode(body)
        dtype = next(body.parameters()).dtype
        # float32 on a CPU with the kernels: every product, the head's too, through kernels/int_gemv.py's f32_gemv
        # (the library is loaded before a saved package that calls it)
        self.float_kernels = device.type == "cpu" and dtype == torch.float32 and int_gemv.available()
        # int8 or int4 heads, and float32 ones where the kernel reads them
        in_graph = isinstance(output_head.head, QUANTIZED_LINEARS) or self.float_kernels
        self.eager_head = None if in_graph else output_head
        self.options = DECODE_COMPILE_OPTIONS if device.type == "cpu" else None
        self.module = DecodeStep(body, output_head.head if in_graph else None)
        self.flat = FlatDecodeStep(self.module)
        self._compiled = None  # the torch.compile path, built at its first use (importing Dynamo takes a second)
        self._marked_keys: torch.Tensor | None = None
        self.packaged = not any(isinstance(m, MoEFeedForward) for m in body.modules())
        self.cacheable = self.packaged  # kept on disk (with a cache_dir): packaged steps only
        self.cache_path: Path | None = None
        self._run = None  # the packaged step: run([ids, mask, positions, *keys, *values]) -> [out]
        # float32 with the kernels: a second package for 2 to FLOAT_ROWS rows (several sequences at once), built
        # at its first use (`ready_for`), whose products read each weight row once for all rows (f32_gemv). Not
        # for int8/int4 weights: their layers choose a kernel by the row count, which a symbolic count cannot.
        self.batched = (self.packaged and self.float_kernels
                        and not any(isinstance(m, QUANTIZED_LINEARS) for m in body.modules()))
        self.rows_cache_path: Path | None = None
        self._run_rows = None
        # what the packaged step reads as its weights: the model's own tensors, by name (kept alive here)
        self._weights = {name: tensor.detach() for name, tensor in self.flat.state_dict(keep_vars=True).items()}
        if cache_dir is not None and self.packaged:
            config = body.config.to_dict() if hasattr(body.config, "to_dict") else vars(body.config)
            # int8 and int4 steps differ in their weights' modules, not in the config
            # (and in whether they run the VNNI kernels, kernels/int_gemv.py)
            config = {**config, "quantized": sorted({type(m).__name__ + ("-vnni" if m.vnni else "")
                                                     for m in body.modules() if isinstance(m, QUANTIZED_LINEARS)}),
                      "float_kernels": self.float_kernels}
            self.cache_path = Path(cache_dir) / compile_key(config, device, dtype, in_graph, self.options).name
            self._run = load_package(self.cache_path, self._weights)
            if self.batched:
                rows_key = compile_key({**config, "rows": f"1-{int_gemv.FLOAT_ROWS}"}, device, dtype, in_graph,
                                       self.options)
                self.rows_cache_path = Path(cache_dir) / rows_key.name
                self._run_rows = load_package(self.rows_cache_path, self._weights)
        self.loaded = self._run is not None

    def loaded_for(self, batches: bool) -> bool:
        """Whether what `Engine.warm_up(batches)` builds came from the compile cache: the one-row step and, with
        `batches`, the step of several rows where there is one."""
        return self.loaded and (self._run_rows is not None or not (batches and self.batched))

    def ready_for(self, rows: int, cache) -> bool:
        """Whether a step of `rows` rows runs compiled: one row always; 2 to FLOAT_ROWS rows where `batched`, once
        their package is built (here, the first time: it is compiled, or loaded from the cache) and works."""
        if rows == 1:
            return True
        if not self.batched or rows > int_gemv.FLOAT_ROWS:
            return False
        if self._run_rows is None:
            if self.rows_cache_path is None or not self.rows_cache_path.exists():  # no silent pause on first use
                log.warning("compiled decode: compiling the step of 2-%d rows%s (about as long as the one-row step)",
                            int_gemv.FLOAT_ROWS, "" if self.rows_cache_path is None
                            else ", once for this model shape and machine")
            self._run_rows = self._package(cache, self.rows_cache_path, batch=True)
            self.batched = self._run_rows is not None
        return self.batched

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """ids, positions (B, 1), mask (B, 1, 1, S) -> logits (B, vocab); B > 1 only where `ready_for(B)`."""
        if ids.shape[0] > 1:
            return self._run_rows([ids, mask, positions, *cache.keys, *cache.values])[0]
        if self.packaged and self._run is None:
            self._run = self._package(cache, self.cache_path)
            self.packaged = self._run is not None
        if self._run is not None:
            out = self._run([ids, mask, positions, *cache.keys, *cache.values])[0]
        else:
            out = self._compiled_call(ids, mask, positions, cache)
        return out if self.eager_head is None else self.eager_head(out)

    def _compiled_call(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        if cache.keys[0] is not self._marked_keys:  # a new allocation (the cache grew): mark rows, columns
            _mark_dynamic(cache, None)
            self._marked_keys = cache.keys[0]
        _mark_dynamic(None, mask)
        if self._compiled is None:  # dynamic=None: the dimensions marked above are symbolic from the first compilation
            self._compiled = torch.compile(self.module, dynamic=None, options=self.options)
        return self._compiled(ids, mask, positions, cache)

    def _package(self, cache, path: Path | None, batch: bool = False):
        """Export the step and compile it with AOTInductor (saved to `path` when there is one), then load it;
        None, with a warning, when that fails (the `torch.compile` path serves one row instead; batches decode
        eagerly).

        The example inputs are fresh tensors shaped like the cache's (3 rows, 64 columns, a mask of 8): rows,
        columns and the mask's width are compiled as symbols, so one package serves every cache and length; with
        `batch` the step's own row count is a symbol too (1 to FLOAT_ROWS; the one-row package is the other).
        """
        device, dtype = cache.keys[0].device, cache.keys[0].dtype
        _, n_kv_heads, _, head_dim = cache.keys[0].shape
        layers = cache.n_layers
        rows, columns, width = Dim("rows", min=1), Dim("columns", min=3), Dim("width", min=2)
        per_layer = [{0: rows, 2: columns}] * layers
        per_row = {0: Dim("batch", min=1, max=int_gemv.FLOAT_ROWS)} if batch else None  # the step's own rows
        b = 2 if batch else 1
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                # the engine runs under inference mode; torch's export warns of its own deprecations
                warnings.simplefilter("ignore", FutureWarning)
                kv = [torch.zeros(3, n_kv_heads, 65, head_dim, dtype=dtype, device=device) for _ in range(2 * layers)]
                ids = torch.zeros(b, 1, dtype=torch.long, device=device)
                mask = torch.ones(b, 1, 1, 8, dtype=torch.bool, device=device)
                positions = torch.full((b, 1), 7, dtype=torch.long, device=device)
                program = torch.export.export(
                    self.flat, (ids, mask, positions, kv[:layers], kv[layers:]),
                    dynamic_shapes=(per_row, {**(per_row or {}), 3: width}, per_row, per_layer, per_layer), strict=False)
            options = {**(self.options or {}), **PACKAGE_OPTIONS}
            with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                if path is None or not save_package(program, path, options):  # no cache, or it cannot be written
                    path = Path(scratch) / "decode.pt2"
                    save_package(program, path, options)
                return load_package(path, self._weights)
        except Exception as err:  # a model torch cannot export in one graph: the torch.compile path still works
            log.warning("compiled decode: packaging the %s step failed (%s); %s", "batched" if batch else "one-row",
                        err, "batches decode eagerly" if batch else "compiling it with torch.compile")
            return None


def _mark_dynamic(cache, mask: torch.Tensor | None) -> None:
    """Mark the sizes that change between calls as symbolic: the cache's rows and capacity, the mask's width."""
    for tensor in [] if cache is None else cache.keys + cache.values:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)  # stays fixed if it is 1 when first compiled
        torch._dynamo.maybe_mark_dynamic(tensor, 2)
    if mask is not None:
        torch._dynamo.maybe_mark_dynamic(mask, 3)
