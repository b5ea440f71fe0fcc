"""Each stage's own flags become a typed options dataclass, written to train_config.json as the "extra" object it
always was (same keys, same values), and read back from it; files of older runs, with fewer keys, still read."""

from __future__ import annotations

import importlib
import json

import pytest

from minimind.cli import VERBS, build_parser
from minimind.train.args import TrainConfig
from minimind.train.stages.sft import SFTOptions

COMMON = ["--data", "d.jsonl", "--out", "run"]
RL = {"group_size": 3, "max_new_tokens": 8, "temperature": 0.7, "top_k": 5, "reward": "exact", "clip": 0.3,
      "clip_high": 0.28, "updates_per_rollout": 2, "minibatches": 4, "compile_rollouts": True, "rollout_dtype": "bf16"}
RL_FLAGS = ["--init", "m", "--group-size", "3", "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "5",
            "--reward", "exact", "--clip", "0.3", "--clip-high", "0.28", "--updates-per-rollout", "2",
            "--minibatches", "4", "--compile-rollouts", "--rollout-dtype", "bfloat16"]

# verb -> (its own flags, the "extra" object train_config.json has always held for them)
CASES = {
    "pretrain": (["--tokenizer", "tok", "--preset", "tiny", "--set", "n_layers=2", "--doc-mask"],
                 {"tokenizer": "tok", "preset": "tiny", "overrides": {"n_layers": 2}, "doc_mask": True}),
    "sft": (["--init", "m", "--add-system-ratio", "0.2", "--empty-think-ratio", "0.4"],
            {"add_system_ratio": 0.2, "empty_think_ratio": 0.4}),
    "dpo": (["--init", "m", "--beta", "0.3", "--logp", "sum"], {"beta": 0.3, "logp": "sum"}),
    "lora": (["--init", "m", "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--target-modules", "q_proj,v_proj"],
             {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["q_proj", "v_proj"]}),
    "distill": (["--init", "m", "--teacher", "t", "--alpha", "0.25", "--temperature", "3", "--reasoning",
                 "--tag-weight", "5", "--tags", "<think>,</think>"],
                {"teacher": "t", "alpha": 0.25, "temperature": 3.0, "reasoning": True, "tag_weight": 5.0,
                 "tags": ["<think>", "</think>"]}),
    "grpo": ([*RL_FLAGS, "--beta", "0.1", "--loss", "dapo", "--importance-sampling", "sequence", "--kl-estimator",
              "k2"], {"beta": 0.1, "loss": "dapo", "importance_sampling": "sequence", "kl_estimator": "k2", **RL}),
    "ppo": ([*RL_FLAGS, "--kl-coef", "0.1", "--gamma", "0.9", "--lam", "0.8", "--vf-coef", "0.2", "--value-clip", "0.4"],
            {"kl_coef": 0.1, "gamma": 0.9, "lam": 0.8, "vf_coef": 0.2, "value_clip": 0.4, **RL}),
}


def stage_config(verb: str, flags: list[str], monkeypatch) -> TrainConfig:
    """The TrainConfig the verb's `run` hands to the trainer (the run itself is stubbed out)."""
    module = importlib.import_module(VERBS[verb][0])
    configs = []
    monkeypatch.setattr(module, "run_stage", lambda cfg, build: configs.append(cfg) or 0)
    assert module.run(build_parser(verb).parse_args([*COMMON, *flags])) == 0
    return configs[0]


@pytest.mark.parametrize("verb", sorted(CASES))
def test_stage_options_are_written_and_read_back_as_train_config_json_extra(verb, monkeypatch):
    flags, extra = CASES[verb]
    cfg = stage_config(verb, flags, monkeypatch)
    written = json.loads(json.dumps(cfg.to_dict(), default=str))  # what the trainer writes to train_config.json
    assert written["extra"] == extra
    assert "options" not in written
    assert TrainConfig.from_dict(written, type(cfg.options)) == cfg


def test_an_older_train_config_json_reads_with_defaults_for_keys_it_lacks():
    written = {"stage": "sft", "data": "d.jsonl", "out": "run", "lr": 1e-4, "adam_betas": [0.9, 0.95],
               "extra": {"add_system_ratio": 0.5, "a_key_no_stage_knows": 1}}
    cfg = TrainConfig.from_dict(written, SFTOptions)
    assert cfg.options == SFTOptions(add_system_ratio=0.5, empty_think_ratio=1.0)
    assert (cfg.lr, cfg.adam_betas, cfg.batch_size) == (1e-4, (0.9, 0.95), TrainConfig.batch_size)
    with pytest.raises(TypeError, match="SFTOptions"):
        TrainConfig(stage="dpo", data="d", out="o").stage_options(SFTOptions)
