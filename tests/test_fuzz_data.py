"""Bad data never crashes with a traceback: property-based tests (hypothesis) of the JSONL readers, the chat
template and loss-mask builder, and SFT packing, with random and adversarial records.

Each generated line is valid or invalid *by construction*, so the oracle is independent of the validator:
valid lines must come back as records, invalid ones must stop the read with `file:line:` naming the first of
them (or be counted and skipped with skip_bad_lines), and nothing else may escape.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind.cli import main
from minimind.data.chat import encode_conversation
from minimind.data.datasets import PackedSFTDataset
from minimind.data.shards import Shard, ShardWriter
from minimind.errors import UserError
from minimind.records import BadRecord, ReadStats, read_records
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
REPO = Path(__file__).resolve().parents[1]

# ---- strategies ---------------------------------------------------------------------------------------------
# Any text a JSON string can carry (hypothesis never makes lone surrogates here; those come separately below):
# control characters and NUL, emoji, CJK, right-to-left text, and the tokenizer's own special-token strings.
SPECIALS = st.sampled_from(["<s>", "</s>", "<unk>", "<think>", "</think>", "<answer>", "\n", "\r\n", "\x00",
                            "{{ eos_token }}", "{% if %}", "assistant\n", "</s>\n<s>assistant\n"])
TEXT = st.lists(st.one_of(st.text(min_size=1, max_size=30), SPECIALS), min_size=1, max_size=6).map("".join).filter(
    lambda s: s.strip() != "")


@st.composite
def conversations(draw, max_turns: int = 8, reasoning: bool = True) -> list[dict]:
    """A valid chat: optional system first, at least one user and one assistant turn, any order after."""
    turns = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=0, max_size=max_turns - 2))
    turns = ["user", *turns, "assistant"] if draw(st.booleans()) else [*turns, "user", "assistant"]
    if turns[0] == "assistant":  # a chat starts with a system or user turn
        turns.insert(0, "user")
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for role in turns:
        message = {"role": role, "content": draw(TEXT)}
        if role == "assistant" and reasoning and draw(st.booleans()):
            message["reasoning_content"] = draw(TEXT)
        messages.append(message)
    return messages


def valid_record(kind: str):
    """-> strategy of (record object, what read_records yields for it)."""
    if kind == "pretrain":
        return TEXT.map(lambda t: ({"text": t, "meta": 1}, t))
    if kind == "sft":
        return conversations().map(lambda c: ({"conversations": c}, c))
    if kind == "dpo":
        return st.tuples(conversations(), conversations()).map(lambda p: ({"chosen": p[0], "rejected": p[1]}, p))
    return rlaif_record()


@st.composite
def rlaif_record(draw) -> tuple[dict, tuple[list[dict], str]]:
    """A prompt with its reference answer, with none (the prompt alone), or with a blank answer slot ("" or
    MiniMind's placeholder "空"): the last two read as the answer ""."""
    chat = draw(conversations(reasoning=False).filter(lambda c: c[-1]["role"] == "assistant"
                                                      and c[-2]["role"] == "user"))
    prompt, form = chat[:-1], draw(st.sampled_from(["answer", "answer", "prompt alone", "blank answer"]))
    if form == "answer":
        return {"conversations": chat}, (prompt, chat[-1]["content"])
    if form == "prompt alone":
        return {"conversations": prompt}, (prompt, "")
    blank = {"role": "assistant", "content": draw(st.sampled_from(["", "  ", "空", " 空\n"]))}
    return {"conversations": [*prompt, blank]}, (prompt, "")


JSON_GARBAGE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=4), max_leaves=12)
NOT_A_STRING = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.text()),
                         st.dictionaries(st.text(max_size=3), st.text(max_size=3)))


