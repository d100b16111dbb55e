"""`verify`: check a latent-shard directory end to end; every problem is one line, nothing raises on damaged files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LdtokError
from ..latent_kinds import stored_latent
from .manifest import (
    FORMAT_VERSION,
    PART_RE,
    SHARD_RE,
    TEMP_RE,
    DamagedPartError,
    load_manifest,
    read_part,
    read_shard_header,
    sha256_file,
)

# what `index.json` must hold for the checks to run: key -> type
INDEX_KEYS = {"kind": str, "fields": (dict, type(None)), "metadata": dict, "totals": dict, "shards": list}
RECORD_KEYS = {"file": str, "rank": int, "index": int, "num_samples": int, "num_skipped": int, "sha256": str,
               "num_bytes": int, "ids_first": (str, type(None)), "ids_last": (str, type(None))}  # fmt: skip
TOTALS_KEYS = ("num_samples", "num_shards")


@dataclass
class VerifyReport:
    """Result of `verify`.

    Args:
        ok (`bool`): no problem found.
        problems (`list[str]`): one line per problem (duplicate ids are capped at 20 lines plus a count).
        num_samples (`int`): samples in the shards that could be read.
        num_shards (`int`): shards listed in `index.json`.
        num_bytes (`int`): bytes of the listed shards found on disk.
    """

    ok: bool
    problems: list[str] = field(default_factory=list)
    num_samples: int = 0
    num_shards: int = 0
    num_bytes: int = 0


def index_problems(manifest: object) -> list[str]:
    """Missing or mistyped keys of a parsed `index.json` (empty when every check can run)."""
    if not isinstance(manifest, dict):
        return [f"index.json: damaged (a {type(manifest).__name__}, not an object): rerun the encode command"]
    problems = [f"index.json: damaged (key {key!r} missing or not a {getattr(t, '__name__', 'valid value')})"
                for key, t in INDEX_KEYS.items() if not isinstance(manifest.get(key), t)]  # fmt: skip
    if problems:
        return problems
    problems += [f"index.json: damaged (totals.{k} missing)" for k in TOTALS_KEYS if k not in manifest["totals"]]
    try:  # the earlier residual-VQ layout (one (S, h, w) tensor) is no longer read
        stored_latent(manifest["kind"], manifest["fields"])
    except LdtokError as e:
        problems.append(f"index.json: {e}")
    except (ValueError, KeyError, TypeError):  # an unknown kind or malformed fields: other checks report them
        pass
    for i, rec in enumerate(manifest["shards"]):
        if not isinstance(rec, dict):
            problems.append(f"index.json: damaged (shards[{i}] is not an object)")
            continue
        bad = [k for k, t in RECORD_KEYS.items() if not isinstance(rec.get(k), t)]
        if bad:
            problems.append(f"index.json: damaged (shards[{i}] ({rec.get('file')!r}): keys {bad} missing or mistyped)")
    return problems


def _non_finite(f, name: str) -> int:
    t = f.get_tensor(name)
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def _check_shard(path: Path, rec: dict, manifest: dict) -> tuple[list[str], list[str]]:
    """Problems of one listed shard and its sample ids (empty if unreadable)."""
    name, problems = rec["file"], []
    if os.path.getsize(path) != rec["num_bytes"]:
        problems.append(f"{name}: {os.path.getsize(path)} bytes, index says {rec['num_bytes']}")
    if sha256_file(path) != rec["sha256"]:
        problems.append(f"{name}: sha256 mismatch (corrupted or rewritten)")
    try:
        header = read_shard_header(path)
        with safe_open(str(path), framework="pt") as f:  # the reader's own parser must accept it too
            f.metadata()
            non_finite = {key: n for key in f.keys() if (n := _non_finite(f, key))}  # noqa: SIM118
        ids = json.loads(header.metadata["ids"])
    except Exception as e:  # noqa: BLE001 - any parse failure is a reported problem, not a crash
        return problems + [f"{name}: unreadable header or data ({type(e).__name__}: {e})"], []
    for key, n in non_finite.items():
        problems.append(f"{name}: {key} has {n} non-finite values (NaN/inf): the model diverged? re-encode with "
                        "a model whose outputs are finite")  # fmt: skip
    meta = header.metadata
    if meta.get("ldtok_format") != FORMAT_VERSION or meta.get("kind") != manifest["kind"]:
        problems.append(f"{name}: format {meta.get('ldtok_format')!r} / kind {meta.get('kind')!r} do not match index")
    if len(ids) != rec["num_samples"]:
        problems.append(f"{name}: {len(ids)} ids, index says {rec['num_samples']} samples")
    if ids and (ids[0] != rec["ids_first"] or ids[-1] != rec["ids_last"]):
        problems.append(f"{name}: first/last id differ from index")
    expected = manifest["fields"] or {}
    if rec["num_samples"] > 0 and set(header.tensors) != set(expected):
        problems.append(f"{name}: tensors {sorted(header.tensors)}, index fields {sorted(expected)}")
    for key, info in header.tensors.items():
        if info["shape"][:1] != [rec["num_samples"]]:
            problems.append(f"{name}: {key} has shape {info['shape']}, expected {rec['num_samples']} rows")
        if key in expected and (info["dtype"], info["shape"][1:]) != (expected[key]["dtype"], expected[key]["shape"]):
            problems.append(f"{name}: {key} is {info['dtype']}{info['shape'][1:]}, index says {expected[key]}")
    return problems, ids


def _part_problems(out_dir: Path, shards: list[dict]) -> list[str]:
    """Every part manifest parses, passes its checksum and lists the shards `index.json` lists for its rank."""
    problems = []
    for p in sorted(out_dir.iterdir()):
        m = PART_RE.match(p.name)
        if not m:
            continue
        rank = int(m.group(1))
        try:
            part = read_part(out_dir, rank)
        except DamagedPartError as e:
            problems.append(f"{p.name}: damaged ({str(e).removeprefix(str(p) + ': ')}): rerun the encode command")
            continue
        shards_of_part = part["shards"] if isinstance(part["shards"], list) else []
        listed = [s.get("file") if isinstance(s, dict) else None for s in shards_of_part]
        indexed = [s["file"] for s in shards if s["rank"] == rank]
        if listed != indexed:
            problems.append(f"{p.name}: lists other shards than index.json for rank {rank}")
    return problems


def verify(out_dir: str | os.PathLike) -> VerifyReport:
    """Check a shard directory end to end (reads every byte once; holds all sample ids in memory).

    Checks: `index.json` parses and has every key the checks need; every listed shard exists with the listed size
    and sha256, its header parses (ours and safetensors' parser), its ids, tensor names, dtypes and row counts agree
    with the index, its latents are finite; totals add up; no sample id occurs twice across the whole set; every
    part manifest passes its checksum and agrees with the index; no temp files are left; no shard file is unlisted.
    """
    out_dir = Path(out_dir)
    report = VerifyReport(ok=False)
    try:
        manifest = load_manifest(out_dir)
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"index.json: {type(e).__name__}: {e}")
        return report
    report.problems += index_problems(manifest)
    if report.problems:
        return report
    shards = manifest["shards"]
    report.num_shards = len(shards)
    seen: dict[str, str] = {}
    duplicates = []
    for rec in shards:
        path = out_dir / rec["file"]
        if not path.is_file():
            report.problems.append(f"{rec['file']}: listed in index.json but missing")
            continue
        report.num_bytes += os.path.getsize(path)
        problems, ids = _check_shard(path, rec, manifest)
        report.problems += problems
        report.num_samples += len(ids)
        for sample_id in ids:
            if sample_id in seen:
                duplicates.append(f"duplicate sample id {sample_id!r} in {seen[sample_id]} and {rec['file']}")
            else:
                seen[sample_id] = rec["file"]
    report.problems += duplicates[:20] + (
        [f"... {len(duplicates) - 20} more duplicate ids"] if len(duplicates) > 20 else []
    )
    totals = manifest["totals"]
    if totals["num_shards"] != len(shards) or totals["num_samples"] != sum(s["num_samples"] for s in shards):
        report.problems.append(f"totals {totals} do not add up over the {len(shards)} listed shards")
    report.problems += _part_problems(out_dir, shards)
    listed = {s["file"] for s in shards}
    for p in sorted(out_dir.iterdir()):
        if TEMP_RE.match(p.name):
            report.problems.append(f"{p.name}: leftover temp file (a crashed writer?)")
        elif SHARD_RE.match(p.name) and p.name not in listed:
            report.problems.append(f"{p.name}: shard file not listed in index.json")
    report.ok = not report.problems
    return report
