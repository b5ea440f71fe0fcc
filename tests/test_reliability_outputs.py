"""No run destroys another's work, and a full disk is one clear line.

Three mistakes and faults a user meets: running the same command again without `--resume` (the earlier run
must survive, and the refusal say what is there), two jobs into one `--out` (the second refuses, naming the
first; a lock left by a dead process is taken over), and a disk that fills up mid-run (one line naming the file,
the reason, the last complete checkpoint and the command that continues; no staging files left behind).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from minimind.cli import main
from minimind.outputs import WriteFailed, write_failure
from minimind.train import checkpoint as ckpt
from minimind.train import monitor as monitor_module
from minimind.train.rundir import LOCK, RunLock
from minimind.train.stages import pretrain as pretrain_stage

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    """The corpus tokenized once for every run here (a JSONL --data would be prepared again in each --out)."""
    from minimind.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(corpus_file, tokenizer_dir, "pretrain", out, progress=False)
    return out


def pretrain_args(corpus: Path, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), *TINY,
            "--max-seq-len", "32", "--batch-size", "4", "--max-steps", "6", "--device", "cpu", "--dtype", "fp32",
            "--save-every", "2", "--log-every", "1", *extra]


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = re.findall(r"minimind \w+: error: .*", err)  # (after any progress bar, which ends without a newline)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. forgetting --resume ---------------------------------------------------------------------------

def test_forgotten_resume_refuses_and_keeps_the_earlier_run(tmp_path, prepared, tokenizer_dir, capsys):
    out = tmp_path / "run"
    assert main(pretrain_args(prepared, tokenizer_dir, out, "--stop-after-steps", "3")) == 0
    before = snapshot(out / "checkpoints")
    assert main(pretrain_args(prepared, tokenizer_dir, out)) == 2
    line = one_error_line(capsys)
    assert "already holds a pretrain run: latest checkpoint step 3, not finished" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(out / "checkpoints") == before  # nothing touched
    assert steps_logged(out) == [1, 2, 3]
    (out / "checkpoints" / ".tmp-step-5").mkdir()  # staging a killed run left behind: removed at the next save
    (out / "checkpoints" / ".tmp-step-5" / "optimizer.pt").write_bytes(b"partial")
    assert main(pretrain_args(prepared, tokenizer_dir, out, "--resume")) == 0
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_a_finished_run_is_refused_and_overwrite_starts_over(tmp_path, prepared, tokenizer_dir, capsys):
    out = tmp_path / "run"
    assert main(pretrain_args(prepared, tokenizer_dir, out, "--max-steps", "2")) == 0
    (out / "notes.txt").write_text("mine")  # an unrelated file: --overwrite must leave it
    capsys.readouterr()
    assert main(pretrain_args(prepared, tokenizer_dir, out, "--max-steps", "3")) == 2
    assert "latest checkpoint step 2, finished (model.safetensors written)" in one_error_line(capsys)
    assert main(pretrain_args(prepared, tokenizer_dir, out, "--max-steps", "3", "--overwrite")) == 0
    assert "deleting the earlier pretrain run" in capsys.readouterr().out
    assert steps_logged(out) == [1, 2, 3]  # a fresh run, not 2 + 3 lines
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2", "step-3"]
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(tmp_path, prepared, tokenizer_dir, capsys):
    assert main(pretrain_args(prepared, tokenizer_dir, tmp_path / "run", "--resume", "--overwrite")) == 2
    assert "give one of them" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---- 2. two jobs, one directory -----------------------------------------------------------------------

def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that takes the run lock and keeps it until killed."""
    code = ("import sys, time; from minimind.train.rundir import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_job_refuses_naming_the_first_then_takes_over_a_dead_ones_lock(tmp_path, prepared,
                                                                                 tokenizer_dir, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        assert main(pretrain_args(prepared, tokenizer_dir, out)) == 2
        line = one_error_line(capsys)
        assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started " in line
        assert not (out / "metrics.jsonl").exists() and not (out / "train_config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=f"taking over the lock of a run that is no longer running .*pid {holder.pid}"):
        assert main(pretrain_args(prepared, tokenizer_dir, out, "--max-steps", "2")) == 0
    assert (out / LOCK).read_text() == ""  # released at the end


def test_the_lock_is_one_per_directory_and_released(tmp_path):
    first = RunLock.acquire(tmp_path / "a")
    other = RunLock.acquire(tmp_path / "b")  # another directory is another lock
    with pytest.raises(Exception, match=f"pid {os.getpid()}"):
        RunLock.acquire(tmp_path / "a")
    first.release()
    other.release()
    RunLock.acquire(tmp_path / "a").release()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "started": "2026-01-02 03:04:05"}))
    with pytest.raises(Exception, match=r"another host \(host gpu-node-7, pid 4242.*delete .*\.minimind\.lock"):
        RunLock.acquire(tmp_path)


