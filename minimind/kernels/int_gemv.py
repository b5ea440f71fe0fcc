"""int8, 4-bit and float32 weight matmuls for decoding on CPUs with AVX-512 VNNI or AVX2 (`int_gemv.cpp`), built on
first use.

Decoding multiplies one activation row (or a few) by every weight matrix once per token. PyTorch's kernels for
that shape either convert each weight to float before multiplying (Inductor's generated row-dot, the packed
int4 kernel with bf16 activations) or are built for larger matrices (fbgemm). These round the activations to
int8 as well (one scale per row for int8 weights; one per 32 inputs for 4-bit ones, as llama.cpp's q8_0 does)
and multiply integers with the CPU's dot-product instructions (VNNI's `vpdpbusd`; AVX2's `vpmaddubsw`), so the
weights stream at memory speed.
Both are registered as torch operators (`torch.ops.minimind.int8_gemv` / `q4_gemv`, with shape functions for
torch.compile), so the compiled decode step calls them from inside its graph. `int8_gemv_cat` / `q4_gemv_cat`
multiply one input by several matrices in one call (outputs side by side); the compiled step's graph pass
`FuseSharedInput` puts a layer's q, k and v products (and its gate and up ones) into one such call.
`f32_gemv` / `f32_gemv_cat` do the same for float32 models on their own weights (FMA row dots that prefetch the
next rows); the graph pass `FloatGemv` turns the compiled float32 step's one-row products into them.
`one_query_attention` is float32 attention of one new token per row over its KV cache (GQA, a column mask), for
eager and batched decoding (`minimind.kernels.attention.one_query_kernel_attention`). `sample_tokens` draws one
token per row from logits at a temperature, with its log-probability, in one pass (the Engine's sampler when no
top-k/top-p/min-p, penalty, bias or grammar is set).

The C++ source is compiled once per machine with the C++ compiler torch.compile uses, for the best instruction set
the CPU has (`isa()`: AVX-512 with VNNI, else AVX2 with FMA; one source, the vector code of each in its own
section), into torch's extension cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions); later starts
load the library. Where the CPU has neither, the build fails, or `MINIMIND_INT_KERNELS=0` is set, `available()` is
False and the Engine keeps PyTorch's own kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from functools import cache
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from minimind.device import cpu_info

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int_gemv.cpp")
ROWS = 16  # output rows per weight block (int_gemv.cpp's kRows)
GEMV_ROWS = 4  # products of up to this many rows take the int8/int4 kernels (decoding one or a few sequences)
FLOAT_ROWS = 16  # float32 products of up to this many rows take f32_gemv (each weight row is read once for all)
GROUP = 32  # inputs per 4-bit scale (q4_0)
# -fopenmp: at::parallel_for only splits work across torch's threads when the code including it is compiled
# with OpenMP (torch's own build is; cpp_extension adds no such flag). Without it every call ran on one thread.
# The library links the libgomp.so.1 torch has already loaded, so both share one thread pool.
_COMMON_FLAGS = ["-O3", "-fopenmp", "-mfma", "-mf16c"]
# The instruction sets the source is written for, best first: (name, CPU flags it needs, compiler flags).
ISAS = (("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
         ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]),
        ("avx2", {"avx2", "fma", "f16c"}, ["-mavx2"]))


def isa() -> str | None:
    """The instruction set the kernels are built for here: "avx512" (with VNNI), "avx2" (with FMA), or None where
    the CPU has neither. `MINIMIND_KERNEL_ISA=avx2` builds the AVX2 kernels on an AVX-512 CPU (to test them)."""
    flags = cpu_info().flags
    usable = [name for name, needs, _ in ISAS if needs <= flags]
    wanted = os.environ.get("MINIMIND_KERNEL_ISA")
    if wanted:
        return wanted if wanted in usable else None
    return usable[0] if usable else None


def _flags() -> list[str]:
    return _COMMON_FLAGS + next(cflags for name, _, cflags in ISAS if name == isa())


@cache
def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call; False where they cannot run)."""
    if os.environ.get("MINIMIND_INT_KERNELS", "1") == "0" or isa() is None:
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = _library_name()
        if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
            log.warning("building the CPU kernels (%s, %s) once for this machine and torch version; about a minute",
                        SOURCE.name, isa())
        load(name, [str(SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=False)
    except Exception as err:  # no compiler, an unexpected toolchain: PyTorch's own kernels serve instead
        log.warning("CPU kernels (int8, int4, float32 decoding) unavailable (%s); using PyTorch's", err)
        return False
    _register_shapes()
    return True


def _library_name() -> str:
    # the torch version in the name: a library built against another torch is never loaded
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_flags()).encode()).hexdigest()[:12]
    return f"minimind_int_gemv_{isa()}_" + re.sub(r"\W", "_", torch.__version__) + "_" + digest


def library_path() -> Path | None:
    """Where the loaded kernel library lives (from the process's memory map); None before `available()` loads it."""
    try:
        with open("/proc/self/maps") as handle:
            paths = {line.split()[-1] for line in handle if _library_name() in line}
    except OSError:
        return None
    return Path(paths.pop()) if paths else None


