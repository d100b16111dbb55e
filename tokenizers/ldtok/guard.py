"""The non-finite guard of every trainer: a NaN/inf loss or gradient skips the optimizer step; a run that keeps
producing them stops; non-finite weights are never written.

Every rank takes the same decision (the flag is all-reduced), so data-parallel ranks stay in lockstep: a rank that
skipped while another stepped would leave their weights apart for the rest of the run.

With fp16 mixed precision Accelerate's `GradScaler` already skips steps whose gradients overflow (and lowers its scale):
there a non-finite gradient is left to the scaler and not counted, and a non-finite loss is counted but its step still
goes through the scaler, which skips it (its gradients are non-finite) and keeps its own bookkeeping straight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from .distributed import all_reduce_
from .errors import LdtokError

logger = logging.getLogger("ldtok.guard")


class TrainingDivergedError(LdtokError):
    """Too many optimizer steps in a row had a non-finite loss or gradient, or the weights became non-finite."""


def _finite(value) -> bool:
    return value is None or bool(torch.isfinite(torch.as_tensor(value)).all())


def nonfinite_names(values: Mapping[str, torch.Tensor | float]) -> list[str]:
    """The keys of `values` whose value has a NaN or inf."""
    return [name for name, value in values.items() if not _finite(value)]


def nonfinite_tensors(modules: Mapping[str, nn.Module]) -> list[str]:
    """`"<module>.<tensor>"` of every floating-point parameter or buffer with a NaN or inf."""
    bad = []
    for label, module in modules.items():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                bad.append(f"{label}.{name}")
    return bad


class NonFiniteGuard:
    """Decides, per optimizer step, whether to skip it; counts the skipped steps and stops a diverged run.

    Args:
        accelerator (`Accelerator`): the run's; the skip flag is all-reduced over its processes.
        max_consecutive (`int`): stop after this many skipped optimizer steps in a row.
        last_good (`Callable[[], Path | None]`): the newest whole checkpoint, named in the stop message.
    """

    def __init__(self, *, accelerator: Accelerator, max_consecutive: int, last_good: Callable[[], Path | None]):
        self.accelerator = accelerator
        self.max_consecutive = max_consecutive
        self.last_good = last_good
        self.fp16 = accelerator.mixed_precision == "fp16"
        self.consecutive = 0
        self.total = 0
        self._skipped = False

    def _any_rank(self, bad: bool | torch.Tensor) -> bool:
        """`bad` on any rank; one host sync (a GPU run pays one per optimizer step, not one per tensor)."""
        flag = torch.as_tensor(bad, device=self.accelerator.device).float().reshape(1)
        return bool(all_reduce_(flag, op="max").item() > 0)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], *,
             max_grad_norm: float | None) -> torch.Tensor | None:
        """Backpropagate `loss`, clip, then step `optimizer` unless (on any rank) the loss or gradient is non-finite;
        zero the gradients either way. Call it inside `accelerator.accumulate(...)`.

        Returns:
            The gradient norm before clipping (`None` while accumulating, or without clipping).
        """
        accelerator = self.accelerator
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:  # the accumulated gradients are complete (and all-reduced) only now
            parameters = [p for p in parameters if p.grad is not None]
            bad = ~torch.isfinite(loss.detach().float()).all()
            if max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
                if not self.fp16:
                    bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device)).all()
            elif not self.fp16 and parameters:
                bad = bad | ~torch.stack([torch.isfinite(p.grad).all() for p in parameters]).all()
            if self._any_rank(bad):
                self._skipped = True
                if not self.fp16:  # fp16: the scaler sees the non-finite gradients and skips the step itself
                    optimizer.zero_grad(set_to_none=True)
                    return grad_norm
        optimizer.step()  # Accelerate's wrapper skips it while accumulating
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def end_step(self, *, step: int, terms: Mapping[str, torch.Tensor | float]) -> bool:
        """Call once per optimizer step (after every `step(...)` of it); `True` when it was skipped.

        Args:
            step (`int`): the number of the step that was attempted (1-based).
            terms: the step's loss terms, to name the non-finite ones.

        Raises:
            `TrainingDivergedError`: the `max_consecutive`-th skipped step in a row.
        """
        skipped, self._skipped = self._skipped, False
        if not skipped:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        names = ", ".join(nonfinite_names(terms)) or "the gradient norm"
        logger.warning("step %d: non-finite %s: optimizer step skipped (%d in a row, %d in this run)", step, names,
                       self.consecutive, self.total)
        if self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(
                f"training diverged: {self.consecutive} optimizer steps in a row had non-finite values (the last, "
                f"step {step}: {names}); last good checkpoint: {self._last_good()}; lower train.lr (or check the "
                "data) and resume from it with resume=PATH")
        return True

    def _last_good(self) -> str:
        path = self.last_good()
        return str(path) if path is not None else "none (no checkpoint was written yet)"

    def check_weights(self, modules: Mapping[str, nn.Module], *, writing: str | Path) -> None:
        """Refuse to write `writing` (a checkpoint or export) when any weight is non-finite, on any rank.

        Raises:
            `TrainingDivergedError`: naming the first non-finite tensors and the last good checkpoint.
        """
        bad = nonfinite_tensors(modules)
        if self._any_rank(bool(bad)):
            which = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else "on a rank"
            raise TrainingDivergedError(
                f"refusing to write {writing}: non-finite weights ({which}); last good checkpoint: "
                f"{self._last_good()}; lower train.lr and resume from it with resume=PATH")
