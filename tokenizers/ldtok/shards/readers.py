"""Datasets over a latent-shard directory, for training priors (diffusion on KL latents, AR models on VQ indices).

Both readers yield the same items:

- KL: `{"latents": (C, h, w) float32, "id": str}`, with `latents = (z - shift_factor) * scaling_factor` and
  `z = mean + exp(logvar / 2) * eps` (a fresh `eps` per call) when `sample_posterior`, else `z = mean`. Under the
  default SD convention the manifest's `shift_factor` is `None` and no shift is applied (`latents = z *
  scaling_factor`, what `StableDiffusionPipeline` expects); under `--latent-convention sd3` it is the latent mean
  (`ldtok.shards.stats`);
- VQ: `{"indices": (h, w) int64, "id": str}`; residual VQ: `{"indices_stage0": (h, w) int64, ...,
  "indices_stage{S-1}": ..., "id": str}`; VQ-VAE-2: `{"indices_top": ..., "indices_bottom": ..., "id": str}`
  (`ldtok.latent_kinds.stored_latent`: shards of the earlier residual layout, one `(S, h, w)` tensor, are refused);
- plus `"label"` (int64 scalar tensor) and `"caption"` (str) when the shards store them.

With `use_flip=True` each item picks the stored flipped variant (`*_flip` fields) with probability 1/2, the way
LightningDiT uses its pre-encoded flips. `scaling_factor` / `shift_factor` default, each on its own, to the manifest's
`stats` (`ChannelStats.result()`); pass `shift_factor=0.0` to apply no shift.

Both readers check a shard's sha256 against `index.json` the first time they open it in a process (`verify=False`
skips it), so a damaged shard is an error naming it (`ShardChecksumError`), never silently wrong latents.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .. import distributed
from ..errors import LdtokError
from ..latent_kinds import stored_latent
from .manifest import load_manifest, sha256_file


class ShardChecksumError(LdtokError):
    """A shard's bytes do not match the sha256 that `index.json` records for it."""


class _ShardSource:
    """Manifest-driven access to a shard directory, shared by both readers."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        scaling_factor: float | None,
        shift_factor: float | None,
        sample_posterior: bool,
        use_flip: bool,
        verify: bool,
    ):
        self.root = Path(root)
        manifest = load_manifest(self.root)
        self.kind: str = manifest["kind"]
        self.fields: dict = manifest["fields"] or {}
        # only non-empty shards matter to readers; (file, num_samples) is all that stays in memory
        self.shards: list[tuple[str, int]] = [
            (s["file"], s["num_samples"]) for s in manifest["shards"] if s["num_samples"]
        ]
        self.sha256: dict[str, str] | None = {s["file"]: s["sha256"] for s in manifest["shards"]} if verify else None
        self.verified: set[str] = set()  # per process: forked workers start from the parent's set
        self.sample_posterior = sample_posterior
        self.use_flip = use_flip
        self.latent = stored_latent(self.kind, self.fields)  # with residual stages, if stored
        self.latent_fields = self.latent.fields
        if use_flip:
            missing = [f"{name}_flip" for name in self.latent_fields if f"{name}_flip" not in self.fields]
            if missing:
                raise ValueError(f"use_flip=True but {self.root} stores no {missing}")
        self.scaling_factor, self.shift_factor = 1.0, 0.0
        if self.latent.gaussian:
            stats = manifest.get("stats") or {}
            if (scaling_factor is None or shift_factor is None) and not stats:
                raise ValueError(f"{self.root} has no latent stats: pass scaling_factor and shift_factor explicitly")
            self.scaling_factor = float(stats["scaling_factor"] if scaling_factor is None else scaling_factor)
            # the SD convention states no shift (None): latents are z * scaling_factor
            self.shift_factor = float((stats.get("shift_factor") or 0.0) if shift_factor is None else shift_factor)

    def path(self, j: int) -> Path:
        """Shard `j`'s path, its sha256 checked against `index.json` on the first call in this process."""
        name = self.shards[j][0]
        path = self.root / name
        if self.sha256 is not None and name not in self.verified:
            if sha256_file(path) != self.sha256[name]:
                raise ShardChecksumError(
                    f"{path}: sha256 does not match index.json (the shard is damaged); rerun the same `ldtok encode` "
                    "command to re-encode it, or pass verify=False to read it anyway")
            self.verified.add(name)
        return path

    def make_item(
        self, rows: dict[str, Tensor], sample_id: str, caption: str | None, generator: torch.Generator | None
    ) -> dict:
        """Build one item from one sample's stored tensors (`rows[name]` without the batch dimension)."""
        suffix = ""
        if self.use_flip and torch.rand((), generator=generator).item() < 0.5:
            suffix = "_flip"
        item: dict = {"id": sample_id}
        if self.latent.gaussian:
            z = rows["mean" + suffix].float()  # (C, h, w)
            if self.sample_posterior:
                # clamp as diffusers' DiagonalGaussianDistribution does
                std = torch.exp(0.5 * rows["logvar" + suffix].float().clamp(-30.0, 20.0))
                z = z + std * torch.randn(z.shape, generator=generator)
            item["latents"] = (z - self.shift_factor) * self.scaling_factor
        else:
            for name in self.latent_fields:
                item[name] = rows[name + suffix].long()
        if "label" in rows:
            item["label"] = rows["label"].long()
        if caption is not None:
            item["caption"] = caption
        return item

    def needed_fields(self) -> list[str]:
        names = list(self.latent_fields)
        if self.latent.gaussian and not self.sample_posterior:
            names = ["mean"]
        if self.use_flip:
            names += [f"{n}_flip" for n in names]
        return names + (["label"] if "label" in self.fields else [])


