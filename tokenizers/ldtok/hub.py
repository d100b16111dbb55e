"""Uploading an exported tokenizer directory to the Hugging Face Hub (`ldtok push`, `train.push_to_hub`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LdtokError
from .model_card import CARD_NAME, write_model_card


@dataclass
class PushResult:
    """What `push_to_hub` uploaded.

    Args:
        repo_id (`str`): the Hub repository.
        folder (`Path`): the local directory that was uploaded.
        url (`str`): the commit URL the Hub returned (or the repository URL).
    """

    repo_id: str
    folder: Path
    url: str


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload ldtok tokenizer") -> PushResult:
    """Create `repo_id` (a model repository, if it does not exist) and upload `folder` to it.

    The folder must be a model directory (`config.json`); one without a `README.md` gets a minimal model card first,
    so that the Hub page says what the model is and how to load it.

    Args:
        folder (`str` or `PathLike`): an exported directory, e.g. `runs/kl/final` or a checkpoint's `diffusers/`.
        repo_id (`str`): `"user/name"` on the Hub.
        private (`bool`, defaults to `False`): create the repository as private.
        token (`str`, *optional*): a Hub token; by default `huggingface_hub`'s login (`HF_TOKEN`, `hf auth login`).
        commit_message (`str`): the upload's commit message.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LdtokError(f"{folder} is not an exported model directory (no config.json); push final/ or a "
                         "checkpoint's diffusers/ directory")
    if "/" not in repo_id or repo_id.count("/") > 1:
        raise LdtokError(f"hub repo id {repo_id!r} must look like 'user/name'")
    if not (folder / CARD_NAME).is_file():
        write_model_card(folder, repo_id=repo_id)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=commit_message)
    except OSError as error:  # requests' ConnectionError and huggingface_hub's HTTP errors are OSErrors
        cause = " ".join(str(error).split())
        raise LdtokError(f"uploading {folder} to the Hub as {repo_id} failed: {cause}") from error
    return PushResult(repo_id=repo_id, folder=folder, url=str(getattr(commit, "commit_url", commit)))


__all__ = ["PushResult", "push_to_hub"]
