"""Tokenizer: byte-level BPE training, the chat template, loading any HF tokenizer directory."""

from __future__ import annotations

from pathlib import Path

from minimind.errors import UserError
from minimind.tokenizer.template import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, SPECIAL_TOKENS

__all__ = ["CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "SPECIAL_TOKENS", "load_tokenizer"]


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory (ours, MiniMind2's, or any HF one with a chat template) with AutoTokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"{path}: not a tokenizer directory (expected tokenizer.json and tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}/tokenizer_config.json: no eos_token; generation needs one to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
