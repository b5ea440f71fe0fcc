"""Distillation: the KL term and loss, a student of another size getting closer to its teacher on held-out data,
tag weighting for reasoning distillation (exactly the tag targets), showing/hiding the thinking, and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from minimind.cli import main
from minimind.data.chat import encode_conversation, render
from minimind.data.datasets import PackedSFTDataset, stack_collate
from minimind.data.prepare import prepare
from minimind.data.shards import Shard
from minimind.modeldir import load_model, save_model_dir
from minimind.tokenizer.template import split_thinking
from minimind.train.distill_loss import token_kl
from minimind.train.stages.distill import REASONING_TAGS, Distill, TagFinder, TagWeighted


def test_token_kl_matches_torch_kl_div_and_vanishes_for_equal_logits():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    for temperature in (1.0, 2.0):
        ours = token_kl(teacher, student, temperature)
        theirs = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                          log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(ours, theirs)
        assert (ours > 0).all()
    torch.testing.assert_close(token_kl(teacher, teacher, 2.0), torch.zeros(2, 5), atol=1e-6, rtol=0)


def test_distill_loss_is_alpha_ce_plus_t2_kl_on_the_mask():
    student, teacher = tiny_model(0), tiny_model(1, dim=128, n_layers=4, n_heads=4, n_kv_heads=2)
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask}
    alpha, t = 0.3, 2.0
    with torch.no_grad():
        out = Distill(teacher, alpha, t)(student, batch)
        s_logits, t_logits = student(ids[:, :-1]).logits, teacher(ids[:, :-1]).logits
    ce = F.cross_entropy(s_logits.transpose(1, 2), ids[:, 1:], reduction="none")
    kl = token_kl(t_logits, s_logits, t)
    expected = ((alpha * ce + (1 - alpha) * t * t * kl) * mask).sum()
    torch.testing.assert_close(out.loss_sum, expected)
    assert out.metrics["kl"] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert Distill(teacher).count(batch).item() == 9


def chats(n: int, start: int = 0) -> list[dict]:
    return [{"conversations": [{"role": "user", "content": f"What is {i} plus 1?"},
                               {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]}
            for i in range(start, start + n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A bigger model (dim 128, 4 layers) fine-tuned on the task, so it knows something worth distilling."""
    root = tmp_path_factory.mktemp("teacher")
    save_model_dir(tiny_model(7, dim=128, n_layers=4, n_heads=4, n_kv_heads=2), tokenizer, root / "init")
    data = write_jsonl(root / "sft.jsonl", chats(96))
    assert main(["sft", "--data", str(data), "--init", str(root / "init"), "--out", str(root / "sft"),
                 "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
                 "--max-seq-len", "128", "--device", "cpu", "--dtype", "fp32"]) == 0
    return root / "sft"


def held_out_kl(student_dir: Path, teacher_dir: Path, shard: Shard, temperature: float = 2.0) -> float:
    data = PackedSFTDataset(shard, 128)
    batch = stack_collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        return Distill(load_model(teacher_dir), 0.5, temperature)(load_model(student_dir), batch).metrics["kl"]


@pytest.mark.slow
def test_student_kl_to_a_bigger_teacher_falls_on_held_out_data(tmp_path, model_dir, teacher_dir, tokenizer_dir):
    train = write_jsonl(tmp_path / "sft.jsonl", chats(96))
    held_out = write_jsonl(tmp_path / "eval.jsonl", chats(12, start=500))
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher_dir), "--init", str(model_dir), "--data", str(train),
                 "--eval-data", str(held_out), "--out", str(out), "--max-steps", "25", "--batch-size", "4",
                 "--lr", "3e-3", "--warmup-steps", "2", "--max-seq-len", "128", "--device", "cpu",
                 "--dtype", "fp32"]) == 0
    prepare(held_out, tokenizer_dir, "sft", tmp_path / "eval_prepared", progress=False)
    shard = Shard(tmp_path / "eval_prepared")
    before, after = held_out_kl(model_dir, teacher_dir, shard), held_out_kl(out, teacher_dir, shard)
    print(f"\ndistill: held-out KL(teacher || student) at T=2: {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kl"]) for r in rows if "kl" in r) and "eval_kl" in rows[-1]
    assert load_model(out).config.dim == 64  # the student keeps its own size


REASONING_CHAT = [
    {"role": "system", "content": "Think inside <think></think>, answer inside <answer></answer>."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "<think>12 + 30 = 42.</think><answer>42</answer>"},
]


