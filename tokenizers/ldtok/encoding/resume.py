"""What `ldtok encode` does with an existing shard directory: resume it only with the same model and split, or
remove it (`--overwrite`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LdtokError


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "unknown"


def remove_encoded_files(out_dir: Path) -> list[str]:
    """`--overwrite`: delete what `ldtok encode` wrote into `out_dir` (shards, parts, `index.json`, temp files), from
    the last shard backwards (a kill in between leaves a resumable prefix); anything else in it is left alone."""
    from ..shards.manifest import INDEX_NAME, PART_RE, SHARD_RE, TEMP_RE

    if not out_dir.is_dir():
        return []
    removed = []
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # first: a half-removed directory never looks finished
    for p in sorted(out_dir.iterdir(), key=lambda p: p.name, reverse=True):
        if SHARD_RE.match(p.name) or PART_RE.match(p.name) or TEMP_RE.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def check_existing_run(out_dir: Path, *, world_size: int, samples_per_shard: int, model_sha256: str,
                       model_path: str) -> None:  # fmt: skip
    """Refuse, on every rank and before anything is written, to add to shards of another model or another split.

    The model is identified by `tokenizer_sha256` (weights and architecture): a checkpoint of another step with the
    same architecture is another model. (`ShardWriter` checks its own rank's shards; this also catches ranks that
    exist only in the old run or only in the new one, which would otherwise start writing next to shards they can
    never be merged with.)

    Raises:
        `LdtokError` naming both models (hash and path), or both splits, and `--overwrite`.
    """
    from ..shards import ShardWriter
    from ..shards.manifest import PART_RE, SHARD_RE

    if not out_dir.is_dir():
        return
    ranks = {int(m.group(1)) for p in out_dir.iterdir() if (m := PART_RE.match(p.name) or SHARD_RE.match(p.name))}
    for r in sorted(ranks):
        try:
            config = ShardWriter.completed(out_dir, r).config
        except (RuntimeError, ValueError, KeyError) as e:
            raise LdtokError(f"{out_dir}: cannot resume ({e}); rerun with --overwrite to start afresh, or use a new "
                             "--out") from None
        if config is None:  # a part-less rank that wrote nothing yet
            if r >= world_size:
                raise LdtokError(f"{out_dir} holds files of rank {r}; this run has {world_size} process(es): resume "
                                 "with the same settings, pass --overwrite to start afresh, or use a new --out")
            continue
        found_sha = config["metadata"].get("model_sha256")
        if found_sha != model_sha256:
            found_path = config.get("provenance", {}).get("model_path", "path not recorded")
            old = "an ldtok without model hashes" if found_sha is None else f"model {_short(found_sha)}"
            raise LdtokError(
                f"{out_dir} holds shards encoded by {old} ({found_path}); this run's model is "
                f"{_short(model_sha256)} ({model_path}): resume with the same model, or pass --overwrite to remove "
                "the old shards and start afresh (or use a new --out)"
            )
        found = (config["world_size"], config["samples_per_shard"])
        if r >= world_size or found != (world_size, samples_per_shard):
            raise LdtokError(
                f"{out_dir} holds shards of rank {r} written with (world_size, samples_per_shard) = {found}; this run "
                f"has ({world_size}, {samples_per_shard}): resume with the same settings, pass --overwrite to start "
                "afresh, or use a new --out"
            )
