"""Aligning the latent space to a frozen vision foundation model (VA-VAE's VF loss, REPA-E style).

A frozen encoder loaded with `transformers` from a local directory (e.g. a DINOv2 checkpoint the user has saved)
turns the training image into a grid of patch features; a learned 1×1 projection maps the tokenizer's latent to the
same width; two terms pull them together (Yao et al., "Reconstruction vs. Generation", 2025):

- marginal cosine similarity: `mean ReLU(1 - m1 - cos(W z_ij, f_ij))` over positions;
- marginal distance-matrix similarity: `mean ReLU(|cos(W z_i, W z_j) - cos(f_i, f_j)| - m2)` over position pairs.

Two kinds of frozen model:

- a local `transformers` ViT-style directory (`FrozenVisionEncoder`), the models VA-VAE and REPA-E align to;
- a built-in name, `"stlpips-alex"` or `"stlpips-vgg"` (`FrozenConvEncoder`): the last ReLU of the ImageNet-trained,
  anti-aliased AlexNet / VGG16 that ship inside the `stlpips_pytorch` wheel (relu5, 256 / 512 channels). A much
  weaker representation than DINOv2, but a trained one that works offline.

The frozen model never trains: it is put in eval mode and stays there (`train()` is a no-op), its parameters never
require gradients, and its features are computed under `torch.no_grad()`. Only the encoder (through `z`) and the
projection receive the terms' gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LdtokError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN_ALIGN_MODELS = ("stlpips-alex", "stlpips-vgg")


class FrozenVisionEncoder(nn.Module):
    """A frozen ViT-style `transformers` model returning patch features on the latent grid.

    Args:
        model (`transformers.PreTrainedModel`): a model whose output has `last_hidden_state` `(B, T, D)` ending in
            the patch tokens (DINOv2, DINOv2 with registers, ViT, ...); its config has `patch_size`.
        mean, std (`tuple[float, float, float]`): the pixel normalization it was trained with.
    """

    def __init__(self, model: nn.Module, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        self.patch_size = int(model.config.patch_size)
        self.hidden_size = int(model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_directory(cls, path: str | Path) -> FrozenVisionEncoder:
        """Load from a local directory (`config.json` + weights); never downloads. Errors are one line."""
        from transformers import AutoModel

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise LdtokError(f"loss.align_model={path}: not a local transformers model directory (no config.json); "
                             "save one there on a machine with network: "
                             "`AutoModel.from_pretrained('facebook/dinov2-base').save_pretrained(DIR)`, or use a "
                             f"built-in offline CNN: {' or '.join(BUILTIN_ALIGN_MODELS)}")
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        if not hasattr(model.config, "patch_size"):
            raise LdtokError(f"loss.align_model={path}: {type(model).__name__} has no patch_size; "
                             "use a ViT-style model (DINOv2, ViT)")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        processor = path / "preprocessor_config.json"
        if processor.is_file():
            cfg = json.loads(processor.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return cls(model, mean=mean, std=std)

    def train(self, mode: bool = True) -> FrozenVisionEncoder:
        """Stays in eval mode whatever the caller asks (dropout / norm statistics never change)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor, *, grid: tuple[int, int]) -> Tensor:
        """Features `(B, D, h, w)` of images `x` `(B, 3, H, W)` in [-1, 1], on a `grid = (h, w)` patch grid.

        The image is resized to `(h·p, w·p)` (`p` = patch size) so the model's patch grid is the latent's grid.
        """
        h, w = grid
        x = F.interpolate(x.float(), size=(h * self.patch_size, w * self.patch_size), mode="bicubic",
                          align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        tokens = self.model(pixel_values=x).last_hidden_state  # (B, T, D): [CLS, registers..., patches]
        if tokens.shape[1] < h * w:
            raise LdtokError(f"the alignment model returned {tokens.shape[1]} tokens for a {h}x{w} patch grid")
        patches = tokens[:, -h * w:]  # (B, h*w, D)
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w).float()


class FrozenConvEncoder(nn.Module):
    """The last tapped ReLU of a frozen shift-tolerant CNN (`ldtok.perceptual.ShiftTolerantLPIPS`) on the latent grid.

    Args:
        net (`str`): `"stlpips-alex"` (relu5, 256 channels, stride 8) or `"stlpips-vgg"` (relu5_3, 512, stride 16).
    """

    def __init__(self, net: str):
        super().__init__()
        from ..perceptual import backbone_stride, build_perceptual

        if net not in BUILTIN_ALIGN_MODELS:
            raise LdtokError(f"loss.align_model={net}: not a built-in alignment model; use one of "
                             f"{', '.join(BUILTIN_ALIGN_MODELS)} or a local transformers model directory")
        lpips = build_perceptual(net).net  # ShiftTolerantLPIPS, trained backbone
        self.scaling_layer, self.backbone = lpips.scaling_layer, lpips.net
        self.stride = backbone_stride(self.backbone)  # alex 8, vgg 16: three / four stride-2 blur-pools
        self.hidden_size = [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenConvEncoder:
        """Stays in eval mode whatever the caller asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor, *, grid: tuple[int, int]) -> Tensor:
        """Features `(B, D, h, w)` of images `x` `(B, 3, H, W)` in [-1, 1], on a `grid = (h, w)`.

        The image is resized to `(h·s, w·s)` (`s` = the network's stride); the convs' and pools' padding can leave
        the map a row or two off (VGG: `h + 1`), so it is area-resampled to exactly `(h, w)`.
        """
        h, w = grid
        x = F.interpolate(x.float(), size=(h * self.stride, w * self.stride), mode="bicubic", align_corners=False,
                          antialias=True)
        feats = self.backbone(self.scaling_layer(x))[-1]
        return F.adaptive_avg_pool2d(feats, (h, w)).float()


def build_align_encoder(align_model: str) -> FrozenVisionEncoder | FrozenConvEncoder:
    """A built-in name (`BUILTIN_ALIGN_MODELS`) or a local transformers directory; never downloads."""
    if align_model in BUILTIN_ALIGN_MODELS:
        return FrozenConvEncoder(align_model)
    return FrozenVisionEncoder.from_directory(align_model)


class AlignmentProjection(nn.Module):
    """The learned 1×1 projection from the latent `(B, C, h, w)` to the frozen model's width `(B, D, h, w)`."""

    def __init__(self, *, latent_channels: int, feature_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.proj(z)


def alignment_terms(projected: Tensor, features: Tensor, *, margin_cos: float = 0.5,
                    margin_dist: float = 0.25) -> tuple[Tensor, Tensor]:
    """`(marginal cosine term, marginal distance-matrix term)`, scalars in fp32.

    Args:
        projected (`Tensor` `(B, D, h, w)`): the projected latent (differentiable).
        features (`Tensor` `(B, D, h, w)`): the frozen model's features (no gradient).
        margin_cos, margin_dist (`float`): VA-VAE's margins m1, m2: similarities within them are not pushed further.
    """
    with torch.autocast(device_type=projected.device.type, enabled=False):
        z = F.normalize(projected.float().flatten(2), dim=1)  # (B, D, N)
        f = F.normalize(features.float().flatten(2), dim=1)  # (B, D, N)
        cos = (z * f).sum(dim=1)  # (B, N)
        term_cos = F.relu(1 - margin_cos - cos).mean()
        sim_z = z.transpose(1, 2) @ z  # (B, N, N)
        sim_f = f.transpose(1, 2) @ f  # (B, N, N)
        term_dist = F.relu((sim_z - sim_f).abs() - margin_dist).mean()
    return term_cos, term_dist
