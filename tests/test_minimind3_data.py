"""minimind-3's data as published: pretrain_t2t / sft_t2t / rlaif / agent_rl JSONL through the readers and
`prepare`, the `gt` reference answer, and the SFT loader's seeded augmentations (--add-system-ratio,
--empty-think-ratio)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_minimind3_template import WEATHER, learned_runs, minimind3_tokenizer

from minimind.cli import main
from minimind.data.chat import SYSTEM_PROMPTS, ChatAugment
from minimind.data.datasets import PromptDataset
from minimind.data.prepare import open_dataset, prepare
from minimind.data.shards import Shard
from minimind.errors import UserError
from minimind.records import read_records, validate_sft

# An sft_t2t line: tools as JSON text on the system turn, the calls as JSON text, reasoning, a tool turn.
SFT_T2T = {"conversations": [
    {"role": "system", "content": "You can look up the weather.", "tools": json.dumps([WEATHER])},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Use the tool.", "tool_calls": json.dumps(
        [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])},
    {"role": "tool", "content": '{"sky": "sunny"}'},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": ""},
]}
PLAIN = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def m3(tmp_path_factory, corpus_file):
    """A tiny minimind-3-format tokenizer; the tests prepare data with its directory, `m3.name_or_path`."""
    return minimind3_tokenizer(tmp_path_factory.mktemp("tokenizer3"), corpus_file)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def samples(shard: Shard):
    return [tuple(part.tolist() for part in shard.sample(i)) for i in range(len(shard))]


def test_a_system_turn_that_only_carries_tools_may_be_empty(tmp_path, m3):
    only_tools = {"conversations": [{**SFT_T2T["conversations"][0], "content": ""}, *SFT_T2T["conversations"][1:]]}
    data = write_jsonl(tmp_path / "sft_t2t.jsonl", [only_tools])
    prepare(data, m3.name_or_path, "sft", tmp_path / "out", progress=False)
    (ids, _), = samples(Shard(tmp_path / "out"))
    assert m3.decode(ids).startswith("<|im_start|>system\n\n\n# Tools\n\n")  # as minimind-3's template renders it
    empty_user = {"conversations": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(UserError, match=r"sft\.jsonl:1: conversations\[0\] field \"content\" is empty"):
        prepare(write_jsonl(tmp_path / "sft.jsonl", [empty_user]), m3.name_or_path, "sft", tmp_path / "o2",
                progress=False)


def test_sft_t2t_trains_as_published(tmp_path, m3):
    data = write_jsonl(tmp_path / "sft_t2t_mini.jsonl", [SFT_T2T, PLAIN])
    meta = prepare(data, m3.name_or_path, "sft", tmp_path / "out", progress=False)
    assert meta["records"] == 2
    (ids, mask), (plain_ids, plain_mask) = samples(Shard(tmp_path / "out"))
    text = m3.decode(ids)
    assert text.startswith("<|im_start|>system\nYou can look up the weather.\n\n# Tools\n\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert learned_runs(m3, ids, mask) == [
        '<think>\nUse the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>",
        "<think>\n\n</think>\n\nSunny.<|im_end|>"]
    assert '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>\n' in text
    assert learned_runs(m3, plain_ids, plain_mask) == ["<think>\n\n</think>\n\nhello<|im_end|>"]


def test_pretrain_t2t_documents_are_wrapped_in_the_markers(tmp_path, m3):
    data = write_jsonl(tmp_path / "pretrain_t2t_mini.jsonl", [{"text": "MiniMind 12 plus 30"}, {"text": "北京"}])
    prepare(data, m3.name_or_path, "pretrain", tmp_path / "out", progress=False)
    tokens = Shard(tmp_path / "out").tokens().tolist()
    assert m3.decode(tokens) == "<|im_start|>MiniMind 12 plus 30<|im_end|><|im_start|>北京<|im_end|>"


def test_gt_is_the_reference_answer(tmp_path, m3):
    prompt = [{"role": "user", "content": "12 + 30?"}]
    agent = [{"role": "system", "content": "Tools.", "tools": json.dumps([WEATHER])},
             {"role": "user", "content": "Weather in Rome?"}]
    rows = [{"conversations": prompt, "gt": "42"},
            {"conversations": [*prompt, {"role": "assistant", "content": "空"}], "gt": 42},  # a slot beside gt
            {"conversations": [*prompt, {"role": "assistant", "content": "forty-two"}], "gt": "42"},
            {"conversations": agent, "gt": "rain"},
            {"conversations": [*prompt, {"role": "assistant", "content": "42"}]}]  # no gt: as before
    records = list(read_records(write_jsonl(tmp_path / "agent_rl.jsonl", rows), "rlaif"))
    assert [answer for _, answer in records] == ["42", "42", "42", "rain", "42"]
    assert [len(messages) for messages, _ in records] == [1, 1, 1, 2, 1]
    assert records[3][0][0]["functions"] == [WEATHER]
    meta = prepare(tmp_path / "agent_rl.jsonl", m3.name_or_path, "rlaif", tmp_path / "out", progress=False)
    assert meta["records"] == 5
    rl = PromptDataset(Shard(tmp_path / "out"), max_prompt_len=512)  # what GRPO/PPO hand the rewards
    assert [rl[i]["answer"] for i in range(5)] == ["42", "42", "42", "rain", "42"] and rl.unanswered() == 0
    bad = write_jsonl(tmp_path / "rlaif_bad.jsonl", rows[:1] + [{"conversations": prompt, "gt": ["42"]}])
    with pytest.raises(UserError, match=r'rlaif_bad.jsonl:2: field "gt" \(the reference answer\) must be a string'):
        list(read_records(bad, "rlaif"))


def test_malformed_t2t_lines_name_file_and_line(tmp_path):
    broken = dict(SFT_T2T, conversations=[dict(SFT_T2T["conversations"][0], tools="[{not json"),
                                          *SFT_T2T["conversations"][1:]])
    path = write_jsonl(tmp_path / "sft_t2t.jsonl", [PLAIN, broken])
    with pytest.raises(UserError, match=r"sft_t2t.jsonl:2: conversations\[0\].tools is a string but not valid JSON"):
        list(read_records(path, "sft"))


# ---- the loader's augmentations -----------------------------------------------------------------------------
def chats(n):
    return [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(n)]


def test_augment_is_off_by_default_and_seeded():
    messages = chats(1)[0]
    assert not ChatAugment().active and ChatAugment().key() == ""
    assert ChatAugment().apply(messages, 1) == (messages, False)
    half = ChatAugment(0.5, 0.5, seed=7)
    draws = [half.apply(m, line) for line, m in enumerate(chats(200), start=1)]
    assert draws == [ChatAugment(0.5, 0.5, seed=7).apply(m, line) for line, m in enumerate(chats(200), start=1)]
    added = [out[0]["role"] == "system" for out, _ in draws]
    assert 60 < sum(added) < 140 and 60 < sum(drop for _, drop in draws) < 140
    assert all(out[0]["content"] in SYSTEM_PROMPTS for out, _ in draws if out[0]["role"] == "system")
    other = [ChatAugment(0.5, 0.5, seed=8).apply(m, line) for line, m in enumerate(chats(200), start=1)]
    assert other != draws
    assert ChatAugment(0.5, 0.5, seed=7).key() != ChatAugment(0.5, 0.5, seed=8).key()


def test_augment_never_adds_a_system_to_chats_with_tools_or_a_system():
    everything = ChatAugment(add_system_ratio=1.0)
    with_tools = [{"role": "user", "content": "q", "functions": [WEATHER]}, {"role": "assistant", "content": "a"}]
    with_system = [{"role": "system", "content": "S"}, *chats(1)[0]]
    assert everything.apply(with_tools, 3)[0] == with_tools
    assert everything.apply(with_system, 3)[0] == with_system
    assert everything.apply(chats(1)[0], 3)[0][0]["role"] == "system"


@pytest.mark.parametrize("ratios", [(-0.1, 0.0), (0.0, 1.5)])
def test_ratios_outside_zero_one_are_refused(ratios):
    with pytest.raises(UserError, match="must be between 0 and 1"):
        ChatAugment(*ratios)


def test_sft_verb_refuses_a_bad_ratio_before_anything_is_written(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "x.jsonl"
    data.write_text("")  # present: a missing file would be refused first, before the stage is imported
    assert main(["sft", "--data", str(data), "--init", "m", "--out", str(out), "--empty-think-ratio", "2"]) == 2
    assert "--empty-think-ratio must be between 0 and 1, got 2.0" in capsys.readouterr().err
    assert not out.exists()


def test_augmented_preparation_is_cached_per_setting_and_reproducible(tmp_path, m3):
    data = write_jsonl(tmp_path / "sft_t2t.jsonl", [{"conversations": c} for c in chats(12)]
                       + [{"conversations": SFT_T2T["conversations"]}])
    cache = tmp_path / "prepared"
    plain = open_dataset(data, m3.name_or_path, "sft", cache)
    assert open_dataset(data, m3.name_or_path, "sft", cache, augment=ChatAugment()).dir == plain.dir  # off: the same cache
    augment = ChatAugment(add_system_ratio=0.5, empty_think_ratio=0.0, seed=3)  # every empty think block goes
    first = open_dataset(data, m3.name_or_path, "sft", cache, augment=augment)
    assert first.dir != plain.dir
    assert samples(first) == samples(open_dataset(data, m3.name_or_path, "sft", tmp_path / "again", augment=augment))
    texts = [m3.decode(ids) for ids, _ in samples(first)]
    assert not any("<think>\n\n</think>\n\n" in text for text in texts)
    systems = [text.startswith("<|im_start|>system\n") for text in texts[:12]]
    assert 0 < sum(systems) < 12
    assert all(text.split("\n", 1)[1].split("<|im_end|>")[0] in SYSTEM_PROMPTS
               for text, has in zip(texts, systems) if has)
    for ids, mask in samples(first):
        runs = learned_runs(m3, ids, mask)
        assert runs and all(run.endswith("<|im_end|>") and "<think>\n\n</think>" not in run for run in runs)
    tool_runs = learned_runs(m3, *samples(first)[12])
    assert tool_runs[0].startswith("<think>\nUse the tool.\n</think>\n\n<tool_call>") and tool_runs[1] == "Sunny.<|im_end|>"
    assert samples(open_dataset(data, m3.name_or_path, "sft", cache, augment=ChatAugment(0.5, 0.0, seed=4))) != samples(first)
    with pytest.raises(UserError, match="already prepared"):
        open_dataset(first.dir, m3.name_or_path, "sft", cache, augment=augment)
    assert np.array_equal(plain.tokens(), open_dataset(data, m3.name_or_path, "sft", cache).tokens())


def test_dpo_pairs_mask_each_reply_with_its_think_block(tmp_path, m3):
    prompt = [{"role": "user", "content": "2+2?"}]
    pair = {"chosen": [*prompt, {"role": "assistant", "content": "4", "reasoning_content": "add"}],
            "rejected": [*prompt, {"role": "assistant", "content": "5"}]}
    prepare(write_jsonl(tmp_path / "dpo.jsonl", [pair]), m3.name_or_path, "dpo", tmp_path / "out", progress=False)
    (chosen, chosen_mask), (rejected, rejected_mask) = samples(Shard(tmp_path / "out"))
    assert learned_runs(m3, chosen, chosen_mask) == ["<think>\nadd\n</think>\n\n4<|im_end|>"]
    assert learned_runs(m3, rejected, rejected_mask) == ["<think>\n\n</think>\n\n5<|im_end|>"]
    assert m3.decode(rejected) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n5<|im_end|>\n"


def test_an_empty_reasoning_beside_inline_think_text_renders_as_written(m3):
    turns = [{"role": "user", "content": "q"},
             {"role": "assistant", "content": "<think>x</think>y", "reasoning_content": ""}]
    (record,) = [validate_sft({"conversations": turns})]
    assert m3.apply_chat_template(record, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<think>x</think>y<|im_end|>\n")
    turns[1].pop("reasoning_content")  # without the field the template reads the reasoning out of the content
    assert m3.apply_chat_template(validate_sft({"conversations": turns}), tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\nx\n</think>\n\ny<|im_end|>\n")
