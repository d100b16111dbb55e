"""Writing diffusers model directories so that a crash never leaves a half-written one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from diffusers import ModelMixin

from ..atomic import fsync_dir, sync_tree
from ..model_card import CARD_NAME, render_model_card


def save_pretrained_atomic(model: ModelMixin, path: str | os.PathLike, *, extra_files: dict[str, str] | None = None
                           ) -> Path:
    """`model.save_pretrained(path)` (safetensors) through a temporary directory and a rename.

    An existing directory at `path` is replaced only once the new one is complete. `extra_files` (name -> text) are
    written into the directory too (e.g. `ldtok.json`, what diffusers' config has no key for), after a minimal model
    card `README.md` (`ldtok.model_card`), which `extra_files` may replace.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    # A minimal model card from config.json; the trainer rewrites it with the run's data, steps and metrics.
    (tmp / CARD_NAME).write_text(render_model_card(json.loads((tmp / "config.json").read_text())))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    sync_tree(tmp)  # the files reach the disk before the rename makes them the export (as ldtok.atomic's files)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def config_sha256(config: Mapping) -> str:
    """A stable hash of a model's architecture config (diffusers' bookkeeping keys `_*` left out, and the latent
    statistics, which are measured after training and do not change what the weights compute)."""
    skip = {"scaling_factor", "shift_factor", "latents_mean", "latents_std"}
    plain = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in skip}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()
