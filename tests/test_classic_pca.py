"""The textbook sanity check of the trainer: a linear autoencoder trained with L2 on low-rank data spans PCA's top-k
subspace (Baldi & Hornik 1989), through the same model, loss and training step that `train/vae.py` runs."""

import numpy as np
import torch
from scipy.linalg import subspace_angles

from ldtok.losses import LossConfig, build_loss
from ldtok.models import ModelConfig, build_model
from ldtok.training import AutoencoderStep


def low_rank_data(n=512, side=4, rank=3, noise=0.01, seed=0) -> torch.Tensor:
    """`n` images `(1, side, side)` = mean + rank-`rank` signal with distinct variances + small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    D = side * side
    basis = torch.linalg.qr(torch.randn(D, rank, generator=g))[0]  # (D, k) orthonormal
    scales = torch.tensor([1.0, 0.7, 0.4])[:rank]
    coeffs = torch.randn(n, rank, generator=g) * scales
    x = 0.1 + coeffs @ basis.T + noise * torch.randn(n, D, generator=g)
    return x.view(n, 1, side, side)


def test_linear_autoencoder_spans_the_pca_subspace():
    k = 3
    x = low_rank_data(rank=k)
    torch.manual_seed(0)
    model = build_model(ModelConfig(type="mlp", in_channels=1, sample_size=4, block_out_channels=[],
                                    latent_channels=k, deterministic=True))
    loss_fn = build_loss(LossConfig(reconstruction="l2", perceptual="none", perceptual_weight=0.0,
                                    disc_weight=0.0, kl_weight=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def update(loss, optimizer, module):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ae_step = AutoencoderStep(model=model, loss_fn=loss_fn)
    for step in range(1500):
        generated = ae_step.generator(x, step=step)
        update(generated.loss, opt, model)
        terms = generated.terms
    assert float(terms["rec"]) < 2e-3, terms  # down to about the noise floor (1e-4) plus what is left of training

    flat = x.flatten(1).double().numpy()
    _, _, vt = np.linalg.svd(flat - flat.mean(0), full_matrices=False)
    pca = vt[:k].T  # (D, k): top-k principal directions
    decoder = model.vae.decoder[-1].weight.detach().double().numpy()  # (D, k): the decoder's column space
    angles = subspace_angles(decoder, pca)
    assert np.max(angles) < 0.02, np.degrees(angles)  # radians; the noise alone tilts it by ~1e-3
    # and it is not any subspace: a random one is far off
    random = np.random.default_rng(0).standard_normal(pca.shape)
    assert np.max(subspace_angles(random, pca)) > 0.5
