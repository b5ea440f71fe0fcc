"""Data pipeline: JSONL validation errors, SFT loss masks, packing, prepared shards, the step sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minimind.data.chat import encode_conversation
from minimind.data.datasets import PackedPretrainDataset, PackedSFTDataset, PairDataset, pair_collate
from minimind.data.prepare import prepare
from minimind.data.sampler import DataPosition, StepBatchSampler
from minimind.data.shards import Shard
from minimind.errors import UserError
from minimind.records import ReadStats, read_records
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ---- validation: every bad line names file and line -------------------------------------------------------
BAD_LINES = {
    "broken JSON": ('{"text": "unterminated', "pretrain", "not valid JSON"),
    "missing text": ('{"txt": "x"}', "pretrain", 'missing field "text"'),
    "conversations not a list": ('{"conversations": "hi"}', "sft", "must be a list"),
    "unknown role": ('{"conversations": [{"role": "bot", "content": "x"}]}', "sft", "unknown role 'bot'"),
    "empty content": ('{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}',
                      "sft", "is empty"),
    "content not a string": ('{"conversations": [{"role": "user", "content": 3}]}', "sft", "must be a string"),
    "no assistant": ('{"conversations": [{"role": "user", "content": "q"}]}', "sft", "no assistant turn"),
    "dpo missing rejected": ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
                             "dpo", 'missing field "rejected"'),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_bad_line_error_names_file_and_line(tmp_path, name):
    line, kind, message = BAD_LINES[name]
    good = {"pretrain": {"text": "fine"}, "sft": {"conversations": [{"role": "user", "content": "q"},
                                                                     {"role": "assistant", "content": "a"}]}}
    good["dpo"] = {"chosen": good["sft"]["conversations"], "rejected": good["sft"]["conversations"]}
    path = write_jsonl(tmp_path / "data.jsonl", [good[kind], good[kind], line])
    with pytest.raises(UserError) as err:
        list(read_records(path, kind))
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_rlaif_reference_answer_may_be_missing(tmp_path):
    """The last assistant turn is the reference answer; without one (a prompt alone, an empty turn, or the "空"
    placeholder of MiniMind's rlaif-mini.jsonl) the answer is "", never the placeholder itself."""
    user, system = {"role": "user", "content": "1+1=?"}, {"role": "system", "content": "be brief"}
    rows = [{"conversations": [user, {"role": "assistant", "content": "2"}]},
            {"conversations": [user, {"role": "assistant", "content": "空"}]},
            {"conversations": [system, user, {"role": "assistant", "content": " "}]},
            {"conversations": [user]},
            {"conversations": [user, {"role": "assistant", "content": "3"}, user, {"role": "assistant", "content": ""}]}]
    assert list(read_records(write_jsonl(tmp_path / "rl.jsonl", rows), "rlaif")) == [
        ([user], "2"), ([user], ""), ([system, user], ""), ([user], ""),
        ([user, {"role": "assistant", "content": "3"}, user], "")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [user, {"role": "assistant", "content": "2"},
                                                                  {"role": "assistant", "content": "4"}]}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: the prompt must end with a user turn"):
        list(read_records(bad, "rlaif"))


def test_skip_bad_lines_counts_and_reports(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{bad\n{"text": ""}\n\xff\xfe\n\n{"text": "b"}\n')
    stats = ReadStats()
    assert list(read_records(path, "pretrain", skip_bad_lines=True, stats=stats)) == ["a", "b"]
    assert stats.skipped == 3 and stats.good == 2
    assert stats.examples[0].startswith("line 2: not valid JSON")
    assert stats.examples[2] == "line 4: not valid UTF-8 (byte 0)"
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        list(read_records(path, "pretrain"))


# ---- SFT loss masks against hand-written expectations ------------------------------------------------------
def expected(tokenizer, segments):
    """Concatenate separately tokenized segments [(text, learn?)] into (ids, mask)."""
    ids, mask = [], []
    for text, learn in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(learn)] * len(piece)
    return ids, mask


def sys_default():
    return [("<s>", 0), (f"system\n{DEFAULT_SYSTEM_PROMPT}", 0), ("</s>", 0), ("\n", 0)]


def turn(role, text, learn=False):
    return [("<s>", 0), (f"{role}\n", 0), (text, learn), ("</s>", learn), ("\n", 0)]


def test_mask_single_turn(tokenizer):
    chat = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "It is 42."}]
    assert encode_conversation(tokenizer, chat) == expected(
        tokenizer, sys_default() + turn("user", "What is 12 plus 30?") + turn("assistant", "It is 42.", True))


def test_mask_multi_turn_with_system(tokenizer):
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris 🎉"}]
    want = (turn("system", "Be brief.") + turn("user", "你好") + turn("assistant", "你好！", True)
            + turn("user", "Capital of France?") + turn("assistant", "Paris 🎉", True))
    assert encode_conversation(tokenizer, chat) == expected(tokenizer, want)


