"""Bad models and configs: one clear sentence and exit 2 from every verb that loads a model, and nothing
untrusted is ever executed (pickles stay unpickled, a model directory's .py files never run)."""

from __future__ import annotations

import json
import os
import pickle
import pty
import select
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import spawn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import minimind.modeldir as hub
from minimind.cli import main
from minimind.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def rewrite_config(**changes):
    def apply(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
    return apply


def rewrite_weights(**tensors):
    def apply(d: Path) -> None:
        state = {k: v.clone() for k, v in load_file(str(d / "model.safetensors")).items()}
        save_file({**state, **tensors}, str(d / "model.safetensors"))
    return apply


def pickled_weights(d: Path) -> None:
    state = {k: v.clone() for k, v in load_file(str(d / "model.safetensors")).items()}
    (d / "model.safetensors").unlink()
    torch.save(state, d / "model.safetensors")  # a .pth renamed: never unpickled


# name -> (how to break a copy of the tiny model directory, text the one-line error must contain)
BROKEN = {
    "config.json missing": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "model.safetensors missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "tokenizer.json missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "tokenizer_config.json missing": (lambda d: (d / "tokenizer_config.json").unlink(),
                                      "tokenizer_config.json is missing"),
    "both tokenizer files missing": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
                                     "not a tokenizer directory"),
    "tokenizer.json garbage": (lambda d: (d / "tokenizer.json").write_text("{garbage"), "cannot load the tokenizer"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    "n_heads does not divide dim": (rewrite_config(n_heads=5), "'n_heads' (5) must divide 'dim' (64)"),
    "n_kv_heads does not divide n_heads": (rewrite_config(n_kv_heads=3), "'n_kv_heads' (3) must divide 'n_heads' (4)"),
    "dim is text": (rewrite_config(dim="big"), "'dim' must be a positive integer, got 'big'"),
    "dropout is text": (rewrite_config(dropout="none"), "'dropout' must be a number"),
    "dtype is garbage": (rewrite_config(dtype="utf-8"), "config.json: not a valid config"),
    "rope_scaling is a list": (rewrite_config(rope_scaling=[1, 2]), "config.json: not a valid config"),
    "config much larger than weights": (rewrite_config(dim=4096, hidden_dim=16384, n_heads=32, n_kv_heads=8),
                                        "'model.embed_tokens.weight' has shape (512, 64) but config.json implies"),
    "mismatched shape": (rewrite_weights(**{"model.norm.weight": torch.zeros(3)}), "'model.norm.weight' has shape (3,)"),
    "missing tensor": (lambda d: save_file({k: v.clone() for k, v in load_file(str(d / "model.safetensors")).items()
                                            if k != "model.norm.weight"}, str(d / "model.safetensors")),
                       "missing tensor 'model.norm.weight'"),
    "truncated safetensors": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:5000]), "cannot read safetensors"),
    "empty safetensors": (lambda d: (d / "model.safetensors").write_bytes(b""), "cannot read safetensors"),
    "pickle renamed to model.safetensors": (pickled_weights, "cannot read safetensors"),
}
VERBS = {
    "generate": lambda d, tmp: ["generate", "--model", str(d), "--prompt", "hi", "--max-new-tokens", "2"],
    "chat": lambda d, tmp: ["chat", "--model", str(d)],
    "eval": lambda d, tmp: ["eval", "--model", str(d), "--task", "ppl", "--data", str(tmp / "texts.jsonl")],
    "serve": lambda d, tmp: ["serve", "--model", str(d), "--port", "0"],
    "sft --init": lambda d, tmp: ["sft", "--init", str(d), "--data", str(tmp / "chat.jsonl"), "--out",
                                  str(tmp / "run"), "--max-steps", "1", "--batch-size", "1"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("inputs")
    (tmp / "texts.jsonl").write_text('{"text": "MiniMind is small."}\n')
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp / "chat.jsonl").write_text(json.dumps({"conversations": chat}) + "\n")
    return tmp


@pytest.fixture
def no_server(monkeypatch):
    """`minimind serve` must fail before it would start serving; record it if it ever gets that far."""
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: started.append(a))  # serve runs a Server
    return started


@pytest.mark.parametrize("name", list(BROKEN))
def test_every_verb_reports_a_broken_model_dir_in_one_line(tmp_path, model_dir, inputs, capsys, no_server, name):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    damage, message = BROKEN[name]
    damage(broken)
    for verb, args in VERBS.items():
        assert main(args(broken, inputs)) == 2, verb
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"minimind {verb.split()[0]}: error: "), (verb, err)
        assert message in err, (verb, err)
    assert no_server == []


