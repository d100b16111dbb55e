"""Writing diffusers model directories so that a crash never leaves a half-written one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusers import ModelMixin


def save_pretrained_atomic(model: ModelMixin, path: str | os.PathLike) -> Path:
    """`model.save_pretrained(path)` (safetensors) through a temporary directory and a rename.

    An existing directory at `path` is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
