"""int8 and int4 weights for CPU inference: `Engine(model, tok, quantize="int8")`, `--quantize int8|int4`.

Every projection (attention q/k/v/o, the SwiGLU gate/up/down, MoE experts) and the output head keep their
weights as int8, one symmetric scale per output channel (scale = max |w| / 127 over the row), a quarter of
the fp32 bytes. Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth
and 4x fewer bytes is most of the speed-up. The token embedding stays in float for lookups (the output
head gets its own int8 copy) and so do the norms and the MoE router (routing decisions are not worth risking
for a few kilobytes).

The matmul is PyTorch's fbgemm/x86 dynamic-quantized linear (`quantized::linear_dynamic`): each call
quantizes its input rows to uint8 with a per-call scale and accumulates int8 x uint8 in int32. It is
many times faster here than the weight-only kernel `aten._weight_int8pack_mm`, which this CPU build runs
unvectorised, and faster than fp32 at every batch size (docs/performance.md). The activation
rounding is the price: with `reduce_range` (7-bit activations, what PyTorch's own dynamic quantization
uses so that CPUs without VNNI cannot saturate) a matmul's relative error is about 1.5%, which moves
perplexity by well under 2% (tested in tests/test_quantize.py, measured on the demo model in the doc).
These kernels live in PyTorch's legacy quantization API, which warns that it will move to torchao; the
warnings are silenced here, and torchao's int8 linear is the replacement if a PyTorch release drops them.

int4 (`Int4Linear`) is weight-only and uses llama.cpp's q4_0 scheme: groups of 32 consecutive input
weights share one scale d (the group's value of largest magnitude is -8 d), each weight is a 4-bit code q
and stands for (q - 8) d, an eighth of the fp32 bytes (plus one scale per 32 weights). The matmul is
PyTorch's own CPU kernel for this format, `aten._weight_int4pack_mm_for_cpu` on weights packed once by
`aten._convert_weight_to_int4pack_for_cpu`; it is vectorised for bf16 activations only (float32 ones take a
scalar loop many times slower), so each call rounds its input to bf16 and its output comes back as bf16,
an error far below the 4-bit rounding of the weights. Rows are computed independently within a call, but
which kernel a call takes depends on its row count (below), so a sequence decoded beside others can round
differently from the same sequence alone: greedy text rarely changes, sampled text at a fixed seed may. The kernel needs the output rows in multiples of 16 and
the input length in multiples of the group: a layer that does not fit stays in float (llama.cpp's export
likewise keeps such tensors in f16). The alternatives measured against it are in docs/performance.md.

Decoding (up to GEMV_ROWS rows, eager or inside the compiled step) runs neither where the CPU has AVX-512
VNNI: the kernels of minimind/kernels/int_gemv.py round the activations to int8 as well (one scale per row for
int8 weights; one per 32 inputs for int4, llama.cpp's q4_0 x q8_0 dot) and multiply integers, reading the
weights at memory speed (the weights are kept a second time in their blocked layout; for int8 that copy
replaces the (out, in) one). In the compiled step a layer's q/k/v and gate/up products are one call each
(`int_gemv.FuseSharedInput`).
Larger batches and prompts keep the kernels above.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from minimind.errors import UserError
from minimind.kernels import int_gemv

QUANTIZE_CHOICES = ("int8", "int4")
INT4_GROUP = 32  # input weights per scale, as in q4_0
INT4_ROWS = 16  # the packed kernel takes output rows in multiples of this
GEMV_ROWS = int_gemv.GEMV_ROWS  # up to this many rows the VNNI kernels run; more rows are a GEMM for fbgemm / aten


@dataclass(frozen=True)
class FbgemmWeights:
    """fbgemm's prepacked copy of an int8 matrix, for eager calls of many rows. Kept in a plain object rather than
    as a module attribute: torch.export (the packaged decode step, compiled.py) would otherwise try to trace it."""

    packed: torch.ScriptObject


class Int8Linear(nn.Module):
    """A bias-free `nn.Linear` with int8 per-output-channel weights; input and output stay in the model dtype.

    Up to GEMV_ROWS rows run the VNNI kernel (int_gemv.py) where the CPU has it, eagerly and compiled (the
    compiled step calls it from its graph). Otherwise eager calls run fbgemm's dynamic-quantized kernel; under
    torch.compile (`Engine(compile=True)`), which cannot trace that kernel, the same int8 weights are used
    weight-only: out = (x . q_row) * scale, written as a broadcast multiply and row sum for a few rows, so
    inductor fuses the int8-to-float conversion into its row-dot loop and reads one byte per weight
    (activations are not rounded on this path).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free linear layers")
        weight = linear.weight.detach().float().cpu()  # (out, in)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(weight / scales[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scales", scales)
        # the VNNI kernel's blocked copy of the weights (int_gemv.py) replaces the (out, in) one where it runs
        self.vnni = int_gemv.int8_fits(self.out_features, self.in_features) and int_gemv.available()
        if self.vnni:
            packed, wsum = int_gemv.pack_int8(self.qweight)
            del self.qweight
            self.register_buffer("packed", packed)
            self.register_buffer("wsum", wsum)
        with warnings.catch_warnings():  # the quantized-tensor API warns of its future move to torchao
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                self.int8_weight(), scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0
            )
            self._fbgemm = FbgemmWeights(torch.ops.quantized.linear_prepack(qweight, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        rows = x.reshape(-1, self.in_features).float()  # (M, in)
        if self.vnni and rows.shape[0] <= GEMV_ROWS:  # decoding a few rows: int_gemv.py
            out = int_gemv.int8_gemv(rows.contiguous(), self.packed, self.wsum, self.scales)
        elif torch.compiler.is_compiling():
            if rows.shape[0] <= 8:  # decoding: (M, 1, in) * (out, in) summed over in -> (M, out)
                out = (rows[:, None, :] * self.int8_weight().float()).sum(-1) * self.scales
            else:
                out = torch.nn.functional.linear(rows, self.int8_weight().float()) * self.scales
        else:
            out = torch.ops.quantized.linear_dynamic(rows, self._fbgemm.packed, True)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def int8_weight(self) -> torch.Tensor:
        """The (out, in) int8 weights (a copy where the VNNI kernel keeps them blocked)."""
        return int_gemv.unpack_int8(self.packed) if self.vnni else self.qweight

    def weight_bytes(self) -> int:
        """Bytes of the int8 weight matrix (the scales add 8 per output channel)."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """A bias-free `nn.Linear` with q4_0 weights (see the module doc); input and output stay in the model dtype."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int4Linear takes bias-free linear layers")
        if not int4_fits(linear, group):
            raise ValueError(f"Int4Linear needs in_features % {group} == 0 and out_features % {INT4_ROWS} == 0, "
                             f"got ({linear.out_features}, {linear.in_features})")
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        codes, scales = quantize_q4_0(linear.weight.detach().float().cpu(), group)  # (out, in), (out, in / group)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
        # (in / group, out, 2): each group's scale and an additive offset, which q4_0 does not have (zero)
        scales_and_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        # decoding's few rows go to the VNNI kernel (int_gemv.py), on its own copy of the codes and scales
        self.vnni = group == int_gemv.GROUP and int_gemv.available()
        if self.vnni:
            vnni_codes, vnni_scales = int_gemv.pack_q4(codes, scales)
            self.register_buffer("vnni_codes", vnni_codes)
            self.register_buffer("vnni_scales", vnni_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if self.vnni and rows.shape[0] <= GEMV_ROWS:
            out = int_gemv.q4_gemv(rows.float().contiguous(), self.vnni_codes, self.vnni_scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self.qweight, self.group,
                                                             self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float32 weights this layer multiplies by: (q - 8) * d, read back through the kernel."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)  # one-hot rows pick out single weights
        unit = torch.zeros_like(self.scales_and_zeros)
        unit[..., 0] = 1.0  # scale 1: the kernel returns q - 8, exact in bf16
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, unit).float().t()
        scales = self.scales_and_zeros[..., 0].float().t()  # (out, in / group)
        return codes * scales.repeat_interleave(self.group, dim=1)

    def weight_bytes(self) -> int:
        """Bytes of the packed 4-bit weights (the scales add 4 per group of `group` weights)."""
        return self.in_features * self.out_features // 2

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 q4_0 groups of {self.group}"


def int4_fits(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
    """Whether the packed int4 kernel takes this layer's shape (other layers stay in float)."""
    return linear.in_features % group == 0 and linear.out_features % INT4_ROWS == 0


def quantize_q4_0(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weights -> 4-bit codes (out, in) as uint8 in [0, 15] and scales (out, in / group).

    llama.cpp's q4_0 rounding: d = (the group's value of largest magnitude) / -8, q = clamp(round(w / d) + 8,
    0, 15), so w is about (q - 8) d. The scale is rounded to bf16 (what the kernel reads) before the codes are
    chosen, so the codes make up for the scale's rounding.
    """
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group, group)  # (out, G, group)
    index = groups.abs().argmax(dim=-1, keepdim=True)
    scales = (torch.gather(groups, -1, index) / -8.0).to(torch.bfloat16).float()  # (out, G, 1)
    inverse = torch.where(scales == 0, torch.zeros_like(scales), 1.0 / scales)
    codes = torch.floor(groups * inverse + 8.5).clamp(0, 15).to(torch.uint8)  # round half up, as q4_0 does
    return codes.reshape(out_features, in_features), scales.reshape(out_features, -1)


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace the model's projections and output head by `Int8Linear` / `Int4Linear` in place; returns it.

    Only linear layers whose name ends in `_proj` and the `lm_head` are converted (see the module doc); with
    int4, layers whose shape the kernel does not take stay in float.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--quantize {mode} runs on the CPU only; the model is on {device}")
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (name.endswith("_proj") or name == "lm_head")]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if mode == "int8":
            setattr(parent, child, Int8Linear(linear))
        elif int4_fits(linear):
            setattr(parent, child, Int4Linear(linear))
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's projections and output head by `Int8Linear` in place; returns the model."""
    return quantize_model(model, "int8")


def check_quantize(value: str | None) -> str | None:
    """Validate a `quantize` choice: None or one of QUANTIZE_CHOICES."""
    if value is not None and value not in QUANTIZE_CHOICES:
        raise UserError(f"quantize is {value!r}; expected one of {', '.join(QUANTIZE_CHOICES)} (or none)")
    return value
