"""What every bench shares: interleaved A/B timing, the machine line, HF twins (Llama, Qwen3), a quick tokenizer.

Timings on a shared machine drift with load, so each bench times ours and the peer in the same run, in
alternating repetitions (ours, peer, ours, peer, ...), and compares the best repetition of each: a load
spike then hits both sides alike instead of whichever ran second, and the ratio stays meaningful even
when the absolute numbers do not.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimind.kernels import use_training_kernels  # noqa: E402
from minimind.kernels.training import training_view  # noqa: E402
from minimind.model import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from minimind.train.objective import LossOutput, MaskedLM, model_inputs, token_nll  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A bench's parser, described by the first line of its docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def add_bench_arguments(parser: argparse.ArgumentParser, **flags: Any) -> None:
    """Add the flags the benches share, in the order given, with this bench's defaults and help:
    repeats=(N, help), device=default, dtype=(default, help), quick=help, json=True."""
    for name, value in flags.items():
        if name == "repeats":
            parser.add_argument("--repeats", type=int, default=value[0], help=value[1])
        elif name == "device":
            parser.add_argument("--device", default=value, help="cpu, cuda, or auto")
        elif name == "dtype":
            parser.add_argument("--dtype", default=value[0], choices=list(DTYPES), help=value[1])
        elif name == "quick":
            parser.add_argument("--quick", action="store_true", help=value)
        elif name == "json" and value:
            parser.add_argument("--json", default=None, help="append the figures as one JSON line to this file")
        else:
            raise TypeError(f"add_bench_arguments: no shared flag {name}={value!r}")


def append_json(path: str | None, record: dict[str, Any]) -> None:
    """--json FILE: append the run's figures to FILE as one JSON line (nothing without --json)."""
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so a wall-clock timer measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device | str = "cpu",
                warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each call of each case, cases alternating within every repetition (after `warmup` rounds).

    `clock` is wall time; `time.thread_time` counts only the calling thread's CPU time (what a one-thread run
    computes, without the time a loaded machine's other processes hold the core)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    return times


class LogitsMaskedLM(MaskedLM):
    """`MaskedLM` computed as the reference project (and HF's `labels=` loss) does: the whole (tokens x vocab)
    logits of every position, then cross-entropy, then the mask. Ours runs the head chunk by chunk on the
    masked-in positions only (minimind/kernels/head_loss.py); benches use this as the peer's loss."""

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        out = model(**model_inputs(batch))
        return LossOutput((token_nll(out.logits, batch["labels"]) * batch["loss_mask"]).sum(), out.aux_loss)


def machine_line() -> str:
    """Threads, load average and device facts to print above any figure."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
            f"{torch.get_num_threads()} (OMP_NUM_THREADS={omp}), load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}, torch {torch.__version__}{gpu}")


def ratio_line(name: str, ours: float, peer: float, unit: str = "") -> str:
    """The last line every bench prints: `name: ratio=<ours/peer> (ours <x>, peer <y>)`."""
    unit = f" {unit}" if unit else ""
    return f"{name}: ratio={ours / peer:.2f} (ours {ours:.1f}{unit}, peer {peer:.1f}{unit})"


def preset_model(preset: str, seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A preset model with random weights (the init's), in train mode."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig.from_preset(preset, **overrides))


def training_model(preset: str, device: torch.device, compiled: bool = False, **overrides) -> MiniMindForCausalLM:
    """`preset_model` on `device` in train mode with the kernels a training run on `device` selects (the trainer's
    strategies call `use_training_kernels` the same way)."""
    model = preset_model(preset, **overrides).to(device).train()
    use_training_kernels(model, device, compiled)
    return model


def compiled_training_model(preset: str, device: torch.device, **overrides) -> torch.nn.Module:
    """`training_model` compiled as the trainer compiles it: the training view (losses from hidden states) under
    torch.compile, so `MaskedLM` gets its loss from the head-loss kernel inside the graph."""
    return torch.compile(training_view(training_model(preset, device, compiled=True, **overrides)))


def random_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device | str = "cpu") -> dict:
    """A pretraining batch of random tokens (seed 0), every position in the loss: what the step benches train on."""
    tokens = torch.randint(3, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch_size, seq_len)}
    return {k: v.to(device) for k, v in batch.items()}


def hf_twin(model: MiniMindForCausalLM, attn_implementation: str = "sdpa", weights: bool = True):
    """The transformers model of the same shapes holding the same weights (our names are theirs): `LlamaForCausalLM`,
    for a QK-norm model (the minimind-3 presets) `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`, and for any other
    MoE (the `moe` preset) `Qwen2MoeForCausalLM` (its exact rewrite of our shared experts, convert/qwen2_moe.py).

    `weights=False`: HF's own random init on the CPU instead, for a `model` on the meta device (a shape only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.qk_norm or c.use_moe:
        if weights:  # through a directory, so transformers maps per-expert weights onto its fused MoE layout
            return qwen3_directory_twin(model, attn_implementation)
        fields = hf_config_and_state(model, torch.float32, state=False)[0]
        fields.pop("architectures"), fields.pop("torch_dtype", None)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields, attn_implementation=attn_implementation)
        twin = AutoModelForCausalLM.from_config(config)
    else:
        config = LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
            tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn_implementation,
        )
        twin = LlamaForCausalLM(config)
    if not weights:
        return twin.train(model.training)
    twin.load_state_dict(model.state_dict(), strict=False)
    twin.tie_weights()
    param = next(model.parameters())
    return twin.to(param.device, param.dtype).train(model.training)


