"""The latent diffusion prior's part of the training loop (`train/prior_diffusion.py`): a diffusers `UNet2DModel` with
the DDPM forward process on normalized KL latents, its export and its sampler."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import write_text_atomic
from ..config import invalid
from ..ema import ModelEMA
from ..models import save_pretrained_atomic
from ..training.loop import TrainingLoop
from .config import PriorDiffusionConfig, UNetConfig
from .task import PriorTask


def build_unet(config: UNetConfig, *, latent_shape: tuple[int, int, int]) -> UNet2DModel:
    """A `UNet2DModel` on latents of `latent_shape` `(C, h, w)` (`h`, `w` divisible by its downsampling)."""
    C, h, w = latent_shape
    f = 2 ** (len(config.block_out_channels) - 1)
    if h % f or w % f:
        raise invalid("unet.block_out_channels", f"latent size {h}x{w} not divisible by the UNet's downsampling "
                      f"factor {f}")
    levels = zip(config.block_out_channels, config.attention)
    down, up = zip(*[("AttnDownBlock2D", "AttnUpBlock2D") if a else ("DownBlock2D", "UpBlock2D") for _, a in levels])
    return UNet2DModel(
        sample_size=(h, w), in_channels=C, out_channels=C, block_out_channels=tuple(config.block_out_channels),
        down_block_types=down, up_block_types=tuple(reversed(up)), layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
        dropout=config.dropout, num_class_embeds=config.num_classes,
    )


class DiffusionPriorTask(PriorTask):
    """Eps (or v) prediction MSE at uniformly drawn timesteps, through the prepared UNet."""

    name = "prior-diffusion"

    def __init__(self, loop: TrainingLoop, config: PriorDiffusionConfig, *, latent_shape: tuple[int, int, int],
                 loader: DataLoader):
        super().__init__(loop)
        tc = config.train
        self.config, self.conditional = config, config.unet.num_classes is not None
        unet = build_unet(config.unet, latent_shape=latent_shape)
        # clip_sample=False: normalized latents are not confined to [-1, 1] as pixels are
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=config.noise.num_train_timesteps, clip_sample=False,
                                             beta_schedule=config.noise.beta_schedule,
                                             prediction_type=config.noise.prediction_type)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                                      weight_decay=tc.weight_decay)
        self.ema = ModelEMA(unet, decay=tc.ema_decay) if tc.ema_decay else None
        self.unet, self.optimizer, self.loader = loop.accelerator.prepare(unet, optimizer, loader)
        set_seed(tc.seed, device_specific=True)  # same init on every rank (above); from here, per-rank noise
        self.raw_unet = self.ema_source = loop.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            self.ema.to(loop.accelerator.device)
        self.trained, self.weights = [self.unet], {"unet": self.raw_unet}
        self.optimizers = [(self.optimizer, tc.lr)]

    def step(self, batch, step: int) -> dict[str, torch.Tensor]:
        z0 = batch["latents"]  # (B, C, h, w), normalized
        B = z0.shape[0]
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (B,), device=z0.device)
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        if self.config.noise.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(z0, noise, t)
        labels = batch["label"] if self.conditional else None
        pred = self.unet(z_t, t, class_labels=labels).sample  # through the wrapper
        loss = F.mse_loss(pred.float(), target.float())
        self.loop.update(loss, self.optimizer, self.unet)
        return self.record(loss)

    @property
    def final_unet(self) -> UNet2DModel:
        return (self.ema.model if self.ema is not None else self.raw_unet).eval()

    def save_extra(self, path: Path) -> None:
        save_pretrained_atomic(self.ema.model if self.ema is not None else self.raw_unet, path / "unet")

    @torch.no_grad()
    def sample(self, num_samples: int, *, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """`num_samples` normalized latents `(N, C, h, w)` drawn with the configured sampler (classes cycling)."""
        config, device = self.config, self.loop.accelerator.device
        sampler_cls = DDIMScheduler if config.sampler == "ddim" else DDPMScheduler
        sampler = sampler_cls.from_config(self.noise_scheduler.config)
        sampler.set_timesteps(config.num_inference_steps)
        generator = torch.Generator(device).manual_seed(config.train.seed)
        labels = torch.arange(num_samples, device=device) % config.unet.num_classes if self.conditional else None
        z = torch.randn(num_samples, *latent_shape, generator=generator, device=device)
        unet = self.final_unet
        with self.loop.accelerator.autocast():
            for t in tqdm(sampler.timesteps, desc="sample", dynamic_ncols=True):
                z = sampler.step(unet(z, t, class_labels=labels).sample.float(), t, z, generator=generator).prev_sample
        return z


@torch.no_grad()
def validation_loss(task: DiffusionPriorTask, val_shards: str, *, scale: float, shift: float | None,
                    timesteps: int, batch_size: int = 32) -> float:
    """The final UNet's mean denoising MSE on `val_shards` (posterior means, normalized with the TRAINING shards'
    `scale` / `shift`), each latent at `timesteps` evenly spaced timesteps with fixed noise (seed 0): a deterministic
    number, equal for equal UNets and data, whatever the training order or the machine's RNG state."""
    from ..shards import LatentShardDataset

    dataset = LatentShardDataset(val_shards, sample_posterior=False, use_flip=False, scaling_factor=scale,
                                 shift_factor=shift)
    unet, sched, device = task.final_unet, task.noise_scheduler, task.loop.accelerator.device
    T = sched.config.num_train_timesteps
    grid = torch.linspace(0, T - 1, timesteps).round().long()  # (K,)
    generator = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        z0 = torch.stack([it["latents"] for it in items]).float()  # (B, C, h, w)
        labels = torch.stack([it["label"] for it in items]).to(device) if task.conditional else None
        for t in grid:
            noise = torch.randn(z0.shape, generator=generator)
            tt = torch.full((z0.shape[0],), int(t), dtype=torch.long)
            z_t = sched.add_noise(z0, noise, tt)
            target = noise if task.config.noise.prediction_type == "epsilon" else sched.get_velocity(z0, noise, tt)
            pred = unet(z_t.to(device), tt.to(device), class_labels=labels).sample.float().cpu()
            total += float(((pred - target) ** 2).mean(dim=(1, 2, 3)).sum())
            count += z0.shape[0]
    return total / max(count, 1)


def export_diffusion_prior(path: Path, *, task: DiffusionPriorTask, vae_dir: str, scale: float,
                           shift: float | None, info: dict) -> None:
    """The final export of a diffusion prior: `path` becomes a `LatentPriorPipeline` directory (`model_index.json`,
    `unet/`, `scheduler/` (the configured sampler), `vae/`, model card; `ldtok.priors.pipeline`), plus
    `path/prior.json` (`info`: latent scaling, VAE, shards, latent shape)."""
    from .pipeline import save_prior_pipeline

    config = task.config
    sampler_cls = DDIMScheduler if config.sampler == "ddim" else DDPMScheduler
    save_prior_pipeline(path, unet=task.final_unet, scheduler=sampler_cls.from_config(task.noise_scheduler.config),
                        tokenizer_dir=vae_dir, scaling_factor=scale, shift_factor=shift,
                        step=task.loop.state["step"], shards=config.shards)
    write_text_atomic(path / "prior.json", json.dumps(info, indent=2))  # after: the pipeline replaces `path` whole


__all__ = ["DiffusionPriorTask", "build_unet", "export_diffusion_prior", "validation_loss"]
