"""Upload an exported tokenizer directory to the Hugging Face Hub.

    ldtok push runs/kl/final user/my-kl-f8

Creates the model repository if needed and uploads the directory (weights, `config.json`, the model card
`README.md`; a minimal card is written first when the directory has none). Authentication is `huggingface_hub`'s
(`HF_TOKEN` or `hf auth login`).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="an exported model directory (final/ or a checkpoint's diffusers/)")
    parser.add_argument("repo_id", help="the Hub repository, user/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--message", default="Upload ldtok tokenizer", help="the commit message")


def run(args: argparse.Namespace) -> int:
    from ldtok.hub import push_to_hub

    result = push_to_hub(args.dir, args.repo_id, private=args.private, commit_message=args.message)
    print(f"pushed {result.folder} to {result.repo_id}: {result.url}")
    return 0
