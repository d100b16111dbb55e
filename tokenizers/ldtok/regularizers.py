"""The classic autoencoder regularizers that `AutoencoderLoss` adds on request (`loss.*` keys).

- Sparsity (sparse autoencoders): `l1`, the mean absolute latent activation; or `kl`, the KL divergence of each
  latent unit's mean activation (over the batch, squashed to (0, 1) by a sigmoid) to a target rate `rho` (Ng's
  lecture notes on sparse autoencoders), averaged over units.
- Contractive (Rifai et al. 2011): the squared Frobenius norm of the encoder's Jacobian `||dz/dx||_F^2`, estimated
  with random projections: `E_v ||J^T v||^2 = tr(J J^T) = ||J||_F^2` for `v ~ N(0, I)` in latent space, one
  vector-Jacobian product (autograd, graph kept) per projection (Hutchinson's trace estimator). The exact Jacobian
  of an image encoder has `latent size x image size` entries: far too many to form.
- KL annealing schedules: `linear` warm-up (Bowman et al. 2016) and `cyclical` (Fu et al. 2019).
- Bernoulli likelihood: binary cross-entropy of the decoder's logits against images mapped to [0, 1].

Every function here is pure (tensors in, a tensor out); the weights live in `LossConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SPARSITY_KINDS = ("none", "l1", "kl")
KL_SCHEDULES = ("linear", "cyclical")
_EPS = 1e-6


def sparsity_penalty(latents: Tensor, *, kind: str, target: float) -> Tensor:
    """The sparsity penalty of latent activations.

    Args:
        latents (`Tensor` of shape `(B, C, h, w)`): the encoder's code (KL models: the posterior mean).
        kind (`"l1"` or `"kl"`): mean `|z|`; or `mean_j KL(rho || rho_hat_j)` with `rho_hat_j` the batch mean of
            `sigmoid(z_j)` for every unit `j` (a channel at a position).
        target (`float`): `rho` in (0, 1), the target mean activation of the `kl` penalty.

    Returns:
        `Tensor`, scalar, fp32.
    """
    z = latents.float()
    if kind == "l1":
        return z.abs().mean()
    if kind == "kl":
        rho_hat = torch.sigmoid(z).mean(dim=0).clamp(_EPS, 1 - _EPS)  # (C, h, w): mean activation of each unit
        rho = target
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return kl.mean()
    raise ValueError(f"unknown sparsity kind {kind!r}; expected one of {SPARSITY_KINDS[1:]}")


def jacobian_frobenius_sq(z: Tensor, x: Tensor, *, samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson estimate of `||dz/dx||_F^2` per sample, mean over the batch; differentiable (its graph is kept, so
    the penalty trains the encoder through a second backward).

    Args:
        z (`Tensor` of shape `(B, ...)`): the code, computed from `x` with each sample's code depending on that
            sample only (GroupNorm is per sample; BatchNorm in training mode would not be).
        x (`Tensor` of shape `(B, C, H, W)`): the input `z` was computed from; it must require grad.
        samples (`int`): random projections `v ~ N(0, I)` averaged (the estimator's variance falls as `1 / samples`).
        generator (`torch.Generator`, *optional*): a CPU generator for the projections (default: torch's global RNG,
            which Accelerate checkpoints).

    Returns:
        `Tensor`, scalar, fp32: `mean_b (1 / samples) sum_s ||J_b^T v_s||^2`, unbiased for `mean_b ||J_b||_F^2`.
    """
    assert samples >= 1, f"contractive samples must be >= 1, got {samples}"
    assert x.requires_grad, "jacobian_frobenius_sq: x must require grad (and z be computed from it)"
    total = z.new_zeros((), dtype=torch.float32)
    for _ in range(samples):
        v = torch.randn(z.shape, generator=generator, device="cpu" if generator is not None else z.device)
        # J^T v for every sample at once: the code of sample b depends on x[b] only
        (jtv,) = torch.autograd.grad(z, x, grad_outputs=v.to(z), create_graph=True, retain_graph=True)
        total = total + jtv.float().pow(2).sum()
    return total / (samples * z.shape[0])


