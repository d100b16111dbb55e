"""Training checkpoints: `accelerator.save_state` for exact resume, plus a diffusers directory in every checkpoint.

Layout of `output_dir/checkpoints/step_00000400/`:
    model.safetensors, optimizer.bin, ...  Accelerate's state (models, optimizers, per-rank RNG)
    diffusers/                             the model as a diffusers directory (`from_pretrained`-able)
    ema.safetensors                        the model-weight EMA, when enabled
    trainer_state.json                     step, data position, counters

A checkpoint is written to `.step_XXXXXXXX.tmp` and renamed once every file is in place, so a run that dies while
saving never leaves a checkpoint that `resume=latest` would pick up half-written. Nothing here is unpickled on load
beyond what Accelerate loads with `weights_only=True`; our own state is JSON and safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from .atomic import write_text_atomic

_NAME = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `None` (fresh run), `"latest"` (the newest in this run, or a fresh run when
    there is none yet) or a checkpoint directory's path (must exist)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"resume={resume!r}: not a complete ldtok checkpoint (no {TRAINER_STATE} in it)")
    return path


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    *,
    step: int,
    trainer_state: dict,
    write_extra: Callable[[Path], None],
    keep: int,
) -> Path:
    """Save a complete checkpoint for `step` (collective: every rank calls it) and keep the newest `keep`.

    Args:
        write_extra (`Callable[[Path], None]`): called on the main process with the temporary directory, to add the
            diffusers export and other files before the checkpoint is published.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_extra(tmp)
        write_text_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[: max(0, len(list_checkpoints(output_dir)) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
