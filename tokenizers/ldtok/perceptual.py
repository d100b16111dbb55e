"""Frozen perceptual distances for the autoencoder loss.

`build_perceptual(name)` returns a frozen module whose `forward(x, y)` maps two image batches in `[-1, 1]` of shape
`(B, 3, H, W)` to per-sample distances of shape `(B,)`, differentiable with respect to the images. Names:

- `"lpips-vgg"`: LPIPS v0.1 (Zhang et al. 2018, the `lpips` package) on torchvision's ImageNet VGG16 (relu1_2 ...
  relu5_3) with the trained linear heads shipped in the `lpips` wheel. The perceptual loss of taming's VQGAN and LDM's
  KL-VAEs. The backbone is torchvision's `vgg16-397923af.pth`, loaded the normal torchvision way (the torch hub cache,
  downloaded there on first use when the network allows).
- `"lpips-alex"`: LPIPS v0.1 on torchvision's ImageNet AlexNet (`alexnet-owt-7be5be79.pth`, also through the hub cache);
  the better *metric* of the two according to the LPIPS authors, a weaker training loss.
- `"stlpips-vgg"`: ShiftTolerant-LPIPS (Ghildyal & Liu, ECCV 2022, the `stlpips_pytorch` package): VGG16 made
  anti-aliased (stride-1 max pool followed by a reflect-padded 3x3 binomial blur-pool), backbone and linear heads all
  trained by its authors and shipped in the wheel (`weights/vST0.0/vgg_shift_tolerant.pth`). Fully offline.
- `"stlpips-alex"`: the same for AlexNet (first conv at stride 1 followed by blur-pools;
  `weights/vST0.0/alex_shift_tolerant.pth`). Fully offline.
- `"none"`: no perceptual term (`build_perceptual` returns `None`).

The LPIPS backbones come from the torch hub cache (`torch.hub.get_dir()/checkpoints`, i.e.
`$TORCH_HOME/hub/checkpoints`), downloaded by torchvision when missing; offline, `PerceptualWeightsUnavailable` (an
`LdtokError`) says in one line which file to put in which directory. The shift-tolerant networks are rebuilt here
(the package's own modules import IPython and torchsummary at import time, which are not dependencies) with the
same module names, so the shipped state dicts load with `strict=True`; `tests/test_perceptual.py` checks the outputs
against the package's implementation.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
import weakref
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LdtokError

PERCEPTUAL_NETS = ("lpips-vgg", "lpips-alex", "stlpips-vgg", "stlpips-alex", "none")


class PerceptualDistance(nn.Module):
    """A frozen perceptual network: always in eval mode, no parameter requires grad.

    Args:
        net (`nn.Module`): an LPIPS-style module called as `net(x, y)` and returning `(B, 1, 1, 1)` distances.
        name (`str`): the name it was built from, e.g. `"lpips-vgg"`.
    """

    def __init__(self, *, net: nn.Module, name: str):
        super().__init__()
        self.net = net
        self.name = name
        self.backbone_dtype: torch.dtype | None = None  # `set_backbone_precision`
        _autocast_backbone(net.net, self)
        self.requires_grad_(False)
        self.eval()

    def set_backbone_precision(self, dtype: torch.dtype | None) -> PerceptualDistance:
        """Run the backbone's convolutions under autocast to `dtype` (`torch.bfloat16`), or in the weights' dtype
        (`None`). The distance itself (unit-normalizing the features, squared differences, the linear heads and
        the spatial mean) stays fp32: the backbone's features are cast back before it. `loss.perceptual_precision`."""
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"backbone precision must be None (fp32) or torch.bfloat16, got {dtype}")
        self.backbone_dtype = dtype
        return self

    def train(self, mode: bool = True) -> PerceptualDistance:
        # Frozen: the heads carry dropout layers, which must never switch on when the owning loss calls .train().
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distances between `x` and `y`, both `(B, 3, H, W)` in `[-1, 1]`; returns `(B,)`."""
        B, C = x.shape[:2]
        assert C == 3, f"perceptual networks take RGB images, got {C} channels"
        assert y.shape == x.shape, f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}"
        dtype = next(self.net.parameters()).dtype
        return self.net(x.to(dtype), y.to(dtype)).reshape(B)


def _autocast_backbone(backbone: nn.Module, owner: PerceptualDistance) -> None:
    """Patch `backbone.forward` (both LPIPS implementations call `self.net` / `self.net.forward`) to follow
    `owner.backbone_dtype`; the state dict keys stay as they are."""
    forward = backbone.forward
    owner_ref = weakref.ref(owner)

    def forward_in_precision(x: Tensor):
        owner = owner_ref()
        dtype = owner.backbone_dtype if owner is not None else None
        if dtype is None:
            return forward(x)
        with torch.autocast(x.device.type, dtype=dtype):
            feats = forward(x)
        floats = [f.float() for f in feats]
        return type(feats)(*floats) if hasattr(feats, "_fields") else type(feats)(floats)  # namedtuple / list

    backbone.forward = forward_in_precision


def build_perceptual(net: str, *, random_init: bool = False) -> PerceptualDistance | None:
    """Build a frozen perceptual distance by name (see the module docstring).

    Args:
        net (`str`): one of `"lpips-vgg"`, `"lpips-alex"`, `"stlpips-vgg"`, `"stlpips-alex"`, `"none"`.
        random_init (`bool`, defaults to `False`): randomly initialised backbone, trained linear heads. For tests and
            offline mechanics only: the distance is then meaningless.

    Returns:
        `PerceptualDistance` (frozen, eval mode), or `None` for `"none"`.

    Raises:
        `PerceptualWeightsUnavailable`: an `lpips-*` backbone is neither in the torch hub cache nor downloadable (the
            one-line message names the file and the directory).
    """
    if net == "none":
        return None
    if net not in PERCEPTUAL_NETS:
        raise ValueError(f"unknown perceptual network {net!r}; choose one of {PERCEPTUAL_NETS}")
    family, arch = net.split("-")
    module = _build_lpips(arch, random_init) if family == "lpips" else _build_stlpips(arch, random_init)
    return PerceptualDistance(net=module, name=net)


# ----------------------------------------------------------------------------------------------------- LPIPS


def _torchvision_weights_url(arch: str) -> str:
    from torchvision import models

    weights = models.VGG16_Weights.IMAGENET1K_V1 if arch == "vgg" else models.AlexNet_Weights.IMAGENET1K_V1
    return weights.url


class PerceptualWeightsUnavailable(LdtokError, RuntimeError):
    """An LPIPS backbone is neither in the torch hub cache nor downloadable (a `RuntimeError` too, for callers that
    report unavailable metrics instead of failing)."""


def _build_lpips(arch: str, random_init: bool) -> nn.Module:
    import lpips

    with warnings.catch_warnings():
        # lpips calls torchvision's deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        if random_init:
            return lpips.LPIPS(net=arch, pnet_rand=True, verbose=False)
        try:
            # torchvision's normal loading: torch.hub.load_state_dict_from_url reads the hub cache, else downloads.
            return lpips.LPIPS(net=arch, pnet_rand=False, verbose=False)
        except Exception as error:  # offline, or a corrupt or partial cache file
            raise PerceptualWeightsUnavailable(_lpips_weights_message(arch, error)) from error


def _lpips_weights_message(arch: str, error: BaseException) -> str:
    url = _torchvision_weights_url(arch)
    file_name = os.path.basename(urlparse(url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    cause = " ".join(f"{type(error).__name__}: {error}".split())
    what = f"loading failed with {cause}" if path.is_file() else f"downloading it from {url} failed ({cause})"
    return (
        f"perceptual network 'lpips-{arch}' needs torchvision's ImageNet backbone {file_name} in {path.parent} "
        f"($TORCH_HOME/hub/checkpoints, see torch.hub.get_dir()) and {what}; on a machine with network run "
        f"curl -L -o {path} {url}, or use 'stlpips-{arch}' (weights ship with the stlpips_pytorch package, offline)"
    )


# ------------------------------------------------------------------------------------- ShiftTolerant-LPIPS


class _BlurPool(nn.Module):
    """Reflect-pad by 2, then a depthwise 3x3 binomial blur at stride 2 (stlpips' `Downsample(pad_more=True)`)."""

    stride = 2

    def __init__(self, *, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = a[:, None] * a[None, :]
        self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))  # (C, 1, 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=self.stride, groups=x.shape[1])


