"""RL rollout speed: `rollout.sample` through the inference Engine against the decode loop it replaced.

    python bench/rollout.py                          # preset tiny, random weights, batch 32, 64 new tokens
    python bench/rollout.py --preset small --repeats 3
    python bench/rollout.py --quick                  # tiny shapes, one repetition: does it run
    python bench/rollout.py --no-compile             # ours eager only (no compilation)
    python bench/rollout.py --group-size 4           # 8 prompts x 4 rows each, as GRPO samples them
    python bench/rollout.py --rollout-dtype bf16     # ours through a bf16 copy, as `--rollout-dtype bf16` samples

Both sides sample the same left-padded prompts (random token ids of 16-48 tokens, seed 0; with --group-size G each
prompt fills G rows in a row, as in a GRPO batch, which the Engine prefills once per prompt) from the same model in
train mode, at temperature 1, and record each sampled token's temperature-1 log-prob; eos is an id never drawn,
so every row produces exactly --new-tokens tokens. Ours is what GRPO/PPO run: `sample` on the policy
(`policy_engine`: the Engine's ragged KV cache, its decode loop and sampler, the weights refreshed for the step
and the cache given back after each rollout). The peer is the loop rollout.py ran before (kept here only): HF
`DynamicCache`, the model's own forward with a growing attention mask, a log-softmax and an inverse-CDF draw
over the whole batch each step. The sides alternate within each repetition; the best repetition counts.
Ours is timed twice: with the compiled batched decode step (`sample(compile=True)`, what `--compile-rollouts`
runs; compiled once before timing, its one-time cost printed) and eager (`eager`, the RL stages' default).
With `--rollout-dtype bf16` ours samples as `minimind grpo|ppo --rollout-dtype bf16` does: through a bf16 copy of
the fp32 policy's weights, refilled every rollout (timed with ours). The old-policy log-probs the loss compares
against then come from the policy's own fp32 forward: with one optimizer step per rollout batch (the stages'
default) the loss's forward, which runs anyway, so nothing more is timed; a run reusing rollouts
(--updates-per-rollout or --minibatches above 1) adds one forward without grad per rollout, timed apart and
printed. The peer stays the old loop on the fp32 policy, as the stages ran it, and a third side, `peer-bf16`, runs
the old loop on a bf16 copy of the model (the same arithmetic as ours, the old loop's way).
The last line: `rollout: ratio=<ours/peer> (ours <tok/s>, peer <tok/s>)`, ours compiled (eager with --no-compile);
the lines before it give eager's ratio and, with --rollout-dtype bf16, ours against `peer-bf16`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_bench_arguments, append_json, bench_parser, interleaved, machine_line, preset_model, ratio_line  # noqa: E402,I001
from transformers.cache_utils import DynamicCache  # noqa: E402

from minimind.infer.options import compile_allowed  # noqa: E402
from minimind.train.distributed import DTYPES  # noqa: E402
from minimind.train.rollout import left_pad, policy_engine, policy_logprobs, sample  # noqa: E402


@torch.no_grad()
def previous_sample(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_id: int, pad_id: int = 0, temperature: float = 1.0,
                    top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout loop rollout.py had before the Engine took over: (N, T) completion ids and their log-probs."""
    was_training = model.training
    model.eval()
    n = input_ids.shape[0]
    cache = DynamicCache()
    mask = attention_mask
    logits = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        token = previous_pick(logits.float(), temperature, top_k)
        tokens.append(torch.where(done, torch.full_like(token, pad_id), token))
        logps.append(torch.where(done, torch.zeros(n), log_probs.gather(-1, token[:, None]).squeeze(-1)))
        done = done | (token == eos_id)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    model.train(was_training)
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def previous_pick(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Its sampler: greedy at temperature 0, else one uniform per row against the cumulative softmax(logits / T)
    over the top k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, torch.rand(probs.shape[0], 1) * cdf[:, -1:], right=True).squeeze(-1)
    return torch.where(index < probs.shape[-1], index, probs.argmax(-1))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` in `dtype`, for the old loop to sample from."""
    copied = type(model)(model.config).to(dtype)
    copied.load_state_dict(model.state_dict())
    return copied.train(model.training)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="tiny", help="model preset (random weights)")
    parser.add_argument("--batch", type=int, default=32, help="rows per rollout (prompts x group size)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per row")
    parser.add_argument("--group-size", type=int, default=1,
                        help="rows per prompt (GRPO's --group-size; 1: every row its own prompt)")
    parser.add_argument("--no-compile", action="store_true", help="ours eager only (the RL stages' default)")
    parser.add_argument("--rollout-dtype", choices=list(DTYPES), default="fp32",
                        help="the dtype ours samples in (the policy stays fp32; the policy's forward a reused "
                             "rollout needs for its old log-probs is timed apart when this differs)")
    add_bench_arguments(parser, repeats=(3, "timed repetitions of each side"),
                        quick="a small model, 4 rows, 8 tokens, one repetition", json=True)
    args = parser.parse_args()
    args.no_compile = args.no_compile or not compile_allowed()  # MINIMIND_COMPILE=0 (the tests) as well
    overrides = {}
    if args.quick:
        overrides = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
        args.batch, args.new_tokens, args.repeats = 4, 8, 1
    if args.group_size < 1 or args.batch % args.group_size:
        parser.error(f"--group-size {args.group_size} must divide --batch {args.batch}")
    torch.set_grad_enabled(True)  # as in training: sampling turns gradients off itself
    model = preset_model(args.preset, **overrides).train()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (args.batch // args.group_size,), generator=generator).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    prompts = [prompt for prompt in prompts for _ in range(args.group_size)]  # each prompt's group, as GRPO lays it out
    ids, mask = left_pad(prompts, 0)
    never = -1  # an eos id no row draws: every row samples --new-tokens tokens on both sides
    dtype = DTYPES[args.rollout_dtype]
    rescored = dtype != torch.float32

    def ours(compile: bool = not args.no_compile) -> None:
        out = sample(model, ids, mask, args.new_tokens, eos_id=never, seed=0, compile=compile, dtype=dtype)
        assert out.completion_mask.all() and out.completion_ids.shape[1] == args.new_tokens

    def eager() -> None:
        ours(compile=False)

    def peer(on: torch.nn.Module = model) -> None:
        tokens, _ = previous_sample(on, ids, mask, args.new_tokens, eos_id=never)
        assert tokens.shape[1] == args.new_tokens

    print(machine_line())
    print(f"preset {args.preset}{' (quick)' if args.quick else ''}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, fp32 policy, ours sampling in {args.rollout_dtype}, batch {args.batch}, prompts 16-48 tokens, "
          f"{args.new_tokens} new tokens per row")
    sides = {"ours": ours, "peer": peer}
    if rescored:
        copy = copy_in(model, dtype)
        sides[f"peer-{args.rollout_dtype}"] = lambda: peer(copy)
    if not args.no_compile:
        start = time.perf_counter()
        ours()
        print(f"compiling the batched decode step (once per process): {time.perf_counter() - start:.1f} s")
        sides["eager"] = eager
    times = interleaved(sides, args.repeats)
    tokens = args.batch * args.new_tokens
    rates = {name: tokens / min(seconds) for name, seconds in times.items()}
    engine = policy_engine(model, never, compile=not args.no_compile, dtype=dtype)
    copied = sum(p.numel() for p in model.parameters()) * dtype.itemsize if rescored else 0  # the shadow's weights
    print(f"engine weight copies beside the policy's: {(engine.weight_copy_bytes + copied) / 2**20:.1f} MiB "
          f"(the policy's weights: {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.1f} MiB)")
    if rescored:
        out = sample(model, ids, mask, args.new_tokens, eos_id=never, seed=0, dtype=dtype)
        seconds = min(timed(lambda: policy_logprobs(model, out)) for _ in range(args.repeats))
        print(f"the fp32 policy's forward over a rollout (old log-probs of reused rollouts only): {seconds:.3f} s")
    for name, rate in rates.items():
        print(f"{name:5s} {rate:8.1f} tok/s  (best of {len(times[name])}: {min(times[name]):.3f} s per rollout)")
    append_json(args.json, {"bench": "rollout", "preset": args.preset, "batch": args.batch, "dtype": args.rollout_dtype,
                            "new_tokens": args.new_tokens, **{f"{k}_tok_s": v for k, v in rates.items()}})
    if "eager" in rates:
        print(f"eager: ratio={rates['eager'] / rates['peer']:.2f} (eager {rates['eager']:.1f} tok/s, peer "
              f"{rates['peer']:.1f} tok/s)")
    for name in [n for n in rates if n.startswith("peer-")]:
        print(f"same-dtype: ratio={rates['ours'] / rates[name]:.2f} (ours {rates['ours']:.1f} tok/s, {name} "
              f"{rates[name]:.1f} tok/s)")
    print(ratio_line("rollout", rates["ours"], rates["peer"], "tok/s"))


if __name__ == "__main__":
    main()
