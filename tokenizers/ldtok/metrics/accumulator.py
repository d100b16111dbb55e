"""Accumulate evaluation metrics over a (distributed) pass and merge them across processes, each sample once.

Distributed samplers pad the last batches with samples from the start of the epoch (torch's `DistributedSampler`,
Accelerate's `even_batches`), so a plain sum over processes counts a few samples twice. `MetricAccumulator` keys
everything by the sample id from the data batch and removes repeats:

- per-sample values (`add_values`: PSNR, SSIM, LPIPS, a per-channel KL vector, ...) are stored as `id -> {name:
  value}`; a repeated `(id, name)` keeps the first value (on the lowest rank, across processes);
- feature sets (`add_features`, for FID) are kept as float64 moments and code-index sets (`add_indices`) as
  histograms. A repeat seen on the same process is skipped when added. A repeat across processes is subtracted at
  `gather` time using the per-sample data each process keeps for the first `cache_first` samples it adds to a set;
  padding repeats the first samples of the epoch, which are the first each process sees, so the default cache covers
  them. Repeats that cannot be removed are counted in `GatheredMetrics.unremoved_duplicates` (and warned about).

`gather(accelerator)` is a collective: every process must call it. It exchanges the states with
`ldtok.distributed.all_gather_objects` (over the `torch.distributed` group that Accelerate initializes) and every
process gets the same merged `GatheredMetrics`. Without a process group it only merges its own state.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .codebook import index_histogram
from .colour import ColourSummary, colour_stats, summarize_colour
from .fid import FeatureMoments

_FEATURES = "features"
_INDICES = "indices"


@dataclass
class GatheredMetrics:
    """Merged metrics of all processes, every sample counted once.

    Args:
        values (`dict[str, dict[str, float | Tensor]]`): sample id -> metric name -> value (a float for scalar
            metrics, a float64 `Tensor` for vector ones).
        features (`dict[str, FeatureMoments]`): set name -> moments over the unique samples of that set.
        histograms (`dict[str, Tensor]`): set name -> `(K,)` int64 code counts over the unique samples.
        num_processes (`int`): number of merged states.
        duplicates (`dict[str, int]`): metric or set name -> repeated entries that were dropped.
        unremoved_duplicates (`dict[str, int]`): set name -> repeated samples still counted (their per-sample data
            was not cached); absent when zero.
    """

    values: dict[str, dict[str, float | Tensor]]
    features: dict[str, FeatureMoments]
    histograms: dict[str, Tensor]
    num_processes: int
    duplicates: dict[str, int]
    unremoved_duplicates: dict[str, int]

    def ids(self, name: str | None = None) -> list[str]:
        """Sorted ids of the samples that have metric `name` (all samples with any value when `None`)."""
        return sorted(i for i, row in self.values.items() if name is None or name in row)

    def stack(self, name: str) -> Tensor:
        """Values of metric `name` for `ids(name)`, in that order: `(N,)` or `(N, ...)` float64."""
        ids = self.ids(name)
        if not ids:
            raise KeyError(f"no sample has a value for {name!r}")
        rows = [self.values[i][name] for i in ids]
        if isinstance(rows[0], Tensor):
            return torch.stack(rows)
        return torch.tensor(rows, dtype=torch.float64)

    def mean(self, name: str, *, cap: float | None = None) -> Tensor:
        """Mean of metric `name` over its samples; with `cap`, values above it (e.g. PSNR's `+inf`) count as `cap`."""
        values = self.stack(name)
        if cap is not None:
            values = values.clamp(max=cap)
        return values.mean(dim=0)

    def colour(self) -> ColourSummary | None:
        """The colour metrics over the samples `MetricAccumulator.add_colour` saw (`None` if it saw none)."""
        if not self.ids("colour/delta_e"):
            return None
        return summarize_colour(**{k: self.stack(f"colour/{k}") for k in
                                   ("delta_e", "lab_shift", "chroma", "chroma_rec", "chroma_hist")})


class _KeyedSet:
    """Summed per-sample contributions (feature moments or a code histogram) with the ids that went in."""

    def __init__(self, *, kind: str, num_codes: int | None = None):
        self.kind = kind
        self.num_codes = num_codes
        self.ids: list[str] = []
        self.seen: set[str] = set()
        self.cache: dict[str, Tensor] = {}
        self.duplicates = 0
        self.moments = FeatureMoments()
        self.counts = torch.zeros(num_codes or 0, dtype=torch.int64)

    def add(self, ids: Sequence[str], data: Tensor, *, cache_first: int) -> None:
        assert len(ids) == data.shape[0], f"{len(ids)} ids for {data.shape[0]} samples"
        rows = []
        for i, sid in enumerate(ids):
            if sid in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(sid)
            self.ids.append(sid)
            rows.append(i)
        if not rows:
            return
        kept = data[rows].detach()
        room = max(0, cache_first - len(self.cache))
        if room:
            for sid, row in zip([ids[i] for i in rows[:room]], kept[:room].cpu()):
                self.cache[sid] = row.clone()
        if self.kind == _FEATURES:
            self.moments.update(kept)
        else:
            self.counts += index_histogram(kept, self.num_codes).cpu()

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_codes": self.num_codes,
            "ids": list(self.ids),
            "cache": dict(self.cache),
            "duplicates": self.duplicates,
            "moments": self.moments.cpu(),
            "counts": self.counts.clone(),
        }


