"""Where training numbers go: `metrics.jsonl` (one line per step), a progress bar, optional trackers.

Only the main rank writes. Trackers (wandb, swanlab, tensorboard) are imported only when asked for and run
offline unless the user has configured them otherwise, so no flag here ever needs the network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minimind.errors import UserError
from minimind.outputs import writing


class Monitor:
    """Collects per-step metrics; `log(step, metrics)` writes them everywhere that is enabled."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, log_every: int,
                 trackers: list[str], run_name: str, config: dict[str, Any]):
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
        for name in trackers:
            self.trackers.append(_open_tracker(name, Path(run_dir), run_name, config))

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
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record.get('lr', 0):.2e}",
                                 tok_s=f"{record.get('tokens_per_sec', 0):,.0f}", refresh=False)
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


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


def _open_tracker(name: str, run_dir: Path, run_name: str, config: dict[str, Any]):
    """A callable(step, record) logging to wandb, swanlab or tensorboard, offline by default."""
    try:
        if name == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
            run = wandb.init(project="minimind", name=run_name, dir=str(run_dir), config=config)
            return _Tracker(lambda step, rec: run.log(rec, step=step), run.finish)
        if name == "swanlab":
            import swanlab

            run = swanlab.init(project="minimind", experiment_name=run_name, logdir=str(run_dir / "swanlab"),
                               config=config, mode=os.environ.get("SWANLAB_MODE", "local"))
            return _Tracker(lambda step, rec: swanlab.log(rec, step=step), swanlab.finish)
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))

            def log(step: int, rec: dict) -> None:
                for key, value in rec.items():
                    if isinstance(value, (int, float)) and key != "step":
                        writer.add_scalar(key, value, step)

            return _Tracker(log, writer.close)
    except ImportError as err:
        raise UserError(f"--{name} needs the {name} package ({err}); pip install {name}") from None
    raise UserError(f"unknown tracker {name!r}")


class _Tracker:
    def __init__(self, log, close):
        self._log, self.close = log, close

    def __call__(self, step: int, record: dict) -> None:
        self._log(step, {k: v for k, v in record.items() if isinstance(v, (int, float))})
