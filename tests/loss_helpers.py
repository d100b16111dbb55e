"""Small shared pieces of the loss tests: the all-off weights, hand-made images and a hand-made discriminator."""

import torch
from torch import nn

H = W = 32

# Every weight off: a test switches on the terms it looks at.
OFF = {
    "rec_weight": 0.0,
    "perceptual_weight": 0.0,
    "kl_weight": 0.0,
    "quant_weight": 0.0,
    "disc_weight": 0.0,
    "perceptual": "none",
}


class Channel0(nn.Module):
    """A parameter-free 'discriminator' whose logits are channel 0 of its input: hand-made logits."""

    def forward(self, x):
        return x[:, :1]


def images(seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, H, W, generator=g) * 2 - 1
