"""`minimind push DIR --repo org/name`: upload a model directory (or a run directory's final model) to the Hugging
Face Hub with a model card; `--push-to-hub org/name` on the training verbs does the same at the end of a run.

    minimind push runs/sft --repo me/minimind-sft
    minimind push runs/sft --repo me/minimind-sft --private --revision v1 --commit-message "first SFT"

Uploads go through huggingface_hub (`HfApi.create_repo` + `upload_folder`), so the token is the one of
`hf auth login` or `HF_TOKEN`, and `HF_ENDPOINT` points at a mirror as usual. A run directory's checkpoints,
tracker logs and lock files stay local.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from minimind.card import DEFAULT_LICENSE, CardInfo, write_card
from minimind.errors import UserError

# What a run directory holds besides the model (checkpoints, the tokenized data, tracker logs): never uploaded.
RUN_ONLY = ["checkpoints/*", "prepared/*", ".save-*", ".tmp*", ".minimind.lock", "wandb/*", "swanlog/*",
            "tensorboard/*", "**/__pycache__/*"]
# What one checkpoint upload (--push-every-checkpoint) sends: the weights and what they are, not the optimizer.
CHECKPOINT_FILES = ["model.safetensors", "adapter_model.safetensors", "trainer.json", "manifest.json"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="model directory (or a run directory holding the final model)")
    parser.add_argument("--repo", required=True, help="Hub repository id, org/name (created when missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="branch to push to (created from main when missing; default: main)")
    parser.add_argument("--commit-message", default=None, help="commit message (default: 'Upload <DIR name>')")
    add_card_arguments(parser)


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """The model card flags `push` and the training verbs share."""
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="license in the model card's metadata")
    parser.add_argument("--card-tag", action="append", default=[], metavar="TAG", dest="card_tags",
                        help="extra tag in the model card (repeatable)")
    parser.add_argument("--overwrite-card", action="store_true",
                        help="replace a README.md the directory already has (else it is uploaded as it is)")


def check_repo_id(repo: str, option: str = "--repo") -> None:
    """Refuse a repo id the Hub would refuse, before anything is written or trained."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise UserError(f"{option} {repo!r}: not a valid Hub repo id ({str(err).splitlines()[0]})") from None
    if repo.count("/") != 1:
        raise UserError(f"{option} {repo!r}: expected org/name")


def check_token(option: str) -> None:
    """A Hugging Face token must be configured (`hf auth login` or HF_TOKEN) before a run that will push."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise UserError(f"{option} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    is_model = (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    if not is_model and not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: not a model directory (needs config.json and model.safetensors, or a LoRA "
                        "adapter's adapter_config.json)")


def push_folder(path: str | Path, repo: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, card: CardInfo | None = None,
                overwrite_card: bool = False) -> str:
    """Write the model card (unless the user's README.md is there), create the repo (and branch) if needed and
    upload the directory's model files; -> the commit's URL."""
    path = Path(path)
    _check_model_dir(path)
    check_repo_id(repo)
    write_card(path, card or CardInfo(repo=repo), overwrite=overwrite_card)
    return _upload(path, repo, private, revision, commit_message=commit_message or f"Upload {path.resolve().name}",
                   ignore_patterns=RUN_ONLY)


def push_checkpoint(checkpoint: str | Path, repo: str, private: bool = False, revision: str | None = None) -> str:
    """Upload one training checkpoint's weights under `checkpoints/step-N/` in the repo."""
    checkpoint = Path(checkpoint)
    return _upload(checkpoint, repo, private, revision, path_in_repo=f"checkpoints/{checkpoint.name}",
                   allow_patterns=CHECKPOINT_FILES, commit_message=f"Checkpoint {checkpoint.name}")


def _upload(folder: Path, repo: str, private: bool, revision: str | None, **upload: Any) -> str:
    """Create the repo (and the branch) when missing, then upload `folder` with `upload_folder`'s `upload`
    arguments; -> the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with _hub_errors(repo):
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", revision=revision,
                                 **upload)
    return str(getattr(info, "commit_url", info))


class _hub_errors:
    """Turn the Hub's refusals (no token, no permission, network) into one line naming the repo."""

    def __init__(self, repo: str):
        self.repo = repo

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, _tb) -> bool:
        if err is None:
            return False
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

        if isinstance(err, LocalTokenNotFoundError):
            raise UserError(f"push to {self.repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN") \
                from None
        if isinstance(err, (HfHubHTTPError, OSError)):
            detail = " ".join(str(err).split())[:200]
            raise UserError(f"push to {self.repo}: the Hub refused or could not be reached ({detail})") from None
        return False


def run(args: argparse.Namespace) -> int:
    card = CardInfo(repo=args.repo, license=args.license, tags=list(args.card_tags))
    url = push_folder(args.dir, args.repo, args.private, args.revision, args.commit_message, card,
                      args.overwrite_card)
    print(f"pushed {args.dir} to https://huggingface.co/{args.repo} ({url})")
    return 0