def hf_config_and_state(model: MiniMindForCausalLM, dtype: torch.dtype, state: bool = True) -> tuple[dict, dict]:
    """(config.json, state dict) of `model`'s Qwen3 / Qwen3-MoE form (QK-norm) or Qwen2-MoE form (other MoE), as
    `minimind convert` writes them; `state=False`: the config only ({} for the weights)."""
    if model.config.qk_norm:
        from minimind.convert.llama import untied_state
        from minimind.convert.qwen3 import qwen3_config

        return qwen3_config(model.config, dtype), untied_state(model) if state else {}
    from minimind.convert.qwen2_moe import qwen2_moe_config, qwen2_moe_state_dict

    return qwen2_moe_config(model.config, dtype), qwen2_moe_state_dict(model) if state else {}


def qwen3_directory_twin(model: MiniMindForCausalLM, attn_implementation: str):
    """`Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` (or `Qwen2MoeForCausalLM` for an MoE without QK-norm) loaded
    from a scratch directory holding our weights under their names, in `model`'s dtype, device and train/eval
    mode."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    config, state = hf_config_and_state(model, param.dtype)
    path = Path(scratch_dir("minimind-qwen3-twin-"))
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    twin = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype, attn_implementation=attn_implementation)
    return twin.to(param.device).train(model.training)


def scratch_dir(prefix: str) -> str:
    """A temporary directory removed when the bench exits (benches write models, GGUF files, prepared data)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def bench_tokenizer(vocab_size: int, texts: list[str] | None = None):
    """A byte-level BPE tokenizer of the given vocabulary size, trained in seconds (synthetic text by default)."""
    from minimind.tokenizer import load_tokenizer
    from minimind.tokenizer.train import save_tokenizer, train_tokenizer

    if texts is None:
        rng = random.Random(0)
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + list("abcdefghijklmnopqrstuvwxyz ")
        texts = ["".join(rng.choice(chars) for _ in range(300)) for _ in range(800)]
    out = scratch_dir("bench-tokenizer-")
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size, show_progress=False), out)
    return load_tokenizer(out), Path(out)


def demo_tokenizer(vocab_size: int = 6400):
    """A tokenizer trained on the bundled demo pretraining and SFT text (about a second): (tokenizer, dir)."""
    import itertools

    from minimind.demo_data import demo_file
    from minimind.tokenizer.train import texts_from_jsonl

    texts = itertools.chain(texts_from_jsonl(demo_file("pretrain.jsonl")), texts_from_jsonl(demo_file("sft.jsonl")))
    return bench_tokenizer(vocab_size, list(texts))