def exact_jacobian_frobenius_sq(encode: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`||J||_F^2` of every sample from the full Jacobian (tiny models only; the tests' reference), mean over B."""
    values = []
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda xb: encode(xb.unsqueeze(0)).squeeze(0), x[b])
        values.append(J.float().pow(2).sum())
    return torch.stack(values).mean()


def kl_weight_at(
    step: int, *, weight: float, schedule: str, warmup_steps: int = 0, total_steps: int | None = None,
    cycles: int = 4, ratio: float = 0.5,
) -> float:
    """The KL weight at optimizer step `step` (0-based).

    Args:
        weight (`float`): the final (peak) weight `beta`.
        schedule (`"linear"` or `"cyclical"`): `linear`: `beta * min(1, step / warmup_steps)` (constant when
            `warmup_steps == 0`). `cyclical` (Fu et al. 2019): the `total_steps` are cut into `cycles` periods of
            `P = total_steps / cycles` steps; within a period, at `tau = (step mod P) / P`, the weight rises linearly
            from 0 to `beta` over the first `ratio` of the period, then stays at `beta`. Steps past `total_steps` keep
            cycling with the same period.
        warmup_steps (`int`): linear schedule's ramp.
        total_steps (`int`): cyclical schedule's span (the trainer passes `train.max_steps`).
        cycles (`int`), ratio (`float`, in (0, 1]): cyclical schedule's shape.
    """
    if schedule == "linear":
        return weight if warmup_steps == 0 else weight * min(1.0, step / warmup_steps)
    if schedule == "cyclical":
        assert total_steps is not None and total_steps > 0, "the cyclical KL schedule needs total_steps > 0"
        period = total_steps / cycles
        tau = math.fmod(step, period) / period
        return weight * min(1.0, tau / ratio)
    raise ValueError(f"unknown KL schedule {schedule!r}; expected one of {KL_SCHEDULES}")


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """Binary cross-entropy of decoder `logits` against images `x` in `[-1, 1]` mapped to `[0, 1]`, mean over values.

    Args:
        logits (`Tensor` of shape `(B, C, H, W)`): the decoder's output read as Bernoulli logits.
        x (`Tensor` of shape `(B, C, H, W)`): the target images in `[-1, 1]`.
    """
    target = ((x.float() + 1) / 2).clamp(0, 1)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def logits_to_image(logits: Tensor) -> Tensor:
    """The image `2 * sigmoid(logits) - 1` in `[-1, 1]`: the Bernoulli mean, as the rest of ldtok reads images."""
    return torch.sigmoid(logits) * 2 - 1


# ---------------------------------------------------------------------------------------- AutoencoderLoss's terms


def validate_classic(cfg) -> None:
    """Range checks of the `LossConfig` keys this module serves; a `ConfigValueError` naming the key."""
    from ldtok.config import check_range, invalid  # a ValueError too

    check_range(cfg, "sparsity_target", gt=0.0, lt=1.0)
    if cfg.sparsity_weight > 0 and cfg.sparsity == "none":
        raise invalid("sparsity", "is none but loss.sparsity_weight > 0: choose loss.sparsity=l1 or kl")
    check_range(cfg, "contractive_samples", ge=1)
    check_range(cfg, "kl_cycles", ge=1)
    check_range(cfg, "kl_ratio", gt=0.0, le=1.0)
    check_range(cfg, "kl_total_steps", ge=1)
    if cfg.kl_schedule == "cyclical" and cfg.kl_warmup_steps > 0:
        raise invalid("kl_warmup_steps", "is the linear schedule's ramp; with loss.kl_schedule=cyclical set "
                      "loss.kl_ratio / loss.kl_cycles instead (and kl_warmup_steps=0)")


def reconstruction_term(cfg, x: Tensor, x_rec: Tensor, output) -> Tensor:
    """The pixel term of `LossConfig` `cfg`: L1 / L2 of `x_rec`, or the Bernoulli NLL of `output.logits` (`bce`)."""
    if cfg.reconstruction == "bce":
        if output is None or output.logits is None:
            raise ValueError("loss.reconstruction=bce needs the decoder's logits (output.logits): build the model "
                             "with decoder_logits=True (model.type mlp or vae2)")
        return bernoulli_nll(output.logits, x)
    diff = x_rec.float() - x.float()
    return diff.abs().mean() if cfg.reconstruction == "l1" else diff.pow(2).mean()


def classic_regularizers(cfg, output, terms: dict[str, Tensor]) -> Tensor | float:
    """`sparsity_weight * sparsity + contractive_weight * contractive` (0 when both are off); adds the unweighted
    terms to `terms` (`sparsity`, `contractive`)."""
    total: Tensor | float = 0.0
    if cfg.sparsity != "none" and cfg.sparsity_weight > 0:
        if output is None or output.latents is None:
            raise ValueError(f"loss.sparsity={cfg.sparsity} needs the model's latent code (output.latents); "
                             "this model family does not expose one")
        terms["sparsity"] = sparsity_penalty(output.latents, kind=cfg.sparsity, target=cfg.sparsity_target)
        total = total + cfg.sparsity_weight * terms["sparsity"]
    if cfg.contractive_weight > 0:
        if output is None or output.contractive is None:
            raise ValueError("loss.contractive_weight > 0 needs the model's Jacobian estimate (output.contractive): "
                             "build the model with contractive_samples > 0 (model.type kl or mlp), in train mode")
        terms["contractive"] = output.contractive.float()
        total = total + cfg.contractive_weight * terms["contractive"]
    return total


def hierarchical_kl(kl_maps: dict[str, Tensor], *, free_bits: float, num_values: int
                    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Hierarchical VAEs' KL: `(free-bits KL / num_values, raw nats, raw nats per level)`.

    Args:
        kl_maps (`dict[str, Tensor]`): level name -> KL map `(B, C_l, h_l, w_l)` in nats.
        free_bits (`float`): per-channel floor (nats per sample, summed over positions), applied in every level.
        num_values (`int`): values per image `C * H * W` (the loss's per-value scaling).
    """
    total, nats, per_level = 0.0, 0.0, {}
    for name, kl_map in kl_maps.items():
        kl_channels = kl_map.float().sum(dim=(2, 3)).mean(dim=0)  # (C_l,) per-sample nats of each channel
        per_level[name] = kl_channels.sum()
        nats = nats + per_level[name]
        if free_bits > 0:
            # max(kl_c, floor): a channel under its floor costs a constant, so gets no KL gradient
            kl_channels = kl_channels.clamp(min=free_bits)
        total = total + kl_channels.sum()
    return total / num_values, nats, per_level
