"""Upload an exported tokenizer directory to the Hugging Face Hub.

    ldtok push runs/kl/final user/my-kl-f8

Creates the model repository if needed and uploads the directory (weights, `config.json`, the model card
`README.md`; a minimal card is written first when the directory has none). Authentication is `huggingface_hub`'s
(`HF_TOKEN` or `hf auth login`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ldtok.config_cli import add_config_arguments, config_from_args


@dataclass
class PushOptions:
    """What `ldtok push` uploads, and where.

    Args:
        dir (`str`): an exported model directory (final/ or a checkpoint's diffusers/).
        repo_id (`str`): the Hub repository, user/name.
        private (`bool`, defaults to `False`): create the repository as private.
        message (`str`, defaults to `"Upload ldtok tokenizer"`): the commit message.
    """

    dir: str
    repo_id: str
    private: bool = False
    message: str = "Upload ldtok tokenizer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PushOptions, positional=("dir", "repo_id"))


def run(args: argparse.Namespace) -> int:
    from ldtok.hub import push_to_hub

    options = config_from_args(PushOptions, args, positional=("dir", "repo_id"))
    result = push_to_hub(options.dir, options.repo_id, private=options.private, commit_message=options.message)
    print(f"pushed {result.folder} to {result.repo_id}: {result.url}")
    return 0
