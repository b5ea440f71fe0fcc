"""Model and tokenizer directories from the Hugging Face Hub (`org/name[@revision]`) or ModelScope
(`ms:org/name[@revision]`), and uploads to the Hub.

Every CLI option that takes a model or tokenizer directory is declared with `type=model_dir`; after parsing, the
CLI calls `resolve_args`, which turns each hub id into a local snapshot directory through the library's own
cache (`snapshot_download`: `HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_OFFLINE`, the token from `hf auth login` or
`HF_TOKEN` are all honoured by huggingface_hub itself). A local path that exists always wins over a hub id.
Nothing here speaks HTTP directly; huggingface_hub and modelscope are imported only when an id is used.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from minimind.errors import UserError, install_hint

MODELSCOPE_PREFIX = "ms:"
# org/name as the Hub spells repo ids (letters, digits, '-', '_', '.'), then an optional @revision (a branch, tag
# or commit; branches may hold '/').
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[\w-])(?:@(?P<revision>[\w./-]+))?$")
# Files a model repository may hold that MiniMind never reads: skipped so that a snapshot of a repo with
# .pth/.gguf copies beside the safetensors does not download them (a .bin may be the only weights).
_SKIPPED = ["*.pth", "*.pt", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot", "checkpoints/*"]


@dataclass(frozen=True)
class HubId:
    """A parsed hub id: the repo, its revision (None = the default branch) and which hub serves it."""

    repo: str
    revision: str | None
    hub: str  # "huggingface" or "modelscope"

    def __str__(self) -> str:
        prefix = MODELSCOPE_PREFIX if self.hub == "modelscope" else ""
        return f"{prefix}{self.repo}" + (f"@{self.revision}" if self.revision else "")


def model_dir(value: str) -> str:
    """argparse `type` of every option that takes a model or tokenizer directory: the value unchanged; marks the
    option so that `resolve_args` resolves it (a hub id becomes a local snapshot directory)."""
    return value


def parse_hub_id(value: str) -> HubId | None:
    """The hub id `value` names, or None when it is not one (or names a local path that exists, which wins)."""
    if not value or Path(value).expanduser().exists():
        return None
    hub = "huggingface"
    if value.startswith(MODELSCOPE_PREFIX):
        hub, value = "modelscope", value[len(MODELSCOPE_PREFIX):]
    match = _HUB_ID.match(value)
    if match is None or ".." in match["repo"]:
        return None
    return HubId(match["repo"], match["revision"], hub)


def resolve_model_dir(value: str, option: str) -> str:
    """A local directory for `value`: the value itself when it is not a hub id, else the snapshot's directory
    (downloaded into the cache when not already there). Errors name `option` and the id."""
    hub_id = parse_hub_id(value)
    if hub_id is None:
        if value.startswith(MODELSCOPE_PREFIX):
            raise UserError(f"{option} {value}: expected ms:ORG/NAME[@REVISION]")
        return value
    if hub_id.hub == "modelscope":
        return _modelscope_snapshot(hub_id, option)
    return _hf_snapshot(hub_id, option)


def _hf_snapshot(hub_id: HubId, option: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{option} {hub_id}"
    try:
        return snapshot_download(hub_id.repo, revision=hub_id.revision, ignore_patterns=_SKIPPED)
    except GatedRepoError:
        raise UserError(f"{where}: a gated repo; accept its terms on the Hub, then `hf auth login` or set "
                        f"HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where}: not a local directory, and the Hub has no such repo (or it is private: "
                        f"`hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: the repo has no revision {hub_id.revision!r}") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise UserError(f"{where}: not a local directory, not in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) and the Hub cannot be reached{offline}") from None
    except HFValidationError as err:
        raise UserError(f"{where}: not a valid repo id ({_first_line(err)})") from None
    except (HfHubHTTPError, OSError) as err:
        raise UserError(f"{where}: download failed ({_first_line(err)})") from None


def _modelscope_snapshot(hub_id: HubId, option: str) -> str:
    where = f"{option} {hub_id}"
    try:  # the module itself: `modelscope.hub.snapshot_download` as an attribute is the function
        snapshot_download = importlib.import_module("modelscope.hub.snapshot_download").snapshot_download
    except ImportError:
        raise UserError(f"{where}: ModelScope ids need the modelscope extra: {install_hint('modelscope')}") from None
    try:
        kwargs = {"revision": hub_id.revision} if hub_id.revision else {}
        return str(snapshot_download(hub_id.repo, ignore_file_pattern=_SKIPPED, **kwargs))
    except Exception as err:  # noqa: BLE001 - modelscope raises plain exceptions (ValueError, HTTPError, ...)
        raise UserError(f"{where}: ModelScope download failed ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(err).__name__)


def resolve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Resolve, in place, every parsed option declared with `type=model_dir` (a hub id becomes its snapshot
    directory); -> {dest: hub id} of the ones that were hub ids (a model card names them), also kept as
    `args.hub_sources`."""
    sources: dict[str, str] = {}
    for action in _model_dir_actions(parser._actions):
        value = getattr(args, action.dest, None)
        if not isinstance(value, str):
            continue
        option = action.option_strings[-1] if action.option_strings else action.dest.upper()
        resolved = resolve_model_dir(value, option)
        if resolved != value:
            sources[action.dest] = value
            setattr(args, action.dest, resolved)
    args.hub_sources = sources
    return sources


def _model_dir_actions(actions: Iterable[argparse.Action]) -> Iterable[argparse.Action]:
    return (a for a in actions if a.type is model_dir)


def is_hub_id(value: str | None) -> bool:
    """True when `value` is a Hugging Face id (`org/name[@rev]`) that is not a local path (a model card links it)."""
    hub_id = parse_hub_id(value or "")
    return hub_id is not None and hub_id.hub == "huggingface"
