"""Model directories: save/load round-trip, self-contained remote code, clear errors on bad directories."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from minimind.errors import UserError
from minimind.modeldir import load_model, load_model_dir, save_model_dir


def test_directory_has_spec_files(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "modeling_minimind.py", "configuration_minimind.py"} <= names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_minimind.MiniMindForCausalLM"
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".save-")]
    # The remote code is the plain model only: no training or decoding kernel ships with a directory.
    code = {p.name for p in model_dir.glob("*.py")}
    assert code == {"configuration_minimind.py", "modeling_minimind.py", "layers.py", "moe.py", "documents.py"}
    for path in model_dir.glob("*.py"):
        text = path.read_text()
        assert "from minimind" not in text and "import minimind" not in text and "autograd.Function" not in text


def test_load_round_trip_gives_same_logits(model_dir):
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_model(model_dir)(ids).logits, tiny_model()(ids).logits, atol=0, rtol=0)


def test_auto_classes_load_with_remote_code(model_dir):
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    assert config.hidden_size == 64
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model()(ids).logits)


FRESH_INTERPRETER = """
import sys
class NoMiniMind:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "minimind":
            raise ImportError("minimind must not be imported")
sys.meta_path.insert(0, NoMiniMind())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = tok("hello 你好", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, do_sample=False)
assert out.shape[1] == ids.shape[1] + 5 or int(out[0, -1]) == tok.eos_token_id
assert not [m for m in sys.modules if m.split(".")[0] == "minimind"]
print("OK", out.shape[1])
"""


def test_fresh_interpreter_without_minimind_loads_and_generates(model_dir, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(model_dir, copy)  # a directory that has travelled away from this checkout
    # stdin closed: transformers 5 asks whether to trust the directory's code when AutoTokenizer reads
    # config.json; with no answer it falls back to the plain tokenizer class, which is all a tokenizer needs.
    result = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER, str(copy)], capture_output=True, text=True,
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


def test_missing_files_are_named(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_model(broken)
    with pytest.raises(UserError, match="config.json is missing"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="no such model directory"):
        load_model(tmp_path / "nowhere")


def test_mismatched_shapes_and_bad_config_are_one_sentence(model_dir, tmp_path):
    broken = tmp_path / "shapes"
    shutil.copytree(model_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(3, 3\)"):
        load_model(broken)
    config = json.loads((model_dir / "config.json").read_text())
    bad = tmp_path / "badconfig"
    shutil.copytree(model_dir, bad)
    (bad / "config.json").write_text(json.dumps({**config, "n_heads": 5}))
    with pytest.raises(UserError, match=r"config.json: config field 'n_heads' \(5\) must divide 'dim' \(64\)"):
        load_model(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        load_model(bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_model(bad)


def test_save_is_atomic_per_file_and_keeps_other_files(tmp_path, tokenizer):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    save_model_dir(tiny_model(), tokenizer, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    model, tok = load_model_dir(tmp_path)
    assert tok.eos_token_id == 2 and model.config.vocab_size == 512
