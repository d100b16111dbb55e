"""Exponential moving average of model weights.

Parameters are averaged: `ema = decay * ema + (1 - decay) * param`. Buffers are **copied** from the live model at every
update, not averaged: the buffers of our models are either statistics that are already running averages (the EMA
codebook, its cluster sizes and sums) or counters, and averaging them a second time would make the EMA model decode with
a codebook that lags behind the one its encoder was trained against.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of `model` that tracks an exponential moving average of its parameters.

    Args:
        model (`nn.Module`): the live model (unwrapped, not the DDP wrapper).
        decay (`float`): the EMA decay per optimizer step, e.g. 0.999.
        warmup (`bool`, defaults to `True`): use `min(decay, (1 + n) / (10 + n))` for the n-th update, so early
            averages are not dominated by the random initialization.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True):
        assert 0.0 < decay < 1.0, f"EMA decay must be in (0, 1), got {decay}"
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        live = dict(model.named_parameters())
        for name, p_ema in self.model.named_parameters():
            p = live[name].detach()
            if p_ema.dtype.is_floating_point:
                p_ema.lerp_(p.to(p_ema.dtype), 1.0 - decay)
            else:
                p_ema.copy_(p)
        live_buffers = dict(model.named_buffers())
        for name, b_ema in self.model.named_buffers():
            b_ema.copy_(live_buffers[name])
        self.num_updates += 1

    def to(self, device) -> ModelEMA:
        self.model.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the update count is stored as a 0-d tensor."""
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.num_updates = int(state["num_updates"])
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
