"""Sampling parameters and the per-row next-token choice for a batch of sequences.

Every row of a batch has its own parameters (the server mixes requests), stored as one (rows, 7) tensor so a
step reads them without building tensors from Python lists. Order of operations, per row:
  1. repetition penalty (CTRL): for every token already in prompt + output, a positive logit is divided by
     the penalty and a negative one multiplied by it;
  2. presence / frequency penalties (OpenAI semantics, over the generated tokens only):
     logit -= presence * [count > 0] + frequency * count;
  3. temperature 0 -> argmax (greedy). Otherwise logits / temperature -> softmax, then top-k, top-p (keep the
     smallest head of the sorted distribution whose mass reaches p) and min-p (drop tokens below
     min_p * the top probability), then one draw.
The draw is inverse-CDF sampling with one uniform number per row taken from that row's own `torch.Generator`,
so a seeded request gives the same tokens whatever else shares its batch, and no global RNG state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from minimind.errors import UserError

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows
PARAM_COLUMNS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


@dataclass
class SamplingParams:
    """How one request is decoded. The defaults are greedy, eos-terminated, 256 new tokens at most.

    top_k 0 = off; top_p 1 = off; min_p 0 = off; penalties 1 / 0 / 0 = off.
    `stop`: strings that end generation; the stop string and anything after it are not returned.
    `seed`: makes sampling reproducible; None draws a fresh seed from the OS.
    `ignore_eos`: keep going past the end-of-sequence token (benchmarks).
    `logprobs`: None = off; k in [0, 20] = report each sampled token's log-probability under the model (its
    raw distribution: before penalties, temperature and truncation) and the k most likely tokens' (`TokenLogprob`).
    `prompt_logprobs`: the same for every prompt token after the first (scoring a text, as `echo` does).
    `logit_bias`: {token id: bias in [-100, 100]} added to those tokens' logits before sampling (OpenAI's
    semantics: -100 bans a token, 100 all but forces it).
    `grammar`: an llguidance grammar the output must follow (`grammar.py`: `json_grammar(schema)` for JSON,
    `tool_call_grammar` for function calls); tokens it does not allow next are never sampled.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise UserError(f"stop is {self.stop!r}; expected a string or a list of strings")
        self.stop = tuple(s for s in self.stop if s)
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first out-of-range field."""
        integer = {"max_new_tokens": 1, "top_k": 0}
        for name, low in integer.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise UserError(f"{name} is {value!r}; expected an integer >= {low}")
        ranges = [
            ("temperature", 0, float("inf"), ">= 0 (0 = greedy)"),
            ("top_p", 0, 1, "in (0, 1]"),
            ("min_p", 0, 1, "in [0, 1]"),
            ("repetition_penalty", 0, float("inf"), "> 0 (1 = off)"),
            ("presence_penalty", -2, 2, "in [-2, 2]"),
            ("frequency_penalty", -2, 2, "in [-2, 2]"),
        ]
        for name, low, high, expected in ranges:
            value = getattr(self, name)
            exclusive_low = name in ("top_p", "repetition_penalty")
            ok = _is_number(value) and (value > low if exclusive_low else value >= low) and value <= high
            if not ok:
                raise UserError(f"{name} is {value!r}; expected a number {expected}")
        if self.seed is not None and not _is_int(self.seed):
            raise UserError(f"seed is {self.seed!r}; expected an integer")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise UserError(f"{name} is {value!r}; expected None or an integer in [0, {MAX_LOGPROBS}]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise UserError(f"logit_bias is {type(self.logit_bias).__name__}; expected {{token id: bias}}")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise UserError(f"logit_bias key {token!r} is not a token id (an integer >= 0)")
                if not (_is_number(bias) and -100 <= bias <= 100):
                    raise UserError(f"logit_bias[{token}] is {bias!r}; expected a number in [-100, 100]")
        self._check_grammar()

    def _check_grammar(self) -> None:
        if self.grammar is None:
            return
        if not isinstance(self.grammar, str):
            raise UserError(f"grammar is {type(self.grammar).__name__}; expected an llguidance grammar string")
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(self.grammar)
        if error:
            raise UserError(f"the output grammar is invalid: {' '.join(error.split())}")  # llguidance's is multi-line

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def unfiltered(self) -> bool:
        """Sampled from softmax(logits / temperature) itself: no top-k, top-p, min-p or penalty."""
        return (self.temperature > 0 and self.top_k == 0 and self.top_p >= 1 and self.min_p <= 0
                and not self.penalized)

    def row(self) -> list[float]:
        """This request's values in PARAM_COLUMNS order."""
        return [float(getattr(self, name)) for name in PARAM_COLUMNS]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def apply_penalties(logits: torch.Tensor, params: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float32; params (B, 7); seen (B, V) bool over prompt + output; counts (B, V) over output."""
    repetition = params[:, 4:5].clamp(min=1e-6)  # a float32 underflow to 0 would turn -inf logits into NaN
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    counts = counts.to(logits.dtype)
    return logits - params[:, 5:6] * (counts > 0).to(logits.dtype) - params[:, 6:7] * counts


def sample_rows(logits: torch.Tensor, params: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from (B, V) float32 logits filtered by temperature/top-k/top-p/min-p.

    uniforms: (B,) numbers in [0, 1), one per row from that row's generator. Rows with temperature 0 must be
    handled by the caller (their temperature is replaced by 1 here only to keep the arithmetic finite).
    The draw walks the kept tokens in vocabulary order, so a row's token depends only on its own logits,
    parameters and uniform. The vocabulary is sorted only when some row asks for top-p or min-p (the sort is
    the costliest part of a step's sampling on a CPU); top-k is a threshold at the row's k-th probability
    (tokens tied with it stay in).
    """
    temperature = params[:, 0:1]
    temperature = torch.where(temperature > 0, temperature.clamp(min=1e-5), 1.0)  # no overflow to inf
    probs = torch.softmax(logits / temperature, dim=-1)
    drop = None  # (B, V) bool: tokens filtered out, when any row filters
    top_k = params[:, 1:2]
    widest = int(top_k.max())
    if widest > 0:
        top = probs.topk(min(widest, probs.shape[-1]), dim=-1).values  # (B, widest), descending
        kth = top.gather(-1, (top_k.long() - 1).clamp(0, top.shape[-1] - 1))  # (B, 1)
        drop = (top_k > 0) & (probs < kth)
    top_p, min_p = params[:, 2:3], params[:, 3:4]
    if bool(((top_p < 1) | (min_p > 0)).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut = (top_p < 1) & (mass_before >= top_p)  # top-p: the head before this token already reaches p
        cut |= sorted_probs < min_p * sorted_probs[:, :1]  # min-p, relative to the top token
        cut[:, 0] = False  # the most likely token always survives
        cut = torch.zeros_like(cut).scatter_(-1, order, cut)  # back to vocabulary order
        drop = cut if drop is None else drop | cut
    kept = probs if drop is None else probs.masked_fill(drop, 0.0)
    cdf = kept.cumsum(dim=-1)
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    # The first token whose cdf passes the target; a dropped token adds nothing to the cdf, so it is never the
    # first to pass. A target rounded up to the total would run off the end: the row's likeliest token then.
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    past_end = index >= probs.shape[-1]  # (B,) rare: the (B, V) argmax only when some row needs it
    return torch.where(past_end, probs.argmax(-1), index) if bool(past_end.any()) else index


def choose_tokens(
    logits: torch.Tensor,
    params: torch.Tensor,
    uniforms: torch.Tensor | None,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token for every row: penalties when `seen`/`counts` are given, then only `allowed` tokens (B, V)
    bool, if given (a grammar), greedy where temperature is 0, sampled elsewhere when `uniforms` are given
    (None = the whole batch is greedy)."""
    logits = logits.float()
    if seen is not None and counts is not None:
        logits = apply_penalties(logits, params, seen, counts)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if uniforms is None:
        return logits.argmax(dim=-1)
    sampled = sample_rows(logits, params, uniforms)
    greedy_rows = params[:, 0] <= 0  # (B,) the (B, V) argmax only when some row is greedy
    return torch.where(greedy_rows, logits.argmax(dim=-1), sampled) if bool(greedy_rows.any()) else sampled


@dataclass
class TokenLogprob:
    """A sampled token's log-probability under the model, and the `top` most likely tokens' (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int | None]) -> list[TokenLogprob | None]:
    """For each row with k = ks[row] not None: the log-probability of `tokens[row]` under the raw logits (B, V)
    and the k most likely tokens; None for the other rows. One log-softmax and one top-k for the batch."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    widest = max(k or 0 for k in ks)
    values, ids = logprobs.topk(widest, dim=-1) if widest else (logprobs[:, :0], tokens[:, None][:, :0])
    values, ids = values.tolist(), ids.tolist()
    return [None if k is None else TokenLogprob(int(t), lp, list(zip(ids[row][:k], values[row][:k])))
            for row, (k, t, lp) in enumerate(zip(ks, tokens.tolist(), chosen))]
