"""The flags every training verb shares, and `TrainConfig`, the resolved settings the trainer runs with.

A stage passes its own defaults (pretrain lr 1e-3; sft 5e-4; dpo 1e-4, clip 0.5, wd 0; lora 1e-3, as the
reference project's scripts); any flag overrides them. A stage's `warmup_steps` default is a cap: the warmup a
run gets without `--warmup-steps` is a fraction of its own length, at most that cap (`TrainConfig.warmup_for`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from minimind.device import dtype_name
from minimind.errors import UserError
from minimind.hub import model_dir

# The share of a run's optimizer steps spent warming up when --warmup-steps is not given (capped by the stage's
# default): long enough for AdamW's second-moment estimates to settle, short enough that a 40-step run still
# spends most of its steps near the peak learning rate.
WARMUP_FRACTION = {"pretrain": 0.05}
DEFAULT_WARMUP_FRACTION = 0.03
# The experiment trackers a training verb logs to (one flag each), and what each does without configuration.
TRACKER_HELP = {
    "wandb": "online after `wandb login`, else offline; WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY honoured",
    "swanlab": "online after `swanlab login` or with SWANLAB_API_KEY, else local; SWANLAB_MODE honoured",
    "tensorboard": "event files in OUT/tensorboard",
    "trackio": "a local trackio project; TRACKIO_SPACE_ID to sync to a Space",
}


@dataclass
class StageOptions:
    """A stage's own settings (beta, rank, ...): each stage subclasses this with its fields, built from its flags
    once. train_config.json keeps them under "extra", as a plain object with one key per field."""

    @classmethod
    def from_args(cls: type[OptionsT], args: argparse.Namespace, **parsed: Any) -> OptionsT:
        """The options from parsed flags of the same names; `parsed` gives the fields a flag does not give as is."""
        return cls(**{f.name: parsed[f.name] if f.name in parsed else getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls: type[OptionsT], data: dict[str, Any]) -> OptionsT:
        """The options from a train_config.json's "extra": keys it does not name are ignored, fields it lacks take
        their defaults, and JSON lists become tuples where the field is one."""
        values = {}
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
                values[f.name] = tuple(value) if isinstance(value, list) and str(f.type).startswith("tuple") else value
        return cls(**values)


OptionsT = TypeVar("OptionsT", bound=StageOptions)


@dataclass
class TrainConfig:
    stage: str
    data: str
    out: str
    init: str | None = None
    max_steps: int = -1
    epochs: int = 1
    batch_size: int = 32
    accumulation_steps: int = 1
    lr: float = 5e-4
    warmup_steps: int | None = None  # None: min(warmup_cap, warmup_fraction x the run's steps), see warmup_for
    warmup_cap: int = 0
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas of the reference project
    grad_clip: float = 1.0
    max_seq_len: int = 512
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    stop_after_steps: int = 0
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    num_workers: int = 0
    log_every: int = 10
    eval_data: str | None = None
    eval_every: int = 0
    eval_batches: int = 20
    skip_bad_lines: bool = False
    nan_tolerance: int = 5
    strategy: str = "ddp"
    zero_offload: bool = False
    trackers: list[str] = field(default_factory=list)
    project: str | None = None  # the trackers' project; None: WANDB_PROJECT / SWANLAB_PROJECT / ..., else minimind
    run_name: str | None = None  # None: the run directory's name
    tracker_tags: list[str] = field(default_factory=list)
    push_to_hub: str | None = None  # org/name: the final model (and with push_every_checkpoint each checkpoint)
    hub_private: bool = False
    push_every_checkpoint: bool = False
    hub_sources: dict[str, str] = field(default_factory=dict)  # option -> hub id it was given as (--init org/x)
    peak_tflops: float = 0.0
    options: StageOptions = field(default_factory=StageOptions)  # the stage's own settings; "extra" in the JSON
    command: list[str] = field(default_factory=list)  # the command line, for the hint that continues the run

    def to_dict(self) -> dict[str, Any]:
        """What train_config.json holds: every field, the stage's options as "extra"."""
        return {("extra" if k == "options" else k): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], options: type[StageOptions] = StageOptions) -> TrainConfig:
        """A train_config.json read back, its "extra" as `options`; keys it does not know are ignored."""
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "options"}
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        return cls(**values, options=options.from_dict(data.get("extra", {})))

    def stage_options(self, kind: type[OptionsT]) -> OptionsT:
        """The stage's options as their own type; a config of another stage is a programming error."""
        if not isinstance(self.options, kind):
            raise TypeError(f"{self.stage} options are {type(self.options).__name__}, not {kind.__name__}")
        return self.options

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimizer steps: --warmup-steps when given, else
        min(warmup_cap, warmup_fraction x total_steps) rounded down."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(self.warmup_cap, math.floor(self.warmup_fraction * total_steps))


