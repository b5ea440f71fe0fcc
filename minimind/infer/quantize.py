"""int8 weights for CPU inference: `Engine(model, tok, quantize="int8")`, `--quantize int8` on the CLI.

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
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from minimind.errors import UserError

QUANTIZE_CHOICES = ("int8",)


class Int8Linear(nn.Module):
    """A bias-free `nn.Linear` with int8 per-output-channel weights; input and output stay in the model dtype.

    Eager calls run fbgemm's dynamic-quantized kernel. Under torch.compile (`Engine(compile=True)`), which
    cannot trace that kernel, the same int8 weights are used weight-only: out = (x . q_row) * scale, written
    as a broadcast multiply and row sum for a few rows, so inductor fuses the int8-to-float conversion into
    its row-dot loop and reads one byte per weight (activations are not rounded on this path).
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
        with warnings.catch_warnings():  # the quantized-tensor API warns of its future move to torchao
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                self.qweight, scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        rows = x.reshape(-1, self.in_features).float()  # (M, in)
        if torch.compiler.is_compiling():
            if rows.shape[0] <= 8:  # decoding: (M, 1, in) * (out, in) summed over in -> (M, out)
                out = (rows[:, None, :] * self.qweight.float()).sum(-1) * self.scales
            else:
                out = torch.nn.functional.linear(rows, self.qweight.float()) * self.scales
        else:
            out = torch.ops.quantized.linear_dynamic(rows, self._packed, True)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the int8 weight matrix (the scales add 8 per output channel)."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's projections and output head by `Int8Linear` in place; returns the model.

    Only linear layers whose name ends in `_proj` and the `lm_head` are converted (see the module doc).
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--quantize int8 runs on the CPU only; the model is on {device}")
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (name.endswith("_proj") or name == "lm_head")]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(getattr(parent, child)))
    return model


def check_quantize(value: str | None) -> str | None:
    """Validate a `quantize` choice: None or one of QUANTIZE_CHOICES."""
    if value is not None and value not in QUANTIZE_CHOICES:
        raise UserError(f"quantize is {value!r}; expected one of {', '.join(QUANTIZE_CHOICES)} (or none)")
    return value
