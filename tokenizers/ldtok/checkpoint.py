"""Training checkpoints, whole or absent: `accelerator.save_state` for exact resume, plus a diffusers directory.

Layout of `output_dir/checkpoints/step_00000400/`:
    model.safetensors, optimizer.bin, ...  Accelerate's state (models, optimizers, per-rank RNG)
    diffusers/                             the model as a diffusers directory (`from_pretrained`-able)
    ema.safetensors                        the model-weight EMA, when enabled
    trainer_state.json                     step, data position, counters
    manifest.json                          every other file with its size and sha256, written last

A checkpoint is written to `.step_XXXXXXXX.tmp`, its manifest last, and renamed once every file is in place. It counts
as whole only when its manifest is present and every file it lists has the recorded size (and, when resuming, the
recorded sha256): a run killed while saving, a truncated file or a flipped byte never passes for a checkpoint.
Rotation renames an old checkpoint to `.step_XXXXXXXX.deleting` before deleting it, so a kill mid-deletion leaves a
name `remove_leftovers` cleans up at the next start, never a half-deleted `step_*` directory. Nothing here is
unpickled on load beyond what Accelerate loads with `weights_only=True`; our own state is JSON and safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from .atomic import write_text_atomic
from .errors import DiskFullError, LdtokError, disk_full_error

logger = logging.getLogger("ldtok.checkpoint")

_NAME = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
# Left by interrupted writes, rotations and exports (ldtok.atomic and save_pretrained_atomic use `.NAME.tmp-PID`).
_LEFTOVER_CHECKPOINTS = re.compile(r"^\.step_\d{8}\.(tmp|deleting)$")
_LEFTOVER_OUTPUTS = re.compile(r"^\..+\.(tmp|old)-\d+$")


class CheckpointError(LdtokError):
    """A checkpoint that cannot be resumed from: missing, incomplete or damaged (the message names the file)."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(output_dir: str | Path) -> list[Path]:
    """Every `step_*` directory, whole or not, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(path: Path) -> Path:
    """Record every file under checkpoint directory `path` (size, sha256) in `path/manifest.json`, atomically."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[file.relative_to(path).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    return write_text_atomic(path / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def checkpoint_problem(path: Path, *, checksums: bool) -> str | None:
    """Why checkpoint directory `path` is not whole (a phrase naming the file), or `None` when it is.

    Args:
        checksums (`bool`): also compare every file's sha256 (reads everything), not only its presence and size.
    """
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        entries = [(rel, int(entry["size"]), str(entry["sha256"])) for rel, entry in files.items()]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its writing was interrupted, or an older ldtok wrote it)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is damaged"
    for rel, size, sha256 in entries:
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing (listed in {MANIFEST})"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes, {MANIFEST} recorded {size} (truncated or overwritten)"
        if checksums and _sha256(file) != sha256:
            return f"{rel} does not match its sha256 in {MANIFEST} (the file is damaged)"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Whole checkpoints (manifest present, every file of the recorded size), oldest first."""
    return [p for p in step_dirs(output_dir) if checkpoint_problem(p, checksums=False) is None]


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete what interrupted checkpoint writes, rotations and exports left behind; returns what was removed.

    Call it on the main process at startup, before any writer of this run exists.
    """
    out = Path(output_dir)
    candidates = []
    if checkpoint_dir(out).is_dir():
        candidates += [p for p in checkpoint_dir(out).iterdir() if _LEFTOVER_CHECKPOINTS.match(p.name)]
    if out.is_dir():
        candidates += [p for p in out.iterdir() if _LEFTOVER_OUTPUTS.match(p.name)]
    for path in candidates:
        logger.info("removing %s, left by an interrupted write", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return candidates


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, checksums verified.

    Args:
        resume (`str`, *optional*): `None` (a fresh run), `"latest"` (the newest whole checkpoint of this run, damaged
            ones skipped with a warning; a fresh run when there is none yet) or a checkpoint directory's path.

    Raises:
        `CheckpointError`: `resume=PATH` is not a whole checkpoint, or `latest` finds only damaged ones.
    """
    if resume is None:
        return None
    if resume == "latest":
        damaged = []
        for path in reversed(step_dirs(output_dir)):
            problem = checkpoint_problem(path, checksums=True)
            if problem is None:
                return path
            logger.warning("resume=latest: skipping the damaged checkpoint %s: %s", path, problem)
            damaged.append(f"{path.name}: {problem}")
        if damaged:
            raise CheckpointError(f"resume=latest: {checkpoint_dir(output_dir)} holds no whole checkpoint "
                                  f"({'; '.join(damaged)}); delete them to start afresh")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume}: no such checkpoint directory")
    problem = checkpoint_problem(path, checksums=True)
    if problem is not None:
        raise CheckpointError(f"resume={resume}: not a whole checkpoint: {problem}; resume from another one "
                              "(resume=latest picks the newest whole one)")
    return path


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint, on the CPU (`load_state_dict` then copies to the model's device: a device
    string such as `cpu:0`, which a multi-process CPU run has, is not one safetensors accepts)."""
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError (header, truncation) or OSError
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _disk_full(error: BaseException, path: Path) -> DiskFullError | None:
    """A `DiskFullError` when `error` (or its cause) is the disk filling up, whatever layer reported it: an OSError
    (ENOSPC), safetensors' `IoError(... StorageFull ...)` or torch.save's `basic_ios::clear: iostream error`."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            full = disk_full_error(seen, seen.filename or path)
            if full is not None:
                return full
        text = str(seen)
        if "No space left" in text or "StorageFull" in text or "os error 28" in text:
            return disk_full_error(OSError(28, text), path)
        if "iostream error" in text or "file write failed" in text:
            try:
                st = os.statvfs(path.parent)
            except OSError:
                return None
            if st.f_bavail * st.f_frsize < 64 << 20:  # torch.save does not say why; a near-empty disk is why
                return disk_full_error(OSError(28, text), path)
        seen = seen.__cause__ or seen.__context__
    return None


def _delete(path: Path) -> None:
    """Rename out of the way first, then delete: a kill in between leaves a leftover, not a half checkpoint."""
    trash = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    *,
    step: int,
    trainer_state: dict,
    write_extra: Callable[[Path], None],
    keep: int,
) -> Path:
    """Save a whole checkpoint for `step` (collective: every rank calls it) and keep the newest `keep` whole ones.

    Args:
        write_extra (`Callable[[Path], None]`): called on the main process with the temporary directory, to add the
            diffusers export and other files before the manifest is written and the checkpoint published.

    Raises:
        `DiskFullError`: the disk filled up; the temporary directory of the failed write was removed.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            write_extra(tmp)
            write_text_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
    except BaseException as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the space of a failed write is given back now
        full = _disk_full(e, tmp)
        if full is not None:
            raise full from e
        raise
    accelerator.wait_for_everyone()  # every rank's files (its RNG state) are in place before the manifest
    if accelerator.is_main_process:
        try:
            write_manifest(tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            full = _disk_full(e, tmp)
            if full is not None:
                raise full from e
            raise
        if final.exists():
            _delete(final)
        tmp.rename(final)
        whole = list_checkpoints(output_dir)  # includes `final`; older damaged ones are left alone (and warned of)
        for old in whole[: max(0, len(whole) - keep)]:
            _delete(old)
    accelerator.wait_for_everyone()
    return final
