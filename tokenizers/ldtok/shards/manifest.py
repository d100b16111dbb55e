"""On-disk layout of a latent-shard directory: names, atomic writes, per-rank parts, `index.json` and `verify`.

`verify` (checking a whole directory) lives in `verify.py`. A directory written by `ShardWriter` holds

- `shard-r{rank:02d}-{k:05d}.safetensors`: the shards (see `writer.py` for what is inside);
- `part-r{rank:02d}.json`: each rank's part manifest, rewritten atomically after every shard and on `close()`;
- `index.json`: the merged manifest, written once by `write_manifest` after every rank has closed.

Every file is written by `ldtok.atomic` (`.{name}.tmp-{pid}` in the same directory, fsynced, `os.replace`d,
the directory fsynced), so a final name
always holds a complete file; a crash leaves at most temp files behind, which the next writer of that rank removes and
`verify` reports.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors
import torch

from ..atomic import write_json_atomic
from ..latent_kinds import latent_kind
from .stats import ChannelStats

FORMAT_VERSION = "1"
INDEX_NAME = "index.json"
SHARD_RE = re.compile(r"^shard-r(\d{2,})-(\d{5,})\.safetensors$")
PART_RE = re.compile(r"^part-r(\d{2,})\.json$")
TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")

# safetensors dtype codes -> torch dtype names used in "fields"
SAFETENSORS_DTYPES = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "I64": "int64",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ names and writes
def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:02d}-{index:05d}.safetensors"


def part_name(rank: int) -> str:
    return f"part-r{rank:02d}.json"




def sha256_file(path: Path, *, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def remove_temp_files(out_dir: Path, prefix: str) -> list[str]:
    """Delete temp files `.{prefix}*.tmp-{pid}` (a dead run's leftovers); returns the removed names."""
    removed = []
    for p in Path(out_dir).iterdir():
        if TEMP_RE.match(p.name) and p.name.startswith("." + prefix):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def list_shard_files(out_dir: Path) -> dict[tuple[int, int], str]:
    """All final shard files of a directory, keyed by `(rank, index)`."""
    found = {}
    for p in Path(out_dir).iterdir():
        m = SHARD_RE.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p.name
    return found


# ------------------------------------------------------------------------------------------------ shard headers
@dataclass
class ShardHeader:
    """The parsed header of a safetensors shard (no tensor data is read).

    Args:
        metadata (`dict[str, str]`): the `__metadata__` text map.
        tensors (`dict[str, dict]`): per tensor `{"dtype": torch dtype name, "shape": list[int]}`.
    """

    metadata: dict[str, str]
    tensors: dict[str, dict]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse a safetensors header and check that every tensor's byte range lies inside the file.

    Raises:
        `ValueError` if the header is malformed or the file is truncated.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file size {size}")
        header = json.loads(f.read(n))
    data_bytes = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_bytes:
            raise ValueError(f"tensor {name!r} data [{begin}, {end}) outside the {data_bytes} data bytes")
        tensors[name] = {"dtype": SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]), "shape": list(info["shape"])}
    return ShardHeader(metadata=metadata, tensors=tensors)


@dataclass
class ShardRecord:
    """One completed shard, as listed in part manifests (and, without `stats`, in `index.json`).

    Args:
        file (`str`): file name inside the shard directory.
        rank (`int`), index (`int`): the writing rank and the shard's number `k` within that rank.
        num_samples (`int`): rows stored.
        num_skipped (`int`): items of the rank's sequence this shard covers but could not encode (ids in metadata
            `"skipped"`); `num_samples + num_skipped` items of the rank's sequence are covered.
        sha256 (`str`): hex digest of the file bytes.
        num_bytes (`int`): file size.
        ids_first (`str`, *optional*), ids_last (`str`, *optional*): first and last sample id (`None` if empty).
        stats (`dict`, *optional*): `ChannelStats.state_dict()` of this shard's posterior (KL only).
    """

    file: str
    rank: int
    index: int
    num_samples: int
    num_skipped: int
    sha256: str
    num_bytes: int
    ids_first: str | None
    ids_last: str | None
    stats: dict | None = None

    @property
    def num_items(self) -> int:
        return self.num_samples + self.num_skipped

    def to_json(self, *, with_stats: bool = True) -> dict:
        d = asdict(self)
        if not with_stats:
            d.pop("stats")
        return d

    @classmethod
    def from_shard_file(cls, path: Path) -> ShardRecord:
        """Rebuild the record of a complete shard from its own header and bytes (crash recovery)."""
        path = Path(path)
        meta = read_shard_header(path).metadata
        ids = json.loads(meta["ids"])
        return cls(
            file=path.name,
            rank=int(meta["rank"]),
            index=int(meta["shard_index"]),
            num_samples=len(ids),
            num_skipped=len(json.loads(meta.get("skipped", "[]"))),
            sha256=sha256_file(path),
            num_bytes=os.path.getsize(path),
            ids_first=ids[0] if ids else None,
            ids_last=ids[-1] if ids else None,
            stats=json.loads(meta["stats"]) if "stats" in meta else None,
        )


# ------------------------------------------------------------------------------------------------ parts
PART_KEYS = ("kind", "world_size", "samples_per_shard", "metadata", "codebook_size", "fields", "captions", "rank",
             "finished", "shards")


def part_checksum(part: dict) -> str:
    """sha256 of a part manifest's content (every key but `checksum`, canonical JSON; floats round-trip exactly)."""
    body = {k: v for k, v in part.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class DamagedPartError(ValueError):
    """A part manifest that does not parse, lacks keys, or whose checksum does not match its content."""


def read_part(out_dir: Path, rank: int) -> dict | None:
    """The part manifest of `rank` (`None` if there is none).

    Raises:
        `DamagedPartError` naming the file if it does not parse, lacks a key, or fails its checksum (parts written
        before checksums existed have none and are accepted).
    """
    path = Path(out_dir) / part_name(rank)
    if not path.exists():
        return None
    try:
        part = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedPartError(f"{path}: does not parse ({e})") from None
    missing = [k for k in PART_KEYS if not isinstance(part, dict) or k not in part]
    if missing:
        raise DamagedPartError(f"{path}: missing keys {missing}")
    if "checksum" in part and part["checksum"] != part_checksum(part):
        raise DamagedPartError(f"{path}: checksum mismatch (the file was damaged or edited)")
    return part


def write_part(out_dir: Path, part: dict) -> None:
    part = {k: v for k, v in part.items() if k != "checksum"}
    write_json_atomic(Path(out_dir) / part_name(part["rank"]), {**part, "checksum": part_checksum(part)})


# ------------------------------------------------------------------------------------------------ index.json
def write_manifest(
    out_dir: str | os.PathLike,
    *,
    model: dict,
    stats: dict | None = None,
    extra: dict | None = None,
    latent_convention: str = "sd",
) -> dict:
    """Merge every rank's part manifest into `index.json` (atomically). Call once, on one process, after all ranks
    have called `ShardWriter.close()` (e.g. after `accelerator.wait_for_everyone()`, on the main process).

    Args:
        out_dir (`str` or `PathLike`): the shard directory.
        model (`dict`): model information, e.g. `{"path": ..., "config_sha256": ..., "class": ...}`; its
            `config_sha256`, if given, must equal the shards' `model_config_sha256` metadata.
        stats (`dict`, *optional*): latent statistics, e.g. `ChannelStats.result()`. If `None` and the shards are KL,
            the per-shard posterior statistics recorded by the writer are merged (see `stats.py`); VQ kinds get none.
        extra (`dict`, *optional*): anything else JSON-able to record (dataset name, split, command line, ...).
        latent_convention (`"sd"` or `"sd3"`, defaults to `"sd"`): how the merged KL statistics state
            `scaling_factor` / `shift_factor` (see `ChannelStats.result`); readers apply them as
            `(z - (shift_factor or 0)) * scaling_factor`.

    Returns:
        The manifest `dict` that was written.

    Raises:
        `RuntimeError` if a rank's part is missing or not closed, or parts disagree.
    """
    out_dir = Path(out_dir)
    remove_temp_files(out_dir, INDEX_NAME)
    parts = _read_parts(out_dir)
    world_size, fields = _check_parts(out_dir, parts)
    first = parts[0]
    metadata = first["metadata"]
    for key, shard_key in (("config_sha256", "model_config_sha256"), ("sha256", "model_sha256")):
        declared = model.get(key), metadata.get(shard_key)
        if None not in declared and declared[0] != declared[1]:
            raise RuntimeError(f"model {key} {declared[0]} != shards' {shard_key} {declared[1]}")
    records = [ShardRecord(**s) for r in sorted(parts) for s in parts[r]["shards"]]
    if stats is None and latent_kind(first["kind"]).gaussian:
        stats = _merged_shard_stats(records, latent_convention)
    manifest = {
        "ldtok_format": FORMAT_VERSION,
        "kind": first["kind"],
        "fields": fields,
        "captions": any(bool(part["captions"]) for part in parts.values()),
        "codebook_size": first["codebook_size"],
        "metadata": metadata,
        "samples_per_shard": first["samples_per_shard"],
        "world_size": world_size,
        "totals": {
            "num_samples": sum(r.num_samples for r in records),
            "num_skipped": sum(r.num_skipped for r in records),
            "num_shards": len(records),
            "num_bytes": sum(r.num_bytes for r in records),
        },
        "shards": [r.to_json(with_stats=False) for r in records],
        "model": model,
        "stats": stats,
        "extra": extra or {},
        "created": {
            "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "python": platform.python_version(),
        },
    }
    write_json_atomic(out_dir / INDEX_NAME, manifest)
    return manifest


def _read_parts(out_dir: Path) -> dict[int, dict]:
    """Every rank's part manifest, by rank (`RuntimeError` for a damaged one, or none at all)."""
    parts = {}
    for p in out_dir.iterdir():
        m = PART_RE.match(p.name)
        if m:
            try:
                parts[int(m.group(1))] = read_part(out_dir, int(m.group(1)))
            except DamagedPartError as e:
                raise RuntimeError(f"{e}: rerun the encode command, which rebuilds it from the shards") from None
    if not parts:
        raise RuntimeError(f"no part manifests in {out_dir}: did any ShardWriter close()?")
    return parts


def _check_parts(out_dir: Path, parts: dict[int, dict]) -> tuple[int, dict | None]:
    """`(world_size, fields)` of parts that are complete (every rank, all closed) and agree with each other."""
    world_size = parts[min(parts)]["world_size"]
    missing = [r for r in range(world_size) if r not in parts]
    unfinished = [r for r, part in sorted(parts.items()) if not part["finished"]]
    if missing or unfinished or max(parts) >= world_size:
        raise RuntimeError(
            f"cannot merge {out_dir}: world_size {world_size}, missing parts of ranks {missing}, "
            f"ranks not closed {unfinished}, ranks present {sorted(parts)}"
        )
    first = parts[0]
    fields = None
    for r, part in sorted(parts.items()):
        for key in ("kind", "world_size", "samples_per_shard", "metadata", "codebook_size"):
            if part[key] != first[key]:
                raise RuntimeError(f"part of rank {r} has {key}={part[key]!r}, rank 0 has {first[key]!r}")
        if part["fields"] is not None:  # a rank that stored no sample has no fields
            if fields is not None and part["fields"] != fields:
                raise RuntimeError(f"part of rank {r} has fields {part['fields']}, another rank {fields}")
            fields = part["fields"]
    return world_size, fields


def _merged_shard_stats(records: list[ShardRecord], convention: str) -> dict | None:
    """The per-shard posterior statistics the writer recorded, merged (`None` with fewer than 2 values)."""
    merged = None
    for rec in records:
        if rec.stats is not None and rec.stats["count"] > 0:
            s = ChannelStats.from_state_dict(rec.stats)
            merged = s if merged is None else merged.merge(s)
    if merged is None or merged.count <= 1:
        return None
    source = "posterior (expected moments of mean + std * eps, per-shard merge)"
    return merged.result(convention=convention) | {"source": source}


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """Read `index.json` of a shard directory (keys as written by `write_manifest`)."""
    path = Path(out_dir) / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run write_manifest after all ranks closed their writers")
    manifest = json.loads(path.read_text())
    if manifest.get("ldtok_format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported ldtok_format {manifest.get('ldtok_format')!r}")
    return manifest
