"""The int4 matmul candidates for `--quantize int4`, timed on every projection of one decode step (one row).

    python bench/int4_kernels.py                 # the `small` preset's shapes, 50 steps per timing, best of 5
    python bench/int4_kernels.py --compile       # also the compiled candidates (a minute or two to compile)
    python bench/int4_kernels.py --quick         # tiny shapes, does it run

Candidates, each over the same weights (q4_0 codes and scales, quantize.py's `quantize_q4_0`):
  fp32              F.linear on the float weights (the baseline bytes: 4 per weight)
  int8              fbgemm's dynamic-quantized kernel (`Int8Linear` for more than 4 rows)
  int4-aten-fp32    aten._weight_int4pack_mm_for_cpu with float32 activations
  int4-aten-bf16    the same kernel with bf16 activations (`Int4Linear` for more than 4 rows)
  int8-vnni / int4-vnni   `Int8Linear` / `Int4Linear` as decoding calls them: the VNNI kernels of
                    minimind/kernels/int_gemv.py where the CPU has them (else the two kernels above)
  int4-own          (--compile) our own 4-bit kernel: two codes per byte, unpacked, scaled per group and
                    summed in one torch.compile'd graph
  int8-compile / int4-aten-bf16-compile   (--compile) the int8 weight-only row-dot and the aten int4 kernel
                    inside torch.compile (what the compiled step ran before the VNNI kernels)
The last line: `int4_kernels: ratio=<int4-aten-bf16 / int8 steps per s>` (both eager).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_bench_arguments, bench_parser, interleaved, machine_line, ratio_line  # noqa: E402

from minimind.infer.compiled import DECODE_COMPILE_OPTIONS  # noqa: E402
from minimind.infer.quantize import INT4_GROUP, Int4Linear, Int8Linear, quantize_q4_0  # noqa: E402
from minimind.model import MiniMindConfig  # noqa: E402


def projection_shapes(config: MiniMindConfig) -> list[tuple[int, int]]:
    """(out, in) of every matmul of one decode step: per layer q, k, v, o, gate, up, down; then the head."""
    kv = config.n_kv_heads * config.head_dim
    layer = [(config.n_heads * config.head_dim, config.dim), (kv, config.dim), (kv, config.dim),
             (config.dim, config.n_heads * config.head_dim), (config.hidden_dim, config.dim),
             (config.hidden_dim, config.dim), (config.dim, config.hidden_dim)]
    return layer * config.n_layers + [(config.vocab_size, config.dim)]


class AtenInt4Fp32(Int4Linear):
    """`Int4Linear`'s aten kernel called with float32 activations (and scales)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, self.scales_and_zeros.float())


class AtenInt4Bf16(Int4Linear):
    """`Int4Linear`'s aten kernel with bf16 activations, whatever the row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.qweight, self.group,
                                                         self.scales_and_zeros)
        return out.float()


class RowDotInt8(Int8Linear):
    """`Int8Linear`'s weight-only row-dot, which Inductor generates where the CPU has no VNNI kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.register_buffer("rows", self.int8_weight().contiguous())  # (out, in), as the compiled step read it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] * self.rows.float()).sum(-1) * self.scales


class Fbgemm(Int8Linear):
    """`Int8Linear`'s fbgemm kernel, whatever the row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._fbgemm.packed, True)


class OwnInt4(nn.Module):
    """Two 4-bit codes per byte, (out, in / group, group / 2): low nibbles the group's first half, high nibbles
    its second half; one float scale per (out, group). Decoding only (one row)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        codes, scales = quantize_q4_0(linear.weight.detach().float())  # (out, in) uint8, (out, in / group)
        groups = codes.view(codes.shape[0], -1, INT4_GROUP)
        half = INT4_GROUP // 2
        self.register_buffer("packed", groups[..., :half] | (groups[..., half:] << 4))
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(1, 1, -1, INT4_GROUP)  # (1, 1, in / group, group)
        half = INT4_GROUP // 2
        low = (self.packed & 15).float() - 8  # (out, in / group, group / 2)
        high = (self.packed >> 4).float() - 8
        dots = (groups[..., :half] * low).sum(-1) + (groups[..., half:] * high).sum(-1)  # (1, out, in / group)
        return (dots * self.scales).sum(-1)  # (1, out)


class Step(nn.Module):
    """Every projection of one decode step applied to one input row (of its input size)."""

    def __init__(self, layers: list[nn.Module], shapes: list[tuple[int, int]]):
        super().__init__()
        self.layers, self.inputs = nn.ModuleList(layers), [n_in for _, n_in in shapes]

    def forward(self, rows: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [layer(rows[n_in]) for layer, n_in in zip(self.layers, self.inputs)]


class Float(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="small", help="model preset whose shapes are timed")
    parser.add_argument("--steps", type=int, default=50, help="decode steps per timing")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile'd candidates")
    add_bench_arguments(parser, repeats=(5, "timings per candidate (best is kept)"),
                        quick="tiny shapes, 5 steps, one repetition (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.repeats = "tiny", 5, 1
    config = MiniMindConfig.from_preset(args.preset)
    shapes = projection_shapes(config)
    torch.manual_seed(0)
    linears = [nn.Linear(n_in, n_out, bias=False) for n_out, n_in in shapes]
    rows = {n_in: torch.randn(1, n_in) for _, n_in in shapes}
    kinds = {"fp32": Float, "int8": Fbgemm, "int4-aten-fp32": AtenInt4Fp32, "int4-aten-bf16": AtenInt4Bf16,
             "int8-vnni": Int8Linear, "int4-vnni": Int4Linear}
    steps = {name: Step([kind(linear) for linear in linears], shapes) for name, kind in kinds.items()}
    if args.compile:
        for name, kind in (("int4-own", OwnInt4), ("int8-compile", RowDotInt8), ("int4-aten-bf16-compile", AtenInt4Bf16)):
            steps[name] = torch.compile(Step([kind(linear) for linear in linears], shapes), dynamic=False,
                                        options=DECODE_COMPILE_OPTIONS)
    print(machine_line())
    print(f"shapes: preset {args.preset}, {len(shapes)} matmuls of one row, {args.steps} steps per timing, "
          f"best of {args.repeats}")

    def repeat(step):
        def run() -> None:
            for _ in range(args.steps):
                step(rows)
        return run

    with torch.inference_mode():
        times = interleaved({name: repeat(step) for name, step in steps.items()}, args.repeats)
    rates = {name: args.steps / min(t) for name, t in times.items()}
    print(", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()) + " steps/s")
    if "int8-compile" in rates:
        print(ratio_line("int4 kernel compiled", rates["int4-aten-bf16-compile"], rates["int8-compile"], "steps/s"))
        print(ratio_line("int4 own kernel vs aten", rates["int4-own"], rates["int4-aten-bf16-compile"], "steps/s"))
    print(ratio_line("int8 vnni vs fbgemm", rates["int8-vnni"], rates["int8"], "steps/s"))
    print(ratio_line("int4 vnni vs aten bf16", rates["int4-vnni"], rates["int4-aten-bf16"], "steps/s"))
    print(ratio_line("int4_kernels", rates["int4-aten-bf16"], rates["int8"], "steps/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
