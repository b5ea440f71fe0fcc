"""Experiment trackers, offline: the scalars each one logged are read back from its own files; a resumed run
continues the same tracker run; a training run pushes to the Hub (API replaced by a recorder) with its card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants
from test_hub import HubRecorder, cache_repo

from minimind.cli import main
from minimind.errors import UserError
from minimind.train.monitor import TRACKER_IDS, Monitor, check_trackers


def wandb_history(run_dir: Path, runs: list | None = None) -> tuple[set[str], list[dict[str, float]]]:
    """(run ids, history rows) of every offline wandb run under `run_dir`, read from wandb's own .wandb files;
    the run records themselves are appended to `runs` when given."""
    import wandb
    from swanlab.converter.wb.wbdatastore import WBDataStoreReader  # a reader of wandb's record log
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # wandb's service writes the run's last records after finish() returns; this waits for it
    ids, rows = set(), []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        reader = WBDataStoreReader()
        reader.open(path)
        while (data := reader.scan()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                if runs is not None:
                    runs.append(record.run)
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        reader.close()
    return ids, rows


def swanlab_scalars(run_dir: Path) -> tuple[set[str], dict[tuple[str, int], float]]:
    """(run ids, {(key, step): value}) of the swanlab runs under `run_dir`, read from swanlab's own files."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    ids, scalars = set(), {}
    for path in sorted(run_dir.glob("swanlog/run-*/run-*.swanlab")):
        reader = DataStoreReader()
        reader.open(path)
        for data in reader:
            record = Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "start":
                ids.add(record.start.id)
                assert record.start.project == "minimind" and list(record.start.tags) == ["a"]
            elif kind == "scalar":
                scalars[(record.scalar.key, record.scalar.step)] = record.scalar.value.number
        reader.close()
    return ids, scalars


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("MINIMIND_NO_PROGRESS", "1")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


@pytest.mark.slow
def test_each_tracker_logs_the_scalars_and_resume_continues_its_run(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")  # wandb's own variable names its project when --project does not
    run = tmp_path / "run"
    run.mkdir()
    first = Monitor(run, True, 4, 0, 1, ["wandb", "swanlab", "tensorboard"], "sft", {"lr": 0.1},
                    project=None, tags=["a"], tracker_name="r1")
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0 / step, "lr": 0.1, "note": "text is not a scalar"})
    first.close()
    ids = json.loads((run / TRACKER_IDS).read_text())
    assert set(ids) == {"wandb", "swanlab"}
    for done in run.glob("wandb/offline-run-*"):  # wandb names a run's folder by the second it started in
        done.rename(done.with_name("offline-run-00000000_000000-" + done.name.rsplit("-", 1)[1]))
    # Resume after a checkpoint at step 2: the same tracker runs continue; step 3 is redone.
    second = Monitor(run, True, 4, 2, 1, ["wandb", "swanlab", "tensorboard"], "sft", {"lr": 0.1},
                     project=None, tags=["a"], tracker_name="r1")
    for step in (3, 4):
        second.log(step, {"loss": 10.0 + step, "lr": 0.1})
    second.close()
    assert json.loads((run / TRACKER_IDS).read_text()) == ids
    runs = []
    wandb_ids, rows = wandb_history(run, runs)
    assert wandb_ids == {ids["wandb"]}
    assert {(r.project, r.display_name, tuple(r.tags)) for r in runs} == {("from-env", "r1", ("a",))}
    assert [(r["_step"], r["loss"]) for r in rows][:3] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert rows[-1]["_step"] == 4 and rows[-1]["loss"] == 14.0
    swan_ids, scalars = swanlab_scalars(run)
    assert swan_ids == {ids["swanlab"]}
    assert scalars[("loss", 1)] == 1.0 and scalars[("loss", 4)] == 14.0 and ("note", 1) not in scalars
    board = tensorboard_scalars(run)
    assert board["loss"] == [(1, 1.0), (2, 0.5), (3, 13.0), (4, 14.0)]  # resume purged the old step 3


