"""The one training loop every stage runs: a stage supplies the model, an Objective and data.

Per optimizer step: fetch `accumulation_steps` micro-batches; count the step's targets over all of them
and all ranks; forward/backward each under autocast (gradient sync only on the last, where the engine
allows); skip the step if the loss or gradient norm is not finite; clip; AdamW step with the cosine learning
rate; log; maybe evaluate and checkpoint. SIGTERM/SIGINT finish the current step, checkpoint and exit 0. The
data position, every RNG state, the optimizer and the scaler are in each checkpoint, so `--resume` continues
bit-exactly. What differs between ddp, fsdp and zero2 lives in `strategies/`, behind one small interface.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from minimind.data.sampler import DataPosition, StepBatchSampler
from minimind.errors import StepError, UserError
from minimind.info import count_parameters, training_flops
from minimind.kernels.training import plain_model, training_view
from minimind.outputs import writing
from minimind.train import checkpoint as ckpt
from minimind.train.args import TrainConfig
from minimind.train.distributed import (
    DistInfo,
    SharedError,
    all_reduce_sum,
    barrier,
    resolve_dtype,
)
from minimind.train.mfu import peak_flops
from minimind.train.monitor import Monitor
from minimind.train.objective import Objective, flop_counts
from minimind.train.report import read_metrics, write_report
from minimind.train.rundir import space_warning
from minimind.train.schedule import lr_at
from minimind.train.strategies import make_strategy


@dataclass
class StageRun:
    """What a stage hands the trainer."""

    model: torch.nn.Module  # trainable parameters have requires_grad=True; frozen ones (LoRA base) False
    objective: Objective
    dataset: Dataset
    collate: Callable[[list], dict]
    save_final: Callable[[torch.nn.Module, Path], None]  # writes the run's product (model dir or adapter)
    eval_dataset: Dataset | None = None
    trainable_only_checkpoint: bool = False  # checkpoints hold only trainable tensors (the base is --init)
    final_numbers: Callable[[torch.nn.Module], dict[str, Any]] | None = None  # extra rows for report.md
    notes: list[str] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: TrainConfig, run: StageRun, info: DistInfo):
        self.cfg, self.run, self.info = cfg, run, info
        self.out = Path(cfg.out)
        self.device = info.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        # A causal LM trains inside `TrainingLM` (losses from the hidden states); same parameters and names.
        self.model = training_view(run.model.to(self.device))
        if cfg.gradient_checkpointing and hasattr(self.model, "model"):
            self.model.model.gradient_checkpointing = True
        self.config = getattr(self.model, "config", None)  # FLOPs for `mfu` come from its shapes
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if not self.trainable:
            raise UserError("the stage left no trainable parameters")
        # The strategy (ddp | fsdp | zero2) wraps the model and owns the optimizer, gradient sync and scaler.
        self.strategy = make_strategy(cfg, info, self.dtype)
        self.train_model = self.strategy.wrap(self.model, run.trainable_only_checkpoint)
        self.global_batch = cfg.batch_size * cfg.accumulation_steps * info.world_size
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.checkpoints = ckpt.CheckpointIO(self.out, cfg.keep_checkpoints, info)
        self.step, self.position, self.bad_steps = 0, DataPosition(), 0
        self.stop_signal: str | None = None

    # ---- the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # dropout differs per rank, repeatably
        if cfg.resume:
            self._resume()
        sampler = StepBatchSampler(len(self.run.dataset), cfg.batch_size, cfg.accumulation_steps,
                                   info.world_size, info.rank, cfg.seed, start=self.position)
        if sampler.steps_per_epoch < 1:
            raise UserError(
                f"--data has {len(self.run.dataset)} training rows but one step needs {sampler.global_batch} "
                f"(batch {cfg.batch_size} x accumulation {cfg.accumulation_steps} x {info.world_size} processes)"
            )
        # An objective that reuses a fetched batch for several steps (RL rollouts) consumes one every `reuse`
        # steps: an epoch is then reuse x as many optimizer steps, and the data position moves at each fetch.
        reuse = max(int(self.run.objective.steps_per_batch), 1)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * sampler.steps_per_epoch * reuse
        fetched_from = self.step - self.step % reuse  # a run resumed mid-reuse fetches that batch again
        sampler.steps = max(-(-(self.total_steps - fetched_from) // reuse), 0)
        # The warmup a default gives depends on the run's length; the resolved number is what train_config.json
        # records, so a resumed or replayed run follows the same schedule.
        cfg.warmup_steps = cfg.warmup_for(self.total_steps)
        if info.is_main:
            with writing(self.out / "train_config.json"):
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
        # The loader's own generator seeds its workers, so creating it leaves the global RNG untouched.
        loader = DataLoader(self.run.dataset, batch_sampler=sampler, collate_fn=self.run.collate,
                            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=_ignore_stop_signals)
        monitor = Monitor(self.out, info.is_main, self.total_steps, self.step, cfg.log_every, cfg.trackers,
                          f"{cfg.stage}", cfg.to_dict(), project=cfg.project, tags=cfg.tracker_tags, tracker_name=cfg.run_name)
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else (peak_flops(self.device, self.dtype)
                                                                   if info.is_main else 1.0)
        if info.is_main:
            warning = self._space_warning()
            if warning:
                monitor.message(warning)
            monitor.message(f"{cfg.stage}: {self.total_steps} steps, global batch {sampler.global_batch} "
                            f"({cfg.batch_size} x {cfg.accumulation_steps} accumulation x {info.world_size} "
                            f"processes) x {cfg.max_seq_len} tokens, {self.device} {str(self.dtype)[6:]}")
        previous = self._install_signal_handlers()
        ran = 0
        try:
            batches = iter(loader)
            micro: list[dict] | None = None
            while self.step < self.total_steps:
                started = time.perf_counter()
                if micro is None or self.step % reuse == 0:
                    micro = [next(batches) for _ in range(cfg.accumulation_steps)]
                try:
                    metrics = self.train_step(micro, self.step % reuse)
                except StepError as e:  # this step changed no weight: save the last finished one, then stop
                    self._save_checkpoint()
                    monitor.close()
                    raise StepError(f"{e}. Saved a checkpoint at step {self.step}/{self.total_steps}; fix it and "
                                    "continue with the same command plus --resume") from None
                self.step += 1
                if self.step % reuse == 0:
                    self.position = sampler.advance(self.position)
                ran += 1
                metrics["step_time"] = time.perf_counter() - started
                self._add_throughput(metrics)
                if cfg.eval_every and self.run.eval_dataset is not None and self.step % cfg.eval_every == 0:
                    metrics.update(self.evaluate())
                monitor.log(self.step, metrics)
                stop = self._stop_requested()
                if self.step >= self.total_steps:
                    break
                if stop or (cfg.stop_after_steps and ran >= cfg.stop_after_steps):
                    self._save_checkpoint()
                    reason = f"received {stop}" if stop else f"--stop-after-steps {cfg.stop_after_steps} reached"
                    monitor.message(f"{reason}: saved checkpoint at step {self.step}/{self.total_steps}; "
                                    f"continue with the same command plus --resume")
                    monitor.close()
                    return {"step": self.step, "finished": False}
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save_checkpoint()
        finally:
            self._restore_signal_handlers(previous)
        return self._finish(monitor)

    def train_step(self, micro: list[dict], phase: int = 0) -> dict[str, Any]:
        """One optimizer step over the micro-batches (the `phase`-th on them, for an objective that reuses
        batches); returns the step's metrics."""
        cfg, info = self.cfg, self.info
        sizes = [self._batch_counts(b) for b in micro]  # counted on the host copies: no device sync mid-step
        micro = [_to_device(b, self.device) for b in micro]
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_for(self.total_steps), cfg.min_lr_ratio)
        self.strategy.set_lr(lr)
        self.train_model.train()
        with self._autocast():  # RL samples its rollouts here, before the count that may depend on them
            self.run.objective.prepare(self.train_model, micro, phase)
        count = all_reduce_sum(sum(self.run.objective.count(b).float() for b in micro).to(self.device), info)
        denominator = count.clamp(min=1.0) / info.world_size  # every strategy averages gradients over ranks
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        extra: dict[str, float] = {}
        tokens = useful = flops = 0
        for i, (batch, (batch_tokens, batch_useful, batch_flops)) in enumerate(zip(micro, sizes)):
            with self.strategy.accumulate(last=i == len(micro) - 1):
                with self._autocast():
                    out = self.run.objective(self.train_model, batch)
                    loss = out.loss_sum / denominator + out.aux_loss / len(micro)
                self.strategy.backward(loss)
            loss_sum += out.loss_sum.detach().float()
            aux_sum += torch.as_tensor(out.aux_loss, device=self.device).detach().float()
            for key, value in out.metrics.items():
                extra[key] = extra.get(key, 0.0) + float(value) / len(micro)
            if out.tokens is not None:  # RL: the objective trained on sequences it sampled
                batch_tokens = out.tokens
                batch_useful = out.tokens if out.useful_tokens is None else out.useful_tokens
            if out.flops is not None:  # and knows what sampling and its frozen models cost
                batch_flops = out.flops
            tokens, useful, flops = tokens + batch_tokens, useful + batch_useful, flops + batch_flops
        step_loss = (all_reduce_sum(loss_sum, info) / count.clamp(min=1.0)).item()
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm, finite = self.strategy.step(clip, math.isfinite(step_loss))
        if finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self._on_bad_step(step_loss, grad_norm)
        metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "aux_loss": aux_sum.item() / len(micro),
                   "epoch": self.position.epoch, **extra, "tokens": tokens * info.world_size,
                   "nonpad_fraction": useful / max(tokens, 1), "flops": flops}
        if not finite:
            metrics["skipped"] = True
        return metrics

    def _on_bad_step(self, loss: float, grad_norm: float) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.info.is_main:
            print(f"warning: step {self.step + 1}: non-finite {what}; step skipped "
                  f"({self.bad_steps} in a row, stopping at {self.cfg.nan_tolerance})", flush=True)
        if self.bad_steps >= self.cfg.nan_tolerance:
            self.step += 1
            self._save_checkpoint()
            raise SharedError(  # every rank saw the same (all-reduced) loss, so all stop here together
                f"training diverged: non-finite {what} for {self.bad_steps} steps in a row (up to step {self.step}); "
                f"weights before those steps are saved in {self.out / 'checkpoints'} — lower --lr or check the data, "
                "then continue with --resume"
            )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _batch_counts(self, batch: dict) -> tuple[int, int, float]:
        """(tokens, non-padding tokens, FLOPs needed) of one micro-batch of this rank: training FLOPs with the head
        at loss positions only and attention per document (`flop_counts`), plus frozen models' forwards."""
        if self.config is None:
            return batch["input_ids"].numel(), _useful_tokens(batch), 0.0
        counts = flop_counts(batch)
        flops = training_flops(self.config, *counts) + self.run.objective.frozen_flops(counts)
        return batch["input_ids"].numel(), _useful_tokens(batch), flops

    def _add_throughput(self, metrics: dict[str, Any]) -> None:
        seconds = max(metrics["step_time"], 1e-9)
        metrics["tokens_per_sec"] = metrics["tokens"] / seconds
        metrics["mfu"] = metrics.pop("flops") / seconds / self.peak if self.peak else 0.0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss (Σ target loss / Σ targets) on the first `eval_batches` eval batches, main rank.

        With a sharded strategy every rank runs the same batches (each forward pass gathers the weights).
        """
        if not (self.info.is_main or self.strategy.sharded):
            return {}
        self.model.eval()
        loader = DataLoader(self.run.eval_dataset, batch_size=self.cfg.batch_size, shuffle=False,
                            collate_fn=self.run.collate)
        total, count, extra, n = 0.0, 0.0, {}, 0
        for i, batch in enumerate(loader):
            if i >= self.cfg.eval_batches:
                break
            batch = _to_device(batch, self.device)
            with self._autocast():
                out = self.run.objective(self.model, batch)
            total += out.loss_sum.float().item()
            count += self.run.objective.count(batch).float().item()
            for key, value in out.metrics.items():
                extra[f"eval_{key}"] = extra.get(f"eval_{key}", 0.0) + float(value)
            n += 1
        self.model.train()
        if not self.info.is_main:
            return {}
        return {"eval_loss": total / max(count, 1.0), **{k: v / max(n, 1) for k, v in extra.items()}}

    def _finish(self, monitor: Monitor) -> dict[str, Any]:
        cfg = self.cfg
        if self.run.eval_dataset is not None:
            final_eval = self.evaluate()
            if final_eval and (not cfg.eval_every or self.step % cfg.eval_every):
                monitor.log(self.step, final_eval)
        self._save_checkpoint()
        monitor.close()
        summary: dict[str, Any] = {"step": self.step, "finished": True}
        # An ordinary module on the main rank, whatever the strategy: the causal LM itself, not its TrainingLM.
        final = plain_model(self.strategy.final_model())
        if self.info.is_main:
            with writing(self.out):
                self.run.save_final(final, self.out)
                summary.update(self.write_report(final))
            if cfg.push_to_hub:
                self._push_final()
        barrier(self.info)
        return summary

    def write_report(self, final: torch.nn.Module) -> dict[str, Any]:
        records = read_metrics(self.out)
        train = [r for r in records if isinstance(r.get("loss"), (int, float))]
        evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
        tail = train[-max(1, len(train) // 20):]
        timed = train[1:] or train  # the first step pays for warm-up
        config = getattr(self.model, "config", None)
        numbers: dict[str, Any] = {"stage": self.cfg.stage, "steps": self.step}
        if config is not None and hasattr(config, "dim"):
            numbers["parameters"] = count_parameters(config).total
        numbers.update({
            "trainable parameters": self.trainable,
            "global batch (rows)": self.global_batch,
            "tokens seen": sum(r.get("tokens", 0) for r in train),
            "training time (s)": round(sum(r.get("step_time", 0.0) for r in train), 1),
            "tokens/s (mean)": sum(r.get("tokens_per_sec", 0.0) for r in timed) / max(len(timed), 1),
            "MFU (mean)": sum(r.get("mfu", 0.0) for r in timed) / max(len(timed), 1),
            "non-pad token fraction": sum(r.get("nonpad_fraction", 1.0) for r in train) / max(len(train), 1),
            "first train loss": train[0]["loss"] if train else float("nan"),
            "final train loss (last 5%)": sum(r["loss"] for r in tail) / max(len(tail), 1),
        })
        if evals:
            numbers["first held-out loss"], numbers["final held-out loss"] = evals[0], evals[-1]
        if self.run.final_numbers is not None:
            numbers.update(self.run.final_numbers(final))
        write_report(self.out, f"MiniMind {self.cfg.stage} run", numbers, self.run.notes)
        (self.out / "summary.json").write_text(json.dumps(numbers, indent=2, default=str) + "\n")
        return numbers

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        """Checkpoint the whole state at the current step (collective: the strategy gathers full states)."""
        info = self.info
        state = ckpt.TrainerState(
            step=self.step, epoch=self.position.epoch, offset=self.position.offset, bad_steps=self.bad_steps,
            world_size=info.world_size, strategy=self.cfg.strategy, stage=self.cfg.stage,
            max_seq_len=self.cfg.max_seq_len, global_batch=self.global_batch)
        model_state, optimizer_state = self.strategy.model_state(), self.strategy.optimizer_state()
        self.checkpoints.save(state, model_state, optimizer_state, self.strategy.scaler_state(), ckpt.rng_state(),
                              self.run.objective.state_dict())
        if self.cfg.push_to_hub and self.cfg.push_every_checkpoint and info.is_main:
            from minimind.push import push_checkpoint

            try:
                push_checkpoint(self.out / "checkpoints" / f"step-{self.step}", self.cfg.push_to_hub,
                                self.cfg.hub_private)
            except UserError as err:  # the checkpoint is safe on disk; training goes on, the final push retries
                print(f"warning: checkpoint {self.step} not uploaded: {err}")

    def _push_final(self) -> None:
        """Upload the final model with its card (main rank); a failed upload leaves the run complete on disk."""
        from minimind.card import CardInfo
        from minimind.push import push_folder

        cfg = self.cfg
        try:
            url = push_folder(self.out, cfg.push_to_hub, cfg.hub_private, card=CardInfo(repo=cfg.push_to_hub),
                              commit_message=f"MiniMind {cfg.stage}: {self.step} steps")
        except UserError as err:
            raise UserError(f"{err}; the model is saved in {self.out}: push it with `minimind push {self.out} "
                            f"--repo {cfg.push_to_hub}`") from None
        print(f"pushed {self.out} to https://huggingface.co/{cfg.push_to_hub} ({url})")

    def _resume(self) -> None:
        """Continue from the latest checkpoint in --out, if any: weights, optimizer, scaler, RNG, data position."""
        info = self.info
        found = self.checkpoints.load(self.cfg.stage, self.cfg.max_seq_len, self.strategy.state_names,
                                      self.strategy.all_names)
        if found is None:
            return
        state = found.state
        self.strategy.load(found.model, found.optimizer, found.scaler)
        if found.rng is not None:
            ckpt.set_rng_state(found.rng)
        elif info.is_main or info.rank >= state.world_size:
            print(f"rank {info.rank}: no saved RNG state (checkpoint had {state.world_size} processes); "
                  "dropout continues from a fresh seed", flush=True)
        if found.objective is not None:
            self.run.objective.load_state_dict(found.objective)
        self.step, self.bad_steps = state.step, state.bad_steps
        self.position = DataPosition(state.epoch, state.offset)
        if info.is_main:
            print(f"resumed from {found.path} (step {self.step}; saved by {state.world_size} process(es) with "
                  f"--strategy {state.strategy}, now {info.world_size} with {self.cfg.strategy})", flush=True)
            if state.global_batch != self.global_batch:
                print(f"note: the global batch was {state.global_batch} rows and is now {self.global_batch}; "
                      "the data continues at the same sample, but each step now covers a different number "
                      "of rows (see docs/distributed.md on resuming on a different number of GPUs)", flush=True)

    def _space_warning(self) -> str | None:
        """Main rank, at start: a warning if --out looks too small for the checkpoints to come and the model."""
        cfg, params = self.cfg, list(self.model.parameters())
        # parameters() lists a shared (tied) tensor once; numel() is the full size under fsdp too
        every = sum(p.numel() * p.element_size() for p in params)
        trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        # the weights (trainable ones only for an adapter) and AdamW's two moments per trainable parameter
        checkpoint = (trainable if self.run.trainable_only_checkpoint else every) + 2 * trainable
        left = max(self.total_steps - self.step, 0)
        saves = (left // cfg.save_every if cfg.save_every else 0) + 1  # the last one is the final save
        return space_warning(self.out, checkpoint, every, cfg.keep_checkpoints, saves)

    # ---- signals --------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        previous = {}

        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _stop_requested(self) -> str | None:
        flag = torch.tensor(1.0 if self.stop_signal else 0.0, device=self.device)
        if all_reduce_sum(flag, self.info).item() > 0:  # every rank stops at the same step
            return self.stop_signal or "a stop signal (on another rank)"
        return None


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which stops cleanly and then shuts them
    down; a terminal's Ctrl-C or a scheduler's SIGTERM reaches the whole process group, workers included."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _useful_tokens(batch: dict) -> int:
    if "doc_ids" in batch:
        return int((batch["doc_ids"] >= 0).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()