class MetricAccumulator:
    """Collects per-sample metric values, FID feature moments and code histograms keyed by sample id.

    Args:
        cache_first (`int`, *optional*, defaults to 1024): per feature/index set, how many of the first samples this
            process adds keep their per-sample data, so that repeats across processes can be subtracted exactly at
            `gather`. Must be at least the per-process batch size to cover sampler padding (8 KiB per sample for
            2048-d features).
    """

    def __init__(self, *, cache_first: int = 1024):
        self.cache_first = cache_first
        self.reset()

    def reset(self) -> None:
        """Forget everything added so far."""
        self.values: dict[str, dict[str, float | Tensor]] = {}
        self.value_duplicates: Counter[str] = Counter()
        self.sets: dict[str, _KeyedSet] = {}

    def add_values(self, ids: Sequence[str], values: dict[str, Tensor]) -> None:
        """Record per-sample values.

        Args:
            ids (`Sequence[str]`): the batch's sample ids (`batch["id"]`), length B.
            values (`dict[str, Tensor]`): metric name -> `(B,)` (scalar per sample) or `(B, ...)` (a vector per sample,
                e.g. `kl_per_sample_channel`). A name already recorded for an id is ignored (the first value wins).
        """
        for name, v in values.items():
            assert v.ndim >= 1 and v.shape[0] == len(ids), f"{name}: shape {tuple(v.shape)} for {len(ids)} ids"
            v = v.detach().double().cpu()
            rows = v.tolist() if v.ndim == 1 else list(v.unbind(0))
            for sid, value in zip(ids, rows):
                row = self.values.setdefault(sid, {})
                if name in row:
                    self.value_duplicates[name] += 1
                else:
                    row[name] = value

    def add_colour(self, ids: Sequence[str], x: Tensor, x_rec: Tensor) -> None:
        """Record the per-image colour statistics (`ldtok.metrics.colour`) of reconstructions `x_rec` of `x`, both
        `(B, 3, H, W)` in `[-1, 1]`; `GatheredMetrics.colour()` summarizes them."""
        self.add_values(ids, colour_stats(x, x_rec).values())

    def _set(self, name: str, kind: str, num_codes: int | None = None) -> _KeyedSet:
        s = self.sets.get(name)
        if s is None:
            s = self.sets[name] = _KeyedSet(kind=kind, num_codes=num_codes)
        assert s.kind == kind, f"set {name!r} holds {s.kind}, cannot add {kind}"
        assert s.num_codes == num_codes, f"set {name!r} has {s.num_codes} codes, got {num_codes}"
        return s

    def add_features(self, name: str, ids: Sequence[str], features: Tensor) -> None:
        """Add the features of a batch to the FID set `name` (e.g. `"real"`, `"reconstructed"`).

        Args:
            name (`str`): the feature set.
            ids (`Sequence[str]`): sample ids, length B.
            features (`Tensor` of shape `(B, F)`): e.g. `InceptionFID` outputs.
        """
        assert features.ndim == 2, f"expected (B, F) features, got shape {tuple(features.shape)}"
        self._set(name, _FEATURES).add(ids, features, cache_first=self.cache_first)

    def add_indices(self, name: str, ids: Sequence[str], indices: Tensor, *, num_codes: int) -> None:
        """Add a batch's code indices to the histogram `name` (e.g. `"codes"`, or `"codes/top"` for VQ-VAE-2).

        Args:
            name (`str`): the histogram.
            ids (`Sequence[str]`): sample ids, length B.
            indices (`Tensor` of shape `(B, ...)`, integer): code indices per sample.
            num_codes (`int`): codebook size K.
        """
        self._set(name, _INDICES, num_codes).add(ids, indices.int(), cache_first=self.cache_first)

    def state(self) -> dict[str, Any]:
        """This process's accumulated state as plain, picklable CPU objects (the input of `merge_states`)."""
        return {
            "values": {sid: dict(row) for sid, row in self.values.items()},
            "value_duplicates": dict(self.value_duplicates),
            "sets": {name: s.state() for name, s in self.sets.items()},
        }

    def gather(self, accelerator: Any | None = None) -> GatheredMetrics:
        """Merge the states of all processes (a collective: every process must call it); a merge of one without.

        Args:
            accelerator (`accelerate.Accelerator`, *optional*): kept for callers that pass one; the merge goes
                through `ldtok.distributed` (the `torch.distributed` group Accelerate initializes), with or without it.

        Returns:
            `GatheredMetrics`, the same on every process.
        """
        from ..distributed import all_gather_objects

        states = all_gather_objects(self.state())  # Accelerate's processes share torch.distributed's group
        return merge_states(states)


