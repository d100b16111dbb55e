"""The autoencoder training loop shared by `train/vae.py` and `train/vq.py`, under HF Accelerate.

One loop for every family: the model's forward returns an `AutoencoderOutput` (KL posterior or quantizer outputs) and
`AutoencoderLoss` turns it into the generator loss; a PatchGAN discriminator is trained by its own optimizer once
`loss.disc_start` is reached. Both models are prepared by Accelerate and every forward that trains them runs through the
prepared (DDP-wrapped) models inside `accelerator.accumulate(model, disc)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .checkpoint import (
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
from .config import ConfigError, save_config
from .data import DataConfig, DataError, build_dataset, collate
from .ema import ModelEMA
from .errors import LdtokError
from .guard import NonFiniteGuard
from .images import make_grid, save_image_atomic
from .losses import AutoencoderLoss, LossConfig, build_discriminator, build_loss
from .meters import ThroughputMeter, peak_memory_mib
from .model_card import write_model_card
from .models import ModelConfig, build_model
from .performance import adamw, enable_tf32, expected_device, memory_format, resolve_mixed_precision
from .run_checks import EpochProgress, check_batch_fills, check_resolution, downsample_factor
from .splits import ValidationPlan, plan_validation
from .trackers import hparams, log_images, resolve_report_to
from .validation import calibrate_latent_scale, validate

logger = logging.getLogger("ldtok.training")


@dataclass
class TrainConfig:
    """Optimization and infrastructure of a training run.

    Args:
        max_steps (`int`): optimizer steps to train for (a step may accumulate several batches).
        batch_size (`int`): images per process per forward.
        gradient_accumulation_steps (`int`): batches accumulated into one optimizer step.
        lr (`float`): autoencoder learning rate (peak, after warm-up).
        disc_lr (`float`, *optional*): discriminator learning rate; defaults to `lr`.
        adam_betas (`list[float]`): Adam's betas (LDM/taming use 0.5, 0.9).
        weight_decay (`float`): AdamW weight decay.
        warmup_steps (`int`): linear learning-rate warm-up from 0.
        lr_schedule (`"constant"` or `"cosine"`): after warm-up (cosine decays to 10% of `lr` at `max_steps`).
        max_grad_norm (`float`, *optional*): gradient clipping of each model; `None` disables it.
        max_nonfinite_steps (`int`): a non-finite loss or gradient norm skips the optimizer step (counted, logged);
            this many skipped steps in a row stop the run with an error naming the last good checkpoint.
        mixed_precision (`"auto"`, `"no"`, `"fp16"` or `"bf16"`): Accelerate's autocast (quantizer, KL and loss
            reductions stay fp32). `auto`: what `accelerate launch --mixed_precision` / `accelerate config` say, and
            without either bf16 where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else
            fp32 (`ldtok.performance.resolve_mixed_precision`). An explicit value overrides Accelerate's.
        channels_last (`bool`): models and inputs in channels-last memory format (faster convolutions with cuDNN and
            oneDNN; the same results up to float rounding).
        compile (`bool`): `torch.compile` the autoencoder, the discriminator and the perceptual network (one-time
            compilation cost; pays off on long GPU runs).
        ema_decay (`float`, *optional*): keep an EMA of the model weights (e.g. 0.999); the final export uses it.
        input_noise_std (`float`): denoising mode: add Gaussian noise of this std (in [-1, 1] units) to the input and
            reconstruct the clean image. 0 disables it.
        seed (`int`): seeds model init, data order and augmentation.
        checkpoint_every (`int`): save a resumable checkpoint every this many steps (and at the end).
        keep_checkpoints (`int`): keep only the newest this many checkpoints.
        log_every (`int`): log loss terms every this many steps.
        image_every (`int`): write a reconstruction grid PNG every this many steps (and at the end).
        val_every (`int`): compute validation metrics every this many steps (and at the end); 0: only at the end.
        val_images (`int`): validation images used for metrics.
        grid_images (`int`): images in the reconstruction grid.
        report_to (`str`): Accelerate trackers, comma-separated (`tensorboard`, `wandb`, `mlflow`, ...), `all`,
            `none`, or `auto` (TensorBoard when installed); each gets the scalars, the resolved config as
            hyperparameters and the reconstruction grids (`ldtok.trackers`). Metrics are always also appended to
            `output_dir/metrics.jsonl`.
        push_to_hub (`bool`): upload `final/` (with its model card) to the Hub at the end of training.
        hub_repo_id (`str`, *optional*): the Hub repository (`user/name`) for `push_to_hub`.
    """

    max_steps: int = 1000
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    disc_lr: float | None = None
    adam_betas: list[float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float | None = 1.0
    max_nonfinite_steps: int = 10
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    ema_decay: float | None = None
    input_noise_std: float = 0.0
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    image_every: int = 500
    val_every: int = 0
    val_images: int = 64
    grid_images: int = 8
    report_to: str = "auto"
    push_to_hub: bool = False
    hub_repo_id: str | None = None

    def __post_init__(self):
        self.adam_betas = list(self.adam_betas)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas needs 2 values, got {self.adam_betas}")
        for key in ("max_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        resolve_report_to(self.report_to)  # an unknown or uninstalled tracker is a ConfigError at load time
        if self.push_to_hub and not self.hub_repo_id:
            raise ConfigError("train.push_to_hub needs train.hub_repo_id (user/name)")


@dataclass
class RunConfig:
    """A training run: `output_dir`, `resume`, and the `data`, `val_data`, `model`, `loss` and `train` sections.

    Args:
        output_dir (`str`): where checkpoints, grids, logs and `final/` go.
        resume (`str`, *optional*): `latest` (the newest checkpoint in `output_dir`, if any) or a checkpoint path.
        val_data (`DataConfig`, *optional*): validation images; it inherits every key of `data` and overrides only the
            keys it gives (`val_data.split=test`). By default the dataset's validation split when it has one, else a
            deterministic `data.val_fraction` holdout, excluded from training (`ldtok.splits`).
    """

    inherit: ClassVar[dict[str, str]] = {"val_data": "data"}

    output_dir: str = "runs/default"
    resume: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    val_data: DataConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model.init_from is None and self.data.channels != self.model.in_channels:
            from .config import ConfigError

            raise ConfigError(f"data.channels={self.data.channels} but model.in_channels={self.model.in_channels}: "
                              "set both to 1 (greyscale) or 3 (RGB)")


def learning_rate(step: int, *, base: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine to 10%."""
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return base