@st.composite
def invalid_line(draw, kind: str) -> bytes:
    """One line that no reader may accept, built from a valid record and broken in one way."""
    record, _ = draw(valid_record(kind))
    good = json.dumps(record, ensure_ascii=draw(st.booleans())).encode()
    ways = ["utf8", "truncated", "surrogate", "nested", "huge int", "not object", "wrong type", "raw control",
            "empty chat", "only system", "no assistant", "bad role", "assistant first"]
    if kind == "rlaif":  # a prompt alone is a valid rlaif record (no reference answer)
        ways.remove("no assistant")
    how = draw(st.sampled_from(ways))
    if how == "utf8":  # a byte that can never appear in UTF-8
        at = draw(st.integers(0, len(good)))
        return good[:at] + draw(st.sampled_from([b"\xff", b"\xc0", b"\xfe", b"\xed\xa0\x80"])) + good[at:]
    if how == "truncated":
        return good[: draw(st.integers(1, len(good) - 1))]
    if how == "surrogate":  # an escaped half of a UTF-16 pair, alone: valid JSON, not text
        lone = draw(st.sampled_from([b"\\ud800", b"\\udfff", b"\\uDBFF", b"\\udc00x"]))
        key = b'"text": "' if kind == "pretrain" else b'"content": "'
        at = good.index(key) + len(key)
        return good[:at] + lone + good[at:]
    if how == "nested":
        depth = draw(st.sampled_from([100, 5_000, 100_000]))
        return b'{"text": ' + b"[" * depth + b"]" * depth + b', "conversations": ' + b"{\"a\":" * depth + b"1" + \
            b"}" * depth + b"}"
    if how == "huge int":
        return b'{"text": ' + b"7" * draw(st.integers(4_301, 20_000)) + b', "conversations": 1, "chosen": 1}'
    if how == "not object":
        return json.dumps(draw(st.one_of(st.lists(JSON_GARBAGE), st.text(), st.integers(), st.none()))).encode()
    if how == "raw control":  # a raw NUL/control byte inside a JSON string is not valid JSON
        at = good.index(b'"', good.index(b":")) + 1
        return good[:at] + draw(st.sampled_from([b"\x00", b"\x01", b"\x1f", b"\r"])) + good[at:]
    if kind == "pretrain":
        return json.dumps({"text": draw(NOT_A_STRING | st.sampled_from(["", "  \n\t"]))}).encode()
    chat = record["conversations"] if kind in ("sft", "rlaif") else record["chosen"]
    if how == "wrong type":
        at = draw(st.integers(0, len(chat) - 1))
        chat[at] = {**chat[at], "content": draw(NOT_A_STRING)} if draw(st.booleans()) else draw(NOT_A_STRING)
    elif how == "empty chat":
        chat.clear()
    elif how == "only system":
        chat[:] = [{"role": "system", "content": "be brief"}]
    elif how == "no assistant":
        chat[:] = [m for m in chat if m["role"] != "assistant"]
    elif how == "assistant first":
        chat[:] = [m for m in chat if m["role"] != "system"]
        chat.insert(0, {"role": "assistant", "content": "Hello!"})
    else:
        chat[0] = {**chat[0], "role": draw(st.sampled_from(["bot", "System", "", "tool"]) | NOT_A_STRING)}
    return json.dumps(record).encode()


@st.composite
def jsonl_file(draw, kind: str) -> tuple[list[bytes], list[object | None]]:
    """Lines of a file, and for each what a reader must yield (None = must be rejected, ... = blank)."""
    lines, expected = [], []
    for _ in range(draw(st.integers(1, 8))):
        choice = draw(st.sampled_from(["valid", "valid", "invalid", "blank"]))
        if choice == "valid":
            record, value = draw(valid_record(kind))
            lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())).encode())
            expected.append(value)
        elif choice == "invalid":
            lines.append(draw(invalid_line(kind)))
            expected.append(None)
        else:
            lines.append(draw(st.sampled_from([b"", b"  ", b"\t"])))
            expected.append(...)
    return lines, expected


# ---- the readers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo", "rlaif"])
def test_readers_accept_exactly_the_valid_lines(tmp_path_factory, kind):
    directory = tmp_path_factory.mktemp(f"fuzz-{kind}")

    @FUZZ
    @given(jsonl_file(kind))
    def check(data):
        lines, expected = data
        path = directory / "data.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        wanted = [v for v in expected if v is not None and v is not ...]
        bad_lines = [i + 1 for i, v in enumerate(expected) if v is None]
        stats = ReadStats()
        if wanted:
            got = list(read_records(path, kind, skip_bad_lines=True, stats=stats))
            assert got == wanted and stats.good == len(wanted)
        else:
            with pytest.raises(UserError, match=re.escape(f"{path}: no usable {kind} records")):
                list(read_records(path, kind, skip_bad_lines=True, stats=stats))
        assert stats.skipped == len(bad_lines)
        if bad_lines:
            with pytest.raises(UserError) as err:
                list(read_records(path, kind))
            message = str(err.value)
            assert message.startswith(f"{path}:{bad_lines[0]}: ") and "\n" not in message
        elif wanted:
            assert list(read_records(path, kind)) == wanted

    check()


def test_thousands_of_turns_and_huge_lines_are_read(tmp_path, tokenizer):
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(3000)]
    huge = "MiniMind " * 200_000  # a 1.8 MB line
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"conversations": chat}) + "\n" + json.dumps({"conversations": [
        {"role": "user", "content": huge}, {"role": "assistant", "content": huge}]}) + "\n")
    records = list(read_records(path, "sft"))
    assert len(records[0]) == 3000 and records[1][0]["content"] == huge


