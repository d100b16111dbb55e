"""`ImageTransform`: resize the shorter side, crop a square (random or center), maybe flip and jitter the colour, scale
to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """Resize the shorter side to `resolution` (bicubic, antialiased), crop a square, maybe flip and jitter the colour,
    scale to [-1, 1].

    Random crop offsets and flips come from the `generator` the dataset passes in, seeded from (seed, epoch, sample
    index): augmentation then depends on neither worker scheduling nor the data loader's prefetching, so a resumed
    run sees exactly the crops an uninterrupted run would have seen.

    Args:
        resolution (`int`): output side `R`.
        random_crop (`bool`, defaults to `False`): random crop position, else the center.
        random_flip (`bool`, defaults to `False`): horizontal flip with probability 0.5.
        channels (`int`, defaults to 3): 3 for RGB output, 1 for greyscale (`(1, R, R)`).
        hue_jitter (`float`, defaults to 0): rotate the hue by a uniform fraction of the colour wheel in
            `[-hue_jitter, hue_jitter]` (torchvision's `adjust_hue`; at most 0.5). Grey stays grey.
        saturation_jitter (`float`, defaults to 0): scale the saturation by a uniform factor in
            `[1 - saturation_jitter, 1 + saturation_jitter]` (torchvision's `adjust_saturation`; below 1).
    """

    def __init__(self, *, resolution: int, random_crop: bool = False, random_flip: bool = False, channels: int = 3,
                 hue_jitter: float = 0.0, saturation_jitter: float = 0.0):
        assert resolution > 0, f"resolution must be positive, got {resolution}"
        assert 0.0 <= hue_jitter <= 0.5, f"hue_jitter must be in [0, 0.5], got {hue_jitter}"
        assert 0.0 <= saturation_jitter < 1.0, f"saturation_jitter must be in [0, 1), got {saturation_jitter}"
        self.resolution = resolution
        self.channels = channels
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.hue_jitter = hue_jitter if channels == 3 else 0.0
        self.saturation_jitter = saturation_jitter if channels == 3 else 0.0

    @property
    def is_random(self) -> bool:
        return self.random_crop or self.random_flip or self.hue_jitter > 0 or self.saturation_jitter > 0

    def __call__(self, image: Image.Image, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Map an RGB PIL image to a `(3, R, R)` float tensor in [-1, 1]; randomness drawn from `generator`."""
        R = self.resolution
        W, H = image.size
        scale = R / min(W, H)
        out_w, out_h = max(R, round(W * scale)), max(R, round(H * scale))  # size after resizing the shorter side
        if self.random_crop:
            left = int(torch.randint(0, out_w - R + 1, (), generator=generator))
            top = int(torch.randint(0, out_h - R + 1, (), generator=generator))
        else:
            left, top = (out_w - R) // 2, (out_h - R) // 2
        # Resample only the crop: `box` (in source pixels) gives the same pixels as resizing the whole image and then
        # cropping (the filter still reads outside the box), without materialising a huge upscaled image.
        sx, sy = out_w / W, out_h / H
        box = (left / sx, top / sy, (left + R) / sx, (top + R) / sy)
        image = image.resize((R, R), Image.Resampling.BICUBIC, box=box)
        if self.channels == 1:
            image = image.convert("L")
        x = torch.from_numpy(np.array(image, dtype=np.uint8).reshape(R, R, -1)).permute(2, 0, 1)  # (C, R, R)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        if self.hue_jitter > 0 or self.saturation_jitter > 0:
            return self._jitter_colour(x.float().div_(255.0), generator).mul_(2.0).sub_(1.0)
        return x.float().div_(127.5).sub_(1.0)

    def _jitter_colour(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A random saturation scale, then a random hue rotation, of a `(3, R, R)` image in `[0, 1]`. The draws come
        after the crop's and the flip's, so turning the jitter on leaves those as they were."""
        from torchvision.transforms import functional as TF

        if self.saturation_jitter > 0:
            u = float(torch.rand((), generator=generator))
            x = TF.adjust_saturation(x, 1.0 + self.saturation_jitter * (2.0 * u - 1.0))
        if self.hue_jitter > 0:
            u = float(torch.rand((), generator=generator))
            x = TF.adjust_hue(x, self.hue_jitter * (2.0 * u - 1.0))
        return x
