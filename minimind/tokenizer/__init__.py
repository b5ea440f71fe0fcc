"""Tokenizer: byte-level BPE training, the chat template, loading any HF tokenizer directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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
           "SPECIAL_TOKENS", "TextEncoder", "encode_texts", "load_tokenizer"]


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


@dataclass(frozen=True)
class TextEncoder:
    """What encodes plain text exactly as `tokenizer(text, add_special_tokens=False)["input_ids"]` of a fast HF
    tokenizer does, without transformers: its `tokenizers` backend (after transformers' loading touches) as JSON,
    and the one setting the JSON leaves out. Small and picklable, so worker processes start in milliseconds."""

    backend_json: str
    split_special_tokens: bool = False

    @classmethod
    def of(cls, tokenizer) -> TextEncoder | None:
        """The encoder of a loaded HF tokenizer; None for a slow (Python) one, which has no backend."""
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is None:
            return None
        return cls(backend.to_str(), bool(getattr(tokenizer, "split_special_tokens", False)))

    def load(self):
        """The backend `tokenizers.Tokenizer`, set as transformers sets it before encoding without padding or
        truncation."""
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.backend_json)
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = self.split_special_tokens
        # Without special tokens a post-processor leaves one sequence's ids as they are (it adds specials and
        # sets type ids and offsets), so it is skipped rather than run on every document.
        backend.post_processor = None
        return backend


def encode_texts(backend, texts: list[str]) -> list[list[int]]:
    """Token ids of each text from one batched call of a `TextEncoder.load()` backend (no offsets computed)."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: tokenizers >= 0.21
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


# sha256 of the chat templates earlier versions saved. They render every chat without tools exactly as the
# current one does, so tokenizers saved with them get the current one, and function calling with it.
_EARLIER_TEMPLATES = {"a761f8e87a62c7a5a4ee4215b3e1f2adf0c4dd14fcea71114dabae6b1a11c099"}


def _digest(template) -> str:
    return hashlib.sha256(str(template).encode()).hexdigest()
