"""`--config FILE` on every verb: YAML, TOML or JSON options under their underscore names, the command line
overriding them, unknown keys a one-line error (exit 2); a run's train_config.json replays the run exactly."""

from __future__ import annotations

import json

import pytest

from minimind.cli import VERBS, main, parse_verb_args
from minimind.errors import UserError


def write_config(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name,text", [
    ("c.yaml", "data: d.jsonl\nout: runs/x\ninit: m\nlr: 2.0e-4\nskip_bad_lines: true\nmax-seq-len: 64\n"),
    ("c.toml", 'data = "d.jsonl"\nout = "runs/x"\ninit = "m"\nlr = 2e-4\nskip_bad_lines = true\nmax_seq_len = 64\n'),
    ("c.json", '{"data": "d.jsonl", "out": "runs/x", "init": "m", "lr": 2e-4, "skip_bad_lines": true, '
               '"max_seq_len": 64}'),
])
def test_a_config_file_sets_options_and_flags_override_it(tmp_path, name, text):
    config = write_config(tmp_path / name, text)
    _, args = parse_verb_args("sft", ["--config", config])
    assert (args.data, args.out, args.init, args.lr, args.skip_bad_lines, args.max_seq_len) == \
        ("d.jsonl", "runs/x", "m", 2e-4, True, 64)
    plain = parse_verb_args("sft", ["--data", "d", "--out", "o", "--init", "m"])[1]
    assert args.batch_size == plain.batch_size and args.epochs == plain.epochs  # the verb's own defaults stay
    _, args = parse_verb_args("sft", [f"--config={config}", "--lr", "1e-3", "--out", "runs/y"])
    assert (args.lr, args.out, args.max_seq_len) == (1e-3, "runs/y", 64)


def test_unknown_keys_and_bad_files_are_one_line_errors(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", "data: d.jsonl\nout: o\nlearning_rate: 0.1\n")
    assert main(["pretrain", "--config", config, "--tokenizer", "t"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minimind pretrain: error: {config}: unknown key 'learning_rate'") and "\n" not in err
    with pytest.raises(UserError, match=r"c.yaml: unknown key 'preset'"):
        parse_verb_args("sft", ["--config", write_config(tmp_path / "c.yaml", "preset: tiny\n")])
    with pytest.raises(UserError, match=r"bad.toml: not a valid config file"):
        parse_verb_args("generate", ["--config", write_config(tmp_path / "bad.toml", "max_new_tokens = = 3\n")])
    with pytest.raises(UserError, match=r"list.json: expected an object"):
        parse_verb_args("generate", ["--config", write_config(tmp_path / "list.json", "[1, 2]")])
    with pytest.raises(UserError, match=r"nothing.yaml: no such config file"):
        parse_verb_args("eval", ["--config", str(tmp_path / "nothing.yaml")])
    with pytest.raises(UserError, match=r"stage is 'pretrain', a config for `minimind pretrain`, not `minimind sft`"):
        parse_verb_args("sft", ["--config", write_config(tmp_path / "s.json", '{"stage": "pretrain"}')])
    with pytest.raises(UserError, match=r"doc_mask is an on/off option"):
        parse_verb_args("pretrain", ["--config", write_config(tmp_path / "b.yaml", "doc_mask: sometimes\n")])


def test_every_verb_takes_a_config(tmp_path):
    config = write_config(tmp_path / "empty.yaml", "{}\n")
    for verb in VERBS:
        with pytest.raises(SystemExit) as exit_:
            parse_verb_args(verb, ["--config", config, "--help"])
        assert exit_.value.code == 0, verb


@pytest.mark.slow
def test_train_config_json_replays_the_run(tmp_path, tokenizer_dir, corpus_file):
    first = tmp_path / "first"
    assert main(["pretrain", "--data", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--preset", "tiny",
                 "--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1",
                 "--max-seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--lr", "3e-3", "--seed", "7",
                 "--device", "cpu", "--dtype", "fp32", "--log-every", "1", "--out", str(first)]) == 0
    second = tmp_path / "second"
    assert main(["pretrain", "--config", str(first / "train_config.json"), "--out", str(second)]) == 0

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert len(losses(first)) == 3 and losses(first) == losses(second)
    a = json.loads((first / "train_config.json").read_text())
    b = json.loads((second / "train_config.json").read_text())
    assert {k: v for k, v in a.items() if k not in ("out", "command")} == \
        {k: v for k, v in b.items() if k not in ("out", "command")}


def test_stage_options_a_run_records_read_back_as_their_flags(tmp_path):
    from minimind.lora import parse_targets
    from minimind.train.stages import parse_overrides
    from minimind.train.stages.lora import LoRAOptions
    from minimind.train.stages.pretrain import PretrainOptions

    recorded = {"stage": "lora", "data": "d", "out": "o", "init": "m", "tracker_tags": ["a", "b"],
                "adam_betas": [0.9, 0.999], "command": ["lora"], "hub_sources": {},
                "extra": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}}
    _, args = parse_verb_args("lora", ["--config", write_config(tmp_path / "l.json", json.dumps(recorded))])
    options = LoRAOptions.from_args(args, targets=parse_targets(args.target_modules))
    assert (options.rank, options.alpha, options.targets, args.tracker_tags) == (4, 8, ["q_proj", "v_proj"], ["a", "b"])

    recorded = {"stage": "distill", "data": "d", "out": "o", "init": "m",
                "extra": {"tags": ["<think>", "</think>"]}}
    _, args = parse_verb_args("distill", ["--config", write_config(tmp_path / "d.json", json.dumps(recorded))])
    assert args.tags == "<think>,</think>"  # distill's comma-separated flag, as the run was given it
    recorded = {"stage": "pretrain", "data": "d", "out": "o", "warmup_cap": 500, "warmup_fraction": 0.05,
                "extra": {"tokenizer": "t", "preset": "tiny", "overrides": {"dim": 32, "dropout": 0.1}}}
    _, args = parse_verb_args("pretrain", ["--config", write_config(tmp_path / "p.json", json.dumps(recorded))])
    options = PretrainOptions.from_args(args, overrides=parse_overrides(args.set))
    assert (options.tokenizer, options.preset, options.overrides) == ("t", "tiny", {"dim": 32, "dropout": 0.1})
    assert parse_overrides(["intermediate_size=64"]) == {"intermediate_size": 64}  # the HF name of hidden_dim
    with pytest.raises(UserError, match="--set n_layer=2: 'n_layer' is not a model config field"):
        parse_overrides(["n_layer=2"])  # a typo is refused, not written into config.json
    with pytest.raises(UserError, match=r"p.json: unknown key 'min_lr_ratio'"):
        parse_verb_args("pretrain", ["--config", write_config(tmp_path / "p.json", '{"min_lr_ratio": 0.5}')])
