"""The one training loop of ldtok, under HF Accelerate: the autoencoder trainer and both prior trainers run on it.

`TrainingLoop` owns what every trainer shares: the `Accelerator` (mixed precision resolved for its device, trackers of
`train.report_to` with the resolved config as hyperparameters), the output directory (leftovers of an interrupted
write removed, `config.yaml`), resume (`accelerator.load_state` plus the trainer state, the weight EMA and a task's
extra state), checkpoints through `ldtok.checkpoint`, epochs (`set_epoch`, mid-epoch resume), the learning-rate
schedule, the non-finite guard, and logging to `metrics.jsonl` and the trackers.

A trainer brings a `Task`: its prepared models, optimizers and EMA, and its step. The loop runs the step inside
`accelerator.accumulate(*task.trained)`, so the forwards run through the prepared (DDP-wrapped) models of every model
being trained; the step backpropagates each loss with `loop.update(...)` (the guard's skip-on-non-finite step).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import (
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    load_tensors,
    read_trainer_state,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
    step_dirs,
)
from ..config import save_config
from ..ema import ModelEMA
from ..errors import LdtokError
from ..guard import NonFiniteGuard
from ..performance import enable_tf32, expected_device, resolve_mixed_precision
from ..trackers import hparams, resolve_report_to
from .config import TrainLoopConfig
from .schedule import set_learning_rates

logger = logging.getLogger("ldtok.training")


class Task:
    """What a trainer brings to `TrainingLoop.fit`; override `step` and whichever hooks apply.

    Attributes:
        name (`str`): the progress bar's label.
        trained (`list[nn.Module]`): the prepared models being trained (the `accumulate` context's models).
        weights (`dict[str, nn.Module]`): the unwrapped models whose weights a checkpoint or export must hold finite
            values (the loop adds the EMA model).
        optimizers (`list[tuple[Optimizer, float]]`): each prepared optimizer with its peak learning rate.
        ema (`ModelEMA`, *optional*): the weight EMA, updated from `ema_source` after every optimizer step.
    """

    name: str = "train"
    trained: list[nn.Module]
    weights: dict[str, nn.Module]
    optimizers: list[tuple[torch.optim.Optimizer, float]]
    ema: ModelEMA | None = None
    ema_source: nn.Module | None = None

    def start_epoch(self, epoch: int, *, fresh: bool) -> None:
        """Before an epoch's first batch (`fresh`: from its start, not resumed in its middle)."""

    def end_epoch(self, epoch: int) -> None:
        """After an epoch's last batch."""

    def accept(self, batch: Any) -> bool:
        """Whether to train on `batch`, checked before the step (every rank must take the same decision)."""
        return True

    def step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Forward through the prepared models, backpropagate with `loop.update`; returns the detached loss terms."""
        raise NotImplementedError

    def log_values(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """What is logged every `train.log_every` steps (`terms`: the last step's)."""
        return {k: float(v) for k, v in terms.items()}

    def after_step(self, step: int, *, done: bool) -> None:
        """After an optimizer step and its logging, before its checkpoint (validation, image grids)."""

    def save_extra(self, path: Path) -> None:
        """Add files to the checkpoint directory `path` (main process; the EMA is saved by the loop)."""

    def load_extra(self, path: Path) -> None:
        """Restore what `save_extra` wrote (every process)."""


class TrainingLoop:
    """Accelerate setup, output directory, resume, the loop over epochs, checkpoints and logging of a run.

    Args:
        train (`TrainLoopConfig`): the run's `train` section.
        output_dir (`str` or `Path`): where checkpoints, logs and exports go.
        config: the whole resolved config, saved as `config.yaml` and given to the trackers as hyperparameters.
        resume (`str`, *optional*): `latest` or a checkpoint path.

    Raises:
        `LdtokError`: `output_dir` holds checkpoints of a run and `resume` is not set.
    """

    def __init__(self, train: TrainLoopConfig, *, output_dir: str | Path, config: Any, resume: str | None):
        self.tc, self.out, self.resume_arg = train, Path(output_dir), resume
        if resume is None and step_dirs(self.out):
            raise LdtokError(f"{self.out} already holds checkpoints of a run: pass resume=latest to continue it, or "
                             "choose another output_dir (or delete it) to start afresh")
        report_to = resolve_report_to(train.report_to)
        # the precision is the Accelerator's argument, so it is resolved for the device it will pick (no PartialState
        # here: built before the Accelerator, it would miss ACCELERATE_USE_CPU and see every CPU rank as the main one)
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            mixed_precision=resolve_mixed_precision(train.mixed_precision, expected_device()),
            log_with=report_to or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved ..." lines drown ours
        enable_tf32(accelerator.device)
        set_seed(train.seed)
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.out)  # of an interrupted checkpoint write, rotation or final export
            save_config(config, self.out / "config.yaml")
        if report_to:
            accelerator.init_trackers("ldtok", config=hparams(config))
        self.state: dict[str, int] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "nonfinite_steps": 0}
        self.guard = NonFiniteGuard(accelerator=accelerator, max_consecutive=train.max_nonfinite_steps,
                                    last_good=lambda: (list_checkpoints(self.out) or [None])[-1])
        self.resumed_from: Path | None = None
        self.finished = False  # resumed from a checkpoint that had already reached train.max_steps

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, module: nn.Module,
               *more: nn.Module) -> torch.Tensor | None:
        """Backpropagate `loss`, clip the gradients of `module` (and of the `more` modules `optimizer` also steps)
        together and step `optimizer`, skipping the step (on every rank) when the loss or gradient norm is
        non-finite; returns the gradient norm (`None` while accumulating)."""
        parameters = [p for m in (module, *more) for p in m.parameters()]
        return self.guard.step(loss, optimizer, parameters, max_grad_norm=self.tc.max_grad_norm)

    def resume(self, task: Task) -> Path | None:
        """Load `resume`'s checkpoint (checksums verified) into the prepared models, optimizers, the task's EMA and
        extra state, and the trainer state; call it after `accelerator.prepare`."""
        self.accelerator.wait_for_everyone()
        path = resolve_resume(self.resume_arg, self.out)
        if path is None:
            if self.resume_arg == "latest":
                logger.info("resume=latest: no checkpoint in %s yet, starting from step 0", self.out)
            return None
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # the files are whole (checked above): the config's model is another one
            first_line = str(e).splitlines()[0][:300] if str(e) else ""
            raise CheckpointError(f"cannot load {path} into the model of this config ({type(e).__name__}: "
                                  f"{first_line}); resume with the config the run was trained with") from e
        self.state.update(read_trainer_state(path))
        if task.ema is not None:  # loaded on the CPU, copied to the device by load_state_dict
            task.ema.load_state_dict(load_tensors(path / "ema.safetensors"))
        task.load_extra(path)
        self.guard.total = self.state["nonfinite_steps"]
        self.resumed_from = path
        self.finished = self.state["step"] >= self.tc.max_steps
        logger.info("resumed from %s at step %d", path, self.state["step"])
        if self.finished:
            logger.info("the run in %s already finished at step %d (train.max_steps=%d)", self.out,
                        self.state["step"], self.tc.max_steps)
        return path

    def log(self, values: dict[str, float]) -> None:
        """Log `values` at the current step to the trackers and (main process) `metrics.jsonl`."""
        self.accelerator.log(values, step=self.state["step"])
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state["step"], **values}) + "\n")

    def all_weights(self, task: Task) -> dict[str, nn.Module]:
        return {**task.weights, **({"ema": task.ema.model} if task.ema is not None else {})}

    def checkpoint(self, task: Task) -> None:
        """A whole checkpoint of the current step (collective), refused when a weight is non-finite."""
        step = self.state["step"]
        self.guard.check_weights(self.all_weights(task), writing=checkpoint_dir(self.out) / f"step_{step:08d}")

        def write_extra(path: Path) -> None:
            task.save_extra(path)
            if task.ema is not None:
                save_file({k: v.contiguous().cpu() for k, v in task.ema.state_dict().items()},
                          path / "ema.safetensors")

        save_checkpoint(self.accelerator, self.out, step=step, trainer_state=self.state, write_extra=write_extra,
                        keep=self.tc.keep_checkpoints)

    def fit(self, task: Task, loader) -> None:
        """Train until `train.max_steps`: epochs of `loader` (resumed mid-epoch), the schedule, the step inside
        `accelerator.accumulate`, EMA, logging every `log_every` and checkpoints every `checkpoint_every` steps."""
        tc, state, accelerator = self.tc, self.state, self.accelerator
        progress = tqdm(total=tc.max_steps, initial=state["step"], disable=not self.is_main, desc=task.name,
                        unit="step", dynamic_ncols=True)
        for model in task.trained:
            model.train()
        while state["step"] < tc.max_steps:
            loader.set_epoch(state["epoch"])  # the sampler's shuffle
            task.start_epoch(state["epoch"], fresh=state["batch_in_epoch"] == 0)
            skip = state["batch_in_epoch"]
            for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
                state["batch_in_epoch"] += 1
                if not task.accept(batch):
                    continue
                set_learning_rates(task.optimizers, state["step"], warmup_steps=tc.warmup_steps,
                                   max_steps=tc.max_steps, schedule=tc.lr_schedule)
                with accelerator.accumulate(*task.trained):  # forwards run through the prepared (DDP) models
                    terms = task.step(batch, state["step"])
                if not accelerator.sync_gradients:
                    continue
                if self.guard.end_step(step=state["step"] + 1, terms=terms):  # skipped: the next batch retries it
                    state["nonfinite_steps"] = self.guard.total
                    self.log({"nonfinite_steps": self.guard.total})
                    continue
                state["step"] += 1
                if task.ema is not None:
                    task.ema.update(task.ema_source)
                progress.update(1)
                done = state["step"] >= tc.max_steps
                if state["step"] % tc.log_every == 0 or done:
                    values = task.log_values(terms)
                    self.log(values)
                    progress.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
                task.after_step(state["step"], done=done)
                if tc.checkpoint_every and (state["step"] % tc.checkpoint_every == 0 or done):
                    self.checkpoint(task)
                if done:
                    break
            else:
                task.end_epoch(state["epoch"])
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        progress.close()

    def check_final(self, task: Task, writing: Path) -> None:
        """Before the export (collective): every rank is done, and no weight is non-finite."""
        self.accelerator.wait_for_everyone()
        self.guard.check_weights(self.all_weights(task), writing=writing)


__all__ = ["Task", "TrainingLoop"]