def test_torchrun_restarting_the_same_job_takes_its_lock_back_quietly(tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-17")
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x", "job": "job-17"}))
    RunLock.acquire(tmp_path).release()
    assert not recwarn.list


# ---- 3. a full disk -----------------------------------------------------------------------------------

def _fail_on_call(real, n: int, error: BaseException):
    """`real`, except that its n-th call (1-based) raises `error` after writing nothing."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    return wrapper


class _FullAfter:
    """A text file whose writes fail with ENOSPC once `marker` is in what is written."""

    def __init__(self, handle, marker: str):
        self.handle, self.marker = handle, marker

    def write(self, text: str) -> int:
        if self.marker in text:
            raise ENOSPC
        return self.handle.write(text)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


@pytest.mark.parametrize("where", ["checkpoint", "metrics", "final model"])
def test_a_full_disk_is_one_line_with_the_way_to_continue(where, tmp_path, prepared, tokenizer_dir, capsys,
                                                         monkeypatch):
    out = tmp_path / "run"
    if where == "checkpoint":  # rng, optimizer, scaler per checkpoint: the 5th object saved is step 4's optimizer
        monkeypatch.setattr(ckpt.torch, "save", _fail_on_call(ckpt.torch.save, 5, ENOSPC))
        path_part, latest = "/checkpoints/.tmp-step-4/optimizer.pt", "step-2"
    elif where == "metrics":
        monkeypatch.setattr(monitor_module, "open", lambda *a, **k: _FullAfter(open(*a, **k), '"step": 5'),
                            raising=False)
        path_part, latest = "metrics.jsonl", "step-4"
    else:  # transformers' save_pretrained fails inside safetensors, which reports the OS error in its text
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(pretrain_stage, "save_model_dir", _fail_on_call(pretrain_stage.save_model_dir, 1, error))
        path_part, latest = "", "step-6"
    assert main(pretrain_args(prepared, tokenizer_dir, out)) == 2
    line = one_error_line(capsys)
    command = shlex.join(pretrain_args(prepared, tokenizer_dir, out))
    assert f"could not write {out}" in line and f"{path_part}: no space left on device; " in line
    assert f"; the last complete checkpoint is {out / 'checkpoints' / latest}; " in line
    assert line.endswith(f"; free space, then continue with: minimind {command} --resume")
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".save-*"))
    monkeypatch.undo()  # space freed: the printed command continues the run
    assert main(pretrain_args(prepared, tokenizer_dir, out, "--resume")) == 0
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6] and (out / "model.safetensors").is_file()


def test_write_failures_are_told_in_plain_words():
    assert str(write_failure(OSError(errno.EDQUOT, "x"), "/d/f")) == "could not write /d/f: disk quota exceeded"
    named = OSError(errno.EIO, "x", "/d/g")
    assert str(write_failure(named, "/d")).startswith("could not write /d/g: an input/output error")
    try:  # torch's zip writer hides the OSError behind its own RuntimeError
        try:
            raise ENOSPC
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5952 vs 5844") from None
    except RuntimeError as err:
        assert isinstance(write_failure(err, "/d/h"), WriteFailed)
    assert str(write_failure(OSError("4096 requested and 3056 written"), "/d/m.gguf")).endswith("no space left on device")
    assert write_failure(RuntimeError("a bug"), "/d") is None


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_real_full_filesystem(tmp_path, prepared, tokenizer_dir, capsys):
    """The real thing on a 4 MB tmpfs (where this process may mount one; the injected cases above hold anyway)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4000k"):
        pytest.skip("mounting a tmpfs needs root on Linux; the ENOSPC injection tests cover the same paths")
    try:
        out = disk / "run"
        args = pretrain_args(prepared, tokenizer_dir, out, "--max-steps", "12")
        assert main(args) == 2
        captured = capsys.readouterr()
        assert "warning: " in captured.out and "free, but 3 more checkpoint(s)" in captured.out
        line = re.findall(r"minimind pretrain: error: .*", captured.err)[0]
        assert "/checkpoints/.tmp-step-" in line and ": no space left on device; the last complete checkpoint" in line
        assert not list((out / "checkpoints").glob(".tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        assert main([*args, "--resume"]) == 0
        assert steps_logged(out) == list(range(1, 13))
    finally:
        time.sleep(0.1)
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---- the same rule for prepare, tokenizer and convert -------------------------------------------------

def _refused_then_overwritten(args: list[str], capsys, expect: str) -> None:
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys)
    assert expect in line and "add --overwrite" in line, line
    assert main([*args, "--overwrite"]) == 0


def test_prepare_refuses_an_earlier_dataset_unless_overwrite(tmp_path, corpus_file, tokenizer_dir, capsys):
    out = tmp_path / "prepared"
    args = ["prepare", "--data", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--workers", "0"]
    _refused_then_overwritten(args, capsys, f"--out {out}: already holds a prepared dataset (meta.json, tokens.bin, "
                                            "index.bin)")
    assert json.loads((out / "meta.json").read_text())["n_samples"] == len(corpus_file.read_text().splitlines())


def test_tokenizer_refuses_an_earlier_tokenizer_unless_overwrite(tmp_path, corpus_file, capsys):
    out = tmp_path / "tok"
    args = ["tokenizer", "--data", str(corpus_file), "--vocab-size", "300", "--out", str(out)]
    _refused_then_overwritten(args, capsys, "already holds a tokenizer (tokenizer.json, tokenizer_config.json)")


@pytest.mark.parametrize("target", ["minimind2", "llama"])
def test_convert_refuses_an_earlier_export_unless_overwrite(target, tmp_path, model_dir, capsys):
    out = tmp_path / ("model.pth" if target == "minimind2" else "plain")
    expect = "already exists" if target == "minimind2" else "already holds a model directory (config.json"
    _refused_then_overwritten(["convert", str(model_dir), "--to", target, "--out", str(out)], capsys, expect)


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_partial_shards(tmp_path, corpus_file, tokenizer_dir,
                                                                         capsys, monkeypatch):
    from minimind.data import shards

    out = tmp_path / "prepared"
    args = ["prepare", "--data", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--workers", "0"]
    monkeypatch.setattr(shards, "open", lambda *a, **k: _FullAfter(open(*a, **k), b""), raising=False)
    assert main(args) == 2
    assert one_error_line(capsys) == (f"minimind prepare: error: could not write {out}: no space left on device; "
                                      "the partial files were removed; free space, then run the same command again")
    assert not out.exists()  # the folder it made is gone again
    monkeypatch.undo()
    assert main(args) == 0


def test_prepare_and_tokenizer_keep_the_earlier_output_when_the_new_input_is_bad(tmp_path, corpus_file,
                                                                                  tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    for verb, flags, out in (("prepare", ["--tokenizer", str(tokenizer_dir), "--workers", "0"], tmp_path / "prep"),
                             ("tokenizer", ["--vocab-size", "300"], tmp_path / "tok")):
        assert main([verb, "--data", str(corpus_file), "--out", str(out), *flags]) == 0
        (out / "notes.txt").write_text("mine")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        capsys.readouterr()
        assert main([verb, "--data", str(bad), "--out", str(out), *flags, "--overwrite"]) == 2
        assert f"{bad}:2" in one_error_line(capsys)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, no partial files
    fresh = tmp_path / "fresh"  # a failed first run leaves nothing that refuses the corrected one
    assert main(["prepare", "--data", str(bad), "--out", str(fresh), "--tokenizer", str(tokenizer_dir)]) == 2
    assert not fresh.exists()
    assert main(["prepare", "--data", str(corpus_file), "--out", str(fresh), "--tokenizer", str(tokenizer_dir),
                 "--workers", "0"]) == 0


def test_convert_overwrite_replaces_a_model_only_when_the_new_one_is_complete(tmp_path, model_dir, capsys):
    out = tmp_path / "plain"
    assert main(["convert", str(model_dir), "--to", "llama", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert main(["convert", str(not_a_model), "--to", "llama", "--out", str(out), "--overwrite"]) == 2
    one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "plain"]  # the earlier model came back
    (out / "notes.txt").write_text("mine")  # not only a model: refused before anything is touched
    assert main(["convert", str(model_dir), "--to", "llama", "--out", str(out), "--overwrite"]) == 2
    assert "holds other files besides a model (notes.txt)" in one_error_line(capsys)
    (out / "notes.txt").unlink()
    assert main(["convert", str(model_dir), "--to", "llama", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "plain"]


def test_a_gguf_export_keeps_another_exports_modelfile(tmp_path, model_dir, capsys):
    (tmp_path / "Modelfile").write_text("FROM ./mine.gguf\n")
    args = ["convert", str(model_dir), "--to", "gguf", "--dtype", "f32", "--out", str(tmp_path / "new.gguf")]
    assert main(args) == 2
    assert f"{tmp_path / 'Modelfile'} is there for another GGUF" in one_error_line(capsys)
    assert (tmp_path / "Modelfile").read_text() == "FROM ./mine.gguf\n" and not (tmp_path / "new.gguf").exists()
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./new.gguf\n")
    (tmp_path / "new.gguf").unlink()
    assert main(args) == 0  # its own Modelfile is no obstacle


def test_convert_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "model.pth"
    monkeypatch.setattr(ckpt.torch, "save", _fail_on_call(ckpt.torch.save, 1, ENOSPC))
    assert main(["convert", str(model_dir), "--to", "minimind2", "--out", str(out)]) == 2
    assert one_error_line(capsys).startswith(f"minimind convert: error: could not write {out}: no space left on device;")
    assert not list(tmp_path.iterdir())  # no .model.pth.partial left


def test_demo_refuses_an_earlier_demo_before_running_anything(tmp_path, capsys):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    assert one_error_line(capsys).endswith(f"--out {tmp_path} already holds an earlier demo (pretrain); choose "
                                           "another --out, or add --overwrite to replace it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain"]


def test_an_out_that_is_the_init_directory_is_refused_before_anything_is_deleted(tmp_path, model_dir, capsys):
    import shutil

    start = tmp_path / "start"
    shutil.copytree(model_dir, start)
    before = sorted(p.name for p in start.iterdir())
    data = tmp_path / "sft.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert main(["sft", "--data", str(data), "--init", str(start), "--out", str(start), "--overwrite"]) == 2
    assert "is the --init directory" in one_error_line(capsys)
    assert sorted(p.name for p in start.iterdir()) == before
