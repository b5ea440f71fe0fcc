"""Training stages: each is an objective + a dataset + defaults, run by the one Trainer.

A stage module exposes `add_arguments(parser)` and `run(args)` (a CLI verb) and builds a `StageRun`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from minimind.data.prepare import open_dataset
from minimind.data.shards import Shard
from minimind.errors import UserError
from minimind.train.args import TrainConfig
from minimind.train.distributed import DistInfo, barrier, cleanup, init_distributed
from minimind.train.trainer import StageRun, Trainer


def run_stage(cfg: TrainConfig, build: Callable[[TrainConfig, DistInfo], StageRun]) -> int:
    """Join torchrun's group if any, build the stage, train, and always leave the group cleanly."""
    info = init_distributed(cfg.device)
    try:
        summary = Trainer(cfg, build(cfg, info), info).fit()
        if info.is_main and summary.get("finished"):
            print(f"{cfg.stage}: done at step {summary['step']}; model and report in {cfg.out}", flush=True)
        return 0
    finally:
        cleanup()


def stage_data(cfg: TrainConfig, info: DistInfo, path: str, tokenizer_dir: str | Path, kind: str) -> Shard:
    """Open `path` as `kind` data, preparing a JSONL once into the run directory (main rank only)."""
    return open_dataset(path, tokenizer_dir, kind, Path(cfg.out) / "prepared", skip_bad_lines=cfg.skip_bad_lines,
                        is_main=info.is_main, barrier=lambda: barrier(info))


def parse_overrides(pairs: list[str]) -> dict:
    """`--set field=value` pairs -> a dict; values are JSON when they parse (4, 0.1, true), else strings."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects FIELD=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides
