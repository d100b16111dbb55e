"""The autoencoder's training step: the forward, the generator loss and (once the GAN is on) the discriminator loss.

`AutoencoderStep` computes losses and leaves backward and optimizer steps to its caller, so the trainer
(`ldtok.training.trainer`, through the loop's non-finite guard), the training benchmark (`eval/_bench_steps.py`, plain
or with a GradScaler) and tests all run the same step:

    ae_step = AutoencoderStep(model=model, loss_fn=loss_fn, disc=disc)   # model, disc: as prepared (DDP-wrapped)
    gen = ae_step.generator(x, step=step)                                # forward through `model`
    # latent shaping: gen = ae_step.generator(x, step=step, x_in=masked, shaping=LatentShaping(...))
    update(gen.loss, opt_g, model)
    if (d := ae_step.discriminator(x, gen, step=step)) is not None:      # forward through `disc`
        update(d.loss, opt_d, disc)

The models are called as given (inside `accelerator.accumulate(model, disc)` in training, so DDP arms its all-reduce
in their forwards); the generator loss evaluates the discriminator with detached parameters on the module inside its
wrappers (`AutoencoderLoss`), and the adaptive GAN weight reads `last_layer` of the model inside its wrappers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from ..losses import AutoencoderLoss
from ..outputs import AutoencoderOutput
from ..shaping.options import LatentShaping
from .shaping import Alignment


@dataclass
class LossStep:
    """One loss of a step.

    Args:
        loss (`Tensor` of shape `()`): the loss to backpropagate.
        terms (`dict[str, Tensor]`): its detached terms, for logging.
        output (`AutoencoderOutput`, *optional*): the generator's forward output (its `sample` is the
            reconstruction the discriminator then sees).
    """

    loss: Tensor
    terms: dict[str, Tensor]
    output: AutoencoderOutput | None = None


class AutoencoderStep:
    """The losses of one autoencoder training step.

    Args:
        model (`nn.Module`): the autoencoder being trained (returns an `AutoencoderOutput`), as prepared.
        loss_fn (`AutoencoderLoss`): the generator and discriminator losses.
        disc (`nn.Module`, *optional*): the discriminator being trained, as prepared; needed once the GAN is on.
    """

    def __init__(self, *, model: nn.Module, loss_fn: AutoencoderLoss, disc: nn.Module | None = None,
                 alignment: Alignment | None = None):
        self.model, self.loss_fn, self.disc, self.alignment = model, loss_fn, disc, alignment
        self.last_layer = getattr(extract_model_from_parallel(model, keep_torch_compile=False), "last_layer", None)

    def generator(self, x: Tensor, *, step: int, x_in: Tensor | None = None,
                  shaping: LatentShaping | None = None) -> LossStep:
        """The autoencoder's (generator's) loss.

        Args:
            x (`Tensor` of shape `(B, C, H, W)`): the clean images in [-1, 1] (the target).
            step (`int`): the optimizer step (GAN start, KL schedule).
            x_in (`Tensor`, *optional*): what the model sees (noisy in denoising mode, masked); defaults to `x`.
            shaping (`LatentShaping`, *optional*): the batch's latent noise and EQ-VAE transform, given to the
                model's forward (KL, VQGAN, VQ-VAE-2).
        """
        x_in = x if x_in is None else x_in
        output = self.model(x_in) if shaping is None else self.model(x_in, shaping=shaping)
        alignment = self.alignment(x, output) if self.alignment is not None else None
        loss, terms = self.loss_fn.generator_loss(
            x, output.sample, discriminator=self.disc, last_layer=self.last_layer, step=step,
            posterior=output.posterior, quant=output.quant, output=output,
            transform=shaping.transform if shaping is not None else None, alignment=alignment,
        )
        return LossStep(loss=loss, terms=terms, output=output)

    def discriminator(self, x: Tensor, generated: LossStep, *, step: int) -> LossStep | None:
        """The discriminator's loss on `x` and the generator step's reconstruction; `None` before the GAN starts."""
        if not self.loss_fn.disc_active(step):
            return None
        loss, terms = self.loss_fn.discriminator_loss(x, generated.output.sample, discriminator=self.disc, step=step)
        return LossStep(loss=loss, terms=terms)


def weights_checksum(*models: nn.Module) -> str:
    """sha256 of every parameter and buffer: equal on every rank when data-parallel training is in sync."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = ["AutoencoderStep", "LossStep", "weights_checksum"]
