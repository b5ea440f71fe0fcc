"""Hub ids (`org/name[@rev]`, `ms:org/name`) resolved through the local cache, offline; `minimind push` and the
model card, with the Hub API replaced by a recorder."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import filter_repo_objects

from minimind.cli import main
from minimind.errors import UserError
from minimind.hub import parse_hub_id, resolve_model_dir
from minimind.modeldir import load_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache: Path, repo: str, source: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Lay `source`'s files out as huggingface_hub caches a snapshot of `repo` at `commit` (named by `ref`)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache (HF_HOME's hub/ folder) that only this test sees."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("org/name").repo == "org/name"
    assert parse_hub_id("org/name@v1.0").revision == "v1.0"
    assert parse_hub_id("ms:org/name@master").hub == "modelscope"
    for local in ("/abs/path", "./org/name", "runs", "../org/name", "~/models/x", ""):
        assert parse_hub_id(local) is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_id("org/name") is None  # an existing local directory wins
    assert resolve_model_dir("org/name", "--model") == "org/name"


def test_hub_id_resolves_from_the_cache_offline(hf_cache, model_dir, capsys):
    snapshot = cache_repo(hf_cache, "org/tiny", model_dir)
    cache_repo(hf_cache, "org/tiny", model_dir, commit=OTHER, ref="v1")
    assert Path(resolve_model_dir("org/tiny", "--model")) == snapshot
    assert Path(resolve_model_dir("org/tiny@v1", "--model")).name == OTHER
    assert Path(resolve_model_dir(f"org/tiny@{OTHER}", "--model")).name == OTHER
    model, tokenizer = load_model_dir(resolve_model_dir("org/tiny@main", "--model"))
    assert model.config.vocab_size == 512 and len(tokenizer) <= 512
    # Through the CLI: `info --model` reads the cached config.
    assert main(["info", "--model", "org/tiny@v1"]) == 0
    assert f"{OTHER}\n  dim=64 layers=2" in capsys.readouterr().out


def test_uncached_id_offline_is_one_line_naming_option_and_id(hf_cache, capsys):
    assert main(["info", "--model", "org/missing@v2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--model org/missing@v2" in err and "HF_HUB_OFFLINE" in err
    with pytest.raises(UserError, match="--init org/missing"):
        resolve_model_dir("org/missing", "--init")


@pytest.mark.slow
def test_hf_home_and_offline_from_the_environment(tmp_path, model_dir):
    """A real process: HF_HOME and HF_HUB_OFFLINE as users set them, read by huggingface_hub itself."""
    cache_repo(tmp_path / "home" / "hub", "org/tiny", model_dir)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "minimind", "info", "--model", "org/tiny"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"model {tmp_path / 'home' / 'hub' / 'models--org--tiny' / 'snapshots' / COMMIT}" in done.stdout
    assert "dim=64 layers=2" in done.stdout


def test_modelscope_ids_go_through_modelscope(monkeypatch, model_dir, capsys):
    ms = importlib.import_module("modelscope.hub.snapshot_download")  # the module, not the function
    calls = []

    def fake_snapshot_download(model_id, revision=None, **kwargs):
        calls.append((model_id, revision))
        return str(model_dir)

    monkeypatch.setattr(ms, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("ms:org/tiny@v1.0", "--model") == str(model_dir)
    assert resolve_model_dir("ms:org/tiny", "--model") == str(model_dir)
    assert calls == [("org/tiny", "v1.0"), ("org/tiny", None)]
    assert main(["info", "--model", "ms:org/tiny"]) == 0

    def failing(model_id, revision=None, **kwargs):
        raise ValueError("The model: org/none not exists")

    monkeypatch.setattr(ms, "snapshot_download", failing)
    assert main(["info", "--model", "ms:org/none"]) == 2
    assert "--model ms:org/none: ModelScope download failed" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)  # not installed
    with pytest.raises(UserError, match=r"modelscope extra.*\[modelscope\]"):
        resolve_model_dir("ms:org/tiny", "--model")


class HubRecorder:
    """HfApi's create_repo / create_branch / upload_folder, recording what would be sent."""

    def __init__(self, monkeypatch):
        self.repos, self.branches, self.uploads = [], [], []
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.repos.append((repo_id, kw)))
        monkeypatch.setattr(HfApi, "create_branch",
                            lambda api, repo_id, **kw: self.branches.append((repo_id, kw["branch"])))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: self._upload(**kw))

    def _upload(self, *, repo_id, folder_path, **kw):
        root = Path(folder_path)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        sent = list(filter_repo_objects(files, allow_patterns=kw.get("allow_patterns"),
                                        ignore_patterns=kw.get("ignore_patterns")))
        self.uploads.append({"repo": repo_id, "files": sent, "readme": (root / "README.md").read_text()
                             if (root / "README.md").exists() else None, **kw})
        return f"https://huggingface.co/{repo_id}/commit/abc"