def _register_shapes() -> None:
    """Output shapes for torch.compile's tracing: (M, K) rows -> (M, N) float32."""

    @torch.library.register_fake("minimind::int8_gemv")
    def _int8(x, packed, wsum, scales):
        return x.new_empty(x.shape[0], scales.shape[0])

    @torch.library.register_fake("minimind::q4_gemv")
    def _q4(x, packed, scales):
        return x.new_empty(x.shape[0], packed.shape[0] * ROWS)

    @torch.library.register_fake("minimind::int8_gemv_cat")
    def _int8_cat(x, packed, wsum, scales):
        return x.new_empty(x.shape[0], sum(s.shape[0] for s in scales))

    @torch.library.register_fake("minimind::q4_gemv_cat")
    def _q4_cat(x, packed, scales):
        return x.new_empty(x.shape[0], sum(p.shape[0] for p in packed) * ROWS)

    @torch.library.register_fake("minimind::f32_gemv")
    def _f32(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("minimind::f32_gemv_cat")
    def _f32_cat(x, weights):
        return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))

    @torch.library.register_fake("minimind::one_query_attention")
    def _one_query(q, k, v, mask):
        return q.new_empty(q.shape)

    @torch.library.register_fake("minimind::sample_tokens")
    def _sample(logits, temperature, uniforms):
        rows = logits.shape[0]
        return logits.new_empty(rows, dtype=torch.long), logits.new_empty(rows)


def int8_fits(out_features: int, in_features: int) -> bool:
    """Whether int8_gemv takes an (out, in) weight: whole blocks of 16 rows, inputs in fours."""
    return out_features % ROWS == 0 and in_features % 4 == 0