def autoencoder_step(
    *,
    model: torch.nn.Module,
    disc: torch.nn.Module,
    raw_disc: torch.nn.Module,
    last_layer: torch.Tensor,
    loss_fn: AutoencoderLoss,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    x: torch.Tensor,
    x_in: torch.Tensor,
    step: int,
    update: Callable[[torch.Tensor, torch.optim.Optimizer, torch.nn.Module], torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """One training step: the autoencoder's (generator's) update, then, once the GAN is active, the discriminator's.

    Args:
        model, disc: the models being trained, as prepared (DDP-wrapped) for their forwards.
        raw_disc: the unwrapped discriminator, evaluated with detached parameters inside the generator loss.
        last_layer (`Tensor`): the decoder's last weight, for the adaptive GAN weight.
        x (`Tensor` of shape `(B, 3, H, W)`): the clean images (the target); `x_in` what the model sees (noisy in
            denoising mode, else `x`).
        update: `update(loss, optimizer, module)` backpropagates, clips, steps and zeroes, returning the gradient
            norm or `None` (Accelerate's in training; a plain or GradScaler one in `eval/_bench.py`).

    Returns:
        The detached loss terms (`loss`, `rec`, `perceptual`, `kl`/`quant`, `gan`, `disc_loss`, ...).
    """
    output = model(x_in)
    g_loss, terms = loss_fn.generator_loss(
        x, output.sample, discriminator=raw_disc, last_layer=last_layer, step=step,
        posterior=output.posterior, quant=output.quant, output=output,
    )
    grad_norm = update(g_loss, opt_g, model)
    if grad_norm is not None:
        terms["grad_norm"] = grad_norm
    if loss_fn.disc_active(step):
        d_loss, d_terms = loss_fn.discriminator_loss(x, output.sample, discriminator=disc, step=step)
        update(d_loss, opt_d, disc)
        terms.update(d_terms)
    return terms


def weights_checksum(*models: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: equal on every rank when data-parallel training is in sync."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _validation_config(config: RunConfig) -> ValidationPlan:
    """Where validation images come from, and whether training must exclude a holdout (`ldtok.splits`)."""
    plan = plan_validation(config.data, config.val_data)
    logger.info("validation data: %s", plan.reason)
    return plan


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


def train(config: RunConfig) -> dict:
    """Train the autoencoder described by `config`; returns the run summary (also written to `summary.json`)."""
    tc = config.train
    out = Path(config.output_dir)
    factor = downsample_factor(config.model.block_out_channels, config.model.init_from)
    if config.model.type == "mlp":  # the whole image is one latent position
        for key, value in {"data.resolution": config.data.resolution,
                           "val_data.resolution": _validation_config(config).validation.resolution}.items():
            if value != config.model.sample_size:
                raise ConfigError(f"{key}={value}: an mlp model takes images of model.sample_size="
                                  f"{config.model.sample_size}; set both to the same size")
        factor = config.model.sample_size
    check_resolution(model_type=config.model.type, downsample_factor=factor,
                     resolutions={"data.resolution": config.data.resolution,
                                  "val_data.resolution": _validation_config(config).validation.resolution})
    if config.resume is None and step_dirs(out):
        raise LdtokError(f"{out} already holds checkpoints of a run: pass resume=latest to continue it, or choose "
                         "another output_dir (or delete it) to start afresh")
    report_to = resolve_report_to(tc.report_to)
    # the precision is the Accelerator's argument, so it is resolved for the device it will pick (no PartialState
    # here: built before the Accelerator, it would miss ACCELERATE_USE_CPU and see every CPU rank as the main one)
    expected = expected_device()
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(tc.mixed_precision, expected),
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved ..." lines drown ours
    device = accelerator.device
    enable_tf32(device)
    set_seed(tc.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)  # of an interrupted checkpoint write, rotation or final export
        save_config(config, out / "config.yaml")
    if report_to:
        accelerator.init_trackers("ldtok", config=hparams(config))

    # Build: models, loss, optimizers, data.
    fmt = memory_format(tc.channels_last)
    contractive_samples = config.loss.contractive_samples if config.loss.contractive_weight > 0 else 0
    model = build_model(config.model, decoder_logits=config.loss.reconstruction == "bce",
                        contractive_samples=contractive_samples).to(memory_format=fmt)
    disc = build_discriminator(config.loss).to(memory_format=fmt)
    loss_fn = build_loss(config.loss, max_steps=tc.max_steps).to(accelerator.device, memory_format=fmt)
    betas = tuple(tc.adam_betas)
    opt_g = adamw(model.parameters(), lr=tc.lr, betas=betas, weight_decay=tc.weight_decay, device=device)
    opt_d = adamw(disc.parameters(), lr=tc.disc_lr or tc.lr, betas=betas, weight_decay=tc.weight_decay, device=device)
    validation = _validation_config(config)
    with accelerator.main_process_first():  # the embedded dataset is built once, by the main process
        dataset = build_dataset(config.data, train=True, seed=tc.seed,
                                holdout="exclude" if validation.holdout else None)
    iterable = isinstance(dataset, IterableDataset)
    if not iterable:
        check_batch_fills(num_images=len(dataset), batch_size=tc.batch_size, num_processes=accelerator.num_processes)
    loader = DataLoader(
        dataset, batch_size=tc.batch_size, shuffle=not iterable, drop_last=not iterable, collate_fn=collate,
        num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=config.data.num_workers > 0, prefetch_factor=4 if config.data.num_workers > 0 else None,
        # its own generator: creating a loader iterator (as a resumed run does) then draws nothing from the global
        # RNG, which the posterior sampling uses
        generator=torch.Generator().manual_seed(tc.seed),
    )
    val_images = _load_images(validation.validation, max(tc.val_images, tc.grid_images), validation.holdout)
    ema = ModelEMA(model, decay=tc.ema_decay) if tc.ema_decay else None
    if tc.compile:
        model, disc = torch.compile(model), torch.compile(disc)
        if loss_fn.perceptual is not None:
            loss_fn.perceptual = torch.compile(loss_fn.perceptual)

    model, disc, opt_g, opt_d, loader = accelerator.prepare(model, disc, opt_g, opt_d, loader)
    if ema is not None:
        ema.to(accelerator.device)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    raw_disc = accelerator.unwrap_model(disc, keep_torch_compile=False)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "images_seen": 0, "skipped_files": 0, "nonfinite_steps": 0}
    resume_from = resolve_resume(config.resume, out)  # checksums verified
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except Exception as e:  # the files are whole (checked above): the config's model is another one
            first_line = str(e).splitlines()[0][:300] if str(e) else ""
            raise CheckpointError(f"cannot load {resume_from} into the model of this config ({type(e).__name__}: "
                                  f"{first_line}); resume with the config the run was trained with") from e
        state.update(read_trainer_state(resume_from))
        if ema is not None:
            ema.load_state_dict(load_tensors(resume_from / "ema.safetensors"))
        if (resume_from / "loss.safetensors").is_file():  # LeCAM's running means
            loss_fn.load_state_dict(load_tensors(resume_from / "loss.safetensors"))
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    elif config.resume == "latest":
        logger.info("resume=latest: no checkpoint in %s yet, starting from step 0", out)
    finished = resume_from is not None and state["step"] >= tc.max_steps
    if finished:
        logger.info("the run in %s already finished at step %d (train.max_steps=%d)", out, state["step"], tc.max_steps)
    guard = NonFiniteGuard(accelerator=accelerator, max_consecutive=tc.max_nonfinite_steps,
                           last_good=lambda: (list_checkpoints(out) or [None])[-1])
    guard.total = state["nonfinite_steps"]

    def weights() -> dict[str, torch.nn.Module]:
        return {"model": raw_model, "discriminator": raw_disc, **({"ema": ema.model} if ema is not None else {})}

    def export_model(path: Path, latent_statistics: dict | None = None) -> None:
        (ema.model if ema is not None else raw_model).export(path)
        write_model_card(path, run_config=config, step=state["step"], metrics=last_val,
                         latent_statistics=latent_statistics, repo_id=tc.hub_repo_id)

    def write_checkpoint_extra(path: Path) -> None:
        # the checkpoint's own latent scale, measured as for final/ (not SD's 0.18215 default)
        stats = calibrate_latent_scale(ema.model if ema is not None else raw_model, val_images[: tc.val_images],
                                       device=accelerator.device)
        export_model(path / "diffusers", latent_statistics=stats)
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, path / "ema.safetensors")
        if loss_fn.state_dict():
            save_file({k: v.contiguous().cpu() for k, v in loss_fn.state_dict().items()}, path / "loss.safetensors")

    def checkpoint() -> None:
        guard.check_weights(weights(), writing=checkpoint_dir(out) / f"step_{state['step']:08d}")
        save_checkpoint(accelerator, out, step=state["step"], trainer_state=state, write_extra=write_checkpoint_extra,
                        keep=tc.keep_checkpoints)

    def log(values: dict[str, float]) -> None:
        accelerator.log(values, step=state["step"])
        if accelerator.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": state["step"], **values}) + "\n")

    def evaluate(write_grid: bool, compute_metrics: bool) -> dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        eval_model = ema.model if ema is not None else raw_model
        result = validate(eval_model, val_images[: tc.val_images], device=accelerator.device,
                          autocast=accelerator.autocast) if compute_metrics else {}
        if write_grid:
            originals = val_images[: tc.grid_images].to(accelerator.device)
            with torch.no_grad(), accelerator.autocast():
                was_training = eval_model.training
                eval_model.eval()
                recon = eval_model(originals).sample.float()
                eval_model.train(was_training)
            grid = make_grid([originals, recon])
            path = save_image_atomic(grid, out / "images" / f"step_{state['step']:08d}.png")
            log_images(accelerator, "reconstructions", grid, state["step"])
            result["grid"] = str(path)
        return result

    def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> torch.Tensor | None:
        # skips the step (on every rank) when the loss or gradient norm is non-finite
        return guard.step(loss, optimizer, module.parameters(), max_grad_norm=tc.max_grad_norm)

    progress = tqdm(total=tc.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    meter = ThroughputMeter()
    model.train()
    disc.train()
    last_val: dict[str, float] = {}
    while state["step"] < tc.max_steps:
        loader.set_epoch(state["epoch"])  # the sampler's shuffle
        dataset.set_epoch(state["epoch"])  # the augmentation (crops, flips): seeded per (seed, epoch, sample)
        batches = accelerator.skip_first_batches(loader, state["batch_in_epoch"]) if state["batch_in_epoch"] else loader
        epoch_progress = EpochProgress(fresh=state["batch_in_epoch"] == 0)
        for batch in batches:
            state["batch_in_epoch"] += 1
            state["skipped_files"] += len(batch["skipped"])
            for name in batch["skipped"]:
                logger.warning("skipped an undecodable image: %s", name)
            x = batch["pixel_values"].to(memory_format=fmt)
            epoch_progress.read(images=x.shape[0], skipped=len(batch["skipped"]))
            if accelerator.num_processes > 1:
                # Every rank must take part in every step (DDP all-reduces): skip a batch only if some rank has none.
                # (Accelerate's reduce knows "max" and "sum", not "min": the minimum is minus the max of minus.)
                smallest = -accelerator.reduce(torch.tensor([-x.shape[0]], device=accelerator.device), "max")
                if int(smallest) == 0:
                    continue
            elif x.shape[0] == 0:
                continue
            epoch_progress.trained_batches += 1
            step = state["step"]
            for opt, base in ((opt_g, tc.lr), (opt_d, tc.disc_lr or tc.lr)):
                lr = learning_rate(step, base=base, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps,
                                   schedule=tc.lr_schedule)
                for group in opt.param_groups:
                    group["lr"] = lr
            x_in = x + tc.input_noise_std * torch.randn_like(x) if tc.input_noise_std > 0 else x
            meter.start()
            with accelerator.accumulate(model, disc):  # forwards run through the prepared (DDP) models
                terms = autoencoder_step(
                    model=model, disc=disc, raw_disc=raw_disc, last_layer=raw_model.last_layer, loss_fn=loss_fn,
                    opt_g=opt_g, opt_d=opt_d, x=x, x_in=x_in, step=step, update=update,
                )
            meter.stop(x.shape[0] * accelerator.num_processes)
            state["images_seen"] += x.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if guard.end_step(step=state["step"] + 1, terms=terms):  # skipped: not a step, the next batch retries it
                state["nonfinite_steps"] = guard.total
                log({"nonfinite_steps": guard.total})
                continue

            state["step"] += 1
            if ema is not None:
                ema.update(raw_model)
            progress.update(1)
            if state["step"] % tc.log_every == 0 or state["step"] == tc.max_steps:
                values = {k: float(v) for k, v in terms.items()}
                values.update(lr=opt_g.param_groups[0]["lr"], images_per_s=meter.rate(),
                              skipped_files=state["skipped_files"])
                if hasattr(raw_model, "codebook_metrics"):
                    values.update(raw_model.codebook_metrics())
                log(values)
                progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{meter.rate():.1f}")
            done = state["step"] >= tc.max_steps
            want_grid = state["step"] % tc.image_every == 0 or done
            want_val = (tc.val_every > 0 and state["step"] % tc.val_every == 0) or done
            if want_grid or want_val:
                last_val = evaluate(want_grid, want_val)
                if want_val:
                    log({f"val/{k}": v for k, v in last_val.items() if isinstance(v, float)})
            if state["step"] % tc.checkpoint_every == 0 or done:
                checkpoint()
            if done:
                break
        else:
            epoch_progress.check(epoch=state["epoch"], batch_size=tc.batch_size,
                                 num_processes=accelerator.num_processes)
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()

    # Final export: a plain diffusers directory, with latent statistics measured on the validation images.
    accelerator.wait_for_everyone()
    if finished and (out / "final").is_dir():  # a finished run rerun: nothing to do, nothing rewritten
        accelerator.end_training()
        return _finished_summary(out, state, main=accelerator.is_main_process)
    if finished:  # killed during its final export: export it now (validation too, for a missing summary)
        last_val = evaluate(write_grid=True, compute_metrics=True)
    guard.check_weights(weights(), writing=out / "final")
    checksums = accelerator.gather_for_metrics([weights_checksum(raw_model, raw_disc)], use_gather_object=True)
    summary = {
        "steps": state["step"],
        "images_seen": state["images_seen"],
        "skipped_files": state["skipped_files"],
        "nonfinite_steps": state["nonfinite_steps"],
        "images_per_s": meter.rate(),
        "peak_memory_mib": peak_memory_mib(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "rank_checksums": checksums,
        "validation": last_val,
    }
    if accelerator.is_main_process:
        final_model = ema.model if ema is not None else raw_model
        stats = calibrate_latent_scale(final_model, val_images[: tc.val_images], device=accelerator.device)
        if stats:
            summary["latent_statistics"] = stats
        export_model(out / "final", stats)
        summary["final"] = str(out / "final")
        if tc.push_to_hub:
            from .hub import push_to_hub

            summary["hub_url"] = push_to_hub(out / "final", tc.hub_repo_id).url
        if not (finished and (out / "summary.json").is_file()):
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    accelerator.end_training()
    if finished:
        return {**_finished_summary(out, state, main=accelerator.is_main_process), "exported": True}
    return summary


def summary_lines(config: RunConfig, summary: dict, *, kind: str) -> list[str]:
    """What a training script prints at the end (nothing on the other ranks): where the final model is (`kind`, e.g.
    "diffusers AutoencoderKL"), its validation numbers and the throughput, or that the run had already finished."""
    if "final" not in summary:
        return []
    if summary.get("already_finished"):
        action = "exported its final model" if summary.get("exported") else "nothing to do"
        return [f"{config.output_dir}: the run already finished at step {summary['steps']} (train.max_steps="
                f"{config.train.max_steps}); {action}; final model: {summary['final']}"]
    val = summary["validation"]
    usage = "".join(f", {k} {100 * v:.1f}%" for k, v in val.items() if k.startswith("codebook_usage"))
    return [f"final model: {summary['final']}  ({kind})",
            f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}{usage}; reconstructions: {val.get('grid')}",
            f"training: {summary['images_per_s']:.1f} img/s, peak memory {summary['peak_memory_mib']:.0f} MiB"]


def _finished_summary(out: Path, state: dict, *, main: bool) -> dict:
    """What `train` returns for a run that had already finished: its `summary.json` (untouched), marked so."""
    if not main:
        return {"already_finished": True, "steps": state["step"]}
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return {**summary, "already_finished": True, "steps": state["step"], "final": str(out / "final")}

__all__ = [
    "RunConfig", "TrainConfig", "autoencoder_step", "learning_rate", "list_checkpoints", "summary_lines", "train",
    "weights_checksum",
]
