"""Constrained decoding: a grammar decides which tokens may come next, so the output always parses.

A request's `SamplingParams.grammar` is an llguidance grammar (as `json_grammar`, `tool_call_grammar`,
`regex_grammar`, `choice_grammar` and `lark_grammar` build it). The engine keeps one `LLMatcher` per such
request: each sampling step, after the penalties, every token the grammar does not allow next is set to -inf
(llguidance computes the mask over the tokenizer's byte strings, so a token that spans two JSON symbols is
allowed exactly when its whole text fits), and the chosen token is fed back. The request ends as soon as the
grammar is complete. The parser itself is llguidance (Rust, used by vLLM and llama.cpp); what is ours is
where it sits in the decode step.

JSON is written as `json.dumps` writes it (", " and ": ", no other whitespace): the form the chat template
gives tool arguments in training data, and a small model cannot pad it with endless whitespace.
"""

from __future__ import annotations

import json

import llguidance
import numpy as np
import torch

from minimind.errors import UserError
from minimind.tokenizer.template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _styled(schema: dict | None) -> dict:
    schema = dict(schema) if schema else {"type": "object"}
    schema["x-guidance"] = {**JSON_STYLE, **schema.get("x-guidance", {})}
    return schema


def json_grammar(schema: dict | None = None) -> str:
    """A grammar for one JSON value valid under `schema` (None: any JSON object)."""
    return llguidance.LLMatcher.grammar_from_json_schema(_styled(schema))


def tool_call_grammar(functions: dict[str, dict | None], parallel: bool = True) -> str:
    """A grammar for replies made only of calls, as the chat template writes them: `<tool_call>` blocks of
    {"name": one of `functions`, "arguments": valid under that function's parameter schema}."""
    rules = [f'fn{i}: {_lark_string(json.dumps(name) + ", " + json.dumps("arguments") + ": ")} %json '
             f'{json.dumps(_styled(parameters))}' for i, (name, parameters) in enumerate(functions.items())]
    choice = " | ".join(f"fn{i}" for i in range(len(functions)))
    call = f'call: {_lark_string(TOOL_CALL_OPEN + chr(10) + "{" + json.dumps("name") + ": ")} ({choice}) ' \
           f'{_lark_string("}" + chr(10) + TOOL_CALL_CLOSE)}'
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return lark_grammar("\n".join([start, call, *rules]))


def regex_grammar(pattern: str) -> str:
    """A grammar for text matching a regular expression (whole)."""
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def choice_grammar(options: list[str]) -> str:
    """A grammar for exactly one of `options`."""
    return lark_grammar("start: " + " | ".join(_lark_string(option) for option in options))


def lark_grammar(lark: str) -> str:
    """A grammar from llguidance's Lark dialect (`start:` rule; `%json {schema}` embeds a JSON schema)."""
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _lark_string(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


class Guide:
    """Matchers for the requests of one engine that have a grammar, and the masking of their logits."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ll_tokenizer = None  # built on first use (llguidance's view of the vocabulary)

    def matcher(self, grammar: str):
        """A fresh matcher at the start of `grammar`; UserError naming what is wrong with it."""
        if self._ll_tokenizer is None:
            from llguidance.hf import from_tokenizer  # with llguidance.torch ~1 s of imports: only when used

            self._ll_tokenizer = from_tokenizer(self.tokenizer)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar)
        if matcher.is_error():
            raise UserError(f"the output grammar is invalid: {' '.join(matcher.get_error().split())}")
        return matcher

    def allowed(self, matchers: list, vocab_size: int, device: torch.device) -> torch.Tensor:
        """(B, vocab_size) bool: the tokens each row's matcher allows next (every token for rows without one).
        Applied after the penalties, so no penalty arithmetic can revive a forbidden token."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        width = min(self._ll_tokenizer.vocab_size, vocab_size)
        bits = allocate_token_bitmask(len(matchers), self._ll_tokenizer.vocab_size)  # (B, words) int32
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        for row in rows:
            fill_next_token_bitmask(matchers[row], bits, row)
        # bit i of the little-endian words is token i (unpacked here rather than with llguidance's
        # torch.compile'd kernel, which would compile on the first guided request and again per batch shape)
        unpacked = np.unpackbits(bits[rows].numpy().view(np.uint8), axis=-1, bitorder="little")[:, :width]
        allowed = torch.ones(len(matchers), vocab_size, dtype=torch.bool)
        allowed[rows] = False  # tokens past the tokenizer's vocabulary never decode
        allowed[rows, :width] = torch.from_numpy(unpacked.astype(bool))
        return allowed.to(device)
