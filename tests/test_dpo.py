"""DPO: the loss formula, agreement with TRL's DPOTrainer (both log-prob conventions), and training that raises
the held-out chosen-vs-rejected margin."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_model import llama_twin, randomize

from minimind.cli import main
from minimind.data.chat import encode_conversation
from minimind.data.datasets import pair_collate
from minimind.data.prepare import prepare
from minimind.data.shards import Shard
from minimind.modeldir import load_model
from minimind.train.stages.dpo import DPO, dpo_loss


def test_dpo_loss_equals_the_formula_on_hand_built_logprobs():
    pc, pr = torch.tensor([-1.0, -0.5, -3.0]), torch.tensor([-2.5, -0.4, -1.0])
    rc, rr = torch.tensor([-1.2, -0.6, -2.0]), torch.tensor([-2.0, -0.5, -2.0])
    beta = 0.1
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(3):
        z = beta * ((pc[i] - pr[i]) - (rc[i] - rr[i])).item()
        assert losses[i].item() == pytest.approx(-math.log(1.0 / (1.0 + math.exp(-z))), abs=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item(), abs=1e-7)
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item(), abs=1e-7)
    same, _, _ = dpo_loss(pc, pr, pc, pr, beta)  # policy == reference: every pair costs log 2
    torch.testing.assert_close(same, torch.full((3,), math.log(2.0)))


def pairs(n: int, start: int = 0) -> list[dict]:
    """Arithmetic preference pairs: the correct sum is chosen, a wrong one (or a refusal) rejected."""
    out = []
    for i in range(start, start + n):
        question = [{"role": "user", "content": f"What is {i} plus 1?"}]
        wrong = f"{i} plus 1 is {i + 7}." if i % 2 else "I don't want to answer that."
        out.append({"chosen": question + [{"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}],
                    "rejected": question + [{"role": "assistant", "content": wrong}]})
    return out


def test_dpo_objective_matches_trl_dpotrainer_for_mean_and_sum_logprobs(tmp_path, tokenizer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny_model(), tiny_model()
    randomize(policy, 0)  # different, large weights: log-ratios far from zero
    randomize(reference, 1)
    encoded = [(encode_conversation(tokenizer, p["chosen"]), encode_conversation(tokenizer, p["rejected"]))
               for p in pairs(3, start=5)]
    ours = pair_collate([{"chosen": c, "rejected": r} for c, r in encoded])
    # TRL takes whole sequences plus a completion mask over them and shifts internally; same padding (right, 0).
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    width = max(len(ids) for ids, _ in rows)
    trl_inputs = {key: torch.zeros(len(rows), width, dtype=torch.long)
                  for key in ("input_ids", "attention_mask", "completion_mask")}
    for i, (ids, mask) in enumerate(rows):
        trl_inputs["input_ids"][i, : len(ids)] = torch.tensor(ids)
        trl_inputs["attention_mask"][i, : len(ids)] = 1
        trl_inputs["completion_mask"][i, : len(ids)] = torch.tensor(mask)

    dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    # TRL's `sigmoid` sums the completion log-probs; its `sigmoid_norm` divides each log-ratio by the completion
    # length, which is exactly the seed's mean convention.
    for loss_type, mean in (("sigmoid", False), ("sigmoid_norm", True)):
        args = DPOConfig(output_dir=str(tmp_path / loss_type), beta=0.5, loss_type=[loss_type], report_to="none",
                         use_cpu=True, bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=llama_twin(policy), ref_model=llama_twin(reference), args=args,
                             train_dataset=dummy, processing_class=tokenizer)
        with torch.no_grad():
            theirs = trainer._compute_loss(trainer.model, dict(trl_inputs), False)
            out = DPO(reference, beta=0.5, mean_logp=mean)(policy, ours)
        n_pairs = DPO(reference).count(ours)
        assert n_pairs.item() == 3
        ours_loss = out.loss_sum / n_pairs  # the trainer divides by the step's pair count
        assert abs(ours_loss.item() - math.log(2.0)) > 1e-3  # a non-trivial case
        torch.testing.assert_close(ours_loss, theirs.float(), rtol=0, atol=1e-5)


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def held_out_metrics(policy_dir: Path, reference_dir: Path, shard: Shard) -> dict:
    """DPO metrics of a saved policy on every held-out pair (one batch)."""
    from minimind.data.datasets import PairDataset

    data = PairDataset(shard, 128)
    batch = pair_collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        return DPO(load_model(reference_dir), beta=0.1)(load_model(policy_dir), batch).metrics


@pytest.mark.slow
def test_dpo_training_raises_the_held_out_margin(tmp_path, model_dir, tokenizer_dir):
    train = write_pairs(tmp_path / "dpo.jsonl", pairs(64))
    held_out = write_pairs(tmp_path / "dpo_eval.jsonl", pairs(16, start=200))
    out = tmp_path / "run"
    assert main(["dpo", "--data", str(train), "--eval-data", str(held_out), "--init", str(model_dir),
                 "--out", str(out), "--max-steps", "30", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "2",
                 "--max-seq-len", "128", "--device", "cpu", "--dtype", "fp32", "--eval-every", "15"]) == 0
    prepare(held_out, tokenizer_dir, "dpo", tmp_path / "eval_prepared", progress=False)
    shard = Shard(tmp_path / "eval_prepared")
    before = held_out_metrics(model_dir, model_dir, shard)
    after = held_out_metrics(out, model_dir, shard)
    print(f"\nDPO held-out: reward margin {before['reward_margin']:.4f} -> {after['reward_margin']:.4f}, "
          f"accuracy {before['reward_accuracy']:.2f} -> {after['reward_accuracy']:.2f}, "
          f"policy log-prob gap (chosen - rejected) {before['chosen_logp'] - before['rejected_logp']:.4f} -> "
          f"{after['chosen_logp'] - after['rejected_logp']:.4f}")
    assert before["reward_margin"] == 0.0  # the policy starts as the reference
    assert after["reward_margin"] > 0.05 and after["reward_accuracy"] > 0.8
    assert after["chosen_logp"] - after["rejected_logp"] > before["chosen_logp"] - before["rejected_logp"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= set(rows[0])
    evals = [r["eval_reward_margin"] for r in rows if "eval_reward_margin" in r]
    assert len(evals) == 2 and evals[-1] > 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