def add_common_arguments(parser: argparse.ArgumentParser, stage: str, defaults: dict[str, Any],
                         needs_init: bool = True) -> None:
    """The shared training flags, with this stage's defaults filled in."""
    d = {**{f: getattr(TrainConfig, f, None) for f in TrainConfig.__dataclass_fields__}, **defaults}
    g = parser.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="training data: JSONL (.gz, .zst), Parquet, a directory or glob of "
                        "them, hf:ORG/NAME[:CONFIG][:SPLIT], or a `minimind prepare` directory")
    g.add_argument("--out", required=True, help="run directory: checkpoints, metrics, report, final model")
    if needs_init:
        g.add_argument("--init", required=True, type=model_dir, help="model directory to start from")
    g.add_argument("--eval-data", default=d["eval_data"], help="held-out JSONL/prepared dir for eval loss")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="steps between evals (0 = end only)")
    g.add_argument("--eval-batches", type=int, default=d["eval_batches"], help="batches per evaluation")
    g.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed JSONL lines")
    g.add_argument("--num-workers", type=int, default=d["num_workers"], help="DataLoader worker processes")
    g = parser.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], help="optimizer steps (-1 = from --epochs)")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="passes over the data when --max-steps is -1")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="micro-batch size per process")
    g.add_argument("--accumulation-steps", type=int, default=d["accumulation_steps"],
                   help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (cosine decays to lr/10)")
    cap, fraction = d["warmup_steps"] or 0, WARMUP_FRACTION.get(stage, DEFAULT_WARMUP_FRACTION)
    parser.set_defaults(warmup_cap=cap, warmup_fraction=fraction)
    g.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warmup steps (0 = none); by default {fraction * 100:.0f}%% of the run's optimizer steps, "
                        f"at most {cap}" if cap else "linear warmup steps (default: 0 = none)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="gradient norm clip (0 = off)")
    g.add_argument("--max-seq-len", type=int, default=d["max_seq_len"], help="tokens per training row")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=d["save_every"], help="steps between checkpoints (0 = end)")
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"], help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds an earlier run: delete its checkpoints, metrics and "
                        "model files first (without --resume or --overwrite such an --out is refused)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop cleanly after N steps of this invocation, keeping the full run's schedule (0 = off)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed for init, data order and dropout")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", type=dtype_name, choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU; float32, bfloat16 and "
                        "float16 are accepted too)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "zero2"],
                   help="data-parallel engine: ddp (replicated), fsdp (PyTorch FSDP2: all sharded), zero2 "
                        "(DeepSpeed ZeRO-2: optimizer state and gradients sharded; needs the deepspeed extra)")
    g.add_argument("--zero-offload", action="store_true",
                   help="with --strategy zero2: keep optimizer state and the update on the CPU (ZeRO-Offload)")
    g.add_argument("--log-every", type=int, default=d["log_every"], help="steps between progress-bar updates")
    g.add_argument("--nan-tolerance", type=int, default=d["nan_tolerance"],
                   help="stop after this many non-finite steps in a row (each is skipped)")
    g.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0 = detect/measure)")
    g = parser.add_argument_group("experiment tracking and the Hub")
    for tracker, how in TRACKER_HELP.items():
        g.add_argument(f"--{tracker}", action="store_true", help=f"also log to {tracker} ({how})")
    g.add_argument("--project", default=None,
                   help="tracker project (default: WANDB_PROJECT, SWANLAB_PROJECT or TRACKIO_PROJECT, else minimind)")
    g.add_argument("--run-name", default=None, help="tracker run name (default: the --out directory's name)")
    # --tags as trackers' users type it; distill's --tags already names its reasoning tags, so there only
    # --tracker-tags (which every stage takes)
    names = ["--tracker-tags"] if stage == "distill" else ["--tags", "--tracker-tags"]
    g.add_argument(*names, dest="tracker_tags", default=[], type=lambda s: [t for t in s.split(",") if t],
                   metavar="A,B", help="comma-separated tags of the tracker run")
    g.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                   help="upload the final model with a model card to this Hugging Face repo (needs a token)")
    g.add_argument("--hub-private", action="store_true", help="with --push-to-hub: create the repo as private")
    g.add_argument("--push-every-checkpoint", action="store_true",
                   help="with --push-to-hub: also upload each checkpoint's weights (checkpoints/step-N/)")


def config_from_args(args: argparse.Namespace, stage: str, options: StageOptions | None = None) -> TrainConfig:
    """Build the TrainConfig from parsed flags and the stage's options (built from its own flags)."""
    init, out = getattr(args, "init", None), getattr(args, "out", None)
    if init and out and Path(init).resolve() == Path(out).resolve():  # before --overwrite can delete the start
        raise UserError(f"--out {out} is the --init directory: a run writes its checkpoints and model into --out "
                        "(and --overwrite would delete the model it starts from); choose another --out")
    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    trackers = [t for t in TRACKER_HELP if getattr(args, t, False)]
    values["hub_sources"] = dict(getattr(args, "hub_sources", None) or {})
    command = list(getattr(args, "command_line", None) or [stage])
    cfg = TrainConfig(stage=stage, trackers=trackers, options=options or StageOptions(), command=command, **values)
    check_services(cfg)
    return cfg


def check_services(cfg: TrainConfig) -> None:
    """Before any training: the trackers asked for are installed and --push-to-hub can push (a valid repo id and
    a token), each failure one line."""
    from minimind.train.monitor import check_trackers

    check_trackers(cfg.trackers)
    if cfg.push_to_hub:
        from minimind.push import check_repo_id, check_token

        check_repo_id(cfg.push_to_hub, "--push-to-hub")
        check_token("--push-to-hub")
    elif cfg.push_every_checkpoint or cfg.hub_private:
        raise UserError("--push-every-checkpoint and --hub-private need --push-to-hub ORG/NAME")