def test_a_missing_tracker_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "swanlab", None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else real(name, *a))
    with pytest.raises(UserError, match=r"--swanlab needs the swanlab package: .*\[track\]"):
        check_trackers(["swanlab"])
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert main(["pretrain", "--data", str(data), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--swanlab"]) == 2
    err = capsys.readouterr().err
    assert "[track]" in err and not (tmp_path / "o").exists()


def sft_data(path: Path) -> Path:
    with open(path, "w") as handle:
        for i in range(40):
            chat = [{"role": "user", "content": f"What is {i} plus 1?"},
                    {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]
            handle.write(json.dumps({"conversations": chat}) + "\n")
    return path


@pytest.mark.slow
def test_training_from_a_hub_id_logs_resumes_and_pushes(tmp_path, model_dir, offline, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "org/base", model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = HubRecorder(monkeypatch)
    out = tmp_path / "run"
    common = ["sft", "--data", str(sft_data(tmp_path / "sft.jsonl")), "--init", "org/base@main", "--out", str(out),
              "--max-seq-len", "160", "--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--device", "cpu",
              "--dtype", "fp32", "--tensorboard", "--wandb", "--run-name", "tiny-sft", "--tags", "x,y",
              "--push-to-hub", "me/tiny-sft", "--push-every-checkpoint"]
    assert main([*common, "--stop-after-steps", "2"]) == 0
    assert [u["path_in_repo"] for u in hub.uploads] == ["checkpoints/step-2"]
    assert set(hub.uploads[0]["files"]) == {"model.safetensors", "trainer.json", "manifest.json"}
    assert main([*common, "--resume"]) == 0
    wandb_ids, rows = wandb_history(out)
    assert wandb_ids == {json.loads((out / TRACKER_IDS).read_text())["wandb"]}
    assert [r["_step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [s for s, _ in tensorboard_scalars(out)["loss"]] == [1, 2, 3, 4]
    final = hub.uploads[-1]
    assert final["repo"] == "me/tiny-sft" and "path_in_repo" not in final
    assert {"model.safetensors", "config.json", "README.md", "summary.json"} <= set(final["files"])
    assert (out / "prepared").is_dir() and (out / "wandb").is_dir()
    assert not any(f.startswith(("checkpoints/", "prepared/", "wandb/", "tensorboard/")) for f in final["files"])
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/base" and "sft" in card.data.tags
    assert json.loads((out / "train_config.json").read_text())["hub_sources"] == {"init": "org/base@main"}
    shutil.rmtree(out)


def test_push_to_hub_needs_a_token_before_training(tmp_path, monkeypatch, model_dir, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    args = ["sft", "--data", str(sft_data(tmp_path / "sft.jsonl")), "--init", str(model_dir), "--out",
            str(tmp_path / "o"), "--push-to-hub", "me/x", "--device", "cpu"]
    assert main(args) == 2
    assert "--push-to-hub needs a Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


TRACKIO_RUN = """
import json, sys
from pathlib import Path
from minimind.train.monitor import Monitor
run = Path(sys.argv[1])
for start, steps, offset in ((0, (1, 2, 3), 0.0), (2, (3, 4), 10.0)):  # a run, then its resume from step 2
    monitor = Monitor(run, True, 4, start, 1, ["trackio"], "sft", {"lr": 0.1}, project="proj", tracker_name="r1")
    for step in steps:
        monitor.log(step, {"loss": offset + step})
    monitor.close()
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps([(r["step"], r["loss"]) for r in SQLiteStorage.get_logs("proj", "r1")]))
"""


def test_trackio_logs_locally_and_resume_continues_the_run(tmp_path):
    """A real process: trackio reads TRACKIO_DIR when it is imported."""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1",
           "MINIMIND_NO_PROGRESS": "1"}
    (tmp_path / "run").mkdir()
    done = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logged = json.loads(done.stdout.strip().splitlines()[-1])
    assert logged == [[1, 1.0], [2, 2.0], [3, 3.0], [3, 13.0], [4, 14.0]]
    assert json.loads((tmp_path / "run" / TRACKER_IDS).read_text()) == {"trackio": "r1"}


def test_wandb_is_online_only_for_a_logged_in_user(tmp_path, monkeypatch):
    from minimind.train.monitor import _wandb_logged_in

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login x password y\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not _wandb_logged_in()
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")  # `wandb login`
    assert _wandb_logged_in()
    netrc_file.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert _wandb_logged_in()
