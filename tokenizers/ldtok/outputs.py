"""Typed outputs shared by quantizers, autoencoders and losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


@dataclass
class QuantizerOutput:
    """What a vector quantizer returns.

    Args:
        quantized (`Tensor` of shape `(B, C, H, W)`): straight-through quantized latents (gradients pass to the input).
        indices (`Tensor` of shape `(B, H, W)`, int64): the chosen code of every position.
        loss (`Tensor`, scalar): the quantizer's contribution to the generator loss,
            `beta * commit_loss + codebook_loss`.
        commit_loss (`Tensor`, scalar): unweighted `||z_e - sg(z_q)||^2`; its gradient reaches the encoder only.
        codebook_loss (`Tensor`, scalar): unweighted `||sg(z_e) - z_q||^2`; its gradient reaches the codebook only
            (zero when the codebook is updated by EMA).
        perplexity (`Tensor`, scalar): `exp(entropy)` of the batch's code histogram (all ranks), for logging.
        usage (`Tensor`, scalar): fraction of codes used in the batch (all ranks), for logging.
        entropy_loss (`Tensor`, scalar, *optional*): LFQ / BSQ: the unweighted entropy term
            `per_sample_entropy - diversity_gamma * codebook_entropy` (already included, weighted, in `loss`).
        stages (`list[QuantizerOutput]`, *optional*): residual VQ: every stage's own output (their `loss` summed
            into this one's; `indices` here are all stages' stacked as `(B, S, H, W)`).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    perplexity: Tensor
    usage: Tensor
    entropy_loss: Tensor | None = None
    stages: list[QuantizerOutput] | None = None

    def __iter__(self):
        """diffusers' quantizer convention, for `VQModel.decode` / `forward` on a `VQModel` holding one of ours:
        `quant, loss, (perplexity, None, indices) = quantizer(h)`. ldtok code reads the fields by name."""
        return iter((self.quantized, self.loss, (self.perplexity, None, self.indices)))


@dataclass
class AutoencoderOutput:
    """What a trainable autoencoder's `forward` returns.

    Args:
        sample (`Tensor` of shape `(B, 3, H, W)`): the reconstruction.
        posterior (`DiagonalGaussianDistribution`, *optional*): the KL model's posterior; `None` for VQ models and for
            a KL model in deterministic mode.
        quant (`QuantizerOutput` or list of them, *optional*): VQ models' quantizer outputs (VQ-VAE-2: `[top, bottom]`).
        latents (`Tensor` of shape `(B, C, h, w)`, *optional*): the encoder's deterministic code (KL: the posterior
            mean), for the sparsity penalty; models that do not expose it leave it `None`.
        logits (`Tensor` of shape `(B, C, H, W)`, *optional*): the decoder's raw output when it is read as Bernoulli
            logits (`loss.reconstruction=bce`); `sample` is then `2 * sigmoid(logits) - 1`.
        contractive (`Tensor`, scalar, *optional*): the Hutchinson estimate of the encoder Jacobian's squared
            Frobenius norm, computed in the (wrapped) forward when the model was built with contractive samples.
        kl_maps (`dict[str, Tensor]`, *optional*): hierarchical VAEs: level name -> KL map `(B, C_l, h_l, w_l)` in
            nats of that level's posterior against its (possibly conditional) prior; used instead of `posterior`.
        equivariant_sample (`Tensor` of shape `(B, C, H', W')`, *optional*): the decoding of `T(z)` when the forward
            was given a `LatentShaping` with a transform (EQ-VAE); compared with `T(x)` by the loss.
    """

    sample: Tensor
    posterior: DiagonalGaussianDistribution | None = None
    quant: QuantizerOutput | list[QuantizerOutput] | None = None
    latents: Tensor | None = None
    logits: Tensor | None = None
    contractive: Tensor | None = None
    kl_maps: dict[str, Tensor] | None = None
    equivariant_sample: Tensor | None = None
