"""The autoencoder trainer of `train/vae.py` and `train/vq.py`: `train(config)` on the shared loop.

One trainer for every family: the model's forward returns an `AutoencoderOutput` (KL posterior or quantizer outputs)
and `AutoencoderLoss` turns it into the generator loss (`ldtok.training.autoencoder.AutoencoderStep`); a PatchGAN
discriminator is trained by its own optimizer once `loss.disc_start` is reached. Both models are prepared by Accelerate
and the loop runs every forward that trains them inside `accelerator.accumulate(model, disc)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from ..checkpoint import load_tensors
from ..config import ConfigError
from ..data import DataConfig, DataError, build_dataset, collate
from ..data.splits import plan_validation
from ..distributed import all_reduce_
from ..ema import ModelEMA
from ..images import make_grid, save_image_atomic
from ..losses import build_discriminator, build_loss
from ..meters import ThroughputMeter
from ..model_card import write_model_card
from ..models import build_model
from ..performance import adamw, memory_format, perceptual_dtype
from ..run_checks import EpochProgress, check_batch_fills, check_resolution, downsample_factor
from ..shaping.trainable import apply_trainable, trainable_parameters
from ..trackers import log_images
from ..validation import calibrate_latent_scale, validate
from .autoencoder import AutoencoderStep
from .config import RunConfig
from .loop import Task, TrainingLoop
from .shaping import Alignment, BatchShaping, check_shaping_family
from .summary import final_summary, finished_summary

logger = logging.getLogger("ldtok.training")


def _check_resolutions(config: RunConfig, val_data: DataConfig) -> None:
    """Every image size is one the model takes (a multiple of its downsampling; an mlp's own `sample_size`)."""
    factor = downsample_factor(config.model.block_out_channels, config.model.init_from)
    resolutions = {"data.resolution": config.data.resolution, "val_data.resolution": val_data.resolution}
    if config.model.type == "mlp":  # the whole image is one latent position
        for key, value in resolutions.items():
            if value != config.model.sample_size:
                raise ConfigError(f"{key}={value}: an mlp model takes images of model.sample_size="
                                  f"{config.model.sample_size}; set both to the same size")
        factor = config.model.sample_size
    check_resolution(model_type=config.model.type, downsample_factor=factor, resolutions=resolutions)


def _load_images(data: DataConfig, n: int, holdout: bool = False) -> torch.Tensor:
    """The first `n` decodable images of `data` (of its holdout only, if `holdout`), deterministic transforms:
    `(n, 3, R, R)`."""
    dataset = build_dataset(data, train=False, holdout="only" if holdout else None)
    images = []
    for sample in dataset:
        if "pixel_values" in sample:
            images.append(sample["pixel_values"])
        if len(images) == n:
            break
    if not images:
        where = f"source {data.source!r}, split {data.split!r}" + (", its val_fraction holdout" if holdout else "")
        raise DataError(f"the validation data ({where}) has no decodable image: set val_data (e.g. val_data.path=DIR) "
                        "or raise data.val_fraction")
    return torch.stack(images)


class AutoencoderTask(Task):
    """The autoencoder's part of the loop: its step, the skipped-file accounting, validation, grids and exports."""

    name = "train"

    def __init__(self, loop: TrainingLoop, config: RunConfig):
        tc, device = config.train, loop.accelerator.device
        self.loop, self.config = loop, config
        self.dataset = self.val_images = None  # set by `train` (built after the models, which draw the RNG first)
        self.fmt = fmt = memory_format(tc.channels_last)
        contractive = config.loss.contractive_samples if config.loss.contractive_weight > 0 else 0
        model = build_model(config.model, decoder_logits=config.loss.reconstruction == "bce",
                            contractive_samples=contractive).to(memory_format=fmt)
        disc = build_discriminator(config.loss).to(memory_format=fmt)
        self.loss_fn = build_loss(config.loss, max_steps=tc.max_steps).to(device, memory_format=fmt)
        if self.loss_fn.perceptual is not None:
            self.loss_fn.perceptual.set_backbone_precision(
                perceptual_dtype(config.loss.perceptual_precision, loop.accelerator.mixed_precision))
        apply_trainable(model, tc.trainable)  # the frozen half: no gradients, out of the optimizer, always eval
        self.shaping = BatchShaping(config, downsample_factor=getattr(model, "downsample_factor", 1))
        align_encoder, projection = None, None
        if config.loss.align_weight > 0:
            align_encoder, projection = Alignment.build(config.loss.align_model, model=model)
            align_encoder.to(device)
        extra = list(projection.parameters()) if projection is not None else []
        betas = tuple(tc.adam_betas)
        opt_g = adamw(trainable_parameters(model) + extra, lr=tc.lr, betas=betas, weight_decay=tc.weight_decay,
                      device=device)
        opt_d = adamw(disc.parameters(), lr=tc.disc_lr or tc.lr, betas=betas, weight_decay=tc.weight_decay,
                      device=device)
        self.ema = ModelEMA(model, decay=tc.ema_decay) if tc.ema_decay else None
        if tc.compile:
            model, disc = torch.compile(model), torch.compile(disc)
            if self.loss_fn.perceptual is not None:
                self.loss_fn.perceptual = torch.compile(self.loss_fn.perceptual)
        self.model, self.disc, self.opt_g, self.opt_d = loop.accelerator.prepare(model, disc, opt_g, opt_d)
        self.projection = self.alignment = None
        if projection is not None:  # prepared (DDP all-reduces its gradients), checkpointed by save_state
            self.projection = loop.accelerator.prepare(projection)
            self.alignment = Alignment(align_encoder, self.projection)
        if self.ema is not None:
            self.ema.to(device)
        unwrap = loop.accelerator.unwrap_model
        self.raw_model = self.ema_source = unwrap(self.model, keep_torch_compile=False)
        self.raw_disc = unwrap(self.disc, keep_torch_compile=False)
        self.trained = [self.model, self.disc] + ([self.projection] if self.projection is not None else [])
        self.weights = {"model": self.raw_model, "discriminator": self.raw_disc}
        if self.projection is not None:
            self.weights["alignment_projection"] = unwrap(self.projection, keep_torch_compile=False)
        self.optimizers = [(self.opt_g, tc.lr), (self.opt_d, tc.disc_lr or tc.lr)]
        self.ae_step = AutoencoderStep(model=self.model, loss_fn=self.loss_fn, disc=self.disc,
                                       alignment=self.alignment)
        self.meter = ThroughputMeter()
        self.last_val: dict[str, float] = {}
        for key in ("images_seen", "skipped_files"):
            loop.state.setdefault(key, 0)

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.raw_model

    # ------------------------------------------------------------------------------------------ the loop's hooks
    def start_epoch(self, epoch: int, *, fresh: bool) -> None:
        self.dataset.set_epoch(epoch)  # the augmentation (crops, flips): seeded per (seed, epoch, sample)
        self.epoch_progress = EpochProgress(fresh=fresh)

    def end_epoch(self, epoch: int) -> None:
        self.epoch_progress.check(epoch=epoch, batch_size=self.config.train.batch_size,
                                  num_processes=self.loop.accelerator.num_processes)

    def accept(self, batch) -> bool:
        state = self.loop.state
        state["skipped_files"] += len(batch["skipped"])
        for name in batch["skipped"]:
            logger.warning("skipped an undecodable image: %s", name)
        n = batch["pixel_values"].shape[0]
        self.epoch_progress.read(images=n, skipped=len(batch["skipped"]))
        # Every rank must take part in every step (DDP all-reduces): skip a batch only if some rank has none.
        smallest = all_reduce_(torch.tensor([n], device=self.loop.accelerator.device), op="min")
        if int(smallest) == 0:
            return False
        self.epoch_progress.trained_batches += 1
        return True

    def step(self, batch, step: int) -> dict[str, torch.Tensor]:
        tc, loop = self.config.train, self.loop
        x = batch["pixel_values"].to(memory_format=self.fmt)
        x_in = x + tc.input_noise_std * torch.randn_like(x) if tc.input_noise_std > 0 else x
        x_in, shaping = self.shaping.draw(x_in, step=step, micro=loop.state["batch_in_epoch"])
        self.meter.start()
        gen = self.ae_step.generator(x, step=step, x_in=x_in, shaping=shaping)
        terms = gen.terms
        more = [self.projection] if self.projection is not None else []
        grad_norm = loop.update(gen.loss, self.opt_g, self.model, *more)
        if grad_norm is not None:
            terms["grad_norm"] = grad_norm
        if (disc := self.ae_step.discriminator(x, gen, step=step)) is not None:
            loop.update(disc.loss, self.opt_d, self.disc)
            terms.update(disc.terms)
        images = x.shape[0] * loop.accelerator.num_processes
        self.meter.stop(images)
        loop.state["images_seen"] += images
        return terms

    def log_values(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        values = {k: float(v) for k, v in terms.items()}
        values.update(lr=self.opt_g.param_groups[0]["lr"], images_per_s=self.meter.rate(),
                      skipped_files=self.loop.state["skipped_files"])
        if hasattr(self.raw_model, "codebook_metrics"):
            values.update(self.raw_model.codebook_metrics())
        return values

    def after_step(self, step: int, *, done: bool) -> None:
        tc = self.config.train
        want_grid = step % tc.image_every == 0 or done
        want_val = (tc.val_every > 0 and step % tc.val_every == 0) or done
        if want_grid or want_val:
            self.last_val = self.evaluate(want_grid, want_val)
            if want_val:
                self.loop.log({f"val/{k}": v for k, v in self.last_val.items() if isinstance(v, float)})

    def save_extra(self, path: Path) -> None:
        # the checkpoint's own latent scale, measured as for final/ (not SD's 0.18215 default)
        stats = calibrate_latent_scale(self.eval_model, self.val_images[: self.config.train.val_images],
                                       device=self.loop.accelerator.device)
        self.export(path / "diffusers", latent_statistics=stats)
        if self.loss_fn.state_dict():
            save_file({k: v.contiguous().cpu() for k, v in self.loss_fn.state_dict().items()},
                      path / "loss.safetensors")

    def load_extra(self, path: Path) -> None:
        if (path / "loss.safetensors").is_file():  # LeCAM's running means
            self.loss_fn.load_state_dict(load_tensors(path / "loss.safetensors"))

    # ------------------------------------------------------------------------------------------ evaluation, export
    def evaluate(self, write_grid: bool, compute_metrics: bool) -> dict[str, float]:
        """Validation metrics and/or a reconstruction grid (main process; `{}` elsewhere)."""
        loop, tc = self.loop, self.config.train
        if not loop.is_main:
            return {}
        device, model = loop.accelerator.device, self.eval_model
        result = validate(model, self.val_images[: tc.val_images], device=device,
                          autocast=loop.accelerator.autocast) if compute_metrics else {}
        if write_grid:
            originals = self.val_images[: tc.grid_images].to(device)
            with torch.no_grad(), loop.accelerator.autocast():
                was_training = model.training
                model.eval()
                recon = model(originals).sample.float()
                model.train(was_training)
            grid = make_grid([originals, recon])
            step = loop.state["step"]
            result["grid"] = str(save_image_atomic(grid, loop.out / "images" / f"step_{step:08d}.png"))
            log_images(loop.accelerator, "reconstructions", grid, step)
        return result

    def export(self, path: Path, latent_statistics: dict | None = None) -> None:
        """A `from_pretrained`-able directory of the (EMA) model, with its model card."""
        self.eval_model.export(path)
        write_model_card(path, run_config=self.config, step=self.loop.state["step"], metrics=self.last_val,
                         latent_statistics=latent_statistics, repo_id=self.config.train.hub_repo_id)


def train(config: RunConfig) -> dict:
    """Train the autoencoder described by `config`; returns the run summary (also written to `summary.json`)."""
    tc = config.train
    validation = plan_validation(config.data, config.val_data)
    logger.info("validation data: %s", validation.reason)
    _check_resolutions(config, validation.validation)
    check_shaping_family(config)
    loop = TrainingLoop(tc, output_dir=config.output_dir, config=config, resume=config.resume)
    device = loop.accelerator.device
    task = AutoencoderTask(loop, config)
    with loop.accelerator.main_process_first():  # the embedded dataset is built once, by the main process
        dataset = build_dataset(config.data, train=True, seed=tc.seed,
                                holdout="exclude" if validation.holdout else None)
    iterable = isinstance(dataset, IterableDataset)
    if not iterable:
        check_batch_fills(num_images=len(dataset), batch_size=tc.batch_size,
                          num_processes=loop.accelerator.num_processes)
    workers = config.data.num_workers
    loader = DataLoader(
        dataset, batch_size=tc.batch_size, shuffle=not iterable, drop_last=not iterable, collate_fn=collate,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # its own generator: creating a loader iterator (as a resumed run does) then draws nothing from the global
        # RNG, which the posterior sampling uses
        generator=torch.Generator().manual_seed(tc.seed),
    )
    task.dataset = dataset
    task.val_images = _load_images(validation.validation, max(tc.val_images, tc.grid_images), validation.holdout)
    loader = loop.accelerator.prepare(loader)
    loop.resume(task)
    loop.fit(task, loader)

    out = loop.out
    loop.accelerator.wait_for_everyone()
    if loop.finished and (out / "final").is_dir():  # a finished run rerun: nothing to do, nothing rewritten
        loop.accelerator.end_training()
        return finished_summary(out, loop.state, main=loop.is_main)
    if loop.finished:  # killed during its final export: export it now (validation too, for a missing summary)
        task.last_val = task.evaluate(write_grid=True, compute_metrics=True)
    loop.check_final(task, out / "final")
    summary = final_summary(loop, task)
    loop.accelerator.end_training()
    if loop.finished:
        return {**finished_summary(out, loop.state, main=loop.is_main), "exported": True}
    return summary


__all__ = ["AutoencoderTask", "train"]
