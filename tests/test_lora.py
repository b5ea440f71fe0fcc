"""LoRA: the wrapper, merging, PEFT-format adapters (loaded by PEFT itself), the `minimind lora` stage and resume."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from minimind.cli import main
from minimind.errors import UserError
from minimind.lora import (
    LoRALinear,
    apply_lora,
    load_peft_adapter,
    lora_state_dict,
    merge_lora,
    parse_targets,
    save_peft_adapter,
)
from minimind.modeldir import load_model
from minimind.train.args import TrainConfig
from minimind.train.distributed import DistInfo
from minimind.train.stages import lora as lora_stage
from minimind.train.trainer import Trainer

IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def randomize_adapters(model, seed=1) -> None:
    """B is zero at init; give both factors values so the adapter changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.copy_(torch.randn_like(tensor) * 0.1)


def test_apply_lora_wraps_targets_freezes_base_and_starts_as_identity():
    model = tiny_model()
    before = logits(model)
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in wrapped for ab in "AB"}
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (64, 4)
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # B = 0: exactly the base model


def test_target_patterns_names_and_regex():
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    model = tiny_model()
    wrapped = apply_lora(model, rank=2, alpha=2, targets=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(UserError, match="matches no linear layer"):
        apply_lora(tiny_model(), targets="nothing_here")
    with pytest.raises(UserError, match="not a valid regular expression"):
        parse_targets("q_proj(")


def test_merged_weights_give_the_same_logits_as_base_plus_adapter():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=16, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    randomize_adapters(model)
    adapted = logits(model)
    assert (adapted - logits(tiny_model())).abs().max() > 1e-2  # the adapter really changes the function
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    expected_q = q.weight + q.scaling * q.lora_B.weight @ q.lora_A.weight
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(model.get_submodule("model.layers.0.self_attn.q_proj").weight, expected_q)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)


def test_peft_loads_our_adapter_and_computes_the_same_logits(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    randomize_adapters(model)
    ours = logits(model)
    save_peft_adapter(model, tmp_path, "some/base", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8 and config["lora_dropout"] == 0.05 and config["bias"] == "none"
    assert config["fan_in_fan_out"] is False and config["base_model_name_or_path"] == "some/base"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert len(tensors) == 2 * 7 * 2

    loaded = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path))
    torch.testing.assert_close(logits(loaded), ours, rtol=0, atol=1e-5)
    ours_again = load_peft_adapter(tiny_model(), tmp_path)  # our own reader agrees too
    torch.testing.assert_close(logits(ours_again), ours, rtol=0, atol=1e-5)


def write_sft(path: Path, n: int = 96) -> Path:
    with open(path, "w") as handle:
        for i in range(n):
            chat = [{"role": "user", "content": f"What is {i} plus 1?"},
                    {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]
            handle.write(json.dumps({"conversations": chat}) + "\n")
    return path


def lora_cfg(data, init, out, **kw) -> TrainConfig:
    base = dict(stage="lora", data=str(data), out=str(out), init=str(init), max_steps=6, batch_size=4,
                lr=1e-2, warmup_steps=1, max_seq_len=128, device="cpu", dtype="fp32", log_every=1, weight_decay=0.0,
                options=lora_stage.LoRAOptions(rank=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"]))
    return TrainConfig(**{**base, **kw})


def test_lora_stage_trains_only_the_adapter_and_writes_a_peft_directory(tmp_path, model_dir):
    data = write_sft(tmp_path / "sft.jsonl")
    cfg = lora_cfg(data, model_dir, tmp_path / "run")
    run = lora_stage.build(cfg, DistInfo())
    Trainer(cfg, run, DistInfo()).fit()
    init = load_model(model_dir).state_dict()
    trained = run.model.state_dict()
    for key, tensor in init.items():
        assert torch.equal(trained[key], tensor), f"base tensor {key} changed"
    adapter = lora_state_dict(run.model)
    assert all(torch.count_nonzero(v) > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved off zero

    out = tmp_path / "run"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()
    checkpoint = load_file(str(out / "checkpoints" / "step-6" / "model.safetensors"))
    assert set(checkpoint) == set(adapter)  # checkpoints hold the adapter only
    loaded = peft.PeftModel.from_pretrained(load_model(model_dir), str(out))
    torch.testing.assert_close(logits(loaded), logits(run.model), rtol=0, atol=1e-5)
    # `minimind convert --merge-lora` reads the directory as the PEFT adapter it is.
    assert main(["convert", str(model_dir), "--merge-lora", str(out), "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(run.model), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def sft_prepared(tmp_path_factory, tokenizer_dir) -> Path:
    """The SFT data tokenized once (a `minimind prepare` directory), shared by the CLI runs below."""
    from minimind.data.prepare import prepare

    root = tmp_path_factory.mktemp("lora_data")
    prepare(write_sft(root / "sft.jsonl"), tokenizer_dir, "sft", root / "prepared", progress=False)
    return root / "prepared"


def test_lora_resume_continues_bit_exactly(tmp_path, model_dir, sft_prepared):
    common = ["lora", "--data", str(sft_prepared), "--init", str(model_dir), "--max-steps", "4", "--batch-size", "4",
              "--lr", "1e-2", "--warmup-steps", "1", "--max-seq-len", "128", "--device", "cpu", "--dtype", "fp32",
              "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--target-modules", "q_proj,v_proj"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-after-steps", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 4
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_cli_help_and_bad_target_is_one_line(tmp_path, model_dir, sft_prepared, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lora", "--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--target-modules" in help_text and "--rank" in help_text
    code = main(["lora", "--data", str(sft_prepared), "--init", str(model_dir), "--out", str(tmp_path / "x"),
                 "--target-modules", "wq,wk", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("minimind lora: error: ") and "matches no linear layer" in err[-1]