def tag_targets_by_offsets(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """An independent oracle: tokens whose character span (from the tokenizer's offsets) overlaps a tag."""
    text = render(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for tag in REASONING_TAGS:
        start = text.find(tag)
        while start >= 0:
            spans.append((start, start + len(tag)))
            start = text.find(tag, start + 1)
    marks = [any(s < e_tag and e > s_tag for s_tag, e_tag in spans) for s, e in encoded["offset_mapping"]]
    return encoded["input_ids"], marks


def test_tag_weight_applies_exactly_to_tag_target_positions(tokenizer):
    ids, mask = encode_conversation(tokenizer, REASONING_CHAT)
    oracle_ids, oracle = tag_targets_by_offsets(tokenizer, REASONING_CHAT)
    assert ids == oracle_ids
    finder = TagFinder(tokenizer)
    assert finder(ids).tolist() == oracle
    assert sum(oracle) > 4  # the tags really are split into several pieces by this tokenizer

    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.float32)
    item = {"input_ids": ids_t[:-1], "labels": ids_t[1:], "loss_mask": mask_t[1:]}
    weighted = TagWeighted([item], finder, 10.0)[0]
    expected = torch.tensor([10.0 if tag else 1.0 for tag in oracle[1:]])
    torch.testing.assert_close(weighted["loss_weight"], expected)
    # Tags in the system prompt are weighted too, but only targets (mask 1) reach the loss.
    in_prompt = [t for t, tag in enumerate(oracle[1:]) if tag and mask[t + 1] == 0]
    in_reply = [t for t, tag in enumerate(oracle[1:]) if tag and mask[t + 1] == 1]
    assert in_prompt and in_reply

    model = tiny_model()
    batch = stack_collate([weighted])
    with torch.no_grad():
        out = Distill(None)(model, batch)
        ce = F.cross_entropy(model(batch["input_ids"]).logits[0], batch["labels"][0], reduction="none")
    weights = torch.ones_like(ce)
    weights[in_reply] = 10.0
    torch.testing.assert_close(out.loss_sum, (ce * weights * batch["loss_mask"][0]).sum())


def test_thinking_can_be_shown_or_hidden(tokenizer):
    turns = [{"role": "user", "content": "12 + 30?"},
             {"role": "assistant", "content": "42", "reasoning_content": "12 + 30 = 42."},
             {"role": "user", "content": "and 1 + 1?"}]
    shown = tokenizer.apply_chat_template(turns, tokenize=False)
    hidden = tokenizer.apply_chat_template(turns, tokenize=False, show_thinking=False)
    assert "<think>12 + 30 = 42.</think><answer>42</answer>" in shown
    assert "<think>" not in hidden and "assistant\n42</s>" in hidden
    assert split_thinking("<think>12 + 30 = 42.</think><answer>42</answer>") == ("12 + 30 = 42.", "42")
    assert split_thinking("<think>a</think> b") == ("a", "b")
    assert split_thinking("<think>still thinking") == ("still thinking", "")
    assert split_thinking("just an answer") == (None, "just an answer")


def test_reasoning_distillation_runs_without_a_teacher(tmp_path, model_dir):
    records = [{"conversations": [{"role": "user", "content": f"What is {i} plus 1?"},
                                  {"role": "assistant", "content": f"<think>{i} + 1 = {i + 1}.</think>"
                                                                   f"<answer>{i + 1}</answer>"}]} for i in range(32)]
    data = write_jsonl(tmp_path / "reasoning.jsonl", records)
    out = tmp_path / "reason"
    assert main(["distill", "--reasoning", "--tag-weight", "5", "--init", str(model_dir), "--data", str(data),
                 "--out", str(out), "--max-steps", "4", "--batch-size", "4", "--warmup-steps", "1",
                 "--max-seq-len", "128", "--device", "cpu", "--dtype", "fp32"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] > rows[0]["ce"]  # the tag tokens' extra weight shows in the loss


def test_distill_errors_are_one_line(tmp_path, model_dir, tokenizer, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", chats(8))
    common = ["distill", "--init", str(model_dir), "--data", str(data), "--device", "cpu", "--max-seq-len", "128"]
    wide = tmp_path / "wide"
    save_model_dir(tiny_model(vocab_size=600), tokenizer, wide)
    capsys.readouterr()
    cases = [
        ([], "--teacher is required"),
        (["--teacher", str(tmp_path / "missing")], "missing: no such model directory"),
        (["--teacher", str(wide)], "has vocab_size 600 but --init"),
        (["--reasoning"], "found none of the tags"),
    ]
    for i, (extra, message) in enumerate(cases):
        assert main([*common, *extra, "--out", str(tmp_path / f"out{i}")]) == 2
        err = capsys.readouterr().err.strip()  # progress bars may precede the one error line
        assert err.splitlines()[-1].startswith("minimind distill: error: ") and message in err.splitlines()[-1]
        assert "Traceback" not in err
