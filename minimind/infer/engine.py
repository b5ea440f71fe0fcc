"""The inference Engine: prefill + incremental decode with a KV cache, sampling, stop rules, streaming, batching.

    from minimind import Engine
    engine = Engine.from_pretrained("runs/sft", device="cpu")
    engine.generate("The capital of France is", max_new_tokens=20)               # -> str (greedy)
    engine.generate(["a", "b"], temperature=0.8, top_p=0.9, seed=0)             # -> list[str], one batch
    for piece in engine.stream("Hello", stop=["\\n"]): print(piece, end="")      # text deltas
    engine.chat([{"role": "user", "content": "你好"}])                           # chat template applied
    Engine.from_pretrained("runs/sft", quantize="int8")                         # CPU: int8 (or "int4") weights
    Engine.from_pretrained("runs/sft", compile=True)                            # compiled decode step
    Engine.from_pretrained("runs/sft", compile=True, compile_cache=default_compile_cache())  # compiled once, kept
    Engine.from_pretrained("runs/sft", prepack=False)                           # CPU: no second weight copy
    Engine.from_pretrained("runs/sft", prefix_cache_tokens=8192)                # reuse shared prompt prefixes

The engine is separate from the model and works on token ids; the CLI, the server and the web UI share it.

Step-level API (what a continuous-batching scheduler drives; `generate`/`stream`/`chat` are built on it):
    request_id = engine.add(prompt, params=None, **sampling)   # queue a request (text or token ids)
    outputs = engine.step()                                    # one token for every running request, then
                                                               # waiting ones are admitted (their prefill)
    engine.release(request_id)                                 # cancel: frees its row at once
Each `StepOutput` carries the request id, the new token ids, the text delta that is now safe to show, and
`finished` / `finish_reason` ("stop" = eos or a stop string, "length" = max_new_tokens or the context). A
finished request's row is freed by `step` itself. Requests may be added or released between any two steps.
The engine is not thread-safe: one thread (the scheduler) calls add/step/release.

How a step works: every running request owns one row of a preallocated KV cache (`SlotKVCache`), with its
own length. First every running row decodes one token in one forward, with explicit per-row `position_ids`
and a (B, 1, 1, S) bool mask (skipped when all rows have the same length); finished rows are freed. Then
waiting requests take free rows (up to `max_batch_size`, and `prefill_token_budget` padded tokens) and are
prefilled, which also gives their first token: their rows ordered by the prompt tokens left to prefill, in as
few forwards as keep the padding small (`prefill_chunks`; left-padded among themselves, padding written to a
scratch column, logits of the last position only). When a request leaves, the last row moves into its place,
so running rows are always the contiguous rows [0, n) and the cache is read through views. Memory: rows x the
longest request's prompt + max_new_tokens (capped to the context).
With `prefix_cache_tokens` > 0 (`prefix.py`), a leaving request's keys/values are kept, and a prompt sharing
a prefix with one of them gets those columns copied into its row and prefills only the rest (at the same
positions); `prefix_cache_stats` counts the tokens reused.

Context policy: a prompt must leave room for at least one new token (prompt tokens < `max_seq_len`), else
`UserError`; `max_new_tokens` is capped to what fits, and hitting that cap reports finish_reason "length".
Text prompts get the tokenizer's bos token in front (as pretraining saw it) unless they start with it;
token-id prompts are used as given. `completion_tokens` counts every sampled token, a final eos included.
Seeds: request i of a batched call gets seed + i, so a batched call reproduces each prompt run alone.
A request with `SamplingParams.grammar` samples only tokens its grammar allows (`grammar.py`), e.g.
`engine.generate(prompt, grammar=json_grammar(schema))` always gives JSON valid under the schema, unless
max_new_tokens cuts it short (finish_reason "length").
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minimind.errors import UserError
from minimind.infer.batched import BatchedDecoder
from minimind.infer.cache import SlotKVCache
from minimind.infer.compiled import CompiledDecoder
from minimind.infer.grammar import Guide
from minimind.infer.layout import (
    OutputHead,
    PackedLinear,
    engine_copy,
    gemv_layout,
    pack_linears,
    tensor_bytes,
)
from minimind.infer.prefix import PrefixCache, PrefixStats
from minimind.infer.quantize import check_quantize, quantize_model
from minimind.infer.sampling import PARAM_COLUMNS, SamplingParams, TokenLogprob, choose_tokens, token_logprobs
from minimind.infer.text import TextStream
from minimind.kernels import decode_key_multiple, token_sampler, use_decode_kernels
from minimind.model.modeling_minimind import MiniMindForCausalLM

Prompt = str | Sequence[int]
log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: int
    token_ids: list[int]  # sampled this step (eos included when it ends the request)
    text: str  # delta safe to show: whole characters, never part of a stop string
    finished: bool
    finish_reason: str | None  # "stop" | "length" once finished
    prompt_tokens: int
    completion_tokens: int  # so far
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked for them
    # with SamplingParams.prompt_logprobs, on a request's first output: one per prompt token (None for the first)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0  # on a request's first output: prompt tokens taken from the prefix cache


@dataclass
class Completion:
    """A finished request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs


@dataclass
class GenerationStats:
    """Counts and timing of the last `generate`/`completions`/`stream`/`chat` call, one entry per prompt."""

    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second, prefill included."""
        return sum(self.completion_tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TokenSamples:
    """What `Engine.sample_ids` returns, one entry per prompt (in order)."""

    token_ids: list[list[int]]  # sampled ids, a final stop token included
    logprobs: list[list[float]]  # log p of each sampled id under the raw logits (temperature 1, no truncation)
    finish_reasons: list[str]  # "stop" (a stop token) or "length"


# A prefill forward's fixed cost, in padded prompt tokens, by device type (a CPU computes every padded token; a
# GPU's forward is mostly launch overhead at these sizes); others: 1024.
PREFILL_FORWARD_TOKENS = {"cpu": 32, "cuda": 1024}
# Prefill widths above this are rounded up to a multiple of it, by device type (others: 1), where the matmuls run
# through oneDNN (a CPU engine's prepacked weights, bf16/fp16 ones): oneDNN keeps what it builds for each input
# shape it meets, memory proportional to that shape's rows included, until ~1,000 shapes are cached, so one shape
# per prompt length let a server's memory grow with every new length. Rounded, prompts of up to 512 tokens make
# at most 31 shapes beyond the 16 shortest widths (small, and what a prefix-cache hit usually leaves to prefill).
# Float32 matmuls on plain weights (MKL) keep nothing per shape and are not rounded.
PREFILL_WIDTH_MULTIPLE = {"cpu": 16}
UNIFORM_BLOCK = 64  # random numbers a sampled request draws from its generator at once


@dataclass
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    limit: int  # max_new_tokens capped to the context
    stream: TextStream | None  # None: token ids only, never detokenized (`sample_ids`)
    generator: torch.Generator | None
    matcher: object | None = None  # llguidance.LLMatcher of a request with a grammar
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (token ids, biases) on the device
    stop_ids: frozenset[int] | None = None  # tokens that end it; None: the engine's eos_ids
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens of this request stored in its cache row
    row: int = -1
    uniforms: list[float] = field(default_factory=list)  # drawn ahead from the generator, next one last
    plain: bool = False  # sampled without filter, penalty, grammar or bias: the engine's one-pass draw may take it

    def uniform(self) -> float:
        """This request's next random number in [0, 1) (0 for greedy requests, which draw nothing).

        The generator's numbers in order, drawn UNIFORM_BLOCK at a time (a tensor of n draws holds the n
        numbers n single draws give; one call per token cost more than the draw)."""
        if self.generator is None:
            return 0.0
        if not self.uniforms:
            self.uniforms = torch.rand(UNIFORM_BLOCK, generator=self.generator).tolist()[::-1]
        return self.uniforms.pop()


class Engine:
    """Generation over a causal LM with the HF forward signature (MiniMindForCausalLM); see the module doc."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        device: str | torch.device | None = None,
        max_batch_size: int = 64,
        prefill_token_budget: int = 16384,
        quantize: str | None = None,
        compile: bool = False,
        prepack: bool = True,
        prefix_cache_tokens: int = 0,
        compile_cache: str | Path | None = None,
        compile_batched: bool = False,
        *,
        _owned: bool = False,
    ):
        self.quantize = check_quantize(quantize)
        # The caller's model is never rewritten: the engine prepares its own modules over the same weights
        # (`engine_copy`), except when it loaded the model itself (`from_pretrained`, `_owned`).
        given = None if _owned else model
        if given is not None:
            model = engine_copy(model)
        if device is not None:
            model = model.to(device)
        if quantize is not None:
            model = quantize_model(model, quantize)
        self.device = next(model.parameters()).device
        use_decode_kernels(model, self.device, next(model.parameters()).dtype)  # chosen once, here
        self._draw = token_sampler(self.device)  # unfiltered samples in one pass (a CPU kernel), or None
        if compile and not isinstance(model, MiniMindForCausalLM):
            raise UserError(f"compile=True needs a MiniMind model, got {type(model).__name__}")
        # CPU: oneDNN on prepacked weights for every matmul outside compiled steps (values unchanged, see
        # layout.py; a second copy of every weight). Where this build lacks oneDNN, the column-major layout for
        # faster single-row matmuls instead: free on a model the engine loaded itself, a second copy of the
        # projections on a caller's model, so prepack=False (no second copy) leaves a caller's layout alone.
        packed = prepack and pack_linears(model)
        if not packed and not compile and (prepack or given is None):
            gemv_layout(model)
        # MiniMind: run the body, then the head on the last positions only through `OutputHead`.
        self._body = model.model if isinstance(model, MiniMindForCausalLM) else None
        self._head = OutputHead(model.get_output_embeddings()) if self._body is not None else None
        # compile_cache: a directory where the compiled step is saved and found again (compile_cache.py)
        self._decode_step = CompiledDecoder(self._body, self._head, self.device, compile_cache) if compile else None
        # compile_batched: steps of 2+ rows compiled too (batched.py; RL rollouts), for a float MiniMind model
        batched = compile_batched and self._body is not None and quantize is None
        self._batched_step = BatchedDecoder(self._body, self.device) if batched else None
        self.model = model.eval()
        self.weight_copy_bytes = _weight_copy_bytes(model, given, self._head)
        if self._batched_step is not None:  # its transposed copies of the body's projections
            self.weight_copy_bytes += tensor_bytes(copy for _, copy in self._batched_step.copies)
        log.info("engine: %.1f MiB of weight copies beside the model's own weights", self.weight_copy_bytes / 2**20)
        self.tokenizer = tokenizer
        self.dtype = next(model.parameters()).dtype
        config = model.config
        self.max_seq_len: int = config.max_seq_len
        self.vocab_size: int = config.vocab_size
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        # a prefill forward's fixed cost in padded tokens: what splitting a group of mixed lengths must save
        self.prefill_forward_tokens = PREFILL_FORWARD_TOKENS.get(self.device.type, 1024)
        onednn = packed or self.dtype != torch.float32  # CPU matmuls through oneDNN (on a GPU, no rounding)
        self.prefill_width_multiple = PREFILL_WIDTH_MULTIPLE.get(self.device.type, 1) if onednn else 1
        self.decode_key_multiple = decode_key_multiple(self.device, self.dtype)  # columns eager decode steps read
        self.eos_ids = {tokenizer.eos_token_id} | _as_set(getattr(config, "eos_token_id", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cache = SlotKVCache(config.n_layers, config.n_kv_heads, config.head_dim, self.dtype, self.device)
        # 0: off. Off by default here, since a caller that trains the model must not reuse stale keys/values;
        # the CLI and the server turn it on (`--prefix-cache-tokens`). Quantized weights take other arithmetic
        # by the size of a forward (quantize.py: int8 rounds each matmul's input with a scale of the whole call;
        # int8 and int4 products of up to GEMV_ROWS rows round activations to int8 in the kernels, larger ones
        # do not), so the keys/values of a prompt's tail prefilled alone would differ from a whole prefill's by
        # more than float rounding, and so would the output: no reuse there.
        self.prefix_cache = None
        if prefix_cache_tokens and self.quantize is not None:
            log.info("engine: no prefix cache with %s weights (their arithmetic depends on a forward's rows)",
                     self.quantize)
        elif prefix_cache_tokens:
            self.prefix_cache = PrefixCache.for_cache(prefix_cache_tokens, self.cache)
        self._guide = Guide(tokenizer)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # index = cache row
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._lengths = self._next_tokens = self._row_params = self._seen = self._counts = None
        self._alloc_rows()
        self.last_stats = GenerationStats()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None, **kwargs
    ) -> Engine:
        """Load a model directory (any stage's output) and wrap it; `dtype` like "bf16" or torch.bfloat16.

        Keyword arguments go to the constructor, e.g. `quantize="int8"` (CPU: int8 weights, see `quantize.py`).
        """
        from minimind.modeldir import load_model_dir

        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        model, tokenizer = load_model_dir(path, device=device, dtype=dtype)
        return cls(model, tokenizer, _owned=True, **kwargs)  # nobody else holds it: rewritten in place

    # ---- prompts ----

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text gets bos in front (unless present); a list of ids is checked and kept."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            bos = self.tokenizer.bos_token_id
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            return ids
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def chat_prompt(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Token ids of a conversation rendered by the tokenizer's chat template, ready for the assistant."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- high level ----

    def generate(self, prompts: Prompt | Sequence[Prompt], **sampling) -> str | list[str]:
        """Complete one prompt (-> str) or a list of prompts in one batch (-> list[str]).

        Keyword arguments are `SamplingParams` fields: max_new_tokens=256, temperature=0 (greedy), top_k,
        top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, stop, seed, ignore_eos.
        """
        single = _is_single(prompts)
        results = self.completions([prompts] if single else list(prompts), **sampling)
        texts = [r.text for r in results]
        return texts[0] if single else texts

    def completions(self, prompts: Sequence[Prompt], params: SamplingParams | None = None, **sampling) -> list[Completion]:
        """Like `generate` on a list, with token ids, counts and finish reasons; sets `last_stats`."""
        params = _params(params, sampling)
        self._require_idle()
        start = time.perf_counter()
        ids = self._add_all(prompts, params)
        texts: dict[int, list[str]] = {i: [] for i in ids}
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in ids}
        prompt_logprobs: dict[int, list | None] = {i: None for i in ids}
        last: dict[int, StepOutput] = {}
        for out in self._drive(ids):
            texts[out.request_id].append(out.text)
            tokens[out.request_id] += out.token_ids
            logprobs[out.request_id] += out.logprobs or []
            prompt_logprobs[out.request_id] = prompt_logprobs[out.request_id] or out.prompt_logprobs
            if out.finished:
                last[out.request_id] = out
        wanted = params.logprobs is not None
        results = [
            Completion("".join(texts[i]), tokens[i], last[i].prompt_tokens, last[i].completion_tokens,
                       last[i].finish_reason, logprobs[i] if wanted else None, prompt_logprobs[i])
            for i in ids
        ]
        self.last_stats = GenerationStats(
            [r.prompt_tokens for r in results], [r.completion_tokens for r in results],
            [r.finish_reason for r in results], time.perf_counter() - start,
        )
        return results

    def sample_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                   stop_ids: Sequence[int] | None = None, **sampling) -> TokenSamples:
        """Sample from token-id prompts without detokenizing: ids, each one's raw log-probability, finish reasons.

        What RL rollouts need: the same decode loop and sampler as `completions` (request i seeded seed + i, so
        a seeded call repeats whatever the batch size), minus text. `stop_ids` (default: the engine's eos_ids)
        end a request; stop strings need text and are refused. The log-probabilities are under the model's raw
        distribution whatever the sampling temperature or top-k: the policy at temperature 1.
        """
        params = _params(params, sampling)
        if params.stop:
            raise UserError("sample_ids returns token ids only; stop strings need text (use completions)")
        params = replace(params, logprobs=0)
        self._require_idle()
        stops = None if stop_ids is None else frozenset(int(i) for i in stop_ids)
        ids = self._add_all(prompts, params, text=False, stop_ids=stops)
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        logprobs: dict[int, list[float]] = {i: [] for i in ids}
        reasons: dict[int, str] = {}
        for out in self._drive(ids):
            tokens[out.request_id] += out.token_ids
            logprobs[out.request_id] += [entry.logprob for entry in out.logprobs]
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        return TokenSamples([tokens[i] for i in ids], [logprobs[i] for i in ids], [reasons[i] for i in ids])

    def _drive(self, ids: list[int]) -> Iterator[StepOutput]:
        """Step until the requests `ids` have all finished, yielding each output of theirs; releases them on exit
        (an exception, or a consumer that stops early, frees their rows)."""
        wanted, left = set(ids), set(ids)
        try:
            while left:
                for out in self.step():
                    if out.request_id in wanted:
                        yield out
                        if out.finished:
                            left.discard(out.request_id)
        finally:
            for request_id in ids:
                self.release(request_id)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> Iterator[str]:
        """Yield text pieces of one completion as soon as they are safe to show (see `TextStream`).

        Parameters and the prompt are checked at the call; generation starts at the first `next()`. Closing
        the iterator early cancels the request. `last_stats` is set when the iterator is exhausted.
        """
        params = _params(params, sampling)
        prompt_ids = self.encode(prompt)
        self._check_prompt(prompt_ids)
        return self._stream(prompt_ids, params)

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        self._require_idle()
        start = time.perf_counter()
        (request_id,) = self._add_all([prompt_ids], params)
        try:
            while True:
                for out in self.step():
                    if out.text:
                        yield out.text
                    if out.finished:
                        self.last_stats = GenerationStats(
                            [out.prompt_tokens], [out.completion_tokens], [out.finish_reason],
                            time.perf_counter() - start,
                        )
                        return
        finally:
            self.release(request_id)

    def chat(self, messages: list[dict] | list[list[dict]], stream: bool = False, **sampling):
        """Answer a conversation (list of {role, content}) with the chat template applied.

        -> str, or an iterator of text pieces with `stream=True`; a list of conversations -> list[str].
        """
        if messages and isinstance(messages[0], list):
            if stream:
                raise ValueError("stream=True takes one conversation")
            return self.generate([self.chat_prompt(m) for m in messages], **sampling)
        prompt = self.chat_prompt(messages)
        return self.stream(prompt, **sampling) if stream else self.generate(prompt, **sampling)

    # ---- step level ----

    def add(self, prompt: Prompt, params: SamplingParams | None = None, **sampling) -> int:
        """Queue a request; -> its id. Raises UserError for an empty or too-long prompt or bad parameters."""
        return self._enqueue(prompt, _params(params, sampling))

    def _enqueue(self, prompt: Prompt, params: SamplingParams, text: bool = True,
                 stop_ids: frozenset[int] | None = None) -> int:
        """`add`; `text=False` skips detokenizing (no text deltas, no stop strings); `stop_ids` replaces eos_ids."""
        prompt_ids = self.encode(prompt)
        self._check_prompt(prompt_ids)
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()  # fresh entropy from the OS, not the global RNG
            else:
                generator.manual_seed(params.seed)
        request = _Request(
            request_id=self._next_id,
            prompt_ids=prompt_ids,
            params=params,
            limit=min(params.max_new_tokens, self.max_seq_len - len(prompt_ids)),
            stream=TextStream(self.tokenizer, params.stop) if text else None,
            generator=generator,
            matcher=self._guide.matcher(params.grammar) if params.grammar is not None else None,
            bias=self._bias(params.logit_bias),
            stop_ids=stop_ids,
            plain=params.unfiltered and params.grammar is None and not params.logit_bias,
        )
        self._next_id += 1
        self._requests[request.request_id] = request
        self._waiting.append(request)
        return request.request_id

    @torch.inference_mode()
    def release(self, request_id: int) -> None:
        """Cancel a request (waiting or running) and free its row; unknown or finished ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if request.row < 0:
            self._waiting.remove(request)
        else:
            self._free_rows([request.row])

    @torch.inference_mode()  # as `step` runs: the state it allocates must be inference tensors too
    def warm_up(self, batches: bool = False) -> float:
        """Compile the decode step now rather than during the first answer (`compile=True`; else nothing).

        One short greedy generation; the step is compiled once for every later length and cache size
        (compiled.py), so a server that warms up never stalls a request on compilation. With `batches`, also the
        step of several rows where the engine compiles one (float32 on a CPU with the kernels), by decoding two
        rows. Returns seconds.
        """
        if self._decode_step is None:
            return 0.0
        start = time.perf_counter()
        self._reserve(min(2, self.max_batch_size), 4)  # two cache rows: the row count compiles as a symbol
        self.completions([[self.pad_id] * 2], max_new_tokens=2, temperature=0.0, ignore_eos=True)
        if batches and self._decode_step.batched and self.max_batch_size > 1:
            self.completions([[self.pad_id] * 2] * 2, max_new_tokens=2, temperature=0.0, ignore_eos=True)
        return time.perf_counter() - start

    def refresh_weights(self) -> None:
        """Rebuild the weight copies the engine derives from the model's (CPU prepacked and transposed weights) at
        their next use. They follow in-place updates by the weights' version counters, but not every in-place
        update moves those: a fused optimizer step (`torch.optim.AdamW(fused=True)`) does not. A caller that
        trains the model it samples from (RL rollouts) calls this after its optimizer steps."""
        for module in self.model.modules():
            if isinstance(module, PackedLinear):
                module.refresh()
        if self._head is not None:
            self._head.refresh()
        if self._batched_step is not None:
            self._batched_step.refresh()
        if self.prefix_cache is not None:  # keys/values of the old weights
            self.prefix_cache.clear()

    def free_cache(self) -> None:
        """Give back the KV cache's memory while idle (between RL rollouts, say); the next request allocates a
        cache sized for itself, as a fresh engine would, so what it computes does not depend on earlier calls."""
        self._require_idle()
        self.cache.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self._alloc_rows()

    @property
    def prefix_cache_stats(self) -> PrefixStats | None:
        """Prompt tokens queried and reused, entries and memory held (None when the prefix cache is off)."""
        return None if self.prefix_cache is None else self.prefix_cache.stats

    @property
    def num_running(self) -> int:
        """Requests holding a cache row."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for prefill."""
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def prompt_tokens(self, request_id: int) -> int:
        """Prompt length of a live request (as counted for `usage`)."""
        return len(self._requests[request_id].prompt_ids)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Decode one token for every running request, then prefill waiting ones (their first token)."""
        outputs: list[StepOutput] = []
        if self._running:
            outputs += self._decode()
        finished = [self._requests[o.request_id].row for o in outputs if o.finished]
        for output in outputs:
            if output.finished:
                del self._requests[output.request_id]
        self._free_rows(finished)
        group = self._admit()
        if group:
            prefilled = self._prefill(group)
            for output in prefilled:
                if output.finished:
                    del self._requests[output.request_id]
            self._free_rows([g.row for g, o in zip(group, prefilled) if o.finished])
            outputs += prefilled
        return outputs

    # ---- internals ----

    def _bias(self, logit_bias: dict[int, float] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not logit_bias:
            return None
        outside = [t for t in logit_bias if t >= self.vocab_size]
        if outside:
            raise UserError(f"logit_bias names token {outside[0]}, outside the vocabulary [0, {self.vocab_size})")
        ids = torch.tensor(list(logit_bias), dtype=torch.long, device=self.device)
        return ids, torch.tensor(list(logit_bias.values()), dtype=torch.float32, device=self.device)

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context (max_seq_len) is "
                f"{self.max_seq_len}; a prompt may have at most {self.max_seq_len - 1} tokens"
            )

    def _require_idle(self) -> None:
        if self.has_work:
            raise RuntimeError("the engine has step-level requests in flight; drive them with step()")

    def _add_all(self, prompts: Sequence[Prompt], params: SamplingParams, **how) -> list[int]:
        """Queue every prompt (request i seeded seed + i); `how`: `_enqueue`'s text / stop_ids."""
        ids: list[int] = []
        try:
            for i, prompt in enumerate(prompts):
                seed = None if params.seed is None else params.seed + i
                ids.append(self._enqueue(prompt, replace(params, seed=seed), **how))
        except BaseException:
            for request_id in ids:
                self.release(request_id)
            raise
        return ids

    def _alloc_rows(self) -> None:
        """(Re)size the per-row state to the cache's rows, keeping what running rows hold."""
        rows, n, device = self.cache.rows, len(self._running), self.device

        def grow(old: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
            new = torch.zeros(shape, dtype=dtype, device=device)
            if old is not None and n:
                new[:n] = old[:n]
            return new

        self._lengths = grow(self._lengths, (rows,), torch.long)  # tokens cached per row
        self._next_tokens = grow(self._next_tokens, (rows,), torch.long)  # each row's next decode input
        self._row_params = grow(self._row_params, (rows, len(PARAM_COLUMNS)), torch.float32)
        self._seen = grow(self._seen, (rows, self.vocab_size), torch.bool)  # tokens in prompt + output
        self._counts = grow(self._counts, (rows, self.vocab_size), torch.int32)  # tokens in output
        self._columns = torch.arange(self.cache.capacity, device=device)
        # one row attends every column it has: its mask is a prefix of this (no comparison per token)
        self._every_column = torch.ones((1, 1, 1, self.cache.capacity), dtype=torch.bool, device=device)

    def _reserve(self, rows: int, columns: int) -> None:
        before = (self.cache.rows, self.cache.capacity)
        multiple = self.decode_key_multiple  # the capacity too, so the decode widths it caps stay multiples
        columns = max(columns, min(_round_up(columns, multiple), self.max_seq_len))
        self.cache.reserve(rows, columns, self.max_batch_size, self.max_seq_len)
        if (self.cache.rows, self.cache.capacity) != before:
            self._alloc_rows()

    def _admit(self) -> list[_Request]:
        """Take waiting requests while rows are free and the padded prefill stays within the token budget."""
        group: list[_Request] = []
        width = 0
        while self._waiting and len(self._running) + len(group) < self.max_batch_size:
            longest = max(width, len(self._waiting[0].prompt_ids))
            if group and longest * (len(group) + 1) > self.prefill_token_budget:
                break
            group.append(self._waiting.popleft())
            width = longest
        return group

    def _prefill(self, admitted: list[_Request]) -> list[StepOutput]:
        """Prefill the admitted requests in new rows and sample their first tokens; outputs in admitted order.

        The rows are ordered by the prompt tokens left to prefill (after what the prefix cache gives) and prefilled
        in chunks of similar lengths (`prefill_chunks`), so a group of mixed lengths is not padded to its longest.
        A prompt admitted several times at once (an RL group, n samples of one prompt) is prefilled once: its other
        rows, placed after the prefilled ones, get a copy of that row's keys/values and of its last logits."""
        # (request, (prefix cache entry, tokens it gives)), by the tokens left to prefill
        matched = sorted(((r, self._prefix_match(r)) for r in admitted), key=lambda m: len(m[0].prompt_ids) - m[1][1])
        first_of: dict[tuple[int, ...], int] = {}  # prompt -> index in `prefilled` of its first request
        prefilled, copies = [], []  # copies: (request, prefix match, index in `prefilled` of its twin)
        for request, match in matched:
            prompt = tuple(request.prompt_ids) if request.params.prompt_logprobs is None else None  # None: scored
            if prompt in first_of:
                copies.append((request, match, first_of[prompt]))
                continue
            if prompt is not None:
                first_of[prompt] = len(prefilled)
            prefilled.append((request, match))
        group = [request for request, _ in prefilled] + [request for request, _, _ in copies]
        start, stop = len(self._running), len(self._running) + len(admitted)
        need = max(len(r.prompt_ids) + r.limit for r in self._running + group)
        self._reserve(stop, need)
        reused = []  # per row: columns [0, p) filled from the prefix cache
        for row, (request, (key, length)) in enumerate(prefilled, start):
            if key is not None:
                self.prefix_cache.load(key, length, self.cache, row)
            request.row, request.cached = row, len(request.prompt_ids)
            reused.append(length)
        widths = [len(r.prompt_ids) - p for (r, _), p in zip(prefilled, reused)]
        logits, scores = [], []
        for a, b in prefill_chunks(widths, self.prefill_forward_tokens):
            chunk_logits, chunk_scores = self._prefill_rows(start + a, group[a:b], reused[a:b])
            logits.append(chunk_logits)
            scores += chunk_scores
        twins = [twin for _, _, twin in copies]
        for row, (request, (_, length), twin) in enumerate(copies, start + len(prefilled)):
            self.cache.copy_row(start + twin, row, len(request.prompt_ids))
            request.row, request.cached = row, len(request.prompt_ids)
            reused.append(length)
        logits = torch.cat(logits)
        if twins:
            logits = torch.cat([logits, logits[twins]])
        scores += [None] * len(copies)
        self._running.extend(group)
        self._lengths[start:stop] = torch.tensor([len(r.prompt_ids) for r in group], device=self.device)
        self._row_params[start:stop] = torch.tensor([r.params.row() for r in group], device=self.device)
        for request in group:
            if request.params.penalized:
                self._seen[request.row] = False
                self._seen[request.row, torch.tensor(request.prompt_ids, device=self.device)] = True
                self._counts[request.row] = 0
        outputs = self._sample(start, stop, logits)
        for output, p, score in zip(outputs, reused, scores):
            output.cached_tokens = p
            output.prompt_logprobs = score
        by_request = {output.request_id: output for output in outputs}
        return [by_request[r.request_id] for r in admitted]

    def _prefill_rows(self, first: int, group: list[_Request], reused: list[int]
                      ) -> tuple[torch.Tensor, list[list[TokenLogprob | None] | None]]:
        """One forward over the prompts of rows [first, first + len(group)), left-padded among themselves (the
        first reused[i] tokens of each already in its row): -> logits (rows, V) of their last tokens, and the
        prompt log-probs of the requests that ask for them (None for the others)."""
        width = max(len(r.prompt_ids) - p for r, p in zip(group, reused))  # longest part left to prefill
        if width > self.prefill_width_multiple:  # few shapes (oneDNN); short ones, cheap to keep, as they are
            width = _round_up(width, self.prefill_width_multiple)
        longest = max(len(r.prompt_ids) for r in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        write = torch.full((len(group), width), self.cache.scratch_column, dtype=torch.long)
        positions = torch.zeros((len(group), width), dtype=torch.long)  # pads: position 0, attend column 0
        for i, (request, p) in enumerate(zip(group, reused)):
            n, new = len(request.prompt_ids), len(request.prompt_ids) - p
            ids[i, width - new :] = torch.tensor(request.prompt_ids[p:])  # left-padded: last column = last token
            write[i, width - new :] = positions[i, width - new :] = torch.arange(p, n)
        ids, write, positions = ids.to(self.device), write.to(self.device), positions.to(self.device)
        same_length = all(len(r.prompt_ids) == width for r in group)  # every position is its column: causal
        # (B, 1, T, longest): each new token sees its row's columns up to its own position, reused ones included
        mask = None if same_length else self._columns[:longest] <= positions[:, None, :, None]
        self.cache.bind(first, first + len(group), write, longest, max(reused))
        scored = [r.params.prompt_logprobs for r in group]
        if all(k is None for k in scored):
            return self._forward(ids, mask, positions), [None] * len(group)
        every = self._forward(ids, mask, positions, every_position=True)  # some prompt is scored: every position
        scores = [None if k is None else _prompt_logprobs(every[i, width - len(r.prompt_ids) :], r.prompt_ids, k)
                  for i, (r, k) in enumerate(zip(group, scored))]
        return every[:, -1], scores

    def _prefix_match(self, request: _Request) -> tuple[int | None, int]:
        """(prefix cache entry, tokens of it the request's prompt reuses); (None, 0) for none. A request scoring
        its prompt (prompt_logprobs) needs logits at every prompt position: nothing reused."""
        if self.prefix_cache is None or request.params.prompt_logprobs is not None:
            return None, 0
        return self.prefix_cache.match(request.prompt_ids)

    def _decode(self) -> list[StepOutput]:
        n = len(self._running)
        longest = max(r.cached for r in self._running)
        shortest = min(r.cached for r in self._running)
        positions = self._lengths[:n, None]  # (B, 1): each row writes its new token at its own length
        if self._decode_step is not None and self._decode_step.ready_for(n, self.cache):
            # compiled.py: the whole cache in, the mask says how much (one row: all its columns)
            mask = (self._every_column[..., : longest + 1] if n == 1
                    else self._columns[: longest + 1] <= positions[:, None, :, None])  # (B, 1, 1, longest + 1)
            self.cache.bind(0, n, positions, None, longest)
            logits = self._decode_step(self._next_tokens[:n, None], mask, positions, self.cache)
        elif self._batched_step is not None and n > 1:  # batched.py: the same, for several rows
            mask = self._columns[: longest + 1] <= positions[:, None, :, None]  # (B, 1, 1, longest + 1)
            logits = self._head(self._batched_step(self._next_tokens[:n, None], mask, positions, self.cache))
        else:  # read a multiple of decode_key_multiple columns where that keeps oneDNN's shapes few
            width = min(_round_up(longest + 1, self.decode_key_multiple), self.cache.capacity)
            mask = None if shortest == longest and width == longest + 1 else \
                self._columns[:width] <= positions[:, None, :, None]
            self.cache.bind(0, n, positions, width, longest)
            logits = self._forward(self._next_tokens[:n, None], mask, positions)
        self._lengths[:n] += 1
        for request in self._running:
            request.cached += 1
        return self._sample(0, n, logits)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 every_position: bool = False) -> torch.Tensor:
        """(B, T) ids -> (B, V) logits of the last position (or (B, T, V) of every one), through the bound
        cache rows."""
        if self._body is not None:
            hidden = self._body(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=self.cache, use_cache=True)[0]  # (B, T, dim)
            return self._head(hidden if every_position else hidden[:, -1])
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
            use_cache=True, logits_to_keep=0 if every_position else 1,
        )
        return out.logits if every_position else out.logits[:, -1]

    def _sample(self, start: int, stop: int, logits: torch.Tensor) -> list[StepOutput]:
        requests = self._running[start:stop]
        penalized = any(r.params.penalized for r in self._running)
        if self._draw is not None and not penalized and all(r.plain for r in requests):
            uniforms = torch.tensor([r.uniform() for r in requests], device=self.device)
            tokens, logprobs = self._draw(logits, self._row_params[start:stop, 0], uniforms)
            self._next_tokens[start:stop] = tokens
            return self._record(requests, tokens, tokens.tolist(), logits, logprobs)
        sampling = any(not r.params.greedy for r in requests)
        uniforms = torch.tensor([r.uniform() for r in requests], device=self.device) if sampling else None
        seen, counts = (self._seen[start:stop], self._counts[start:stop]) if penalized else (None, None)
        biased = logits  # what sampling sees; the raw logits stay for logprobs
        if any(r.bias is not None for r in requests):
            biased = logits.float().clone()
            for i, request in enumerate(requests):
                if request.bias is not None:
                    biased[i].index_add_(0, *request.bias)
        matchers = [r.matcher for r in requests]
        guided = any(m is not None for m in matchers)
        grammar = self._guide.allowed(matchers, logits.shape[-1], logits.device) if guided else None
        tokens = choose_tokens(biased, self._row_params[start:stop], uniforms, seen, counts, grammar)
        chosen = tokens.tolist()
        if guided:
            for request, token in zip(requests, chosen):
                if request.matcher is not None:
                    request.matcher.consume_token(token)
        self._next_tokens[start:stop] = tokens
        if penalized:
            rows = torch.arange(stop - start, device=self.device)
            self._seen[start:stop][rows, tokens] = True
            self._counts[start:stop][rows, tokens] += 1
        return self._record(requests, tokens, chosen, logits)

    def _record(self, requests: list[_Request], tokens: torch.Tensor, chosen: list[int], logits: torch.Tensor,
                drawn_logprobs: torch.Tensor | None = None) -> list[StepOutput]:
        """Each request's new token, with its logprob where asked: `drawn_logprobs` (the one-pass draw's) when no
        request wants top alternatives, else from the logits."""
        wanted = [r.params.logprobs for r in requests]
        if all(k is None for k in wanted):
            return [self._advance(r, t) for r, t in zip(requests, chosen)]
        if drawn_logprobs is not None and not any(wanted):
            entries = [None if k is None else TokenLogprob(t, lp, [])
                       for k, t, lp in zip(wanted, chosen, drawn_logprobs.tolist())]
        else:
            entries = token_logprobs(logits, tokens, wanted)
        return [self._advance(r, t, e) for r, t, e in zip(requests, chosen, entries)]

    def _advance(self, request: _Request, token: int, logprob: TokenLogprob | None = None) -> StepOutput:
        """Record one sampled token and decide whether the request is finished."""
        request.output_ids.append(token)
        stream, text, reason = request.stream, "", None  # stream None: token ids only (`sample_ids`)
        stop_ids = self.eos_ids if request.stop_ids is None else request.stop_ids
        if token in stop_ids and not request.params.ignore_eos:
            reason = "stop"
        else:
            stopped = False
            if stream is not None:
                text, stopped = stream.push(token)
            if stopped:
                return self._output(request, token, text, "stop", logprob)  # the stream cut the text at it
            if request.matcher is not None and (request.matcher.is_stopped() or request.matcher.is_error()):
                reason = "stop"  # the grammar is complete (or broken)
            elif len(request.output_ids) >= request.limit:
                reason = "length"
        if reason is not None and stream is not None:
            text += stream.finish()
        return self._output(request, token, text, reason, logprob)

    @staticmethod
    def _output(request: _Request, token: int, text: str, reason: str | None,
                logprob: TokenLogprob | None) -> StepOutput:
        return StepOutput(
            request.request_id, [token], text, reason is not None, reason, len(request.prompt_ids),
            len(request.output_ids), None if logprob is None else [logprob],
        )

    def _free_rows(self, rows: list[int]) -> None:
        """Give rows back; the last running row moves into each hole so running rows stay [0, n)."""
        for row in sorted(rows, reverse=True):
            leaving = self._running[row]
            if self.prefix_cache is not None:  # the row holds its prompt and all output but the last token
                self.prefix_cache.store((leaving.prompt_ids + leaving.output_ids)[: leaving.cached], self.cache, row)
            leaving.row = -1
            moved = self._running.pop()
            last = len(self._running)
            if row != last:
                self.cache.copy_row(last, row, moved.cached)
                for state in (self._lengths, self._next_tokens, self._row_params, self._seen, self._counts):
                    state[row] = state[last]
                self._running[row] = moved
                moved.row = row


