"""GRPO and what it stands on: KV-cached rollouts with left padding (more in test_rollout_engine.py), the rule
and model rewards, the objective's pieces, exact resume, and a short run that raises held-out accuracy above the
SFT starting point."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from minimind.cli import main
from minimind.errors import UserError
from minimind.kernels import head_loss
from minimind.modeldir import save_model_dir
from minimind.train.objective import token_nll
from minimind.train.rewards import ModelReward, RuleReward, answer_correct, make_reward, repetition
from minimind.train.rollout import Rollout, left_pad, sample
from minimind.train.stages.grpo import GRPO, GRPOOptions, clipped_surrogate, group_advantages, k3_kl

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62, 63]]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rollout_logprobs_match_a_full_forward_and_greedy_matches_hf_generate():
    model = tiny_model(3)
    ids, mask = left_pad(PROMPTS, 0)
    torch.manual_seed(0)
    rollout = sample(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), 8, eos_id=2)
    t = rollout.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, use_cache=False,
                       logits_to_keep=t + 1).logits
    full = -token_nll(logits[:, :-1], rollout.completion_ids) * rollout.completion_mask
    torch.testing.assert_close(full, rollout.logprobs, rtol=0, atol=1e-5)  # cached decode == full forward

    greedy = sample(model, ids, mask, 6, eos_id=2, temperature=0.0)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   eos_token_id=2, pad_token_id=0)
    assert torch.equal(greedy.sequences, reference[:, : greedy.sequences.shape[1]])


def test_greedy_rollouts_agree_with_the_inference_engine(tokenizer):
    from minimind.infer.engine import Engine

    model = tiny_model(3)
    ids, mask = left_pad(PROMPTS, 0)
    ours = sample(model, ids, mask, 8, eos_id=tokenizer.eos_token_id, temperature=0.0)
    theirs = Engine(model, tokenizer).completions(PROMPTS, max_new_tokens=8, temperature=0.0)
    for row, completion in enumerate(theirs):
        n = int(ours.lengths()[row])
        assert ours.completion_ids[row, :n].tolist() == completion.token_ids


def test_answer_matching_normalises_and_respects_word_boundaries():
    assert answer_correct("The answer is 4.", "4")
    assert not answer_correct("It is 14", "4") and not answer_correct("42", "4")
    assert answer_correct("addis  ABABA!", "Addis Ababa")
    assert answer_correct("智利在南美洲。", "南美洲")
    assert answer_correct("<think>12 + 30 = 42, not 41</think><answer>42</answer>", "42")
    assert not answer_correct("<think>maybe 41</think><answer>42</answer>", "41")  # thinking does not count
    assert answer_correct("ＳＵＭＭＥＲ", "summer")  # full-width letters
    assert not answer_correct("anything", "")


def fake_rollout(completions: list[list[int]], finished: list[bool]) -> Rollout:
    width = max(len(c) for c in completions)
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros(len(completions), width, dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    return Rollout(ids, mask, mask, torch.zeros(mask.shape), torch.tensor(finished), prompt_len=0)


def test_rule_reward_terms():
    assert repetition([1, 2, 3, 1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 7)
    assert repetition([1, 2]) == 0.0
    rollout = fake_rollout([[7, 2], [7, 8, 9, 10], [2], [5, 5, 5, 5, 5, 5], [6, 2]], [True, False, True, True, True])
    texts = ["42", "42 and more", "", "x x x", "41"]
    rewards = RuleReward(max_new_tokens=10)(rollout, texts, ["42"] * 5)
    expected = [1 - 0.05 * 2 / 10, (1 - 0.05 * 4 / 10) - 0.1, 0.0, -0.1 * (1 - 1 / 4), 0.0]
    torch.testing.assert_close(rewards, torch.tensor(expected))
    # A wrong reply earns nothing for being short or empty: nothing to gain by saying less.
    assert rewards[2] == rewards[4] == 0.0
    # `--reward exact`: correctness alone, so an all-wrong group has equal rewards and no advantage.
    exact = make_reward("exact", 10, 512)(rollout, texts, ["42"] * 5)
    torch.testing.assert_close(exact, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))


def test_model_reward_is_the_mean_completion_logprob(tmp_path, tokenizer):
    scorer = tiny_model(5)
    save_model_dir(scorer, tokenizer, tmp_path / "judge")
    ids, mask = left_pad(PROMPTS, 0)
    torch.manual_seed(0)
    rollout = sample(tiny_model(6), ids, mask, 5, eos_id=2)
    rewards = ModelReward(str(tmp_path / "judge"))(rollout, [], [])
    for row in range(3):
        n = int(rollout.lengths()[row])
        prompt = ids[row][mask[row].bool()]
        seq = torch.cat([prompt, rollout.completion_ids[row, :n]])[None]
        with torch.no_grad():
            logp = torch.log_softmax(scorer(seq).logits[0, -n - 1 : -1], -1)
        expected = logp.gather(-1, seq[0, -n:, None]).mean()
        assert rewards[row].item() == pytest.approx(expected.item(), abs=1e-5)
    assert isinstance(make_reward("rule", 8, 512), RuleReward)
    with pytest.raises(UserError, match="must be 'rule', 'exact', 'model:DIR', 'rm:DIR'"):
        make_reward("bleu", 8, 512)
    with pytest.raises(UserError, match="vocab_size is 512, the policy's is 600"):
        make_reward(f"model:{tmp_path / 'judge'}", 8, 600)


def test_policy_and_reference_log_probs_come_from_hidden_states_as_from_logits(tokenizer, monkeypatch):
    # Chunks of 16 rows: the 6 x 8 completion positions take several, the last a partial one.
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 16 * 4 * 512)
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 1)
    policy, reference = tiny_model(3), tiny_model(4)
    objective = GRPO(reference, tokenizer, RuleReward(8), GRPOOptions(group_size=2, max_new_tokens=8))
    ids, mask = left_pad(PROMPTS, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "answer": ["a", "b", "c"], "prompt": ["", "", ""]}
    saved = []
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        scored, out, logp, ref_logp, _ = objective.on_policy_pass(policy, batch)
    rollout = scored.rollout
    n, t = rollout.completion_ids.shape
    assert out.logits is None and logp.shape == ref_logp.shape == (n, t) and t > 1
    assert not [shape for shape in saved if shape[-1] == 512 and shape[:-1].numel() >= n * t]  # no logits kept

    def logits_form(model):
        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, use_cache=False,
                       logits_to_keep=t + 1).logits
        return -token_nll(logits[:, :-1], rollout.completion_ids)

    with torch.no_grad():
        torch.testing.assert_close(ref_logp, logits_form(reference), rtol=0, atol=1e-5)
    weights = torch.randn(n, t, generator=torch.Generator().manual_seed(1)) * rollout.completion_mask
    grads = []
    for value in (logp, logits_form(policy)):
        (value * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in policy.named_parameters()})
        policy.zero_grad(set_to_none=True)
    torch.testing.assert_close(logp, logits_form(policy), rtol=0, atol=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_pieces_on_hand_numbers():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # an all-equal group teaches nothing

    logp, old = torch.log(torch.tensor([[1.5, 0.5, 1.1]])), torch.zeros(1, 3)  # ratios 1.5, 0.5, 1.1
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([[2.0]]), clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-2.4, -1.0, -2.2]]))  # min(ρA, clip(ρ)A) for A > 0
    assert clipped.tolist() == [[True, False, False]]
    loss, _ = clipped_surrogate(logp, old, torch.tensor([[-1.0]]), clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8, 1.1]]))  # pessimistic side for A < 0

    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    torch.testing.assert_close(k3_kl(lp, ref), torch.tensor([math.exp(-0.5) + 0.5 - 1, 0.0]))


def test_the_rl_objectives_are_built_from_their_options():
    from minimind.train.stages.ppo import PPO, PPOOptions

    reference = tiny_model()
    options = GRPOOptions(group_size=3, max_new_tokens=5, beta=0.1, clip=0.3, temperature=0.7, top_k=5, loss="cispo",
                          importance_sampling="sequence", kl_estimator="k2", updates_per_rollout=2, minibatches=2)
    grpo = GRPO(reference, None, None, options)
    assert (grpo.group_size, grpo.max_new_tokens, grpo.temperature, grpo.top_k) == (3, 5, 0.7, 5)
    assert (grpo.beta, grpo.clip, grpo.loss, grpo.importance_sampling, grpo.kl_estimator) == (
        0.1, 0.3, "cispo", "sequence", "k2")
    assert grpo.clip_high == 4.0 and grpo.steps_per_batch == 4  # cispo's default cap, as `minimind grpo` sets it
    assert GRPO(reference, None, None).clip_high == GRPOOptions.clip  # no options: the flags' defaults
    ppo = PPO(reference, None, None, PPOOptions(group_size=2, kl_coef=0.2, gamma=0.9, lam=0.8, vf_coef=0.3,
                                                value_clip=0.0, clip_high=0.5))
    assert (ppo.group_size, ppo.kl_coef, ppo.gamma, ppo.lam, ppo.vf_coef, ppo.value_clip, ppo.clip, ppo.clip_high) \
        == (2, 0.2, 0.9, 0.8, 0.3, 0.0, PPOOptions.clip, 0.5)


ANSWERS = ["A", "B", "C"]
KEYS = ["sky", "grass", "blood"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def letter_task(root: Path, model_dir: Path) -> Path:
    """A starting point that sometimes gives the rewarded answer: SFT on prompts `#i word` answered with a random
    letter (so the model says A, B or C about a third of the time each), then RL data whose reference is always B.
    Built once per session under `root`; returns the directory."""
    if (root / "sft" / "model.safetensors").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    chat = [{"conversations": [{"role": "user", "content": f"#{i} {KEYS[i % 3]}"},
                               {"role": "assistant", "content": rng.choice(ANSWERS)}]} for i in range(300)]
    write_jsonl(root / "sft.jsonl", chat)
    for name, numbers in (("rl.jsonl", range(300)), ("rl_eval.jsonl", range(1000, 1030))):
        write_jsonl(root / name, [{"conversations": [{"role": "user", "content": f"#{i} {KEYS[i % 3]}"},
                                                     {"role": "assistant", "content": "B"}]} for i in numbers])
    assert main(["sft", "--data", str(root / "sft.jsonl"), "--init", str(model_dir), "--out", str(root / "sft"),
                 "--max-steps", "60", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "5",
                 "--max-seq-len", "96", "--device", "cpu", "--dtype", "fp32"]) == 0
    return root


def rl_args(verb: str, task: Path, out: Path, *extra: str) -> list[str]:
    return [verb, "--data", str(task / "rl.jsonl"), "--eval-data", str(task / "rl_eval.jsonl"), "--init",
            str(task / "sft"), "--out", str(out), "--batch-size", "8", "--group-size", "8", "--max-new-tokens", "6",
            "--max-seq-len", "96", "--device", "cpu", "--dtype", "fp32", *extra]


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_above_the_sft_start(tmp_path, tmp_path_factory, model_dir):
    task = letter_task(tmp_path_factory.getbasetemp() / "letter_task", model_dir)
    out = tmp_path / "grpo"
    assert main(rl_args("grpo", task, out, "--max-steps", "30", "--lr", "1e-3", "--eval-every", "15")) == 0
    summary = json.loads((out / "summary.json").read_text())
    before = summary["held-out accuracy (greedy): --init"]
    after = summary["held-out accuracy (greedy): trained"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["accuracy"] for r in rows if "accuracy" in r and "loss" in r]
    print(f"\nGRPO held-out greedy accuracy {before:.3f} -> {after:.3f}; held-out reward "
          f"{summary['held-out reward (greedy): --init']:.3f} -> {summary['held-out reward (greedy): trained']:.3f}; "
          f"sampled training accuracy (first/last 5 steps) {sum(sampled[:5]) / 5:.3f} -> {sum(sampled[-5:]) / 5:.3f}")
    assert after >= before + 0.3 and after >= 0.8
    assert sum(sampled[-5:]) > sum(sampled[:5])
    for key in ("reward_mean", "reward_std", "kl", "accuracy", "clip_fraction", "completion_len"):
        assert key in rows[0]
    assert [r["eval_accuracy"] for r in rows if "eval_accuracy" in r][-1] == pytest.approx(after)
    assert (out / "model.safetensors").is_file() and "held-out accuracy" in (out / "report.md").read_text()


def test_grpo_resume_is_exact(tmp_path, model_dir):
    records = [{"conversations": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
               for i in range(16)]
    data = write_jsonl(tmp_path / "rl.jsonl", records)
    common = ["grpo", "--data", str(data), "--init", str(model_dir), "--batch-size", "2", "--group-size", "3",
              "--max-new-tokens", "4", "--max-steps", "4", "--lr", "1e-3", "--max-seq-len", "64", "--device", "cpu",
              "--dtype", "fp32"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-after-steps", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0

    def rows(run):
        return [(r["step"], r["loss"], r["reward_mean"]) for r in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "a")) == 4
    # Throughput counts the sampled sequences the policy trained on (6 of prompt + completion), not the prompts.
    for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()):
        if "loss" in r:
            assert r["tokens"] % 6 == 0 and r["tokens"] // 6 > r["completion_len"]
            assert r["nonpad_fraction"] * r["tokens"] >= 6 * r["completion_len"] + 2  # completions + prompts


def test_grpo_cli_help_and_errors(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    assert "--group-size" in capsys.readouterr().out
    data = write_jsonl(tmp_path / "rl.jsonl", [{"conversations": [{"role": "system", "content": "be brief"}]}])
    common = ["grpo", "--data", str(data), "--init", str(model_dir), "--out", str(tmp_path / "x"), "--device", "cpu"]
    for extra, message in ((["--group-size", "1"], "--group-size must be at least 2"),
                           (["--reward", "bleu"], "must be 'rule', 'exact', 'model:DIR', 'rm:DIR'"),
                           ([], "rl.jsonl:1: field \"conversations\" has no user turn")):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("minimind grpo: error: ") and message in err[-1], err


def test_grpo_takes_prompts_without_reference_answers(tmp_path, model_dir, capsys):
    """MiniMind's rlaif-mini.jsonl leaves the answer slot as the placeholder "空"; a prompt may also come alone.
    Neither is matched as an answer (accuracy 0, whatever the replies say), and the run says the rule reward can
    only score their form."""
    placeholder = {"conversations": [{"role": "user", "content": "讲个故事"}, {"role": "assistant", "content": "空"}]}
    alone = {"conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]}
    data = write_jsonl(tmp_path / "rlaif-mini.jsonl", [placeholder, alone] * 2)
    out = tmp_path / "run"
    assert main(["grpo", "--data", str(data), "--init", str(model_dir), "--out", str(out), "--batch-size", "2",
                 "--group-size", "2", "--max-new-tokens", "4", "--max-steps", "2", "--device", "cpu"]) == 0
    assert "4 of 4 prompts have no reference answer" in capsys.readouterr().out
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(rows) == 2 and all(r["accuracy"] == 0.0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_under_torchrun(tmp_path, tmp_path_factory, model_dir, strategy):
    """Two processes: rollouts, the loss and the held-out eval (every rank under fsdp, where the decode steps
    must stay in lockstep across ranks) run to the end and write the model."""
    from dist_helpers import torchrun

    task = letter_task(tmp_path_factory.getbasetemp() / "letter_task", model_dir)
    out = tmp_path / strategy
    result = torchrun(2, [*rl_args("grpo", task, out, "--max-steps", "3", "--eval-every", "3", "--eval-batches", "2",
                                   "--lr", "1e-3", "--strategy", strategy), "--batch-size", "4", "--group-size", "4"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and "eval_accuracy" in rows[-1]
    assert "global batch 8 (4 x 1 accumulation x 2 processes)" in result.stdout + result.stderr
    assert (out / "model.safetensors").is_file()


def _lockstep_worker(rank: int, init_file: str, results) -> None:
    """One of two gloo ranks sampling from the same FSDP-sharded model; rank 0 stops at once, rank 1 never."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_model(0)
        with torch.no_grad():  # no attention/MLP output: each position predicts (about) its own token again
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        for block in model.model.layers:  # as `--strategy fsdp` does: blocks re-gather their weights every forward
            fully_shard(block)
        fully_shard(model)
        prompt = [[1, 40, 41, 2]] if rank == 0 else [[1, 40, 41, 5]]
        ids, mask = left_pad(prompt, 0)
        rollout = sample(model, ids, mask, 4, eos_id=2, temperature=0.0)
        results[rank] = rollout.completion_ids.tolist()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_decode_steps_stay_in_lockstep_across_ranks_for_a_sharded_model(tmp_path):
    """Under FSDP each forward is collective: a rank whose rows all stopped keeps stepping until every rank has,
    or the other rank's next forward would wait forever."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    context = mp.spawn(_lockstep_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):  # False while any rank is still running
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("sampling deadlocked across ranks")
    assert results[0][0][0] == 2  # rank 0: eos first (then padding while rank 1 finishes)
    assert results[1] == [[5, 5, 5, 5]]  # rank 1: never stops, runs to max_new_tokens
