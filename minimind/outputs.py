"""What every verb that writes files shares: no product is overwritten silently, and a failed write is one line.

A verb's output (a run directory, prepared shards, a tokenizer, an export) that already holds that verb's own
kind of product is refused unless `--overwrite` is given; `--overwrite` then replaces exactly those products
(never unrelated files). Prepared shards, tokenizers and exports are written aside and moved in only when
complete (`replacing_product`), so bad input or a failure halfway leaves the earlier product as it was; a training
run's `--overwrite` deletes the earlier run when it starts. A write that fails for lack of space or an I/O error
becomes a `WriteFailed`: one line saying what could not be written and why, in plain words.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from minimind.errors import UserError

# errno -> the reason in plain words; anything else falls back to the system's own text.
REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "an input/output error (the disk or network file system failed)",
    errno.EFBIG: "the file is larger than the file system allows",
}
# The files a model directory is made of (a run's final model, an import, an export), besides the model's
# remote-code files (`model_code_files`).
MODEL_DIR_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "adapter_config.json",
                   "adapter_model.safetensors", "value_head.safetensors")
# safetensors (Rust) and other native writers report the OS error only inside their message text.
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
# numpy's `tofile` (the GGUF writer, prepared shards) reports a short write without an errno: the disk filled up
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class WriteFailed(UserError):
    """A file could not be written (full disk, quota, I/O error): `path` and the plain-words `reason`."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"could not write {path}: {reason}")


def write_failure(err: BaseException, path: str | Path) -> WriteFailed | None:
    """The WriteFailed that `err` amounts to when writing `path`, or None if it is no write failure."""
    if isinstance(err, WriteFailed):
        return err
    # torch's zip writer, failing to finish a file whose write hit ENOSPC, raises its own RuntimeError with the
    # OSError as context: look down the chain
    seen: BaseException | None = err
    while seen is not None:
        code = getattr(seen, "errno", None) if isinstance(seen, OSError) else None
        if code is None:
            match = _OS_ERROR_IN_TEXT.search(str(seen))
            code = int(match.group(1)) if match else None
        if code is None and isinstance(seen, OSError) and _SHORT_WRITE.search(str(seen)):
            code = errno.ENOSPC
        if code is not None and (isinstance(seen, OSError) or code in REASONS):
            where = getattr(seen, "filename", None) or path
            return WriteFailed(where, REASONS.get(code) or os.strerror(code).lower())
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write inside the block into a one-line WriteFailed naming `path` (or the file the OS named)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - anything that is not a write failure is re-raised unchanged
        failure = write_failure(err, path)
        if failure is None:
            raise
        raise failure from None


def model_code_files() -> list[str]:
    """The model's remote-code files that `save_pretrained` copies beside the weights (modeling_minimind.py …),
    listed without importing the model package."""
    spec = importlib.util.find_spec("minimind.model")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")


def existing_products(out: str | Path, names: Iterable[str]) -> list[str]:
    """Which of `names` (files or folders directly in `out`) exist there, in the order given."""
    out = Path(out)
    return [name for name in names if (out / name).exists() or (out / name).is_symlink()]


def refuse_products(out: str | Path, names: Iterable[str], what: str, overwrite: bool) -> list[str]:
    """Which of the products `names` `out` holds; UserError if any unless `overwrite` (nothing is deleted)."""
    found = existing_products(out, names)
    if found and not overwrite:
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise UserError(f"--out {out}: already holds {what} ({listed}); choose another --out, or add --overwrite "
                        "to replace those files")
    return found


def _alive(pid: str) -> bool:
    """Whether the process numbered `pid` (text) runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def replacing_product(out: str | Path, names: Iterable[str], what: str, overwrite: bool) -> Iterator[Path]:
    """A verb's whole output, written aside and moved in when complete: `out` is refused if it holds any of the
    products `names` (it is a `what`) unless `overwrite`; the block writes into the folder it is given (a staging
    folder inside `out`). When the block ends well the earlier products are deleted and the new ones renamed into
    place; when it fails (bad input, a full disk) the staging folder goes and `out` keeps what it had (an `out`
    the block created is removed again). A failed write becomes one line."""
    out, names = Path(out), list(names)
    found = refuse_products(out, names, what, overwrite)
    created = not out.exists()
    for stale in out.glob(".partial-*") if not created else ():  # left by a run that was killed
        if not _alive(stale.name.removeprefix(".partial-")):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".partial-{os.getpid()}"
    try:
        with writing(staging):
            staging.mkdir(parents=True, exist_ok=True)
            yield staging
            remove_products(out, found)
            for name in existing_products(staging, names):
                os.replace(staging / name, out / name)
    except WriteFailed as err:
        where = out / err.path.relative_to(staging) if err.path.is_relative_to(staging) else err.path
        raise UserError(f"{WriteFailed(where, err.reason)}; the partial files were removed; free space, then run "
                        "the same command again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


@contextmanager
def writing_product(out: str | Path, names: Iterable[str]) -> Iterator[None]:
    """A verb's whole output: a failed write removes the partial `names` from `out` and becomes one line."""
    try:
        with writing(out):
            yield
    except WriteFailed as err:
        remove_products(out, names)
        raise UserError(f"{err}; the partial files were removed; free space, then run the same command again") \
            from None


def remove_products(out: str | Path, names: Iterable[str]) -> None:
    """Delete the named files/folders directly inside `out` (a missing one is fine)."""
    for name in names:
        path = Path(out) / name
        with writing(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
