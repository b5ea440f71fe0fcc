"""A run directory's guard: one job at a time, and an earlier run is never overwritten silently.

    out/.minimind.lock   held (flock) by the job's rank 0 for the run's lifetime; holds who: host, pid, start

Without `--resume`, an `--out` that already holds a run (a checkpoint, metrics, or a finished model) is refused
in one line saying what is there; `--overwrite` is the only way to start over, and it deletes exactly the
files a run writes (checkpoints, metrics, report, model files), never the prepared-data cache or anything
else. The lock is taken before anything is written or deleted. The torchrun ranks of one job never block each
other: only rank 0 takes it, and a job restarted by torchrun (same TORCHELASTIC_RUN_ID) takes its own lock
back quietly. A lock left by a process that is gone (same host, pid no longer running) is taken over with a
warning; one left on another host is refused, since this host cannot tell whether it still runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from minimind.errors import UserError
from minimind.outputs import MODEL_DIR_FILES, existing_products, model_code_files, remove_products, writing
from minimind.train.checkpoint import CheckpointDir

LOCK = ".minimind.lock"
# Everything a run writes into --out apart from the prepared-data cache (kept: it is keyed by the data file).
RUN_FILES = ("checkpoints", "metrics.jsonl", "report.md", "summary.json", "loss.png", "train_config.json",
             "tensorboard", "swanlab", "wandb", *MODEL_DIR_FILES)
FINAL_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")


@dataclass
class Holder:
    """Who holds (or held) a run directory's lock."""

    host: str
    pid: int
    started: str  # local time, ISO format
    job: str = ""  # torchrun's TORCHELASTIC_RUN_ID, if launched by torchrun
    pid_start: str = ""  # the process's start tick from /proc (tells a reused pid from the holder)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"),
                   os.environ.get("TORCHELASTIC_RUN_ID", ""), _process_start(os.getpid()))


def _process_start(pid: int) -> str:
    """The start time (clock ticks since boot) of process `pid` from /proc, or "" where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22; the command name before ")" may hold spaces


def _running(holder: Holder) -> bool:
    """Whether the holder's process still runs on this host (a reused pid does not count)."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    return not holder.pid_start or _process_start(holder.pid) in ("", holder.pid_start)


class RunLock:
    """The lock on one run directory, held from `acquire` until `release` (or the process's end)."""

    def __init__(self, out: Path, fd: int):
        self.out, self.fd = out, fd

    @classmethod
    def acquire(cls, out: str | Path) -> RunLock:
        """Take the lock on `out` (created if missing), or raise a UserError naming the job that holds it."""
        out = Path(out)
        path = out / LOCK
        with writing(path):
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock(fd)
            previous = _read_holder(fd)
            if not locked:
                who = previous.describe() if previous else "a process that has not written its name yet"
                raise UserError(f"--out {out} is in use by another run ({who}); wait for it to finish or stop it, "
                                "or choose another --out")
            if previous is not None:
                _check_previous(previous, path)
            with writing(path):
                _write_holder(fd, Holder.me())
        except BaseException:
            os.close(fd)
            raise
        return cls(out, fd)

    def release(self) -> None:
        """Clear the holder and unlock (the file stays, so no second job can lock a file about to vanish)."""
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # an unwritable disk: the next run sees a dead holder and takes over with a warning
        finally:
            os.close(self.fd)  # closing drops the flock


def _flock(fd: int) -> bool:
    """Try to lock without waiting: True if locked, False if another open file holds it.

    A filesystem without flock support counts as locked; the holder file then guards alone.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return True


def _check_previous(previous: Holder, path: Path) -> None:
    """The lock was free but names a holder: take it over if that process is gone, else refuse."""
    here = socket.gethostname()
    if previous.job and previous.job == os.environ.get("TORCHELASTIC_RUN_ID"):
        return  # torchrun restarted this same job
    if previous.host != here:
        raise UserError(f"--out {path.parent} is locked by a run on another host ({previous.describe()}) that "
                        f"this host cannot check; if it no longer runs, delete {path} and start again")
    if _running(previous) and previous.pid != os.getpid():
        raise UserError(f"--out {path.parent} is in use by another run ({previous.describe()}; this file system "
                        "does not enforce locks); wait for it to finish or stop it, or choose another --out")
    warnings.warn(f"{path}: taking over the lock of a run that is no longer running ({previous.describe()})",
                  stacklevel=3)


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        return Holder(**data) if isinstance(data, dict) else None
    except (ValueError, TypeError):  # half-written or foreign content: nobody identifiable
        return None


def _write_holder(fd: int, holder: Holder) -> None:
    data = json.dumps(holder.__dict__).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def existing_run(out: str | Path) -> str | None:
    """What earlier run `out` holds, in words ("pretrain run: latest checkpoint step 10, not finished"), or None."""
    out = Path(out)
    steps = CheckpointDir(out).complete_steps()
    finished = [name for name in FINAL_WEIGHTS if (out / name).is_file()]
    metrics = out / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if not (steps or finished or logged):
        return None
    try:
        stage = json.loads((out / "train_config.json").read_text())["stage"] + " run"
    except (OSError, ValueError, KeyError, TypeError):
        stage = "training run"
    parts = [f"latest checkpoint step {steps[-1]}" if steps else "no checkpoint"]
    parts.append(f"finished ({finished[0]} written)" if finished else "not finished")
    return f"{stage}: {', '.join(parts)}"


def open_run_dir(out: str | Path, resume: bool, overwrite: bool) -> RunLock:
    """Lock `out`, then refuse an earlier run there unless `resume` (continue it) or `overwrite` (delete it)."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    lock = RunLock.acquire(out)
    try:
        earlier = existing_run(out)
        if earlier is not None and not resume:
            if not overwrite:
                raise UserError(f"--out {out} already holds a {earlier}; add --resume to continue it, or "
                                "--overwrite to delete its checkpoints, metrics and model files and start over")
            print(f"--overwrite: deleting the earlier {earlier} in {out}", flush=True)
        if overwrite:
            out = Path(out)
            staging = [p.name for p in out.glob(".save-*")]  # a final save cut short
            remove_products(out, [*existing_products(out, [*RUN_FILES, *model_code_files()]), *staging])
    except BaseException:
        lock.release()
        raise
    return lock


def resume_command(command: list[str]) -> str:
    """The exact command line that continues this run: the one given, with --resume (and no --overwrite)."""
    args = [a for a in command if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        nproc = os.environ.get("LOCAL_WORLD_SIZE", "N")
        return f"torchrun --nproc_per_node {nproc} … -m minimind {shlex.join(args)}"
    return f"minimind {shlex.join(args)}"


def space_warning(out: str | Path, checkpoint_bytes: int, final_bytes: int, keep: int, saves_left: int) -> str | None:
    """A warning if `out`'s free space looks too small for the checkpoints still to come and the final model.

    At the peak a run holds `keep` + 1 checkpoints (the new one is complete before the oldest is pruned); the
    ones already on disk count against that. `keep` 0 keeps every checkpoint.
    """
    out = Path(out)
    on_disk = len(CheckpointDir(out).complete_steps())
    more = saves_left if keep <= 0 else min(saves_left, max(keep + 1 - on_disk, 1))
    need = more * checkpoint_bytes + final_bytes
    free = shutil.disk_usage(out).free
    if free >= need:
        return None
    return (f"warning: {out} has {_size(free)} free, but {more} more checkpoint(s) of about "
            f"{_size(checkpoint_bytes)} (--keep-checkpoints {keep}) and the final model need about {_size(need)}; "
            "the run may stop with 'no space left on device'")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"

