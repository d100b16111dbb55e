"""Train a KL-VAE (Stable Diffusion's AutoencoderKL) with L1/L2 + LPIPS + PatchGAN losses, or one of the classic
small-image families: an MLP VAE / AE (`model.type: mlp`) or the hierarchical KL-VAE (`model.type: vae2`).

    accelerate launch train/vae.py --config configs/demo-kl.yaml [key=value ...]

Keys and defaults: `python train/vae.py --help`. Writes `output_dir/final/`, a diffusers `AutoencoderKL` directory.
"""

from ldtok.config import ConfigError, parse_args
from ldtok.errors import run_cli
from ldtok.training import RunConfig, train


def main() -> None:
    try:
        config = parse_args(RunConfig)
    except AssertionError as e:  # a section's own value checks
        raise ConfigError(str(e)) from None
    if config.model.type not in ("kl", "mlp", "vae2"):
        raise ConfigError(f"model.type: train/vae.py trains kl, mlp and vae2 models, got {config.model.type!r} "
                          "(use train/vq.py)")
    summary = train(config)
    if "final" not in summary:  # not the main process
        return
    if summary.get("already_finished"):
        action = "exported its final model" if summary.get("exported") else "nothing to do"
        print(f"{config.output_dir}: the run already finished at step {summary['steps']} (train.max_steps="
              f"{config.train.max_steps}); {action}; final model: {summary['final']}")
        return
    val = summary["validation"]
    kind = {"kl": "diffusers AutoencoderKL", "mlp": "ldtok MLPAutoencoder", "vae2": "ldtok VAE2"}
    print(f"final model: {summary['final']}  ({kind[config.model.type]})")
    print(f"validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}; reconstructions: {val.get('grid')}")
    print(f"training: {summary['images_per_s']:.1f} img/s, peak memory {summary['peak_memory_mib']:.0f} MiB")


if __name__ == "__main__":
    run_cli(main)
