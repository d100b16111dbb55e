"""Which model a shard directory was encoded with: `resolve_model(shard_dir, model=None)`.

`index.json` records the model by a path relative to the shard directory (`model.relative_path`, so a shard directory
moved together with its model still finds it), its absolute path as a hint (`model.path`) and its weights hash
(`model_sha256`, `ldtok.models.loading.tokenizer_sha256`). `resolve_model` returns the first of these paths that
holds a model with that hash, or the explicitly given model if its hash matches; a moved, missing or changed model
is a one-line `LdtokError` naming the path, the expected hash and the fix. `ldtok decode` and the priors use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LdtokError
from .manifest import load_manifest


class ModelMismatchError(LdtokError):
    """The shards' model cannot be found, or the model found has other weights than the encoder's."""


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "unknown"


def recorded_model_paths(shard_dir: str | os.PathLike, manifest: dict) -> list[Path]:
    """The model paths `index.json` records, in the order they are tried: relative to `shard_dir`, then absolute."""
    info = manifest.get("model") or {}
    paths = []
    if info.get("relative_path"):
        paths.append((Path(shard_dir) / info["relative_path"]).resolve())
    if info.get("path"):
        paths.append(Path(info["path"]).expanduser())
    return list(dict.fromkeys(paths))


def resolve_model(shard_dir: str | os.PathLike, model: str | os.PathLike | None = None, *,
                  manifest: dict | None = None) -> Path:
    """The model directory the shards in `shard_dir` were encoded with.

    Args:
        shard_dir (`str` or `PathLike`): a shard directory with an `index.json`.
        model (`str` or `PathLike`, *optional*): an explicit model directory (`--model`), used instead of the
            recorded paths; its weights hash must still match.
        manifest (`dict`, *optional*): `index.json`, if already read.

    Returns:
        `Path`: the model directory (a training checkpoint resolved to its `diffusers/` export).

    Raises:
        `ModelMismatchError` (an `LdtokError`, one line): no recorded path holds a model, or the model there (or the
        explicit one) has weights other than the encoder's; the message names the path, the expected hash and the fix.
    """
    from ..models.loading import checkpoint_model_dir, tokenizer_sha256

    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    expected = manifest["metadata"].get("model_sha256") or (manifest.get("model") or {}).get("sha256")
    candidates = [Path(model).expanduser().resolve()] if model is not None else recorded_model_paths(shard_dir,
                                                                                                    manifest)
    changed = []
    for candidate in candidates:
        model_dir = checkpoint_model_dir(candidate)
        if not (model_dir / "config.json").is_file():
            continue
        found = tokenizer_sha256(model_dir)
        if expected is None or found == expected:
            return model_dir
        changed.append(f"{model_dir} has model sha256 {_short(found)}")
    where = " or ".join(str(p) for p in candidates) or "no recorded path"
    fix = "pass --model DIR with the model the shards were encoded with, or re-encode the shards with this model"
    if changed:
        raise ModelMismatchError(f"{shard_dir} was encoded with model sha256 {_short(expected)}, but "
                                 f"{'; '.join(changed)} (changed or replaced weights): {fix}")
    raise ModelMismatchError(f"{shard_dir} was encoded with model sha256 {_short(expected)}, and no model is at "
                             f"{where} (moved or deleted?): {fix}")


__all__ = ["ModelMismatchError", "recorded_model_paths", "resolve_model"]
