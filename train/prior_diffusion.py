"""Train a latent-diffusion prior (diffusers `UNet2DModel` + DDPM) on KL latent shards, then sample and decode.

    accelerate launch train/prior_diffusion.py --config configs/prior-diffusion-demo.yaml shards=DIR [key=value ...]

Latents are read with a fresh posterior sample per access and normalized with the manifest's statistics,
`(z - shift_factor) * scaling_factor`; samples are unnormalized (`z / scaling_factor + shift_factor`) and decoded by
the VAE (`vae=DIR`, default: the model the shards were encoded with, found by its path relative to the shards and
checked by its weights hash). Writes to `output_dir`: `metrics.jsonl`, `samples.png`, `final/` (a diffusers pipeline:
`LatentPriorPipeline.from_pretrained("OUT/final")` — `unet/`, `scheduler/`, a copy of the VAE in `vae/`,
`model_index.json`, model card), `final/prior.json` (latent scaling, VAE path), `summary.json`; logs to the trackers
of `train.report_to`. Keys and defaults:
`python train/prior_diffusion.py --help`.
"""

import json

import torch
from diffusers import AutoencoderKL

from ldtok.config import ConfigError, parse_args, write_text_atomic
from ldtok.errors import run_cli
from ldtok.priors import PriorDiffusionConfig
from ldtok.priors.diffusion_trainer import DiffusionPriorTask, export_diffusion_prior, validation_loss
from ldtok.priors.task import load_shards_manifest, save_sample_grid, shard_loader, shard_model_dir, train_to_end
from ldtok.shards import LatentShardDataset
from ldtok.training import TrainingLoop


def main() -> None:
    config = parse_args(PriorDiffusionConfig)
    conditional = config.unet.num_classes is not None
    manifest = load_shards_manifest(config.shards, kinds=("kl",), labels="unet.num_classes" if conditional else None,
                                    needs="this script needs KL latents (train/prior_transformer.py models VQ codes)")
    vae_dir = str(shard_model_dir(config.shards, config.vae, key="vae", what="diffusers AutoencoderKL directory",
                                  manifest=manifest))
    if config.val_shards:  # held-out latents of the same model, checked now rather than after training
        val = load_shards_manifest(config.val_shards, kinds=("kl",), labels=None, needs="val_shards must be KL latents")
        if val["metadata"].get("model_sha256") != manifest["metadata"].get("model_sha256"):
            raise ConfigError(f"val_shards: {config.val_shards} was encoded by another model than {config.shards} "
                              "(model_sha256 differs): encode the validation images with the same model")
    tc = config.train
    loop = TrainingLoop(tc, output_dir=config.output_dir, config=config, resume=config.resume)
    # the VAE that decodes samples, loaded now so a bad one fails before training, not after it
    vae = AutoencoderKL.from_pretrained(vae_dir).eval() if loop.is_main else None
    dataset = LatentShardDataset(config.shards, sample_posterior=config.sample_posterior, use_flip=config.use_flip)
    scale, shift = dataset.source.scaling_factor, dataset.source.shift_factor
    latent_shape = tuple(manifest["fields"]["mean"]["shape"])  # (C, h, w)
    loader = shard_loader(dataset, loop, batch_size=tc.batch_size, num_workers=tc.num_workers)
    task = DiffusionPriorTask(loop, config, latent_shape=latent_shape, loader=loader)
    if not train_to_end(loop, task):
        return
    out = loop.out

    # Export, sample N latents, unnormalize, decode, grid.
    if loop.is_main:
        export_diffusion_prior(out / "final", task=task, vae_dir=vae_dir, scale=scale, shift=shift, info={
            "vae": str(vae_dir), "shards": str(config.shards), "scaling_factor": scale, "shift_factor": shift,
            "latent_shape": list(latent_shape)})
        N, device = config.num_samples, loop.accelerator.device
        z = task.sample(N, latent_shape=latent_shape)
        sample_std = float(z.std())  # about 1 when the prior matches the normalized latents
        z = z / scale + shift  # back to the VAE's latent space
        vae.to(device)
        with torch.no_grad():
            images = torch.cat([vae.decode(chunk).sample.float() for chunk in z.split(16)])  # (N, 3, H, W)
        grid = save_sample_grid(images, columns=config.grid_columns, path=out / "samples.png")
        summary = {"steps": loop.state["step"], "final_loss": task.mean_loss, "samples": str(grid),
                   "unet": str(out / "final" / "unet"), "sample_std": sample_std}
        if config.val_shards:
            summary["val_loss"] = validation_loss(task, config.val_shards, scale=scale, shift=shift,
                                                  timesteps=config.val_timesteps)
            print(f"validation denoising loss {summary['val_loss']:.4f} on {config.val_shards}")
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        print(f"final loss {task.mean_loss:.4f} after {loop.state['step']} steps; UNet: {out / 'final' / 'unet'}")
        print(f"{N} samples ({config.sampler}, {config.num_inference_steps} steps) decoded by {vae_dir}: {grid}")
    loop.accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