def pack_int8(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) int8 -> (the blocked layout (out / 16, in / 4, 64), each row's sum as int32 (out,))."""
    out_features, in_features = qweight.shape
    blocks = qweight.reshape(out_features // ROWS, ROWS, in_features // 4, 4).permute(0, 2, 1, 3)
    packed = blocks.reshape(out_features // ROWS, in_features // 4, 4 * ROWS).contiguous()
    return packed, qweight.int().sum(dim=1, dtype=torch.int32)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The blocked layout back to (out, in) int8."""
    blocks, quads, _ = packed.shape
    return packed.reshape(blocks, quads, ROWS, 4).permute(0, 2, 1, 3).reshape(blocks * ROWS, quads * 4)


def pack_q4(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_0 codes (out, in) uint8 in 0..15 and scales (out, in / 32) -> the kernel's layout.

    Codes: (out / 16, in / 8, 64) bytes; byte 4 r + j of step s of a block holds row r's input 8 s + j in its
    low nibble and input 8 s + 4 + j in its high one. Scales: bf16 (out / 16, in / 32, 16).
    """
    out_features, in_features = codes.shape
    steps = codes.reshape(out_features // ROWS, ROWS, in_features // 8, 2, 4)  # (block, row, step, half, j)
    packed = (steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)).permute(0, 2, 1, 3)  # (block, step, row, j)
    blocked = scales.reshape(out_features // ROWS, ROWS, -1).permute(0, 2, 1)  # (block, group, row)
    return (packed.reshape(out_features // ROWS, in_features // 8, 4 * ROWS).contiguous(),
            blocked.to(torch.bfloat16).contiguous())


def int8_gemv(x: torch.Tensor, packed: torch.Tensor, wsum: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, in) float32 rows times int8 weights (`pack_int8`) and their per-row scales -> (M, out) float32."""
    return torch.ops.minimind.int8_gemv(x, packed, wsum, scales)


def q4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, in) float32 rows times q4_0 weights (`pack_q4`) -> (M, out) float32."""
    return torch.ops.minimind.q4_gemv(x, packed, scales)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor,
                  uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (B, V) logits at temperature (B,) > 0 for uniforms (B,) in [0, 1), as
    `minimind.infer.sampling.sample_rows` draws with no filter set, and its temperature-1 log-probability:
    ((B,) int64, (B,) float32), in one pass over each row instead of a softmax, a cumulative sum, a search and a
    log-softmax over the whole batch."""
    return torch.ops.minimind.sample_tokens(logits.float().contiguous(), temperature.float().clamp(min=1e-5),
                                            uniforms.float())


class StepPass(CustomGraphPass):
    """A graph pass of the compiled decode step, identified by this module's and the kernels' source: Inductor's
    caches key on `uuid`, the compile cache's key on `repr` (it holds the options, these passes among them)."""

    def uuid(self) -> str:
        return hashlib.sha256(Path(__file__).read_bytes() + SOURCE.read_bytes()).hexdigest()

    def __repr__(self) -> str:
        return f"minimind.kernels.int_gemv.{type(self).__name__}({self.uuid()[:12]})"


class FuseSharedInput(StepPass):
    """A post-grad graph pass for the compiled decode step: the int8, int4 or float32 kernel products of one input
    with several weight matrices (a layer's q, k and v projections; its gate and up ones) become one `int8_gemv_cat`
    (`q4_gemv_cat`, `f32_gemv_cat`) call whose output columns the old users slice. The products are the same numbers; what goes
    is a call, an activation rounding and a parallel region per matrix, and the wrapper's Python around them.
    """

    OPS = {  # single-matrix op -> (its multi-matrix op, how many weight tensors each matrix passes)
        "int8_gemv": ("int8_gemv_cat", 3),
        "q4_gemv": ("q4_gemv_cat", 2),
        "f32_gemv": ("f32_gemv_cat", 1),
    }

    def __call__(self, graph: torch.fx.Graph) -> None:
        for name, (cat_name, per_matrix) in self.OPS.items():
            groups: dict[object, list[torch.fx.Node]] = {}
            for node in graph.nodes:  # by name: a step without kernel calls never loads the library
                if isinstance(node.target, torch._ops.OpOverload) and node.target.name() == f"minimind::{name}":
                    groups.setdefault(_same_value(node.args[0]), []).append(node)
            for calls in groups.values():
                if len(calls) > 1:  # the first call's input is computed before any of them
                    _fuse(graph, calls[0].args[0], calls, getattr(torch.ops.minimind, cat_name).default, per_matrix)


class FloatGemv(StepPass):
    """A post-grad graph pass for the compiled decode step, run before Inductor's own: each float32 product of a
    few rows with a weight matrix (`x @ W.T`, W the model's contiguous (out, in) weight) becomes an `f32_gemv`
    call, where the kernels are available (`FuseSharedInput` then merges the ones sharing an input).

    Inductor would otherwise generate a row-dot loop per product (`decompose_mm_pass`); the kernel reads the
    weights at the same instructions but prefetches the rows ahead, so the short rows of these matrices do not
    start cold at every call (docs/performance.md).
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        if not available():
            return
        for node in list(graph.nodes):
            weight = _gemv_weight(node)
            if weight is not None:
                with graph.inserting_before(node):
                    call = graph.call_function(torch.ops.minimind.f32_gemv.default, (node.args[0], weight))
                with node.meta["val"].fake_mode:
                    call.meta["val"] = torch.ops.minimind.f32_gemv.default(node.args[0].meta["val"], weight.meta["val"])
                node.replace_all_uses_with(call)
                graph.erase_node(node)



def _gemv_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """W when `node` is mm(x, permute(W, [1, 0])) with x (M <= FLOAT_ROWS, K) float32, K a multiple of 16 and
    W a contiguous float32 (N, K) matrix; else None."""
    if node.op != "call_function" or node.target != torch.ops.aten.mm.default:
        return None
    x, transposed = node.args
    if not (isinstance(transposed, torch.fx.Node) and transposed.target == torch.ops.aten.permute.default
            and list(transposed.args[1]) == [1, 0]):
        return None
    weight = transposed.args[0]
    x_val, w_val = x.meta.get("val"), weight.meta.get("val")
    if x_val is None or w_val is None or x_val.dtype != torch.float32 or w_val.dtype != torch.float32:
        return None
    rows, k = x_val.shape
    if not (_at_most(rows, FLOAT_ROWS) and isinstance(k, int) and k % 16 == 0):
        return None
    return weight if w_val.dim() == 2 and w_val.is_contiguous() else None


def _at_most(size, limit: int) -> bool:
    """Whether a size, a number or a symbol (a step compiled for a range of rows), is never above `limit`."""
    if isinstance(size, int):
        return size <= limit
    try:
        return int(size.node.shape_env.bound_sympy(size.node.expr).upper) <= limit
    except (AttributeError, TypeError, ValueError, OverflowError):  # no known bound
        return False


_VIEWS = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)


def _same_value(node: torch.fx.Node) -> object:
    """A key equal for nodes holding the same values: each projection reshapes the layer's input itself, so
    q, k and v receive three reshape nodes of one tensor."""
    if node.op == "call_function" and node.target in _VIEWS:
        return (node.target, _same_value(node.args[0]), str(node.args[1:]))
    return node


def _fuse(graph: torch.fx.Graph, x: torch.fx.Node, calls: list[torch.fx.Node], cat, per_matrix: int) -> None:
    """Replace `calls` (products of `x` with one matrix each) by one `cat` call and a column slice per call."""
    weights = [[call.args[1 + j] for call in calls] for j in range(per_matrix)]  # per argument: one per matrix
    with graph.inserting_before(calls[0]):
        fused = graph.call_function(cat, (x, *weights))
    values = [call.meta["val"] for call in calls]
    with values[0].fake_mode:
        fused.meta["val"] = cat(x.meta["val"], *[[w.meta["val"] for w in ws] for ws in weights])
    start = 0
    for call, value in zip(calls, values):
        end = start + value.shape[1]
        with graph.inserting_before(call):
            part = graph.call_function(torch.ops.aten.slice.Tensor, (fused, 1, start, end))
        with value.fake_mode:
            part.meta["val"] = fused.meta["val"][:, start:end]
        call.replace_all_uses_with(part)
        graph.erase_node(call)
        start = end
