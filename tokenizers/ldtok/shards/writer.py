"""`ShardWriter`: buffer encoded latents on CPU and write them as resumable safetensors shards.

Shard contents (one safetensors file of N samples, rows in the order they were added):

the latent fields of its kind (`ldtok.latent_kinds`: KL `mean`, `logvar` `(N, C, h, w)` in float16 / bfloat16 /
float32; VQ `indices` `(N, h, w)`, residual VQ one tensor per stage `indices_stage0` ... `indices_stage{S-1}`
`(N, h, w)` each, VQ-VAE-2 `indices_top`, `indices_bottom`, in `index_dtype_for(codebook_size)`),
plus, optionally, `label` `(N,)` int64, and flip variants: when the encoder also stores the latents of the horizontally
flipped image, every latent field has a twin suffixed `_flip` (`mean_flip`, `logvar_flip`, `indices_flip`, ...),
all or none. Sample ids and captions are *not* tensors: they live in the safetensors metadata as JSON lists (`"ids"`,
`"captions"`), which the header parser returns without touching tensor data (keep ids + captions of one shard well
under safetensors' 100 MB header limit). Metadata (str -> str) also holds: `ldtok_format` ("1"), `kind`, `dtype`
(stored dtype of the latent fields), `fields` (JSON: per tensor dtype, per-sample shape, description), `skipped`
(JSON list of ids of items that could not be encoded), `rank`, `world_size`, `shard_index`, `samples_per_shard`,
`num_items`, `codebook_size` (VQ), `stats` (KL: `ChannelStats.state_dict()` of this shard's posterior), and every
key of the caller's `metadata` (`model_config_sha256`, `resolution`, `transforms`, ...).

Work split and resumability (the protocol the encoder follows):

1. Rank `r` of `W` encodes the dataset items `r, r + W, r + 2W, ...` in that order (`ShardWriter.items_for_rank`).
   Shard `k` of rank `r` covers positions `[k * S, (k + 1) * S)` of that sequence (`S = samples_per_shard`),
   counting items that could not be decoded, which are passed as `skipped` and recorded by id, so shard boundaries
   never depend on which images failed. Every shard but a rank's last one covers exactly `S` items.
2. On (re)start, construct the writer: it removes this rank's stale temp files, finds its complete shards and sets
   `writer.items_done` (a multiple of `S`, or the full sequence if the rank had finished); the encoder resumes with
   `ShardWriter.items_for_rank(len(dataset), rank=r, world_size=W, start=writer.items_done)`.
3. Batches must not straddle a shard boundary while they contain skipped items (their positions are unknown); make
   `S` a multiple of the batch size and the encoder's batches never straddle.
4. `close()` when the rank's sequence is exhausted; then, once every rank has closed, `write_manifest` on one process.

Why this survives `kill -9` at any point: a shard's final name appears only through `os.replace` of a complete,
fsynced temp file, and the shard itself carries everything needed to rebuild its part-manifest record (ids, skipped
ids, item count, stats; the sha256 is recomputed from the file). The part manifest is a cache updated after each shard;
a shard that made it to disk but not into the part (killed in between) is recovered from its header. Completed shards
always form a prefix `0..n-1` of the rank's shard sequence, because shards are written in order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor

from ..atomic import write_bytes_atomic
from ..latent_kinds import LatentKind, index_dtype_for, latent_kind
from .fields import describe_batch
from .manifest import (
    FORMAT_VERSION,
    ShardRecord,
    part_name,
    read_shard_header,
    remove_temp_files,
    shard_name,
    write_part,
)
from .resume import ResumeState, find_completed
from .stats import ChannelStats

# metadata keys the writer owns; the caller's metadata may not use them
WRITER_KEYS = frozenset(
    {"ldtok_format", "kind", "dtype", "fields", "ids", "captions", "skipped", "rank", "world_size", "shard_index",
     "samples_per_shard", "num_items", "codebook_size", "stats", "provenance"}
)  # fmt: skip


class ShardWriter:
    """Write one rank's encoded samples into shards of `samples_per_shard` items; resumable after a crash.

    Args:
        out_dir (`str` or `PathLike`): shard directory (created if needed), shared by all ranks.
        kind (`"kl"`, `"vq"` or `"vqvae2"`): the latent kind (`ldtok.latent_kinds`; a tokenizer's `latent_kind`,
            not its family): which fields `add` takes.
        samples_per_shard (`int`): items per shard `S` (counting skipped items); a multiple of the encoder's batch size.
        metadata (`dict[str, str]`): run-wide text metadata stored in every shard, e.g. `model_config_sha256`,
            `resolution`, `transforms` (JSON). Keys in `WRITER_KEYS` are the writer's, except `dtype`, which is
            accepted if it names the dtype of the stored latent fields. Must be identical when resuming.
        rank (`int`, defaults to 0), world_size (`int`, defaults to 1): this process's place in the encoder's split.
        codebook_size (`int`, *optional*): number of codes (VQ kinds, required; the larger level's for VQ-VAE-2);
            picks the stored index dtype and is range-checked.
        num_stages (`int`, *optional*): residual stages of the code levels (`Tokenizer.index_stages`): `add` then
            takes one field per level and stage (`indices_stage0`, ...; `LatentKind.with_stages`).
        resume (`bool`, defaults to `True`): continue after this rank's complete shards; if `False`, raise
            `FileExistsError` when any exist.
        provenance (`dict[str, str]`, *optional*): where the latents come from, for messages (e.g. the model's
            path); stored in every shard (metadata `provenance`, JSON) and part, but, unlike `metadata`, free to
            differ when resuming.
        check_sha256 (`bool`, defaults to `True`): hash this rank's complete shards when resuming; the first one
            that does not match its part manifest, and every later one, are removed and re-encoded.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        kind: str,
        samples_per_shard: int,
        metadata: dict[str, str],
        rank: int = 0,
        world_size: int = 1,
        codebook_size: int | None = None,
        num_stages: int | None = None,
        resume: bool = True,
        provenance: dict[str, str] | None = None,
        check_sha256: bool = True,
    ):
        self.latent: LatentKind = latent_kind(kind)
        if num_stages is not None:
            self.latent = self.latent.with_stages(num_stages)
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if not self.latent.gaussian and codebook_size is None:
            raise ValueError(f"kind={kind!r} needs codebook_size to choose the index dtype")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str (safetensors); {key!r} -> {type(value).__name__}")
        clashes = sorted(set(metadata) & (WRITER_KEYS - {"dtype"}))
        if clashes:
            raise ValueError(f"metadata keys {clashes} are written by ShardWriter itself")
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.samples_per_shard = samples_per_shard
        self.rank, self.world_size = rank, world_size
        self.codebook_size = None if self.latent.gaussian else codebook_size
        self._index_dtype = None if self.latent.gaussian else index_dtype_for(codebook_size)
        self._requested_dtype = metadata.get("dtype")
        self.metadata = {k: v for k, v in metadata.items() if k != "dtype"}
        self.provenance = dict(provenance or {})
        self.out_dir.mkdir(parents=True, exist_ok=True)

        # a previous run of this rank is dead (we are its replacement): its temp files are garbage
        self.removed_temp_files = remove_temp_files(self.out_dir, f"shard-r{rank:02d}-") + remove_temp_files(
            self.out_dir, part_name(rank)
        )
        state = self.completed(self.out_dir, rank, check_sha256=check_sha256)
        if state.shards and not resume:
            raise FileExistsError(f"{self.out_dir} already holds {len(state.shards)} shards of rank {rank}")
        if state.config is not None:
            mine = self._config()
            for key in ("kind", "world_size", "samples_per_shard", "metadata", "codebook_size"):
                if state.config[key] != mine[key]:
                    raise ValueError(
                        f"cannot resume rank {rank} in {self.out_dir}: existing shards have {key}="
                        f"{state.config[key]!r}, this writer {mine[key]!r}"
                    )
            stored = {name.removesuffix("_flip") for name in state.config["fields"] or {} if name != "label"}
            if stored and stored != set(self.latent.fields):  # e.g. residual VQ's earlier (S, h, w) layout
                raise ValueError(f"cannot resume rank {rank} in {self.out_dir}: existing shards store fields "
                                 f"{sorted(stored)}, this writer {list(self.latent.fields)}")
        self._records: list[ShardRecord] = list(state.shards)
        # per-tensor dtype/shape/description and whether captions are stored: fixed by the first non-empty batch
        self._fields: dict | None = state.config["fields"] if state.config else None
        self._has_captions: bool | None = state.config["captions"] if state.config else None
        self.items_done = state.num_items  # items of this rank's sequence in complete shards
        self.finished = state.finished
        self.resume_state = state
        self._closed = False
        self._reset_buffer()
        # repairs: the part first lists only the intact prefix, then the damaged shards go from the last one
        # backwards, so a kill in between leaves a state the next run repairs the same way
        if state.recovered or state.damaged or state.problems:
            self._write_part(finished=self.finished)
        for name in reversed(state.damaged):
            (self.out_dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ resume API
    @staticmethod
    def items_for_rank(dataset_len: int, *, rank: int, world_size: int, start: int = 0) -> range:
        """Dataset indices rank `rank` encodes, from position `start` of its sequence (`writer.items_done`)."""
        return range(rank + start * world_size, dataset_len, world_size)

    @staticmethod
    def completed(out_dir: str | os.PathLike, rank: int, *, check_sha256: bool = False) -> ResumeState:
        """Find the complete shards of `rank` in `out_dir` (read-only; the constructor does the cleanup and repairs).

        Shards listed in the part manifest whose file has the listed size (and sha256, with `check_sha256`) are taken
        from it; shard files on disk but not in the part (a kill between the rename and the part update) are rebuilt
        from their headers and hashed; a damaged shard and the later ones are reported in `damaged` (see
        `ldtok.shards.resume`). Raises `RuntimeError` if the shards on disk are not a prefix `0..n-1`, or a shard
        short of `samples_per_shard` items is not the last one: states no crash can produce.
        """
        return find_completed(out_dir, rank, writer_keys=WRITER_KEYS, check_sha256=check_sha256)

    @staticmethod
    def completed_ids(out_dir: str | os.PathLike, rank: int) -> list[str]:
        """Sample ids stored in `rank`'s complete shards, in order (reads each shard header)."""
        state = ShardWriter.completed(out_dir, rank)
        ids: list[str] = []
        for rec in state.shards:
            ids += json.loads(read_shard_header(Path(out_dir) / rec.file).metadata["ids"])
        return ids

    # ------------------------------------------------------------------------------------------------ writing
    def _config(self) -> dict:
        return {
            "kind": self.kind,
            "world_size": self.world_size,
            "samples_per_shard": self.samples_per_shard,
            "metadata": self.metadata,
            "codebook_size": self.codebook_size,
        }

    def _reset_buffer(self) -> None:
        self._buffer: dict[str, list[Tensor]] = {}
        self._ids: list[str] = []
        self._captions: list[str] = []
        self._skipped: list[str] = []

    @property
    def _buffered_items(self) -> int:
        return len(self._ids) + len(self._skipped)

    def _check_fields(self, batch: dict[str, Tensor], B: int, has_captions: bool) -> None:
        required = self.latent.fields
        fields = describe_batch(self.latent, batch, B, index_dtype=self._index_dtype)
        if self._fields is None:
            stored = fields[required[0]]["dtype"]
            if self._requested_dtype is not None and self._requested_dtype != stored:
                raise ValueError(
                    f"metadata dtype={self._requested_dtype!r} but the {required[0]!r} tensors are {stored}"
                )
            self._fields, self._has_captions = fields, has_captions
        elif self._fields != fields:
            raise ValueError(f"batch fields {fields} differ from this run's {self._fields}")
        elif self._has_captions != has_captions:
            raise ValueError("give captions for every batch or for none")

    @torch.no_grad()
    def add(
        self,
        batch: dict[str, Tensor],
        ids: Sequence[str],
        captions: Sequence[str] | None = None,
        *,
        skipped: Sequence[str] = (),
    ) -> None:
        """Buffer a batch (copied to CPU); writes a shard each time `samples_per_shard` items are buffered.

        Args:
            batch (`dict[str, Tensor]`): the kind's fields with `B` rows (any device; see the module docstring).
                KL fields are stored in their dtype; VQ indices (any integer dtype) are range-checked and stored in
                `index_dtype_for(codebook_size)`.
            ids (`Sequence[str]`): the `B` sample ids, in row order.
            captions (`Sequence[str]`, *optional*): `B` captions; give them for every batch or for none.
            skipped (`Sequence[str]`, defaults to `()`): ids of items of this batch's span of the rank's sequence that
                could not be encoded (`collate`'s `"skipped"`). They count toward the shard's items; a batch with
                skipped items must fit in the current shard.
        """
        if self._closed or self.finished:
            raise RuntimeError(f"rank {self.rank} writer is {'closed' if self._closed else 'finished'}; nothing to add")
        ids, skipped = [str(i) for i in ids], [str(i) for i in skipped]
        B = len(ids)
        if captions is not None and len(captions) != B:
            raise ValueError(f"{len(captions)} captions for {B} ids")
        if skipped and self._buffered_items + B + len(skipped) > self.samples_per_shard:
            raise ValueError(
                f"a batch with skipped items straddles a shard boundary ({self._buffered_items} buffered + {B} + "
                f"{len(skipped)} skipped > {self.samples_per_shard}); make samples_per_shard a multiple of the "
                "batch size"
            )
        self._skipped += skipped
        if B == 0:
            if self._buffered_items == self.samples_per_shard:
                self._flush()
            return
        self._check_fields(batch, B, captions is not None)
        cpu = {}
        for name, t in batch.items():
            t = t.detach().to("cpu")
            if name == "label":
                t = t.to(torch.int64)
            elif not self.latent.gaussian:
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= self.codebook_size:
                    raise ValueError(
                        f"{name!r} has indices in [{lo}, {hi}], outside codebook_size {self.codebook_size}"
                    )
                t = t.to(self._index_dtype)
            cpu[name] = t
        start = 0
        while start < B:
            take = min(self.samples_per_shard - self._buffered_items, B - start)
            for name, t in cpu.items():
                self._buffer.setdefault(name, []).append(t[start : start + take])
            self._ids += ids[start : start + take]
            if captions is not None:
                self._captions += [str(c) for c in captions[start : start + take]]
            start += take
            if self._buffered_items == self.samples_per_shard:
                self._flush()

    def _flush(self) -> None:
        tensors = {name: torch.cat(parts).contiguous() for name, parts in self._buffer.items()}
        index = len(self._records)
        num_items = self._buffered_items
        metadata = dict(self.metadata)
        metadata.update(
            ldtok_format=FORMAT_VERSION,
            kind=self.kind,
            fields=json.dumps(self._fields or {}),
            ids=json.dumps(self._ids),
            skipped=json.dumps(self._skipped),
            rank=str(self.rank),
            world_size=str(self.world_size),
            shard_index=str(index),
            samples_per_shard=str(self.samples_per_shard),
            num_items=str(num_items),
        )
        if self._fields:
            metadata["dtype"] = self._fields[self.latent.fields[0]]["dtype"]
        if self._has_captions:
            metadata["captions"] = json.dumps(self._captions)
        if self.codebook_size is not None:
            metadata["codebook_size"] = str(self.codebook_size)
        if self.provenance:
            metadata["provenance"] = json.dumps(self.provenance, sort_keys=True)
        stats = None
        if self.latent.gaussian and self._ids:
            channel_stats = ChannelStats(num_channels=tensors["mean"].shape[1])
            channel_stats.update_gaussian(tensors["mean"], tensors["logvar"])  # non-flip latents only
            stats = channel_stats.state_dict()
            metadata["stats"] = json.dumps(stats)
        data = safetensors_save(tensors, metadata=metadata)
        name = shard_name(self.rank, index)
        write_bytes_atomic(self.out_dir / name, data)
        self._records.append(
            ShardRecord(
                file=name,
                rank=self.rank,
                index=index,
                num_samples=len(self._ids),
                num_skipped=len(self._skipped),
                sha256=hashlib.sha256(data).hexdigest(),
                num_bytes=len(data),
                ids_first=self._ids[0] if self._ids else None,
                ids_last=self._ids[-1] if self._ids else None,
                stats=stats,
            )
        )
        self.items_done += num_items
        self._reset_buffer()
        self._write_part(finished=False)

    def _write_part(self, *, finished: bool) -> None:
        part = self._config()
        part.update(
            fields=self._fields,
            captions=self._has_captions,
            ldtok_format=FORMAT_VERSION,
            rank=self.rank,
            finished=finished,
            provenance=self.provenance,
            shards=[r.to_json() for r in self._records],
        )
        write_part(self.out_dir, part)

    def close(self) -> None:
        """Write the remaining buffered items as the rank's last (short) shard and mark the rank finished."""
        if self._closed:
            return
        if self._buffered_items > 0:
            self._flush()
        self._write_part(finished=True)
        self.finished = True
        self._closed = True

    @property
    def records(self) -> list[ShardRecord]:
        """Complete shards of this rank so far (including those found when resuming)."""
        return list(self._records)

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # never write a partial buffer as a complete shard: a rerun redoes those items
            self._reset_buffer()
            self._closed = True
