"""Train a latent-diffusion prior (diffusers `UNet2DModel` + DDPM) on KL latent shards, then sample and decode.

    accelerate launch train/prior_diffusion.py --config configs/prior-diffusion-demo.yaml shards=DIR [key=value ...]

Latents are read with a fresh posterior sample per access and normalized with the manifest's statistics,
`(z - shift_factor) * scaling_factor`; samples are unnormalized (`z / scaling_factor + shift_factor`) and decoded by
the VAE (`vae=DIR`, default: the model the shards were encoded with). Writes to `output_dir`: `metrics.jsonl`,
`samples.png`, `final/unet` (`UNet2DModel.from_pretrained`), `final/scheduler`, `final/prior.json` (latent scaling,
VAE path), `summary.json`. Keys and defaults: `python train/prior_diffusion.py --help`.
"""

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldtok.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_tensors,
    read_trainer_state,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
)
from ldtok.config import ConfigError, parse_args, save_config, write_text_atomic
from ldtok.ema import ModelEMA
from ldtok.errors import run_cli
from ldtok.guard import NonFiniteGuard
from ldtok.images import make_grid, save_image_atomic
from ldtok.models import save_pretrained_atomic
from ldtok.priors import PriorDiffusionConfig
from ldtok.run_checks import check_batch_fills
from ldtok.shards import LatentShardDataset, load_manifest
from ldtok.training import learning_rate

logger = logging.getLogger("ldtok.prior_diffusion")


