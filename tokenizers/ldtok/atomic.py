"""Files that are never half-written: write a temporary file next to the target, then rename it over the target.

The one atomic writer of ldtok (shards, part manifests, `index.json`, reports, configs): the data is fsynced
before the rename and the directory after it, so the new name survives a power cut. A failed write removes its
temporary file, and a full disk is reported as `DiskFullError` ("disk full while writing <path>"), not a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import disk_full_error


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name `path` is written under before being renamed into place: `.NAME.tmp-PID`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_and_sync(f, data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """fsync the directory so the rename itself survives a power cut (a kill -9 cannot undo it anyway)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms / filesystems cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through `.NAME.tmp-PID` in the same folder and `os.replace` (the file has the usual
    umask permissions). A crash leaves either the old file or the new one, never a mix; a failure removes the
    temporary file.

    Raises:
        `DiskFullError` (an `LdtokError`) naming `path` when the disk or quota is full; other `OSError`s as they are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            _write_and_sync(f, data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(e, path) if isinstance(e, OSError) else None
        if full is not None:
            raise full from e
        raise
    fsync_dir(path.parent)
    return path


def sync_tree(directory: str | os.PathLike) -> None:
    """fsync every file under `directory` and every folder in it (bottom-up), before the tree is renamed into place
    (`ldtok.models.export.save_pretrained_atomic`): after the rename and a power cut the files are complete."""
    directory = Path(directory)
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int = 1) -> Path:
    """`obj` as JSON (and a final newline) at `path`, atomically (`write_bytes_atomic`)."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())
