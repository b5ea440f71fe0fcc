"""Tokenizer: byte-level BPE training, the chat template, loading any HF tokenizer directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from minimind.errors import UserError
from minimind.tokenizer.template import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    MINIMIND3_CHAT_TEMPLATE,
    MINIMIND3_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
)

__all__ = ["CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "MINIMIND3_CHAT_TEMPLATE", "MINIMIND3_SPECIAL_TOKENS",
           "SPECIAL_TOKENS", "load_tokenizer"]


def load_tokenizer(path: str | Path):
    """Load a tokenizer directory (ours, MiniMind2's, or any HF one with a chat template) with AutoTokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"{path}: not a tokenizer directory (expected tokenizer.json and tokenizer_config.json)")
    try:
        # trust_remote_code=False: a directory's own .py files never run, and transformers never stops to ask
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - tokenizers and transformers raise assorted types for bad files
        missing = [f" ({name} is missing)" for name in ("tokenizer.json", "tokenizer_config.json")
                   if not (path / name).is_file()]
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"{path}: cannot load the tokenizer{''.join(missing[:1])}: {detail}") from None
    if tokenizer.eos_token_id is None:
        state = "has no eos_token" if (path / "tokenizer_config.json").is_file() else "is missing, so there is no eos_token"
        raise UserError(f"{path}/tokenizer_config.json {state}; generation needs one to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not tokenizer.chat_template or _digest(tokenizer.chat_template) in _EARLIER_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# sha256 of the chat templates earlier versions saved. They render every chat without tools exactly as the
# current one does, so tokenizers saved with them get the current one, and function calling with it.
_EARLIER_TEMPLATES = {"a761f8e87a62c7a5a4ee4215b3e1f2adf0c4dd14fcea71114dabae6b1a11c099"}


def _digest(template) -> str:
    return hashlib.sha256(str(template).encode()).hexdigest()