def main() -> None:
    try:
        config = parse_args(PriorDiffusionConfig)
    except (ConfigError, AssertionError) as e:
        sys.exit(f"config error: {e}")
    try:
        manifest = load_manifest(config.shards)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"config error: shards: {e}")
    if manifest["kind"] != "kl":
        sys.exit(f"config error: shards: {config.shards} holds kind={manifest['kind']!r} shards; this script needs KL "
                 "latents (train/prior_transformer.py models VQ codes)")
    vae_dir = config.vae or manifest["model"].get("path")
    if not vae_dir or not (Path(vae_dir) / "config.json").is_file():
        sys.exit(f"config error: vae: no diffusers AutoencoderKL directory at {vae_dir!r} (set vae=DIR)")
    conditional = config.unet.num_classes is not None
    if conditional and "label" not in manifest["fields"]:
        sys.exit(f"config error: unet.num_classes is set but {config.shards} stores no labels")
    tc, out = config.train, Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        mixed_precision=tc.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved ..." lines drown ours
    set_seed(tc.seed)

    # Data: normalized latents (C, h, w) from the shards; the VAE that decodes samples, loaded now so a bad one fails
    # before training, not after it.
    vae = AutoencoderKL.from_pretrained(vae_dir).eval() if accelerator.is_main_process else None
    dataset = LatentShardDataset(config.shards, sample_posterior=config.sample_posterior, use_flip=config.use_flip)
    scale, shift = dataset.source.scaling_factor, dataset.source.shift_factor
    C, h, w = manifest["fields"]["mean"]["shape"]
    f = 2 ** (len(config.unet.block_out_channels) - 1)
    assert h % f == 0 and w % f == 0, f"latent size {h}x{w} not divisible by the UNet's downsampling factor {f}"
    check_batch_fills(num_images=len(dataset), batch_size=tc.batch_size, num_processes=accelerator.num_processes,
                      what="samples")
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=tc.num_workers)

    # Model: a UNet2DModel on (C, h, w) latents, the DDPM forward process, AdamW.
    levels = zip(config.unet.block_out_channels, config.unet.attention)
    down, up = zip(*[("AttnDownBlock2D", "AttnUpBlock2D") if a else ("DownBlock2D", "UpBlock2D") for _, a in levels])
    unet = UNet2DModel(
        sample_size=(h, w), in_channels=C, out_channels=C, block_out_channels=tuple(config.unet.block_out_channels),
        down_block_types=down, up_block_types=tuple(reversed(up)), layers_per_block=config.unet.layers_per_block,
        attention_head_dim=config.unet.attention_head_dim, norm_num_groups=config.unet.norm_num_groups,
        dropout=config.unet.dropout, num_class_embeds=config.unet.num_classes,
    )
    # clip_sample=False: normalized latents are not confined to [-1, 1] as pixels are
    noise_scheduler = DDPMScheduler(num_train_timesteps=config.noise.num_train_timesteps, clip_sample=False,
                                    beta_schedule=config.noise.beta_schedule,
                                    prediction_type=config.noise.prediction_type)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                                  weight_decay=tc.weight_decay)
    ema = ModelEMA(unet, decay=tc.ema_decay) if tc.ema_decay else None
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    set_seed(tc.seed, device_specific=True)  # same init on every rank (above); from here, per-rank noise
    raw_unet = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.to(accelerator.device)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)  # of an interrupted checkpoint write, rotation or final export
        save_config(config, out / "config.yaml")

    accelerator.wait_for_everyone()
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "nonfinite_steps": 0}
    resume_from = resolve_resume(config.resume, out)  # checksums verified
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state.update(read_trainer_state(resume_from))
        if ema is not None:  # loaded on the CPU, copied to the device by load_state_dict (`cpu:0` is no device for it)
            ema.load_state_dict(load_tensors(resume_from / "ema.safetensors"))
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    if resume_from is not None and state["step"] >= tc.max_steps and (out / "summary.json").is_file():
        # a finished run rerun (summary.json is written last, after the export): nothing to do, nothing rewritten
        if accelerator.is_main_process:
            print(f"{out}: the run already finished at step {state['step']} (train.max_steps={tc.max_steps}); "
                  f"nothing to do; final model: {out / 'final'}")
        accelerator.end_training()
        return
    guard = NonFiniteGuard(accelerator=accelerator, max_consecutive=tc.max_nonfinite_steps,
                           last_good=lambda: (list_checkpoints(out) or [None])[-1])
    guard.total = state["nonfinite_steps"]

    def weights() -> dict[str, torch.nn.Module]:
        return {"unet": raw_unet, **({"ema": ema.model} if ema is not None else {})}

    def write_checkpoint_extra(path: Path) -> None:
        save_pretrained_atomic(ema.model if ema is not None else raw_unet, path / "unet")
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, path / "ema.safetensors")

    # Train: eps (or v) prediction MSE at uniformly drawn timesteps.
    T = noise_scheduler.config.num_train_timesteps
    progress = tqdm(total=tc.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
                    desc="prior-diffusion", dynamic_ncols=True)
    window: list[torch.Tensor] = []
    mean_loss, window_start = float("nan"), time.perf_counter()
    unet.train()
    while state["step"] < tc.max_steps:
        loader.set_epoch(state["epoch"])
        batches = accelerator.skip_first_batches(loader, state["batch_in_epoch"]) if state["batch_in_epoch"] else loader
        for batch in batches:
            state["batch_in_epoch"] += 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["step"], base=tc.lr, warmup_steps=tc.warmup_steps,
                                            max_steps=tc.max_steps, schedule=tc.lr_schedule)
            z0 = batch["latents"]  # (B, C, h, w), normalized
            B = z0.shape[0]
            with accelerator.accumulate(unet):
                noise = torch.randn_like(z0)
                t = torch.randint(0, T, (B,), device=z0.device)
                z_t = noise_scheduler.add_noise(z0, noise, t)
                if config.noise.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(z0, noise, t)
                pred = unet(z_t, t, class_labels=batch["label"] if conditional else None).sample  # through the wrapper
                loss = F.mse_loss(pred.float(), target.float())
                # skips the step (on every rank) when the loss or gradient norm is non-finite
                guard.step(loss, optimizer, unet.parameters(), max_grad_norm=tc.max_grad_norm)
            window.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            if guard.end_step(step=state["step"] + 1, terms={"loss": loss.detach()}):
                state["nonfinite_steps"] = guard.total
                continue
            state["step"] += 1
            if ema is not None:
                ema.update(raw_unet)
            progress.update(1)
            done = state["step"] >= tc.max_steps
            if state["step"] % tc.log_every == 0 or done:
                finite = [w for w in window if torch.isfinite(w)] or window  # a skipped step's loss is not news
                mean_loss = accelerator.reduce(torch.stack(finite).mean(), "mean").item()
                it_per_s = len(window) / tc.gradient_accumulation_steps / (time.perf_counter() - window_start)
                window.clear()
                window_start = time.perf_counter()
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                if accelerator.is_main_process:
                    with open(out / "metrics.jsonl", "a") as fh:
                        fh.write(json.dumps({"step": state["step"], "loss": mean_loss, "it_per_s": it_per_s,
                                             "lr": optimizer.param_groups[0]["lr"]}) + "\n")
            if tc.checkpoint_every and (state["step"] % tc.checkpoint_every == 0 or done):
                guard.check_weights(weights(), writing=checkpoint_dir(out) / f"step_{state['step']:08d}")
                save_checkpoint(accelerator, out, step=state["step"], trainer_state=state,
                                write_extra=write_checkpoint_extra, keep=tc.keep_checkpoints)
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()
    accelerator.wait_for_everyone()
    guard.check_weights(weights(), writing=out / "final")

    # Export, sample N latents, unnormalize, decode, grid.
    if accelerator.is_main_process:
        final_unet = (ema.model if ema is not None else raw_unet).eval()
        save_pretrained_atomic(final_unet, out / "final" / "unet")
        write_text_atomic(out / "final" / "scheduler" / "scheduler_config.json", noise_scheduler.to_json_string())
        write_text_atomic(out / "final" / "prior.json", json.dumps(
            {"vae": str(vae_dir), "shards": str(config.shards), "scaling_factor": scale, "shift_factor": shift,
             "latent_shape": [C, h, w]}, indent=2))
        sampler_cls = DDIMScheduler if config.sampler == "ddim" else DDPMScheduler
        sampler = sampler_cls.from_config(noise_scheduler.config)
        sampler.set_timesteps(config.num_inference_steps)
        N, device = config.num_samples, accelerator.device
        generator = torch.Generator(device).manual_seed(tc.seed)
        labels = torch.arange(N, device=device) % config.unet.num_classes if conditional else None
        z = torch.randn(N, C, h, w, generator=generator, device=device)
        with torch.no_grad(), accelerator.autocast():
            for t in tqdm(sampler.timesteps, desc="sample", dynamic_ncols=True):
                model_output = final_unet(z, t, class_labels=labels).sample
                z = sampler.step(model_output.float(), t, z, generator=generator).prev_sample
        sample_std = float(z.std())  # about 1 when the prior matches the normalized latents
        z = z / scale + shift  # back to the VAE's latent space
        vae.to(device)
        with torch.no_grad():
            images = torch.cat([vae.decode(chunk).sample.float() for chunk in z.split(16)])  # (N, 3, H, W)
        cols = min(config.grid_columns, N)
        pad = (-N) % cols  # white tiles complete the last row
        images = torch.cat([images, images.new_ones(pad, *images.shape[1:])])
        grid = save_image_atomic(make_grid(list(images.split(cols))), out / "samples.png")
        summary = {"steps": state["step"], "final_loss": mean_loss, "samples": str(grid),
                   "unet": str(out / "final" / "unet"), "sample_std": sample_std}
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        print(f"final loss {mean_loss:.4f} after {state['step']} steps; UNet: {out / 'final' / 'unet'}")
        print(f"{N} samples ({config.sampler}, {config.num_inference_steps} steps) decoded by {vae_dir}: {grid}")
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