def backbone_stride(backbone: nn.Module) -> int:
    """The total downsampling of a feature stack: the product of its layers' strides (convs, pools, blur-pools)."""
    total = 1
    for module in backbone.modules():
        stride = getattr(module, "stride", 1)
        total *= stride[0] if isinstance(stride, tuple) else stride
    return total


def _shift_tolerant_alexnet() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 64, kernel_size=11, stride=1, padding=2),
        _BlurPool(channels=64),
        nn.ReLU(inplace=True),  # relu1
        nn.MaxPool2d(kernel_size=3, stride=1),
        _BlurPool(channels=64),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),  # relu2
        nn.MaxPool2d(kernel_size=3, stride=1),
        _BlurPool(channels=192),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),  # relu3
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),  # relu4
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),  # relu5
    ]


def _shift_tolerant_vgg16() -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=1), _BlurPool(channels=in_channels)]
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return layers


# (layers, index after each tapped ReLU, channels of each tap)
_ST_ARCHS = {
    "alex": (_shift_tolerant_alexnet, (3, 7, 11, 13, 15), (64, 192, 384, 256, 256)),
    "vgg": (_shift_tolerant_vgg16, (4, 10, 18, 26, 34), (64, 128, 256, 512, 512)),
}


class _Slices(nn.Module):
    """A feature stack cut into `slice1..slice5` (stlpips' layer names); returns the five tapped activations."""

    def __init__(self, *, layers: list[nn.Module], ends: tuple[int, ...]):
        super().__init__()
        start = 0
        for k, end in enumerate(ends, start=1):
            block = nn.Sequential()
            for i in range(start, end):
                block.add_module(str(i), layers[i])
            self.add_module(f"slice{k}", block)
            start = end
        self.num_slices = len(ends)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for k in range(1, self.num_slices + 1):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class _ScalingLayer(nn.Module):
    """LPIPS v0.1's input normalisation (`(x - shift) / scale`, from `[-1, 1]` to ImageNet statistics)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class _Head(nn.Module):
    """A 1x1 conv to one channel (LPIPS' `NetLinLayer`; index 0 held its training-time dropout)."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class ShiftTolerantLPIPS(nn.Module):
    """ShiftTolerant-LPIPS (Ghildyal & Liu 2022) with the LPIPS v0.1 head; state-dict compatible with the weights
    shipped in `stlpips_pytorch/weights/vST0.0/`.

    Args:
        arch (`str`): `"alex"` or `"vgg"`.
    """

    def __init__(self, *, arch: str):
        super().__init__()
        make_layers, ends, channels = _ST_ARCHS[arch]
        self.scaling_layer = _ScalingLayer()
        self.net = _Slices(layers=make_layers(), ends=ends)
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", _Head(channels=c))
        self.num_taps = len(channels)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """`x`, `y`: `(B, 3, H, W)` in `[-1, 1]`; returns `(B, 1, 1, 1)` distances."""
        feats_x, feats_y = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2  # (B, C_k, h_k, w_k)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        return total


def _unit_normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def stlpips_weights_path(arch: str) -> Path:
    """Path of the shift-tolerant weights shipped in the installed `stlpips_pytorch` wheel (without importing it)."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "perceptual network 'stlpips-*' needs the `stlpips_pytorch` package (pip install stlpips-pytorch)"
        )
    path = Path(spec.origin).parent / "weights" / "vST0.0" / f"{arch}_shift_tolerant.pth"
    if not path.is_file():
        raise RuntimeError(f"stlpips_pytorch is installed but its weights file {path} is missing")
    return path


def _build_stlpips(arch: str, random_init: bool) -> nn.Module:
    module = ShiftTolerantLPIPS(arch=arch)
    state = torch.load(stlpips_weights_path(arch), map_location="cpu", weights_only=True)
    if random_init:  # as lpips' pnet_rand: keep the random backbone, load the heads and the input scaling
        state = {k: v for k, v in state.items() if not k.startswith("net.")}
        missing, unexpected = module.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("net.") for k in missing), (missing, unexpected)
    else:
        module.load_state_dict(state, strict=True)
    return module