def prefill_chunks(widths: Sequence[int], forward_tokens: int) -> list[tuple[int, int]]:
    """Split rows of prompt widths (in their order) into contiguous chunks [a, b), one forward each, that minimise
    the padded tokens (each chunk's rows x its widest) plus `forward_tokens` per forward. Widths in ascending
    order make chunks of similar lengths; one width, or widths close together, stay one chunk."""
    n = len(widths)
    cost = [0] + [None] * n  # cost[b]: the best split of rows [0, b)
    cut = [0] * (n + 1)  # where the last chunk of that split starts
    for b in range(1, n + 1):
        widest = 0
        for a in range(b - 1, -1, -1):
            widest = max(widest, widths[a])
            total = cost[a] + (b - a) * widest + forward_tokens
            if cost[b] is None or total < cost[b]:
                cost[b], cut[b] = total, a
    chunks, b = [], n
    while b > 0:
        chunks.append((cut[b], b))
        b = cut[b]
    return chunks[::-1]


def _weight_copy_bytes(model: torch.nn.Module, given: torch.nn.Module | None, head: OutputHead | None) -> int:
    """Bytes of weights the engine holds beside the model's own: tensors of its model that do not share the
    caller's storage (`given`: restrided, moved or int8 weights; none for a model it loaded itself) plus the
    copies built at first use (oneDNN's prepacked weights, the output head's transposed weight)."""
    ours = list(model.parameters()) + list(model.buffers())
    if given is None:
        made = 0
    else:
        theirs = {t.untyped_storage().data_ptr() for t in (*given.parameters(), *given.buffers())}
        made = tensor_bytes(t for t in ours if t.untyped_storage().data_ptr() not in theirs)
    packed = tensor_bytes(m.weight for m in model.modules() if isinstance(m, PackedLinear))
    head_copy = tensor_bytes([head.head.weight]) if head is not None and head.copy else 0
    return made + packed + head_copy


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """(n, V) logits over a prompt's n positions -> each prompt token's log-probability given the ones before it
    (None for the first, which nothing predicts) and the k likeliest tokens there."""
    if len(prompt_ids) < 2:
        return [None]
    targets = torch.tensor(prompt_ids[1:], device=logits.device, dtype=torch.long)
    return [None, *token_logprobs(logits[:-1], targets, [k] * len(targets))]


def _round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` at or above `value`."""
    return -(-value // multiple) * multiple


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def _is_single(prompts) -> bool:
    """A str, or a flat list of ints, is one prompt; a list of those is a batch."""
    if isinstance(prompts, str):
        return True
    return len(prompts) > 0 and isinstance(prompts[0], int)


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    if params is None:
        return SamplingParams(**overrides)
    return replace(params, **overrides) if overrides else params