def test_push_sends_the_model_files_and_a_card(tmp_path, model_dir, monkeypatch, capsys):
    hub = HubRecorder(monkeypatch)
    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder)
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"x")
    (folder / "summary.json").write_text(json.dumps({"stage": "sft", "steps": 4, "final train loss (last 5%)": 2.5}))
    (folder / "train_config.json").write_text(json.dumps({
        "stage": "sft", "lr": 5e-4, "batch_size": 2, "command": ["sft", "--init", "org/base"], "eval_data": "hf:org/held:default:test",
        "hub_sources": {"init": "org/base@v2", "data": "org/chats"}}))
    (folder / "ceval.json").write_text(json.dumps({"task": "choice", "model": "x", "accuracy": 0.42}))
    assert main(["push", str(folder), "--repo", "me/tiny", "--private", "--revision", "dev",
                 "--commit-message", "first", "--card-tag", "demo"]) == 0
    assert hub.repos == [("me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert hub.branches == [("me/tiny", "dev")]
    (upload,) = hub.uploads
    assert upload["repo"] == "me/tiny" and upload["revision"] == "dev" and upload["commit_message"] == "first"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(upload["files"])
    assert not any(f.startswith("checkpoints") for f in upload["files"])
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "transformers" and meta["base_model"] == "org/base"
    assert meta["datasets"] == ["org/chats", "org/held"] and {"minimind", "sft", "demo"} <= set(meta["tags"])
    assert "trust_remote_code=True" in card.text and "minimind chat --model me/tiny" in card.text
    assert "--to gguf" in card.text and "| 2.5 |" in card.text and "accuracy | 0.42 |" in card.text
    # A README.md of the user's is kept unless --overwrite-card; ours is rewritten on the next push.
    (folder / "README.md").write_text("# my own card\n")
    assert main(["push", str(folder), "--repo", "me/tiny"]) == 0
    assert hub.uploads[-1]["readme"] == "# my own card\n"
    assert main(["push", str(folder), "--repo", "me/tiny", "--overwrite-card", "--license", "mit"]) == 0
    assert ModelCard.load(folder / "README.md").data.license == "mit"
    assert hub.uploads[-1]["revision"] is None and hub.repos[-1][1]["private"] is False


def test_cards_of_exports_and_adapters_say_how_they_load(tmp_path, model_dir):
    from minimind.card import CardInfo, card_text

    plain = tmp_path / "plain"
    assert main(["convert", str(model_dir), "--to", "llama", "--out", str(plain)]) == 0
    text = card_text(plain, CardInfo(repo="me/plain"))
    assert "trust_remote_code" not in text and "custom_code" not in text and "as transformers' LlamaForCausalLM" in text
    assert 'AutoModelForCausalLM.from_pretrained("me/plain")' in text
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for base, hub in (("/home/me/runs/sft", False), ("org/base", True)):
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 8}))
        text = card_text(adapter, CardInfo(repo="me/lora"))
        assert 'AutoPeftModelForCausalLM.from_pretrained("me/lora", trust_remote_code=True)' in text
        assert ("base_model: org/base" in text) == hub and ("is a local directory (/home/me/runs/sft)" in text) != hub
    assert "on PyPI" not in text and "pip install minimind-llm" not in text


def test_push_refuses_what_it_cannot_send(tmp_path, monkeypatch, capsys):
    HubRecorder(monkeypatch)
    assert main(["push", str(tmp_path), "--repo", "me/tiny"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["push", str(tmp_path), "--repo", "not a repo"]) == 2
    assert "--repo 'not a repo'" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()  # nothing written before the checks pass


def test_serve_names_a_hub_model_by_its_id(hf_cache, model_dir, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    cache_repo(hf_cache, "org/tiny", model_dir)
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config.app))
    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    assert main(["serve", "--model", "org/tiny@main", "--port", "0", "--log-level", "warning"]) == 0
    with TestClient(started[0]) as client:
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["org/tiny@main"]


def test_reward_models_take_hub_ids(hf_cache, model_dir):
    from minimind.train.rewards import make_reward

    snapshot = cache_repo(hf_cache, "org/scorer", model_dir)
    combined = make_reward("exact,model:org/scorer@main@0.5", 32, 512)
    (exact, scorer) = combined.terms
    assert scorer.weight == 0.5 and scorer.reward.model.config.name_or_path == str(snapshot.resolve())
    with pytest.raises(UserError, match="--reward org/none: not a local directory"):
        make_reward("rm:org/none", 32, 512)
