"""Rewards people bring: Python functions, reward models with their own tokenizer, weighted sums, the
`minimind reward` stage (Bradley–Terry) and what happens when a reward misbehaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_dpo import pairs, write_pairs
from test_grpo import fake_rollout, write_jsonl

from minimind.cli import main
from minimind.errors import UserError
from minimind.train.rewards import (
    ClassifierReward,
    CombinedReward,
    FunctionReward,
    RewardError,
    RuleReward,
    make_reward,
    render_for,
    split_specs,
)
from minimind.train.stages.reward import bradley_terry_loss, whole_rows

REWARDS_PY = '''
import math

def brevity(prompts, completions, answers, **kwargs):
    return [1.0 / (1 + len(c)) for c in completions]

def echo_prompt(prompts, completions, answers, **kwargs):
    return [float(p[-1]["content"] in c) for p, c in zip(prompts, completions)]

def boom(prompts, completions, answers, **kwargs):
    raise KeyError("no such column")

def nan(prompts, completions, answers, **kwargs):
    return [math.nan] * len(completions)

def short(prompts, completions, answers, **kwargs):
    return [0.0]

def leave(prompts, completions, answers, **kwargs):
    import sys
    sys.exit(3)
'''


@pytest.fixture()
def rewards_file(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_reward_specs_split_into_weighted_terms():
    assert split_specs("exact") == [("exact", 1.0)]
    assert split_specs("exact, my.py:brevity@0.5,rm:org/rm@main") == [
        ("exact", 1.0), ("my.py:brevity", 0.5), ("rm:org/rm@main", 1.0)]  # '@main' is a revision, not a weight
    with pytest.raises(UserError, match="empty reward"):
        split_specs("exact,,rule")
    for weight in ("nan", "inf", "-inf"):
        with pytest.raises(UserError, match=f"'my.py:f@{weight}': the weight after '@' must be a finite number"):
            split_specs(f"my.py:f@{weight}")


def test_function_rewards_get_prompts_completions_answers_and_combine_with_weights(rewards_file):
    rollout = fake_rollout([[5, 6], [7], [8, 9, 10]], [True, True, False])
    texts, answers = ["hello there", "x", "say hi please"], ["", "x", "hi"]
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "y"}],
               [{"role": "user", "content": "hi"}]]
    brevity = FunctionReward(f"{rewards_file}:brevity")
    torch.testing.assert_close(brevity(rollout, texts, answers, prompts),
                               torch.tensor([1 / 12, 1 / 2, 1 / 14]))
    combined = make_reward(f"exact,{rewards_file}:echo_prompt@0.5", 8, 512)
    assert isinstance(combined, CombinedReward)
    exact = RuleReward(8, format_weight=0.0, repetition_weight=0.0, length_weight=0.0)(rollout, texts, answers)
    torch.testing.assert_close(exact, torch.tensor([0.0, 1.0, 1.0]))
    total = combined(rollout, texts, answers, prompts)
    torch.testing.assert_close(total, exact + 0.5 * torch.tensor([1.0, 0.0, 1.0]))
    assert combined.last_terms == {"reward/exact": pytest.approx(2 / 3),
                                   f"reward/{rewards_file}:echo_prompt": pytest.approx(2 / 3)}
    assert make_reward("rule", 8, 512).__class__ is RuleReward  # a lone unweighted reward stays itself


def test_misbehaving_rewards_are_one_clear_line(rewards_file, tmp_path):
    rollout = fake_rollout([[5], [6]], [True, True])
    for name, message in (("boom", "raised KeyError: 'no such column'"), ("nan", "returned nan for completion 0"),
                          ("short", "returned 1 values for 2 completions"), ("leave", r"called sys.exit\(3\)")):
        with pytest.raises(RewardError, match=message):
            FunctionReward(f"{rewards_file}:{name}")(rollout, ["a", "b"], ["", ""], [[], []])
    for spec, message in ((f"{rewards_file}:missing", "has no function 'missing'"),
                          (f"{tmp_path}/nope.py:f", "no file"),
                          ("minimind.no_such_module:f", "importing minimind.no_such_module failed")):
        with pytest.raises(UserError, match=message):
            make_reward(spec, 8, 512)


def other_vocabulary_reward_model(path: Path) -> Path:
    """A randomly initialised Llama sequence classifier (one label) with a word-level tokenizer of its own
    (not ours: another vocabulary, another chat template), saved as a transformers directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<eos>", "user", "assistant", ":", "hello", "hi", "there", "what", "is", "two",
             "plus", "2", "4", "5", "four", "five"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                  eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_reward_model_with_its_own_tokenizer_scores_the_re_rendered_chat(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = other_vocabulary_reward_model(tmp_path / "rm")
    reward = make_reward(f"rm:{rm_dir}", 8, 512)
    assert isinstance(reward, ClassifierReward)
    prompts = [[{"role": "user", "content": "what is two plus 2"}]] * 3
    texts = ["4", "five", "hi there hello"]
    scores = reward(fake_rollout([[1], [2], [3]], [True] * 3), texts, ["4"] * 3, prompts)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    expected = []
    for prompt, text in zip(prompts, texts):
        rendered = render_for(tok, prompt, text)
        assert rendered == f"user : what is two plus 2 <eos> assistant : {text} <eos> "
        with torch.no_grad():
            expected.append(model(**tok(rendered, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
    torch.testing.assert_close(scores, torch.stack(expected), rtol=0, atol=1e-5)
    assert len(set(scores.tolist())) == 3  # the completions are told apart


def test_a_reward_model_must_be_a_classifier(tmp_path, model_dir):
    with pytest.raises(UserError, match="must be a sequence classifier"):
        make_reward(f"rm:{model_dir}", 8, 512)  # a causal LM
    with pytest.raises(UserError, match="not a model directory"):
        make_reward(f"rm:{tmp_path}", 8, 512)
    for prefix in ("rm:", "model:"):  # not tried as a Hub name (which retries for a minute offline)
        with pytest.raises(UserError, match=f"--reward {prefix}rm_missing: no such directory"):
            make_reward(f"{prefix}rm_missing", 8, 512)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    bare = tmp_path / "bare"  # a classifier saved without its tokenizer
    LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                               pad_token_id=0)).save_pretrained(bare)
    with pytest.raises(UserError, match=f"rm:{bare}: no tokenizer transformers can load there"):
        make_reward(f"rm:{bare}", 8, 512)


def test_bradley_terry_loss_and_whole_rows():
    torch.testing.assert_close(bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])),
                               torch.tensor([0.126928, 0.693147]), rtol=0, atol=1e-6)
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "labels": torch.tensor([[2, 3, 9], [5, 8, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    ids, mask = whole_rows(batch)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 5, 8, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.mark.slow
def test_reward_stage_learns_held_out_preferences_and_grpo_scores_with_it(tmp_path, model_dir, rewards_file):
    train = write_pairs(tmp_path / "dpo.jsonl", pairs(64))
    held_out = write_pairs(tmp_path / "dpo_eval.jsonl", pairs(16, start=200))
    rm = tmp_path / "rm"
    assert main(["reward", "--data", str(train), "--eval-data", str(held_out), "--init", str(model_dir),
                 "--out", str(rm), "--max-steps", "30", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "2",
                 "--max-seq-len", "128", "--device", "cpu", "--eval-every", "30"]) == 0
    rows = [json.loads(line) for line in (rm / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # zero head: every margin starts at 0
    report = (rm / "report.md").read_text()
    accuracy = float(report.split("held-out pair accuracy")[1].split("|")[1])
    print(f"\nreward model: held-out pair accuracy {accuracy:.3f}, eval margin {rows[-1].get('eval_score_margin')}")
    # Half the pairs reject a refusal (easy), half a wrong sum (the tiny model cannot add): well above chance
    assert accuracy >= 0.6
    # transformers opens it as a classifier; the GRPO reward ranks a held-out pair's chosen reply first
    reward = make_reward(f"rm:{rm}", 8, 512)
    question = [{"role": "user", "content": "What is 300 plus 1?"}]
    scores = reward(fake_rollout([[1], [1]], [True, True]), ["300 plus 1 is 301.", "I don't want to answer that."],
                    ["301"] * 2, [question] * 2)
    assert scores[0] > scores[1]
    # GRPO with the reward model plus a weighted function of ours: each term is logged
    rl = write_jsonl(tmp_path / "rl.jsonl", [{"conversations": [
        {"role": "user", "content": f"What is {i} plus 1?"}, {"role": "assistant", "content": f"{i + 1}"}]}
        for i in range(8)])
    out = tmp_path / "grpo"
    assert main(["grpo", "--data", str(rl), "--init", str(model_dir), "--out", str(out), "--batch-size", "2",
                 "--group-size", "2", "--max-new-tokens", "4", "--max-steps", "2", "--device", "cpu",
                 "--reward", f"rm:{rm}", "--reward", f"{rewards_file}:brevity@0.5"]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {f"reward/rm:{rm}", f"reward/{rewards_file}:brevity"} <= set(logged[0])


def test_a_reward_that_raises_mid_run_stops_with_a_checkpoint(tmp_path, model_dir, capsys):
    flaky = tmp_path / "flaky.py"
    flaky.write_text("calls = []\n"
                     "def score(prompts, completions, answers, **kwargs):\n"
                     "    calls.append(1)\n"
                     "    if len(calls) > 2:\n"
                     "        raise ValueError('the judge is down')\n"
                     "    return [0.5] * len(completions)\n")
    rl = write_jsonl(tmp_path / "rl.jsonl", [{"conversations": [
        {"role": "user", "content": f"#{i}"}, {"role": "assistant", "content": "B"}]} for i in range(8)])
    out = tmp_path / "run"
    code = main(["grpo", "--data", str(rl), "--init", str(model_dir), "--out", str(out), "--batch-size", "2",
                 "--group-size", "2", "--max-new-tokens", "3", "--max-steps", "4", "--device", "cpu",
                 "--reward", f"{flaky}:score"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert "raised ValueError: the judge is down" in err[-1] and "Saved a checkpoint at step 2/4" in err[-1], err
    assert any(p.name.startswith("checkpoint") for p in out.iterdir()), sorted(p.name for p in out.iterdir())


def test_reward_verb_help(capsys):
    with pytest.raises(SystemExit):
        main(["reward", "--help"])
    assert "--init" in capsys.readouterr().out