def test_a_config_that_does_not_fit_the_weights_allocates_nothing(tmp_path, model_dir, monkeypatch):
    """A config.json for a far larger model (a typo, a wrong file) is refused before any weight is allocated."""
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    rewrite_config(dim=8192, hidden_dim=32768, n_heads=64, n_kv_heads=8)(broken)  # 1.9 B parameters, 7.6 GB
    built = []
    real = hub.MiniMindForCausalLM

    def recording(config):
        built.append(torch.empty(0).device.type)  # the default device the model is built on
        return real(config)

    monkeypatch.setattr(hub, "MiniMindForCausalLM", recording)
    with pytest.raises(UserError, match="has shape \\(512, 64\\) but config.json implies \\(512, 8192\\)"):
        hub.load_model(broken)
    assert built == ["meta"]


CONFIG_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**4) | st.floats(allow_nan=False)
                             | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
CONFIG_FIELDS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len", "norm_eps",
                 "rope_theta", "dropout", "use_moe", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                 "yarn_factor", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "flash_attn",
                 "hidden_size", "num_attention_heads", "torch_dtype", "dtype", "rope_scaling", "model_type",
                 "initializer_range", "aux_loss_alpha", "seq_aux", "norm_topk_prob"]


def test_random_config_values_load_or_fail_in_one_sentence(tmp_path, model_dir):
    base = json.loads((model_dir / "config.json").read_text())
    path = tmp_path / "config.json"

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), CONFIG_VALUES, min_size=1, max_size=3))
    def check(changes):
        path.write_text(json.dumps({**base, **changes}))
        try:
            hub.load_config(tmp_path)
        except UserError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err)

    check()


# ---- untrusted code never runs --------------------------------------------------------------------------
class WritesAFile:
    """A pickle payload: unpickling it would create `marker` (standing in for any code an attacker picks)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_refused_and_never_runs(tmp_path, tokenizer_dir, capsys):
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "zipped.pth", tmp_path / "legacy.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "payload": WritesAFile(marker)}, zipped)
    legacy.write_bytes(pickle.dumps({"model": WritesAFile(marker)}))
    for path in (zipped, legacy):
        assert main(["convert", str(path), "--from", "minimind2", "--tokenizer", str(tokenizer_dir),
                     "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: not a PyTorch state dict loadable with weights_only=True" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, corpus_file, tokenizer_dir, capsys):
    from minimind.train.checkpoint import MANIFEST, CheckpointDir, sha256

    args = ["pretrain", "--data", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "run"),
            "--preset", "tiny", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=4", "--set",
            "n_kv_heads=2", "--max-seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--device", "cpu",
            "--dtype", "fp32", "--stop-after-steps", "2"]
    assert main(args) == 0
    marker = tmp_path / "pwned"
    step = CheckpointDir(tmp_path / "run").latest()
    torch.save({"state": WritesAFile(marker)}, step / "optimizer.pt")
    manifest = json.loads((step / MANIFEST).read_text())  # an attacker who can write files can fix the sums too
    manifest["files"]["optimizer.pt"] = {"bytes": (step / "optimizer.pt").stat().st_size,
                                         "sha256": sha256(step / "optimizer.pt")}
    (step / MANIFEST).write_text(json.dumps(manifest))
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(
        "optimizer.pt: cannot read checkpoint state (Trying to load unsupported GLOBAL posix.system whose module "
        "posix is blocked.)")
    assert not marker.exists()


def test_a_model_dirs_own_code_never_runs_even_if_the_user_says_yes(tmp_path, model_dir):
    """transformers asks on a terminal whether to run a directory's code; the verbs must never ask (nor run
    it), so a hostile directory cannot trick a user who answers "y"."""
    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    marker = tmp_path / "pwned"
    for name in ("configuration_minimind.py", "modeling_minimind.py"):
        code = (evil / name).read_text()
        (evil / name).write_text(code.replace("from __future__ import annotations\n",
                                              f"from __future__ import annotations\nopen({str(marker)!r}, 'w')\n", 1))
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "MiniMind is small."}\n')
    leader, follower = pty.openpty()  # a terminal, as a user has
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINIMIND_NO_PROGRESS": "1"}
    # `prepare` reads a model directory as its tokenizer without importing the model package (whose import
    # registers the model type with transformers and so happens to silence the question)
    proc = spawn([sys.executable, "-m", "minimind", "prepare", "--data", str(data), "--tokenizer",
                  str(evil), "--out", str(tmp_path / "prepared"), "--workers", "0"],
                 stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    output, deadline = b"", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([leader], [], [], 0.5)[0]:
            try:
                output += os.read(leader, 4096)
            except OSError:
                break
            os.write(leader, b"y\n")  # whatever it asks, the answer is yes
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 0, output.decode(errors="replace")
    assert b"custom code" not in output and not marker.exists()
