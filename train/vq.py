"""Train a VQGAN (exported as a diffusers VQModel) or a VQ-VAE-2 with EMA codebooks, LPIPS and PatchGAN losses.

    accelerate launch train/vq.py --config configs/demo-vq.yaml [key=value ...]
    accelerate launch train/vq.py --config configs/demo-vqvae2.yaml

Keys and defaults: `python train/vq.py --help`. Codebook usage, perplexity and restarted dead codes are logged every
step; `output_dir/final/` is a diffusers `VQModel` directory (VQGAN) or an `ldtok.VQVAE2` directory.
"""

from ldtok.config import ConfigError, parse_args
from ldtok.errors import run_cli
from ldtok.training import RunConfig, train


def main() -> None:
    try:
        config = parse_args(RunConfig)
    except AssertionError as e:  # a section's own value checks
        raise ConfigError(str(e)) from None
    if config.model.type not in ("vqgan", "vqvae2"):
        raise ConfigError(f"model.type: train/vq.py trains vqgan or vqvae2, got {config.model.type!r} "
                          "(use train/vae.py for KL models)")
    summary = train(config)
    if "final" not in summary:  # not the main process
        return
    if summary.get("already_finished"):
        action = "exported its final model" if summary.get("exported") else "nothing to do"
        print(f"{config.output_dir}: the run already finished at step {summary['steps']} (train.max_steps="
              f"{config.train.max_steps}); {action}; final model: {summary['final']}")
        return
    val = summary["validation"]
    usage = ", ".join(f"{k} {100 * v:.1f}%" for k, v in val.items() if k.startswith("codebook_usage"))
    if config.model.type == "vqvae2":
        kind = "ldtok VQVAE2"
    elif config.model.quantizer.type == "vq":
        kind = "diffusers VQModel"
    else:
        kind = f"ldtok QuantizedAutoencoder, {config.model.quantizer.type}"
    print(f"final model: {summary['final']}  ({kind})")
    print(f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}, {usage}; "
          f"reconstructions: {val.get('grid')}")
    print(f"training: {summary['images_per_s']:.1f} img/s, peak memory {summary['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    run_cli(main)
