"""ldtok: image tokenizers for latent diffusion and autoregressive priors.

KL-VAE (diffusers `AutoencoderKL`), VQGAN (exported as diffusers `VQModel`) and VQ-VAE-2, trained with L1/L2 + LPIPS +
PatchGAN losses under HF Accelerate, and used to encode image datasets into safetensors latent shards.
"""

__version__ = "0.1.0"
