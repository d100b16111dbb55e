"""Streaming per-channel statistics of latents, mergeable across shards and processes.

The state is Chan et al.'s parallel-variance triple per channel, in float64: element count `n`, mean and `M2` (sum of
squared deviations from the mean). Two states merge exactly (up to float64 rounding) in any order, so statistics can be
accumulated per shard, per rank, stored in shard metadata and combined later; unlike running `sum` / `sum of squares`
it does not lose precision when the mean is large compared with the spread.

Scaling conventions (what `result(convention=...)` reports as `scaling_factor` / `shift_factor`; diffusers pipelines
read these two keys from the model's config):

- `"sd"` (the default; Stable Diffusion 1.x/2.x, SDXL, any pipeline that computes `latents = z * scaling_factor` and
  decodes `latents / scaling_factor`): `scaling_factor` = 1 / RMS of the latents (`1 / sqrt(E[z^2])`, so that
  `E[(z * s)^2] = 1`) and `shift_factor` = `None` (no shift: these pipelines ignore it, so none is written). SD's
  published 0.18215 was `1 / std` with the mean near zero, where the two agree.
- `"sd3"` (SD3 / Flux: `latents = (z - shift_factor) * scaling_factor`): `shift_factor` = global mean and
  `scaling_factor` = 1 / global std about it, so the latents have zero mean and unit variance.

Which latents to feed, for a KL model: SD computed its factor on *posterior samples* `z = mean + std * eps`, which is
what a diffusion model trained on sampled latents sees, and that is what we recommend. `update_gaussian(mean, logvar)`
accumulates the exact expected moments of posterior samples (mean of `mean`, spread of `mean` plus the posterior
variance) without drawing noise; `ShardWriter` uses it. Feed `update(mean)` instead if the prior trains on the mean.
Standard deviations use Bessel's correction (`n - 1`), matching `torch.std`'s default.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from .. import distributed

LATENT_CONVENTIONS = ("sd", "sd3")


class ChannelStats:
    """Per-channel running count, mean and M2 of `(B, C, h, w)` latents, in float64 on CPU.

    Args:
        num_channels (`int`): latent channels `C`.
    """

    def __init__(self, *, num_channels: int):
        assert num_channels > 0, f"num_channels must be positive, got {num_channels}"
        self.num_channels = num_channels
        self.count = 0  # elements per channel (B * h * w summed over updates); identical for every channel
        self.mean = torch.zeros(num_channels, dtype=torch.float64)
        self.m2 = torch.zeros(num_channels, dtype=torch.float64)

    # ---------------------------------------------------------------- accumulation
    def _merge_moments(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if n_b == 0:
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    @torch.no_grad()
    def update(self, latents: Tensor) -> None:
        """Add a batch of latents.

        Args:
            latents (`Tensor` of shape `(B, C, h, w)`): any float dtype or device; reduced in float64 on CPU.
        """
        assert latents.ndim == 4, f"expected (B, C, h, w) latents, got shape {tuple(latents.shape)}"
        assert latents.shape[1] == self.num_channels, f"expected {self.num_channels} channels, got {latents.shape[1]}"
        x = rearrange(latents.detach().to("cpu", torch.float64), "b c h w -> c (b h w)")
        n_b = x.shape[1]
        if n_b == 0:
            return
        mean_b = x.mean(dim=1)
        m2_b = (x - mean_b[:, None]).square().sum(dim=1)
        self._merge_moments(n_b, mean_b, m2_b)

    @torch.no_grad()
    def update_gaussian(self, mean: Tensor, logvar: Tensor) -> None:
        """Add the expected moments of posterior samples `z ~ N(mean, exp(logvar))`, drawing no noise.

        For a batch of Gaussians the mixture's mean is the mean of `mean`, and its M2 about that mean is the spread of
        `mean` plus the summed variances: `sum((mean - m)^2) + sum(exp(logvar))`.

        Args:
            mean (`Tensor` of shape `(B, C, h, w)`): posterior means.
            logvar (`Tensor` of shape `(B, C, h, w)`): posterior log-variances.
        """
        assert mean.shape == logvar.shape, f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ"
        assert mean.ndim == 4 and mean.shape[1] == self.num_channels, (
            f"expected (B, {self.num_channels}, h, w), got {tuple(mean.shape)}"
        )
        m = rearrange(mean.detach().to("cpu", torch.float64), "b c h w -> c (b h w)")
        var = rearrange(logvar.detach().to("cpu", torch.float64), "b c h w -> c (b h w)").exp()
        n_b = m.shape[1]
        if n_b == 0:
            return
        mean_b = m.mean(dim=1)
        m2_b = (m - mean_b[:, None]).square().sum(dim=1) + var.sum(dim=1)
        self._merge_moments(n_b, mean_b, m2_b)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Fold `other` into `self` (in place) and return `self`."""
        assert other.num_channels == self.num_channels, (
            f"cannot merge stats of {other.num_channels} channels into {self.num_channels}"
        )
        self._merge_moments(other.count, other.mean.clone(), other.m2.clone())
        return self

    @torch.no_grad()
    def all_reduce(self) -> ChannelStats:
        """Merge the states of all ranks (in place; a collective when `torch.distributed` is initialized).

        Every rank must call it. The states are all-gathered and merged in rank order, so every rank ends with the
        same bits. A no-op without a process group or with one process.
        """
        if distributed.world_size() == 1:
            return self
        device = distributed.collective_device()
        # one row: [count, mean_0..mean_{C-1}, m2_0..m2_{C-1}]; float64 holds counts exactly below 2^53
        local = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.mean, self.m2]).to(device)
        gathered = distributed.all_gather_tensor(local)
        merged = ChannelStats(num_channels=self.num_channels)
        C = self.num_channels
        for row in gathered:
            row = row.cpu()
            merged._merge_moments(int(row[0].item()), row[1 : 1 + C], row[1 + C :])
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    # ---------------------------------------------------------------- (de)serialization
    def state_dict(self) -> dict:
        """JSON-able state: `{"count": int, "mean": list[float], "m2": list[float]}` (floats round-trip exactly)."""
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> ChannelStats:
        stats = cls(num_channels=len(state["mean"]))
        stats.count = int(state["count"])
        stats.mean = torch.tensor(state["mean"], dtype=torch.float64)
        stats.m2 = torch.tensor(state["m2"], dtype=torch.float64)
        assert stats.m2.shape == stats.mean.shape, "stats state: mean and m2 lengths differ"
        return stats

    # ---------------------------------------------------------------- results
    def result(self, *, convention: str = "sd") -> dict:
        """Summary statistics (JSON-able).

        Args:
            convention (`"sd"` or `"sd3"`, defaults to `"sd"`): which scaling convention `scaling_factor` and
                `shift_factor` follow (see the module docstring).

        Returns:
            `dict` with
            - `count` (`int`): elements per channel;
            - `channel_mean`, `channel_std` (`list[float]` of length C);
            - `mean`, `std`, `rms` (`float`): over all channels and positions (channels have equal counts);
            - `convention`: the argument;
            - `scaling_factor`, `shift_factor`: `"sd"`: 1 / `rms` and `None` (use as `z * scale`); `"sd3"`: 1 / `std`
              and `mean` (use as `(z - shift) * scale`);
            - `scaling_factor_unshifted` (= 1 / `rms`), `scaling_factor_centered` (= 1 / `std`): both, for reference;
            - `state`: `state_dict()`, so the result can be merged further.
        """
        assert self.count > 1, f"need at least 2 elements per channel for a std, have {self.count}"
        assert convention in LATENT_CONVENTIONS, f"convention must be one of {LATENT_CONVENTIONS}, got {convention!r}"
        n, C = self.count, self.num_channels
        channel_var = self.m2 / (n - 1)
        global_mean = self.mean.mean()
        # pooled M2 about the global mean: within-channel M2 + between-channel spread of the channel means
        global_m2 = self.m2.sum() + n * (self.mean - global_mean).square().sum()
        global_std = math.sqrt(global_m2.item() / (n * C - 1))
        global_rms = math.sqrt((global_m2.item() + n * C * global_mean.item() ** 2) / (n * C))
        return {
            "count": n,
            "channel_mean": self.mean.tolist(),
            "channel_std": channel_var.sqrt().tolist(),
            "mean": global_mean.item(),
            "std": global_std,
            "rms": global_rms,
            "convention": convention,
            "scaling_factor": 1.0 / global_rms if convention == "sd" else 1.0 / global_std,
            "shift_factor": None if convention == "sd" else global_mean.item(),
            "scaling_factor_unshifted": 1.0 / global_rms,
            "scaling_factor_centered": 1.0 / global_std,
            "state": self.state_dict(),
        }
