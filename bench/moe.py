"""MoE speed: a training step and batch-8 decoding of the MoE presets against transformers' Qwen MoE models.

    python bench/moe.py                                   # presets moe and minimind3-moe, batch 4 x 256, fp32, CPU
    python bench/moe.py --preset moe --repeats 5
    python bench/moe.py --device cuda --dtype bf16 --batch-size 16 --seq-len 512
    python bench/moe.py --quick                           # narrow 2-layer models, one repetition: does it run

The peers hold the same weights (bench/common.hf_twin): `Qwen2MoeForCausalLM` for `moe` (its exact rewrite of
our ungated shared expert) and `Qwen3MoeForCausalLM` for `minimind3-moe`, with transformers' default experts
implementation (`grouped_mm` where torch has it).

Training step (per preset): forward, loss, backward, gradient clipping, AdamW, on the same random batch; the
MoE load-balancing loss joins the loss on both sides (ours as the trainer adds it, HF through
`output_router_logits=True`). Ours is the model with the kernels a training run selects and the trainer's
objective (`MaskedLM`); HF its own `labels=` loss. Useful tokens/s = batch x seq_len / best step.

Decode (per preset): --decode-batch rows (8) of random prompts, greedy, eos ignored, --new-tokens each; our
Engine against HF `generate`, decode tokens/s = rows x (new - 1) / (time of new - time of 1) (bench/decode.py).
On a CPU also `Engine(quantize="int8")` (int8 experts and projections) against the same HF, unless --no-int8.

Cases alternate within every repetition and the best repetition counts. Prints `moe-train-<preset>: ratio=...`
and `moe-decode-<preset>: ratio=...` lines, then `moe: ratio=...` last: the training ratio of `moe` (of the
first preset given when `moe` is not among them).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from decode import engine_runner, hf_runner, rates  # noqa: E402
from train import make_step  # noqa: E402

from minimind.device import resolve_device  # noqa: E402
from minimind.infer import Engine  # noqa: E402
from minimind.train.objective import MaskedLM  # noqa: E402

PRESETS = ("moe", "minimind3-moe")
# --quick: the presets' structure (experts, top-k, shared experts, QK-norm) at a width that runs in seconds
QUICK_SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                   moe_intermediate_size=128, vocab_size=512)


def train_rates(preset: str, args: argparse.Namespace, device: torch.device, overrides: dict) -> dict[str, float]:
    """Useful tokens/s of ours and HF for one training step of `preset` (same weights, same batch)."""
    dtype = common.DTYPES[args.dtype]
    ours = common.training_model(preset, device, **overrides)
    batch = common.random_batch(ours.config.vocab_size, args.batch_size, args.seq_len, device)
    cases = {"ours": make_step(ours, MaskedLM(), batch, device, dtype, hf=False, aux=True),
             "hf": make_step(common.hf_twin(ours), None, batch, device, dtype, hf=True, aux=True)}
    times = common.interleaved(cases, args.repeats, device)
    return {name: args.batch_size * args.seq_len / min(seconds) for name, seconds in times.items()}


def decode_rates(preset: str, args: argparse.Namespace, device: torch.device, overrides: dict) -> dict[str, float]:
    """Decode tokens/s of our Engine and HF `generate` at --decode-batch rows (same weights, same prompts)."""
    model = common.preset_model(preset, **overrides).eval().to(device)
    if args.dtype != "fp32":
        model.to(common.DTYPES[args.dtype])
    tokenizer, _ = common.bench_tokenizer(model.config.vocab_size)
    peer = common.hf_twin(model).eval()  # before the Engine re-lays its copy's weights out
    prompts = torch.randint(3, len(tokenizer), (args.decode_batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0))
    runners = {"engine": engine_runner(Engine(copy.deepcopy(model), tokenizer), prompts.tolist()),
               "hf": hf_runner(peer, prompts.to(device))}
    if device.type == "cpu" and not args.no_int8:
        runners["engine-int8"] = engine_runner(Engine(model, tokenizer, quantize="int8"), prompts.tolist())
    return rates(runners, args.decode_batch, args.new_tokens, device, args.repeats)


def add_shape_arguments(parser: argparse.ArgumentParser, batch_size: int, new_tokens: int) -> None:
    """The presets, training batch and decode batch flags this bench and bench/moe_bound.py share."""
    parser.add_argument("--preset", nargs="+", default=list(PRESETS), choices=PRESETS, help="MoE presets to time")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="training rows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="training tokens per row")
    parser.add_argument("--decode-batch", type=int, default=8, help="decode rows")
    parser.add_argument("--new-tokens", type=int, default=new_tokens, help="decode tokens generated per row")


def main(argv: list[str] | None = None) -> int:
    parser = common.bench_parser(__doc__)
    add_shape_arguments(parser, batch_size=4, new_tokens=32)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="decode prompt length per row")
    parser.add_argument("--no-decode", action="store_true", help="time the training step only")
    parser.add_argument("--no-int8", action="store_true", help="skip the Engine(quantize='int8') decode case")
    common.add_bench_arguments(parser, repeats=(3, "timed repetitions per case (best counts)"), device="cpu",
                        dtype=("fp32", "training autocast dtype and decode weights dtype"),
                        quick="narrow 2-layer models, short rows, one repetition (smoke test)", json=True)
    args = parser.parse_args(argv)
    overrides = QUICK_SHAPE if args.quick else {}
    if args.quick:
        args.batch_size, args.seq_len, args.new_tokens, args.repeats = 2, 32, 4, 1
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    device = resolve_device(args.device)
    print(common.machine_line())
    print(f"train: batch {args.batch_size} x {args.seq_len}, {args.dtype} on {device}; decode: batch "
          f"{args.decode_batch}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens; best of {args.repeats}")
    train, decode = {}, {}
    for preset in args.preset:
        train[preset] = train_rates(preset, args, device, overrides)
        print(f"{preset} train: ours {train[preset]['ours']:.1f}, hf {train[preset]['hf']:.1f} tokens/s")
        if not args.no_decode:
            decode[preset] = decode_rates(preset, args, device, overrides)
            print(f"{preset} decode batch {args.decode_batch}: "
                  + ", ".join(f"{name} {rate:.1f}" for name, rate in decode[preset].items()) + " tokens/s")
    common.append_json(args.json, {"bench": "moe", "device": str(device), "dtype": args.dtype,
                                   "batch": args.batch_size, "seq_len": args.seq_len, "train": train,
                                   "decode_batch": args.decode_batch, "decode": decode,
                                   "machine": common.machine_line()})
    for preset in args.preset:
        print(common.ratio_line(f"moe-train-{preset}", train[preset]["ours"], train[preset]["hf"], "tokens/s"))
        if preset in decode:
            print(common.ratio_line(f"moe-decode-{preset}", decode[preset]["engine"], decode[preset]["hf"], "tokens/s"))
            if "engine-int8" in decode[preset]:
                print(common.ratio_line(f"moe-decode-int8-{preset}", decode[preset]["engine-int8"],
                                        decode[preset]["hf"], "tokens/s"))
    headline = "moe" if "moe" in train else args.preset[0]
    print(common.ratio_line("moe", train[headline]["ours"], train[headline]["hf"], "tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
