"""Where training numbers go: `metrics.jsonl` (one line per step), a progress bar, optional trackers.

Only the main rank writes. Trackers (wandb, swanlab, tensorboard, trackio) are imported only when asked for and
behave as their users expect: wandb is online after `wandb login` (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY
honoured) and offline without a key rather than prompting; swanlab likewise (SWANLAB_MODE); tensorboard writes
event files in OUT/tensorboard. Each tracker's run id is kept in OUT/trackers.json, so `--resume` continues the
same tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from minimind.errors import UserError, install_hint
from minimind.outputs import writing

# --TRACKER flag -> the module it needs (all in the `track` extra).
TRACKER_MODULES = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboard", "trackio": "trackio"}
TRACKER_IDS = "trackers.json"  # tracker -> its run id, so that --resume continues the same tracker runs


class Monitor:
    """Collects per-step metrics; `log(step, metrics)` writes them everywhere that is enabled."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, log_every: int,
                 trackers: list[str], run_name: str, config: dict[str, Any], project: str | None = None,
                 tags: list[str] | None = None, tracker_name: str | None = None):
        """`run_name` labels the progress bar; trackers name the run `tracker_name` (default: the run
        directory's name) in `project`, and continue their recorded runs when `start_step` > 0 (a resume)."""
        self.enabled, self.log_every = enabled, max(1, log_every)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.trackers: list[Any] = []
        self.bar = None
        if not enabled:
            return
        with writing(self.path):
            self._truncate_after(start_step)
            self.file = open(self.path, "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step", dynamic_ncols=True,
                        disable=os.environ.get("MINIMIND_NO_PROGRESS") == "1")
        run = TrackerRun(Path(run_dir), tracker_name or Path(run_dir).resolve().name, project, list(tags or []),
                         config, resume=start_step > 0)
        for name in trackers:
            self.trackers.append(_open_tracker(name, run, start_step))

    def _truncate_after(self, step: int) -> None:
        """On resume, forget lines logged after the checkpoint by the interrupted run (they are redone)."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with writing(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.update(step - self.bar.n)
        if step % self.log_every == 0 or step == self.bar.total:
            self.bar.set_postfix(loss=_shown(record.get("loss", "nan"), ".4f"), lr=_shown(record.get("lr", 0), ".2e"),
                                 tok_s=_shown(record.get("tokens_per_sec", 0), ",.0f"), refresh=False)
        for tracker in self.trackers:
            tracker(step, record)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        for tracker in self.trackers:
            getattr(tracker, "close", lambda: None)()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 62  # an unreadable (half-written) line is dropped


def _shown(value: Any, spec: str) -> str:
    """A logged number in the progress bar's format; a non-finite one as `_plain` logged it ("nan")."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


@dataclass
class TrackerRun:
    """What every tracker is told about the run: where it lives, its names and whether it continues one."""

    run_dir: Path
    name: str
    project: str | None  # None: the tracker's own environment (WANDB_PROJECT, ...) or "minimind"
    tags: list[str]
    config: dict[str, Any]
    resume: bool  # a resumed training run continues the tracker runs recorded in trackers.json

    def run_id(self, tracker: str, new: Callable[[], str]) -> str:
        """The tracker's run id: the one trackers.json recorded when resuming, else `new()`, recorded."""
        path = self.run_dir / TRACKER_IDS
        ids = _read_ids(path)
        if not self.resume or tracker not in ids:
            ids[tracker] = new()
            path.write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
        return ids[tracker]

    def project_for(self, env: str) -> str:
        return self.project or os.environ.get(env) or "minimind"


def _read_ids(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def check_trackers(names: list[str]) -> None:
    """Before training starts: each asked-for tracker is installed, else one line naming the extra."""
    for name in names:
        module = TRACKER_MODULES.get(name)
        if module is None:
            raise UserError(f"unknown tracker {name!r}; expected one of {', '.join(TRACKER_MODULES)}")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--{name} needs the {module} package: {install_hint('track')}")


def _wandb_logged_in() -> bool:
    """An API key in the environment or in the netrc file `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _open_wandb(run: TrackerRun) -> _Tracker:
    import wandb

    mode = None  # wandb's own choice: WANDB_MODE, else online
    if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
        mode = "offline"  # never an interactive login prompt in the middle of a training command
        print(f"wandb: not logged in, logging offline to {run.run_dir / 'wandb'} (`wandb sync` uploads it)")
    handle = wandb.init(project=run.project_for("WANDB_PROJECT"), name=run.name, tags=run.tags or None,
                        config=run.config, dir=str(run.run_dir), mode=mode, id=run.run_id("wandb", _new_id),
                        resume="allow")
    return _Tracker(lambda step, rec: handle.log(rec, step=step), handle.finish)


def _swanlab_mode() -> str:
    """SWANLAB_MODE, else online when `swanlab login` or SWANLAB_API_KEY gave a key, else local."""
    if os.environ.get("SWANLAB_MODE"):
        return os.environ["SWANLAB_MODE"]
    saved = Path(os.environ.get("SWANLAB_SAVE_DIR", Path.home() / ".swanlab")) / ".netrc"
    return "online" if os.environ.get("SWANLAB_API_KEY") or saved.is_file() else "local"


def _open_swanlab(run: TrackerRun) -> _Tracker:
    import swanlab

    handle = swanlab.init(project=run.project_for("SWANLAB_PROJECT"), name=run.name, tags=run.tags or None,
                          config=run.config, log_dir=str(run.run_dir / "swanlog"), mode=_swanlab_mode(),
                          id=run.run_id("swanlab", _new_id), resume="allow")
    return _Tracker(lambda step, rec: handle.log(rec, step=step), handle.finish)


def _open_tensorboard(run: TrackerRun, start_step: int) -> _Tracker:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: on resume, events the interrupted run wrote after the checkpoint are hidden (they are redone).
    writer = SummaryWriter(str(run.run_dir / "tensorboard"), purge_step=start_step + 1 if run.resume else None)

    def log(step: int, rec: dict) -> None:
        for key, value in rec.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    return _Tracker(log, writer.close)


def _open_trackio(run: TrackerRun) -> _Tracker:
    import trackio

    name = run.run_id("trackio", lambda: run.name)  # trackio resumes a run by its name
    handle = trackio.init(project=run.project_for("TRACKIO_PROJECT"), name=name, config=run.config,
                          resume="allow" if run.resume else "never", embed=False)
    return _Tracker(lambda step, rec: handle.log(rec, step=step), trackio.finish)


def _open_tracker(name: str, run: TrackerRun, start_step: int) -> _Tracker:
    """A callable(step, record) logging to one tracker."""
    check_trackers([name])
    if name == "wandb":
        return _open_wandb(run)
    if name == "swanlab":
        return _open_swanlab(run)
    if name == "trackio":
        return _open_trackio(run)
    return _open_tensorboard(run, start_step)


class _Tracker:
    """One tracker's log(step, scalars) and close(); the step itself and non-numbers are not logged."""

    def __init__(self, log: Callable[[int, dict], Any], close: Callable[[], Any]):
        self._log, self.close = log, close

    def __call__(self, step: int, record: dict) -> None:
        self._log(step, {k: v for k, v in record.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
