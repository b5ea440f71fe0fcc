"""Atomic, verifiable checkpoints: a crash at any moment never leaves a half-written "latest".

Layout inside a run directory:
    checkpoints/step-N/      model.safetensors, optimizer.pt, trainer.json, rng-rank{r}.pt, manifest.json
    checkpoints/latest       the name of the newest complete checkpoint ("step-N")
A checkpoint is written into `checkpoints/.tmp-step-N`, every file fsynced, a manifest with each file's size and
sha256 written last, then the directory is renamed into place and `latest` replaced by rename. On resume the
manifest is verified; a truncated or corrupted checkpoint is reported and the previous complete one used.
Tensors go through safetensors or `torch.load(weights_only=True)`: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minimind.errors import UserError
from minimind.outputs import WriteFailed, writing
from minimind.train.distributed import DistInfo, barrier, collective

MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unique_state(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors with shared storage (the tied head) kept once; optionally trainable ones only."""
    if trainable_only:
        return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    return state


class CheckpointDir:
    """The `checkpoints/` folder of a run: save (collectively across ranks), find the latest good one, prune."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def staging(self, step: int) -> Path:
        return self.root / f".tmp-step-{step}"

    def begin(self, step: int) -> Path:
        """Main rank: a fresh staging directory for step `step`; staging left by a killed run is removed first
        (the run holds the directory's lock, so no other writer is using it)."""
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.staging(step)
        tmp.mkdir(parents=True)
        return tmp

    def abandon(self, step: int) -> None:
        """Main rank, after a failed save: remove the partial staging files so they do not keep the disk full."""
        shutil.rmtree(self.staging(step), ignore_errors=True)
        (self.root / ".latest.tmp").unlink(missing_ok=True)

    def commit(self, step: int) -> Path:
        """Main rank, after every rank wrote its files: manifest, fsync, rename into place, move `latest`."""
        tmp = self.staging(step)
        files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
        for path in files:
            _fsync_file(path)
        manifest = {"step": step, "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        final = self.root / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        _fsync_file(pointer)
        os.replace(pointer, self.root / "latest")
        _fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        for old in self.complete_steps()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.root / f"step-{old}", ignore_errors=True)

    def complete_steps(self) -> list[int]:
        steps = []
        for path in self.root.glob("step-*"):
            if path.is_dir() and path.name[5:].isdigit() and (path / MANIFEST).is_file():
                steps.append(int(path.name[5:]))
        return sorted(steps)

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint at `path` is complete and intact, else what is wrong with it.

        The manifest itself is untrusted too (a flipped byte may still parse): it must list plain file names
        with an integer size and a hex digest, and it must list every file the directory holds.
        """
        try:
            manifest = json.loads((path / MANIFEST).read_bytes())
        except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
            return "its manifest is missing or unreadable"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not files:
            return "its manifest lists no files"
        for name, info in files.items():
            if Path(name).name != name or not isinstance(info, dict) or type(info.get("bytes")) is not int \
                    or not isinstance(info.get("sha256"), str):
                return f"its manifest entry {name!r} is malformed"
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != info["bytes"]:
                return f"{name} is truncated ({file.stat().st_size} of {info['bytes']} bytes)"
            if sha256(file) != info["sha256"]:
                return f"{name} does not match its checksum"
        unlisted = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
        if unlisted:
            return f"{unlisted[0]} is not in its manifest"
        return None

    def pointer(self) -> Path | None:
        """The checkpoint `latest` names, or None (with a warning) if the pointer is unreadable or stray."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        try:
            name = pointer.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = None
        if name is None or not (name.startswith("step-") and name[5:].isdigit() and name[5:].isascii()):
            warnings.warn(f"{pointer} is damaged (expected a name like step-N); using the newest complete "
                          "checkpoint instead", stacklevel=3)
            return None
        if not (self.root / name).is_dir():
            warnings.warn(f"{pointer} names {name}, which does not exist; using the newest complete checkpoint "
                          "instead", stacklevel=3)
            return None
        return self.root / name

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, warning about any newer one that does not; None if none."""
        named = self.pointer()
        candidates = [named] if named is not None else []
        candidates += [self.root / f"step-{s}" for s in reversed(self.complete_steps())]
        tried = set()
        for path in candidates:
            if path in tried or not path.is_dir():
                continue
            tried.add(path)
            problem = self.verify(path)
            if problem is None:
                return path
            warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to an earlier one", stacklevel=2)
        return None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with writing(path):
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_object(path: Path, obj: Any) -> None:
    """Optimizer/scaler/RNG state: tensors and plain containers only, readable with weights_only=True.

    Written through a Python file object so that a full disk surfaces as OSError(ENOSPC) naming the path
    (given a path, torch's own writer reports only "unexpected pos").
    """
    with writing(path), open(path, "wb") as handle:
        torch.save(obj, handle)


def load_object(path: Path) -> Any:
    """The inverse of save_object; anything but tensors and plain containers is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's weights_only refusal spreads over lines; the one naming the refused object is the useful one
        detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
        raise UserError(f"{path}: cannot read checkpoint state ({detail})") from None


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
             "numpy": json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    python = json.loads(state["python"])
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainerState:
    """`trainer.json`: where the run stands (step, data position, bad-step streak) and what it ran with, checked
    when it resumes (stage, --max-seq-len) or reported (processes, strategy, global batch)."""

    step: int
    epoch: int
    offset: int
    bad_steps: int
    world_size: int
    strategy: str
    stage: str
    max_seq_len: int
    global_batch: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        """Read a trainer.json; checkpoints written before `strategy` was recorded are ddp ones."""
        return cls(**{"strategy": "ddp", **{k: v for k, v in data.items() if k in cls.__dataclass_fields__}})


@dataclass
class Restored:
    """A checkpoint read back: this rank's share of what `CheckpointIO.save` was given."""

    path: Path
    state: TrainerState
    model: dict[str, torch.Tensor]  # full tensors, tied ones once
    optimizer: dict[str, Any]  # the full AdamW state keyed by parameter name
    scaler: dict[str, Any]
    rng: dict[str, Any] | None  # this rank's RNG states; None if the checkpoint had fewer processes
    objective: dict[str, Any] | None = None  # this rank's objective state (RL's reused rollouts), if it saved one


class CheckpointIO:
    """Saving and reading a run's whole state through `CheckpointDir`; the trainer hands over what to save.

    The files are the same for every strategy and world size: full model tensors, the full AdamW state keyed
    by parameter name, the scaler, the trainer state, and one RNG file per rank (written by that rank, so the
    run directory must be on a filesystem every node sees).
    """

    def __init__(self, run_dir: str | Path, keep: int, info: DistInfo):
        self.dir = CheckpointDir(run_dir, keep=keep)
        self.info = info

    def save(self, state: TrainerState, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
             scaler: dict[str, Any], rng: dict[str, Any], objective: dict[str, Any] | None = None) -> None:
        """Write checkpoint `state.step` (collective). `model` and `optimizer` are the full states the strategy
        gathered (they matter on the main rank only), `rng` this rank's RNG states, `objective` this rank's
        objective state (written only when not empty). A failed write removes the partial staging files and
        raises WriteFailed."""
        try:
            with writing(self.dir.staging(state.step)):
                self._save(state, model, optimizer, scaler, rng, objective)
        except WriteFailed:
            if self.info.is_main:
                self.dir.abandon(state.step)
            raise

    def _save(self, state: TrainerState, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
              scaler: dict[str, Any], rng: dict[str, Any], objective: dict[str, Any] | None = None) -> None:
        info = self.info
        if info.is_main:
            self.dir.begin(state.step)
        barrier(info)
        staging = self.dir.staging(state.step)
        save_object(staging / f"rng-rank{info.rank}.pt", rng)
        if objective:
            save_object(staging / f"objective-rank{info.rank}.pt", objective)
        if info.is_main:
            save_tensors(staging / "model.safetensors", model)
            save_object(staging / "optimizer.pt", optimizer)
            save_object(staging / "scaler.pt", scaler)
            (staging / "trainer.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        barrier(info)
        if info.is_main:
            self.dir.commit(state.step)
        barrier(info)

    def load(self, stage: str, max_seq_len: int, expected: list[str], known: set[str]) -> Restored | None:
        """The latest checkpoint, checked against this run (collective: a bad checkpoint is reported once and
        no rank is left waiting); None if there is none. `expected`: the tensor names the checkpoint must hold;
        `known`: every name the model has."""
        found = collective(self.info, lambda: self._read(stage, max_seq_len, expected, known))
        if found is None:
            return None
        rng_file = found.path / f"rng-rank{self.info.rank}.pt"
        found.rng = load_object(rng_file) if rng_file.is_file() else None
        objective_file = found.path / f"objective-rank{self.info.rank}.pt"
        found.objective = load_object(objective_file) if objective_file.is_file() else None
        return found

    def _read(self, stage: str, max_seq_len: int, expected: list[str], known: set[str]) -> Restored | None:
        path = self.dir.latest()
        if path is None:
            if self.info.is_main:
                print(f"--resume: no checkpoint in {self.dir.root}; starting from step 0", flush=True)
            return None
        state = TrainerState.from_json(json.loads((path / "trainer.json").read_text()))
        if state.stage != stage:
            raise UserError(f"{path}: checkpoint is from stage {state.stage!r}, not {stage!r}")
        if state.max_seq_len != max_seq_len:
            raise UserError(f"{path}: checkpoint was trained with --max-seq-len {state.max_seq_len}, "
                            f"not {max_seq_len}")
        tensors = load_tensors(path / "model.safetensors")
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - known)
        if missing or unexpected:
            key = (missing or unexpected)[0]
            raise UserError(f"{path}/model.safetensors does not match this model: tensor '{key}' is "
                            f"{'missing' if missing else 'unexpected'}")
        return Restored(path, state, tensors, load_object(path / "optimizer.pt"), load_object(path / "scaler.pt"),
                        None)
