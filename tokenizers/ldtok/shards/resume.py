"""What a rank has already written to a shard directory, and the repair of what was damaged since.

`find_completed` is read-only; `ShardWriter`'s constructor acts on its answer (removes `ResumeState.damaged`, rewrites
the part). The rules, which keep the complete shards of a rank a prefix `0..n-1` of its shard sequence:

- a shard listed in the part manifest counts with the part's record when its file has the listed size (and, with
  `check_sha256`, the listed sha256); the first listed shard that fails is *damaged*: it and every later shard of the
  rank are re-encoded (shards are written in order, so a prefix is what resuming can continue from);
- a shard on disk but not in the part (a kill between the rename and the part update) is rebuilt from its header;
- listed shards missing on disk form a tail (repairs delete from the last shard backwards), and are re-encoded;
- a damaged part (`DamagedPartError`) is ignored and every shard is rebuilt from its header: the part is a cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import (
    DamagedPartError,
    ShardRecord,
    list_shard_files,
    part_name,
    read_part,
    read_shard_header,
    sha256_file,
)


@dataclass
class ResumeState:
    """What a rank has already written, as found on disk by `find_completed` (`ShardWriter.completed`).

    Args:
        rank (`int`): the rank.
        shards (`list[ShardRecord]`): complete shards, in order `0..n-1`.
        num_items (`int`): items of the rank's sequence covered by them (samples + skipped); resume from here.
        num_samples (`int`): samples stored in them.
        finished (`bool`): the rank closed (its sequence was exhausted); nothing is left to add.
        recovered (`list[str]`): shard files found on disk but missing from the part manifest (rebuilt from headers).
        config (`dict`, *optional*): `kind`, `world_size`, `samples_per_shard`, `metadata`, `codebook_size`,
            `fields`, `captions` and `provenance` of the run that wrote them (`None` if nothing was written).
        damaged (`list[str]`): shard files on disk to re-encode: the first one whose size or sha256 does not match
            the part, and every later one of the rank.
        problems (`list[str]`): why (one line each: a damaged shard or part, listed shards missing on disk).
    """

    rank: int
    shards: list[ShardRecord]
    num_items: int
    num_samples: int
    finished: bool
    recovered: list[str]
    config: dict | None
    damaged: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _config_from_part(part: dict) -> dict:
    config = {key: part[key] for key in ("kind", "world_size", "samples_per_shard", "metadata", "fields",
                                         "codebook_size", "captions")}  # fmt: skip
    config["provenance"] = part.get("provenance") or {}
    return config


def _config_from_header(meta: dict[str, str], writer_keys: frozenset[str]) -> dict:
    return {
        "kind": meta["kind"],
        "world_size": int(meta["world_size"]),
        "samples_per_shard": int(meta["samples_per_shard"]),
        "metadata": {k: v for k, v in meta.items() if k not in writer_keys},
        "fields": json.loads(meta["fields"]) or None,  # {} when the shard holds only skipped items
        "captions": "captions" in meta if meta["fields"] != "{}" else None,
        "codebook_size": int(meta["codebook_size"]) if "codebook_size" in meta else None,
        "provenance": json.loads(meta.get("provenance", "{}")),
    }


def _listed_shard_ok(path: Path, rec: ShardRecord, *, check_sha256: bool) -> str | None:
    """Why a listed shard cannot be kept (`None` if it can)."""
    size = os.path.getsize(path)
    if size != rec.num_bytes:
        return f"{path.name}: {size} bytes, its part says {rec.num_bytes}"
    if check_sha256 and sha256_file(path) != rec.sha256:
        return f"{path.name}: sha256 mismatch (damaged)"
    return None


def find_completed(out_dir: str | os.PathLike, rank: int, *, writer_keys: frozenset[str],
                   check_sha256: bool = False) -> ResumeState:  # fmt: skip
    """The complete shards of `rank` in `out_dir` (read-only; see the module docstring for the rules).

    Args:
        out_dir (`str` or `PathLike`): the shard directory.
        rank (`int`): the rank.
        writer_keys (`frozenset[str]`): shard metadata keys that are the writer's, not the caller's metadata.
        check_sha256 (`bool`, defaults to `False`): hash every listed shard (reads them all) instead of trusting
            their sizes.

    Raises:
        `RuntimeError` if the shards on disk are not a prefix `0..n-1`, or a shard short of `samples_per_shard`
        items is not the last one: states no crash can produce.
    """
    out_dir = Path(out_dir)
    problems: list[str] = []
    try:
        part = read_part(out_dir, rank) if out_dir.exists() else None
    except DamagedPartError as e:
        part = None
        problems.append(f"{e}: rebuilt from the shard headers")
    on_disk = sorted((k, name) for (r, k), name in list_shard_files(out_dir).items() if r == rank) \
        if out_dir.exists() else []  # fmt: skip
    if [k for k, _ in on_disk] != list(range(len(on_disk))):
        raise RuntimeError(f"{out_dir}: shards of rank {rank} are not contiguous: {[n for _, n in on_disk]}")
    listed = {s["file"]: ShardRecord(**s) for s in (part["shards"] if part else [])}
    lost = sorted(set(listed) - {name for _, name in on_disk})
    if lost:
        problems.append(f"shards {lost} are listed in {part_name(rank)} but missing on disk: re-encoding them")
    config = _config_from_part(part) if part is not None else None
    records: list[ShardRecord] = []
    recovered: list[str] = []
    damaged: list[str] = []
    for _, name in on_disk:
        if damaged:
            damaged.append(name)
            continue
        rec = listed.get(name)
        if rec is not None:
            why = _listed_shard_ok(out_dir / name, rec, check_sha256=check_sha256)
            if why is not None:
                problems.append(why + ": re-encoding it and the later shards of its rank")
                damaged.append(name)
                continue
        else:
            try:
                rec = ShardRecord.from_shard_file(out_dir / name)
                meta = read_shard_header(out_dir / name).metadata
            except (ValueError, KeyError) as e:  # an unlisted shard damaged after it was written
                problems.append(f"{name}: unreadable header ({e}): re-encoding it and the later shards of its rank")
                damaged.append(name)
                continue
            recovered.append(name)
            if config is None:
                config = _config_from_header(meta, writer_keys)
            elif config["fields"] is None and meta["fields"] != "{}":  # the part predates the first full shard
                config.update(fields=json.loads(meta["fields"]), captions="captions" in meta)
        records.append(rec)
    S = config["samples_per_shard"] if config else 0
    short = [r.file for r in records[:-1] if r.num_items != S]
    if short:
        raise RuntimeError(f"{out_dir}: shards {short} hold fewer than {S} items but are not rank {rank}'s last")
    intact = not (lost or damaged)
    finished = intact and (bool(part and part["finished"]) or bool(records and records[-1].num_items < S))
    return ResumeState(rank=rank, shards=records, num_items=sum(r.num_items for r in records),
                       num_samples=sum(r.num_samples for r in records), finished=finished, recovered=recovered,
                       config=config, damaged=damaged, problems=problems)  # fmt: skip