def merge_states(states: Sequence[dict[str, Any]]) -> GatheredMetrics:
    """Merge `MetricAccumulator.state()` dicts, in rank order, counting every sample id once.

    Values: the first state (lowest rank) holding `(id, name)` wins. Sets: contributions are summed, then every id
    present `m > 1` times has `m - 1` copies subtracted using a cached copy of its data (from any state); ids without
    a cached copy stay counted `m` times and are reported in `unremoved_duplicates`.
    """
    values: dict[str, dict[str, float | Tensor]] = {}
    duplicates: Counter[str] = Counter()
    for st in states:
        duplicates.update(st["value_duplicates"])
        for sid, row in st["values"].items():
            merged = values.setdefault(sid, {})
            for name, v in row.items():
                if name in merged:
                    duplicates[name] += 1
                else:
                    merged[name] = v

    features: dict[str, FeatureMoments] = {}
    histograms: dict[str, Tensor] = {}
    unremoved: dict[str, int] = {}
    names = sorted({name for st in states for name in st["sets"]})
    for name in names:
        parts = [st["sets"][name] for st in states if name in st["sets"]]
        kinds = {(p["kind"], p["num_codes"]) for p in parts}
        assert len(kinds) == 1, f"set {name!r} differs across processes: {sorted(kinds, key=str)}"
        kind, num_codes = kinds.pop()
        occurrences = Counter(sid for p in parts for sid in p["ids"])
        cache: dict[str, Tensor] = {}
        for p in parts:
            for sid, row in p["cache"].items():
                cache.setdefault(sid, row)
        repeats = {sid: m - 1 for sid, m in occurrences.items() if m > 1}
        removable = sorted(sid for sid in repeats if sid in cache)
        missing = sum(m for sid, m in repeats.items() if sid not in cache)
        duplicates[name] += sum(p["duplicates"] for p in parts) + sum(repeats[sid] for sid in removable)
        if missing:
            unremoved[name] = missing
            warnings.warn(f"{name}: {missing} repeated samples across processes could not be removed", stacklevel=2)
        extra = [cache[sid] for sid in removable for _ in range(repeats[sid])]
        if kind == _FEATURES:
            moments = FeatureMoments()
            for p in parts:
                moments = moments.merge(p["moments"])
            if extra:
                moments.remove(torch.stack(extra))
            features[name] = moments
        else:
            counts = torch.stack([p["counts"] for p in parts]).sum(dim=0)
            if extra:
                counts -= index_histogram(torch.stack(extra), num_codes)
            histograms[name] = counts
    return GatheredMetrics(
        values=values,
        features=features,
        histograms=histograms,
        num_processes=len(states),
        duplicates={k: v for k, v in duplicates.items() if v},
        unremoved_duplicates=unremoved,
    )