class LatentShardDataset(Dataset):
    """Map-style dataset: random access to sample `i` via `safetensors.safe_open` (memory-mapped, one row read).

    Memory holds a per-shard sample count (for `bisect`) and, per process, at most `max_open_files` open shards with
    their id/caption lists; nothing else is loaded. Works with any number of DataLoader workers (handles are opened
    lazily in each worker, never pickled).

    Args:
        root (`str` or `PathLike`): shard directory with an `index.json`.
        scaling_factor (`float`, *optional*): KL latent scale; defaults to the manifest's `stats["scaling_factor"]`.
        shift_factor (`float`, *optional*): KL latent shift; defaults to the manifest's `stats["shift_factor"]`.
        sample_posterior (`bool`, defaults to `True`): KL: draw `mean + std * eps` anew at every access; else the mean.
        use_flip (`bool`, defaults to `False`): pick the stored flipped variant with probability 1/2.
        verify (`bool`, defaults to `True`): check each shard's sha256 against `index.json` when it is first opened.
        max_open_files (`int`, defaults to 8): open shards kept per process (LRU).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = True,
        use_flip: bool = False,
        verify: bool = True,
        max_open_files: int = 8,
    ):
        self.source = _ShardSource(
            root,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            sample_posterior=sample_posterior,
            use_flip=use_flip,
            verify=verify,
        )
        self.offsets = [0]  # offsets[j] = index of shard j's first sample
        for _, n in self.source.shards:
            self.offsets.append(self.offsets[-1] + n)
        self.max_open_files = max_open_files
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # open mmaps do not travel to workers
        return state

    def _open(self, j: int) -> tuple:
        if self._pid != os.getpid():  # forked worker: do not share the parent's handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if j in self._handles:
            self._handles.move_to_end(j)
            return self._handles[j]
        handle = safe_open(str(self.source.path(j)), framework="pt")
        meta = handle.metadata()
        entry = (handle, json.loads(meta["ids"]), json.loads(meta["captions"]) if "captions" in meta else None)
        self._handles[j] = entry
        if len(self._handles) > self.max_open_files:
            self._handles.popitem(last=False)
        return entry

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = i % len(self)
        j = bisect.bisect_right(self.offsets, i) - 1
        row = i - self.offsets[j]
        handle, ids, captions = self._open(j)
        rows = {name: handle.get_slice(name)[row : row + 1][0] for name in self.source.needed_fields()}
        return self.source.make_item(rows, ids[row], captions[row] if captions else None, None)


class LatentShardIterable(IterableDataset):
    """Streaming dataset: whole shards are read one buffer at a time, shuffled at shard level and within the buffer.

    Shards are permuted per epoch (same permutation on every rank), then split by rank and by DataLoader worker, so
    every sample is yielded exactly once per epoch across all ranks and workers; a rank/worker may get nothing when
    there are fewer shards than `world_size * num_workers`, and ranks can receive different numbers of samples
    (shards of unequal size): loop by epochs or steps accordingly. Do not let Accelerate re-shard it
    (pass explicit `rank` / `world_size`, or use the loader without `accelerator.prepare`'s dataset sharding).

    Args:
        root (`str` or `PathLike`): shard directory with an `index.json`.
        shuffle (`bool`, defaults to `True`): shuffle shard order and samples within the buffer.
        seed (`int`, defaults to 0): base seed; the order depends on `(seed, epoch)` only (and posterior noise on
            rank and worker too), so runs are reproducible.
        buffer_shards (`int`, defaults to 1): shards loaded together and shuffled as one buffer (memory: that many
            shards).
        rank (`int`, *optional*), world_size (`int`, *optional*): this process's split; default to
            `torch.distributed` when initialized, else `0` / `1`.
        scaling_factor, shift_factor, sample_posterior, use_flip, verify: as in `LatentShardDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = True,
        use_flip: bool = False,
        verify: bool = True,
    ):
        self.source = _ShardSource(
            root,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            sample_posterior=sample_posterior,
            use_flip=use_flip,
            verify=verify,
        )
        assert buffer_shards >= 1, f"buffer_shards must be positive, got {buffer_shards}"
        assert (rank is None) == (world_size is None), "give both rank and world_size, or neither"
        self.shuffle, self.seed, self.buffer_shards = shuffle, seed, buffer_shards
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard permutation; call before iterating each epoch (in the main process)."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples over all ranks and workers per epoch."""
        return sum(n for _, n in self.source.shards)

    def _split(self) -> tuple[int, int, int, int]:
        if self.rank is not None:
            rank, world_size = self.rank, self.world_size
        else:  # torch.distributed's when initialized, else 0 / 1
            rank, world_size = distributed.rank(), distributed.world_size()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world_size, worker, num_workers

    def __iter__(self):
        rank, world_size, worker, num_workers = self._split()
        order = list(range(len(self.source.shards)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        mine = order[rank::world_size][worker::num_workers]
        # per-(rank, worker) stream for the in-buffer shuffle, flips and posterior noise
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 65_537 + rank) * 257 + worker)
        names = self.source.needed_fields()
        for start in range(0, len(mine), self.buffer_shards):
            columns: dict[str, list[Tensor]] = {name: [] for name in names}
            ids: list[str] = []
            captions: list[str] = []
            for j in mine[start : start + self.buffer_shards]:
                with safe_open(str(self.source.path(j)), framework="pt") as f:
                    meta = f.metadata()
                    for name in names:
                        columns[name].append(f.get_tensor(name))
                ids += json.loads(meta["ids"])
                if "captions" in meta:
                    captions += json.loads(meta["captions"])
            buffer = {name: torch.cat(parts) for name, parts in columns.items()}
            rows = torch.randperm(len(ids), generator=g).tolist() if self.shuffle else range(len(ids))
            for r in rows:
                sample = {name: t[r] for name, t in buffer.items()}
                yield self.source.make_item(sample, ids[r], captions[r] if captions else None, g)
