"""Latent-space shaping: the options that make a tokenizer's latents easier for a prior, beyond reconstruction.

- `equivariance`: EQ-VAE's spatial transforms (scale, rotate by 90°·k, flip) applied to latents and images alike;
- `corruption`: l-DeTok's latent noise and MAE/MAETok-style patch masking of the encoder input, and their schedules;
- `alignment`: VA-VAE's vision-foundation alignment (a frozen `transformers` vision encoder from a local directory,
  a learned projection of the latent, the marginal cosine and distance-matrix terms);
- `trainable`: which half of an autoencoder trains (`all`, `decoder`, `encoder`), for decoder-only fine-tuning with a
  bit-identical latent space.

Everything here is a plain function or module that receives tensors; the trainer decides when to use it.
"""
