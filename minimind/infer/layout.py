"""Weight layouts for CPU inference: same values, same shapes, faster matmuls for decoding.

Two mechanisms, the first preferred (the Engine applies it to every model it serves on CPU unless told
`prepack=False`):

- `pack_linears`: oneDNN matmuls on a copy of each weight (float32, or bf16 where oneDNN has it) reordered
  once into oneDNN's blocked layout (`PackedLinear`): faster than either BLAS layout at one, eight and 64
  rows (docs/performance.md). The price is a second copy of the weights in memory.
- `gemv_layout`, without oneDNN or with `prepack=False`: `nn.Linear` stores its weight as
  (out, in) rows and computes x @ W.T; for one or a few rows the CPU BLAS path for that layout reads the
  matrix markedly slower than when the same matrix is stored as (in, out) rows, i.e. when W.T is contiguous.
  `gemv_layout` re-stores each projection weight in that layout in place: the parameter keeps its shape
  (out, in), name, values and identity (optimizers still point at it); only its strides change. A weight
  shared between modules (the output head tied to the token embedding) is left alone, because HF
  `save_pretrained` cannot save a tied tensor that is not contiguous; `OutputHead` instead keeps a
  transposed copy of it for decoding.

Both rewrite the modules they are given, so the Engine applies them to `engine_copy(model)`, never to the
model it was handed: new module objects over the same weight storage. What each layout then costs in memory
is in `Engine.weight_copy_bytes`.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from minimind.kernels import int_gemv


def engine_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose modules the Engine may rewrite (swap classes, replace layers, restride or move
    weights, set flags) while the caller's model stays as it was.

    Module objects are new; every parameter is a new `nn.Parameter` over the same storage (and version
    counter), and buffers are the same tensors, so the copy costs no weight memory and follows in-place
    updates of the caller's weights (an optimizer step, `load_state_dict`). Tied weights stay tied.
    """
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def tensor_bytes(tensors) -> int:
    """Bytes held by distinct storages among `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


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


def few_rows_kernel(weight: torch.Tensor) -> bool:
    """Whether products with `weight` of up to FLOAT_ROWS rows can go through kernels/int_gemv.py's f32_gemv: a
    contiguous float32 CPU matrix whose rows are a multiple of 16 long, on a CPU where the kernels are built."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] % 16 == 0 and int_gemv.available())


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T is a decode-sized float32 product (up to FLOAT_ROWS rows) that needs no gradient."""
    return (x.numel() <= int_gemv.FLOAT_ROWS * x.shape[-1] and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class OutputHead:
    """logits = hidden @ W.T for the output head, with W.T stored contiguous on CPU.

    The copy is refreshed whenever the head's weight changes (its version counter moves with every
    in-place update, e.g. an optimizer step on a model that an RL stage also decodes with, and its
    storage changes when it is replaced), so it never serves stale weights. Up to FLOAT_ROWS rows (decoding)
    of a float32 head go through `f32_gemv` on the weight itself instead, where the kernels run (no copy is
    made unless more rows come). Heads that are not a plain float `nn.Linear` on CPU (int8, GPU) are called as
    they are.
    """

    def __init__(self, head: nn.Module):
        self.head = head
        weight = getattr(head, "weight", None)
        self.copy = (type(head) is nn.Linear and head.bias is None and weight.device.type == "cpu"
                     and weight.is_floating_point())
        self.kernel = self.copy and few_rows_kernel(weight)
        self._key: tuple[int, int] | None = None
        self._weight_t: torch.Tensor | None = None

    def refresh(self) -> None:
        """Rebuild the copy at the next call, whatever the version counter says (see `Engine.refresh_weights`)."""
        self._key = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, dim) -> logits (B, vocab)."""
        if not self.copy:
            return self.head(hidden)
        weight = self.head.weight
        if self.kernel and few_rows(hidden, weight):
            return torch.ops.minimind.f32_gemv(hidden, weight.detach())
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            with torch.no_grad():
                self._weight_t = weight.detach().t().contiguous()  # (dim, vocab)
            self._key = key
        return hidden @ self._weight_t


# Weight dtypes the engine prepacks: float32 everywhere oneDNN runs, bf16 where this CPU's oneDNN has it
# (native on AVX-512 BF16 / AMX, faster than float32 per matmul there; docs/performance.md).
PACKED_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _onednn_linear_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear on CPU for `dtype` and it computes x @ W.T."""
    try:
        weight, x = torch.randn(4, 8).to(dtype), torch.randn(3, 8).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        want = x.float() @ weight.float().t()
        rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
        return out.dtype == dtype and torch.allclose(out.float(), want, rtol=rtol, atol=atol)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class PackedLinear(nn.Linear):
    """`nn.Linear` whose inference calls on CPU (float32, bf16) run oneDNN on a prepacked copy of the weight.

    For a few rows (batched decoding) the BLAS call behind `F.linear` reads the weights far slower than the
    memory allows; oneDNN's matmul on a weight reordered once into its blocked layout is faster there and for
    prompt-sized row counts too (docs/performance.md). The module keeps its parameters, so
    `state_dict`, saving and training see a plain `nn.Linear`; the packed copy (as many bytes as the weight)
    is rebuilt whenever the weight changes (version counter or storage, as in `OutputHead`). Calls that need a
    gradient, other dtypes or devices, autocast, sharded weights (FSDP's DTensor) and calls under torch.compile
    take the plain path. Up to FLOAT_ROWS rows in float32 (decoding a few sequences) go through
    kernels/int_gemv.py's `f32_gemv` on the weight itself where `pack_linears` found the kernels (`use_f32_gemv`):
    it reads each weight row once for all the rows: 1.2-2.5x faster than oneDNN at 16 to 1 rows (docs/performance.md).
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple[int, int] | None = None
    use_f32_gemv: bool = False  # set by pack_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.device.type != "cpu" or x.dtype != weight.dtype or weight.dtype not in PACKED_DTYPES
                or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or type(weight) not in (nn.Parameter, torch.Tensor)  # a tensor subclass, e.g. FSDP's DTensor
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
            return F.linear(x, weight, self.bias)
        if self.use_f32_gemv and few_rows(x, weight) and weight.is_contiguous():
            out = torch.ops.minimind.f32_gemv(x.reshape(-1, x.shape[-1]), weight.detach())
            out = out.view(*x.shape[:-1], out.shape[-1])
            return out if self.bias is None else out + self.bias
        key = (weight.data_ptr(), weight._version)
        if key != self._packed_key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            self._packed_key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def refresh(self) -> None:
        """Re-pack at the next call, whatever the version counter says (see `Engine.refresh_weights`)."""
        self._packed_key = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed copy behind (oneDNN tensors have no storage to copy)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_packed_key")}


def pack_linears(model: nn.Module) -> int:
    """Make every plain float32 / bf16 CPU `nn.Linear` of `model` a `PackedLinear` in place; returns how many.

    Only the class changes (parameters, names, hooks and identity stay), so a later `load_state_dict`,
    `save_pretrained` or optimizer step works as before. Nothing changes where oneDNN lacks the dtype.
    """
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is nn.Linear and weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES
                and _onednn_linear_works(weight.dtype)):
            module.__class__ = PackedLinear
            module.use_f32_gemv = few_rows_kernel(weight)
            changed += 1
    return changed
