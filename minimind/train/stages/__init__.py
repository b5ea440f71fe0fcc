"""Training stages: each is an objective + a dataset + defaults, run by the one Trainer.

A stage module exposes `add_arguments(parser)` and `run(args)` (a CLI verb) and builds a `StageRun`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from minimind.data.chat import ChatAugment
from minimind.data.prepare import open_dataset
from minimind.data.shards import Shard
from minimind.errors import UserError
from minimind.model import MiniMindConfig
from minimind.outputs import WriteFailed
from minimind.train.args import TrainConfig
from minimind.train.checkpoint import CheckpointDir
from minimind.train.distributed import (
    DistInfo,
    SharedError,
    cleanup,
    collective,
    init_distributed,
    main_first,
)
from minimind.train.rundir import open_run_dir, resume_command
from minimind.train.strategies import SHARDED
from minimind.train.trainer import StageRun, Trainer

T = TypeVar("T")


def run_stage(cfg: TrainConfig, build: Callable[[TrainConfig, DistInfo], StageRun]) -> int:
    """Join torchrun's group if any, build the stage, train, and always leave the group cleanly.

    A user error during set-up or training is raised on every rank together; rank 0 reports it (the CLI's
    one line) and the other ranks exit with the same code without repeating it.
    """
    info = init_distributed(cfg.device, need_group=cfg.strategy in SHARDED)
    lock = None
    code = 1  # what this process exits with, should leaving the process group hang (`cleanup`)
    try:
        # rank 0 locks --out for the whole job before anything is written; the others wait for its verdict
        lock = collective(info, lambda: open_run_dir(cfg.out, cfg.resume, cfg.overwrite) if info.is_main else None)
        run = collective(info, lambda: _hinted(cfg, lambda: build(cfg, info)))  # build may prepare the data
        trainer = collective(info, lambda: Trainer(cfg, run, info))
        summary = _hinted(cfg, trainer.fit)
        if info.is_main and summary.get("finished"):
            print(f"{cfg.stage}: done at step {summary['step']}; model and report in {cfg.out}", flush=True)
        code = 0
        return 0
    except SharedError:
        code = 2
        if not info.is_main:
            raise SystemExit(2) from None
        raise
    except UserError:
        code = 2
        raise
    except KeyboardInterrupt:
        code = 130  # the shell's code for Ctrl-C, as the CLI returns it
        raise
    finally:
        if lock is not None:
            lock.release()
        cleanup(info, exit_code=code)


def _hinted(cfg: TrainConfig, fn: Callable[[], T]) -> T:
    """Run `fn`; a failed write becomes one line that also says where the run stands and how to continue it."""
    try:
        return fn()
    except WriteFailed as err:
        latest = CheckpointDir(cfg.out).latest()
        where = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was completed yet"
        raise UserError(f"{err}; {where}; free space, then continue with: {resume_command(cfg.command)}") from None


def stage_data(cfg: TrainConfig, info: DistInfo, path: str, tokenizer_dir: str | Path, kind: str,
               augment: ChatAugment | None = None) -> Shard:
    """Open `path` as `kind` data; a JSONL is prepared once into the run directory by rank 0 while the
    other ranks wait (and share its error, if the file is bad). `augment`: the SFT loader's augmentations."""
    return main_first(info, lambda is_main: open_dataset(
        path, tokenizer_dir, kind, Path(cfg.out) / "prepared", skip_bad_lines=cfg.skip_bad_lines, is_main=is_main,
        augment=augment))


def _config_fields() -> set[str]:
    """The names `--set` may give: MiniMindConfig's parameters and their Hugging Face names."""
    params = inspect.signature(MiniMindConfig.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD} \
        | set(MiniMindConfig.attribute_map)


def parse_overrides(pairs: list[str]) -> dict:
    """`--set field=value` pairs -> a dict; values are JSON when they parse (4, 0.1, true), else strings."""
    overrides, fields = {}, _config_fields()
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects FIELD=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if key.strip() not in fields:
            raise UserError(f"--set {pair}: {key.strip()!r} is not a model config field (fields: "
                            f"{', '.join(sorted(fields - set(MiniMindConfig.attribute_map)))})")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides
