"""The adaptive GAN weight (taming / LDM) with one backward through the perceptual net and the discriminator.

taming, LDM and diffusers' scripts form `λ = ||∇_W nll|| / (||∇_W gan|| + 1e-4)` (W: the decoder's last weight) with
two `autograd.grad(..., W, retain_graph=True)` calls and then backpropagate `nll + λ·gan + rest` in full: every GAN
step runs the perceptual net's and the discriminator's backward twice.

Every path from `nll` and `gan` to the parameters passes through the reconstruction `x_rec`, so here:

1. `g_nll = ∂nll/∂x_rec` and `g_gan = ∂gan/∂x_rec`: the perceptual and discriminator backwards, once each;
2. `∇_W nll` and `∇_W gan` by backpropagating `g_nll` and `g_gan` from `x_rec` to `W` alone (the decoder's output
   layer: autograd runs only the nodes between them);
3. the loss returned is a surrogate whose value is the true loss and whose gradient is that of
   `nll + λ·gan + rest`: `<x_rec, g_nll + λ·g_gan> + rest`. Its backward runs through the autoencoder only.

The parameter gradients equal the two-pass ones up to float rounding (`tests/test_adaptive_weight.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def adaptive_gan_loss(
    x_rec: Tensor, *, nll: Tensor, gan: Tensor, rest: Tensor, last_layer: Tensor, disc_weight: float, max_ratio: float
) -> tuple[Tensor, Tensor]:
    """`(loss, weight)`: the generator loss `nll + weight·gan + rest` to backpropagate once, and the detached weight.

    Args:
        x_rec (`Tensor`): the decoder's output (the reconstruction, or the logits it is computed from), the only path
            from `nll` and `gan` to the parameters.
        nll (`Tensor`, scalar): reconstruction + perceptual loss of `x_rec`.
        gan (`Tensor`, scalar): the generator's GAN loss of `x_rec` (discriminator parameters detached).
        rest (`Tensor`, scalar): the terms left out of the ratio, backpropagated through their own graph: those that
            do not pass through `x_rec` (KL, quantizer losses), and a colour term with
            `loss.colour_in_adaptive_weight=false` (autograd sums its gradient at `x_rec` with the surrogate's, so the
            autoencoder's backward still runs once).
        last_layer (`Tensor`): the decoder's last weight.
        disc_weight (`float`): multiplies the clamped ratio.
        max_ratio (`float`): upper clamp of the gradient-norm ratio.
    """
    # Means over all values give per-value gradients of about 1/numel, which fp16 flushes to zero: take them scaled by
    # numel (a constant: the ratio and the final gradient are unchanged) and unscale in fp32.
    scale = float(x_rec.numel())
    g_nll, g_gan = (torch.autograd.grad(term * scale, x_rec)[0] for term in (nll, gan))
    w_nll = torch.autograd.grad(x_rec, last_layer, grad_outputs=g_nll, retain_graph=True)[0]
    w_gan = torch.autograd.grad(x_rec, last_layer, grad_outputs=g_gan, retain_graph=True)[0]
    # The 1e-4 of taming acts on unscaled norms: scale it too.
    ratio = w_nll.float().norm() / (w_gan.float().norm() + 1e-4 * scale)
    weight = ratio.clamp(0.0, max_ratio).detach() * disc_weight
    grad = (g_nll.float() + weight * g_gan.float()) / scale
    surrogate = (x_rec.float() * grad).sum() + rest
    value = (nll + weight * gan + rest).detach()
    return surrogate - surrogate.detach() + value, weight