def test_mask_follows_another_tokenizers_markers(tokenizer):
    """A template with different specials still masks content + its end-of-turn marker only."""
    from copy import deepcopy

    other = deepcopy(tokenizer)
    other.chat_template = ("{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + eos_token }}"
                           "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")
    ids, mask = encode_conversation(other, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert ids == expected(other, [("[user]hi", 0), ("</s>", 0), ("[assistant]", 0), ("yo", 1), ("</s>", 1)])[0]
    assert mask == expected(other, [("[user]hi", 0), ("</s>", 0), ("[assistant]", 0), ("yo", 1), ("</s>", 1)])[1]


def prepared(tmp_path, tokenizer_dir, kind, rows, name="d"):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    prepare(path, tokenizer_dir, kind, tmp_path / f"{name}-prep", progress=False)
    return Shard(tmp_path / f"{name}-prep")


def test_truncation_cuts_the_mask_with_the_row_and_drops_unlearnable(tmp_path, tokenizer_dir, tokenizer):
    long_user = "word " * 60
    rows = [
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 30}]},
        {"conversations": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "late"}]},
    ]
    shard = prepared(tmp_path, tokenizer_dir, "sft", rows)
    full_ids, full_mask = shard.sample(0)
    first_target = [int(np.argmax(shard.sample(i)[1])) for i in range(2)]
    seq = first_target[0] + 10  # cuts the first reply in the middle, and is long before the second one starts
    assert first_target[1] > seq + 1 and len(full_ids) > seq + 1
    dataset = PackedSFTDataset(shard, seq_len=seq)
    assert dataset.dropped == 1 and len(dataset) == 1
    item = dataset[0]
    assert torch.equal(item["input_ids"], torch.as_tensor(full_ids[:seq]))
    assert torch.equal(item["loss_mask"], torch.tensor(full_mask[1 : seq + 1], dtype=torch.float32))
    assert item["loss_mask"].sum() == 11 and int(item["loss_mask"][: first_target[0] - 1].sum()) == 0


def test_sft_packing_keeps_conversations_apart(tmp_path, tokenizer_dir):
    rows = [{"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    shard = prepared(tmp_path, tokenizer_dir, "sft", rows)
    lengths = shard.lengths()
    dataset = PackedSFTDataset(shard, seq_len=128)
    assert sum(len(r) for r in dataset.rows) == 12
    item = dataset[0]
    docs = item["doc_ids"]
    assert docs.max() + 1 == len(dataset.rows[0]) and (docs[docs >= 0].diff() >= 0).all()
    used = sum(min(int(lengths[i]), 129) for i, _ in dataset.rows[0])
    assert int((docs >= 0).sum()) == min(used, 128)


def test_pretrain_rows_are_full_and_contiguous(tmp_path, tokenizer_dir):
    shard = prepared(tmp_path, tokenizer_dir, "pretrain", [{"text": f"document number {i} " * 5} for i in range(50)])
    dataset = PackedPretrainDataset(shard, seq_len=32)
    stream = np.asarray(shard.tokens(), dtype=np.int64)
    row = dataset[3]
    assert torch.equal(row["input_ids"], torch.as_tensor(stream[96:128]))
    assert torch.equal(row["labels"], torch.as_tensor(stream[97:129]))
    assert row["loss_mask"].min() == 1  # nothing is padding
    assert stream[0] == 1 and 2 in stream  # <s> doc </s>


def test_dpo_pairs_batch_chosen_then_rejected(tmp_path, tokenizer_dir):
    chat = [{"role": "user", "content": "2+2?"}]
    rows = [{"chosen": chat + [{"role": "assistant", "content": "4"}],
             "rejected": chat + [{"role": "assistant", "content": "five, I think"}]}] * 3
    dataset = PairDataset(prepared(tmp_path, tokenizer_dir, "dpo", rows), seq_len=64)
    batch = pair_collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 4
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert batch["attention_mask"][2].sum() > batch["attention_mask"][0].sum()


@pytest.mark.slow
def test_prepare_with_workers_equals_inline(tmp_path, tokenizer_dir):
    rows = [{"text": f"line {i} 你好 world"} for i in range(600)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prepare(path, tokenizer_dir, "pretrain", tmp_path / "a", workers=0, progress=False)
    meta = prepare(path, tokenizer_dir, "pretrain", tmp_path / "b", workers=2, progress=False)
    assert meta["n_samples"] == 600
    for name in ("tokens.bin", "index.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_prepare_reports_bad_line_from_worker(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}] * 300 + ['{"text": 5}'])
    with pytest.raises(UserError, match=r"p.jsonl:301: field \"text\" must be a string"):
        prepare(path, tokenizer_dir, "pretrain", tmp_path / "x", workers=1, progress=False)


# ---- the sampler --------------------------------------------------------------------------------------------
def test_ranks_get_disjoint_shares_covering_the_global_batch():
    world, b, accum, n = 2, 3, 2, 50
    per_rank = [list(StepBatchSampler(n, b, accum, world, r, seed=1, steps=4)) for r in range(world)]
    single = list(StepBatchSampler(n, b * world, accum, 1, 0, seed=1, steps=4))
    for step in range(4):
        ranks = {i for r in range(world) for m in range(accum) for i in per_rank[r][step * accum + m]}
        alone = {i for m in range(accum) for i in single[step * accum + m]}
        assert ranks == alone and len(ranks) == world * b * accum


def test_sampler_resumes_at_exact_position_across_epochs():
    sampler = StepBatchSampler(20, 4, 1, seed=3, steps=12)
    everything = list(sampler)
    position = DataPosition()
    for _ in range(7):
        position = sampler.advance(position)
    resumed = list(StepBatchSampler(20, 4, 1, seed=3, start=position, steps=5))
    assert resumed == everything[7:]
    assert position.epoch == 1  # 5 steps per epoch: step 7 is in the second epoch