# ---- the chat template and the loss mask --------------------------------------------------------------------
def rendered(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Our template's text, written out by hand, and the [start, end) of each assistant turn's body + its </s>."""
    text, spans = "", []
    if not messages or messages[0]["role"] != "system":
        text += f"<s>system\n{DEFAULT_SYSTEM_PROMPT}</s>\n"
    for message in messages:
        text += f"<s>{message['role']}\n"
        body = message["content"]
        if message.get("reasoning_content"):
            body = f"<think>{message['reasoning_content']}</think><answer>{body}</answer>"
        start = len(text)
        text += body + "</s>"
        if message["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def check_mask(tokenizer, messages: list[dict]) -> None:
    ids, mask = encode_conversation(tokenizer, messages)
    text, spans = rendered(messages)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(ids)
    for (s, e), learn in zip(offsets, mask):
        inside = any(start <= s and e <= end for start, end in spans)
        if learn:
            assert inside and e > s, (text[s:e], messages)  # a target is always assistant text or its </s>
        elif e > s:
            assert not inside, (text[s:e], messages)  # ... and all of it is a target
    closing = {end for _, end in spans}
    eos_targets = [e for (s, e), learn, i in zip(offsets, mask, ids) if learn and i == tokenizer.eos_token_id
                   and e in closing]
    assert sorted(eos_targets) == sorted(closing)  # every assistant turn's own </s> is learned


@FUZZ
@given(messages=conversations())
def test_mask_covers_exactly_assistant_content_and_its_eos(tokenizer, messages):
    check_mask(tokenizer, messages)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": st.text(max_size=20)}), max_size=6))
def test_any_shape_of_text_messages_masks_within_bounds(tokenizer, messages):
    """Empty chats, only-system chats, empty contents, systems in the middle: the template and mask builder
    never fail on text messages (the reader rejects these shapes before training; this is the layer below)."""
    if not messages or messages[0]["role"] == "assistant":
        with pytest.raises(BadRecord, match="needs a system or user turn before its first assistant turn"):
            encode_conversation(tokenizer, messages)
        return
    check_mask(tokenizer, messages)


@pytest.mark.slow
def test_two_thousand_turns_mask_correctly(tokenizer):
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(2000)]
    start = time.perf_counter()
    check_mask(tokenizer, chat)
    print(f"2000 turns encoded and checked in {time.perf_counter() - start:.1f} s")


# ---- SFT packing: masks stay inside their conversation ------------------------------------------------------
@st.composite
def samples(draw) -> list[tuple[list[int], list[int]]]:
    """Token/mask pairs as a prepared shard holds them, including masks no template would make (a target on
    the first token, all targets, none)."""
    out = []
    for _ in range(draw(st.integers(1, 12))):
        n = draw(st.integers(0, 40))
        ids = draw(st.lists(st.integers(3, 511), min_size=n, max_size=n))
        mask = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        out.append((ids, mask))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=samples(), seq_len=st.integers(1, 48))
def test_packed_sft_masks_stay_within_their_conversation(tmp_path_factory, data, seq_len):
    directory = tmp_path_factory.mktemp("shard")
    writer = ShardWriter(directory, "sft", vocab_size=512, with_mask=True)
    for ids, mask in data:
        writer.add(ids, mask)
    writer.close()
    cap = seq_len + 1
    learnable = [i for i, (_, mask) in enumerate(data) if any(mask[1:cap])]
    if not learnable:
        with pytest.raises(UserError, match="no conversation has an assistant target"):
            PackedSFTDataset(Shard(directory), seq_len)
        return
    dataset = PackedSFTDataset(Shard(directory), seq_len)
    assert [i for row in dataset.rows for i, _ in row] == learnable  # each learnable conversation once, in order
    assert dataset.dropped == len(data) - len(learnable)
    for r, row in enumerate(dataset.rows):
        item = dataset[r]
        ids, labels, loss_mask, docs = item["input_ids"], item["labels"], item["loss_mask"], item["doc_ids"]
        assert ids.shape == labels.shape == loss_mask.shape == docs.shape == (seq_len,)
        assert set(loss_mask.tolist()) <= {0.0, 1.0}
        # the full row, position by position: which conversation and which of its tokens sits there
        owner = np.full(cap, -1)
        token = np.full(cap, -1)
        pos = 0
        for doc, (_, n) in enumerate(row):
            owner[pos : pos + n], token[pos : pos + n] = doc, np.arange(n)
            pos += n
        assert docs.tolist() == owner[:-1].tolist()
        for t in range(seq_len):
            doc, k = owner[t + 1], token[t + 1]  # the label at t is the row's token t + 1
            expected = doc >= 0 and k >= 1 and data[row[doc][0]][1][k] == 1  # never a conversation's first token
            assert loss_mask[t] == float(expected), (t, row)
            if expected:
                assert owner[t] == doc and labels[t] == data[row[doc][0]][0][k]


# ---- the command line on bad files: exit 2, one line, no traceback ------------------------------------------
BAD_FILES = {
    "invalid UTF-8": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
    "lone surrogate": b'{"text": "ok"}\n{"text": "a\\ud800b"}\n',
    "deep nesting": b'{"text": "ok"}\n{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    "huge integer": b'{"text": "ok"}\n{"text": ' + b"9" * 5000 + b"}\n",
    "raw NUL": b'{"text": "ok"}\n{"text": "a\x00b"}\n',
    "number for text": b'{"text": "ok"}\n{"text": 42}\n',
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_prepare_on_a_bad_file_is_one_line_naming_the_line(tmp_path, tokenizer_dir, capsys, name):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_FILES[name])
    assert main(["prepare", "--data", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "p"),
                 "--workers", "0"]) == 2
    err = capsys.readouterr().err  # the progress bar's redraws, then the error
    assert err.endswith("\n") and "Traceback" not in err
    assert err.rsplit("\r", 1)[-1].split("\n")[-2].startswith(f"minimind prepare: error: {path}:2: ")


def test_training_cli_on_a_bad_file_exits_2_without_traceback(tmp_path, tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(BAD_FILES.values()))
    args = [sys.executable, "-m", "minimind", "pretrain", "--data", str(path), "--tokenizer", str(tokenizer_dir),
            "--out", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu", "--max-steps", "1"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "MINIMIND_NO_PROGRESS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"minimind pretrain: error: {path}:2: not valid UTF-8 (byte 13)"


def test_skip_bad_lines_counts_every_adversarial_line(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(BAD_FILES.values()) + b'{"text": "MiniMind is small."}\n' * 40)
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--workers", "0", "--skip-bad-lines"]) == 0
    assert "skipped 6 bad lines" in capsys.readouterr().out
    assert Shard(out).meta["records"] == 6 + 40 and Shard(out).meta["skipped_lines"] == 6
