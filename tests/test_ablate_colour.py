"""eval/ablate_colour.py: every row it can train is a valid config (a typo in a row's overrides would otherwise show
only when that row's turn comes, minutes into a run of many)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldtok.config import ConfigError, load_config
from ldtok.training import RunConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import ablate_colour  # noqa: E402

FOLDERS = {"v1": "/data/v1/train", "v2": "/data/v2/train"}


def _config(name: str) -> RunConfig:
    args = ablate_colour.variant_args(name, run_dir=Path("/runs/x"), steps=500, folders=FOLDERS, val_dir="/data/val")
    return load_config(RunConfig, ROOT / ablate_colour.VARIANTS[name][0], args)


def test_every_row_is_a_valid_config():
    errors = {}
    for name in ablate_colour.VARIANTS:
        try:
            _config(name)
        except (ConfigError, AssertionError) as e:  # AssertionError: a section's own value checks
            errors[name] = str(e)
    assert not errors


def test_rows_change_what_they_name():
    base = _config("kl/preset-loss")
    assert (base.loss.perceptual, base.loss.perceptual_weight, base.loss.disc_weight) == ("stlpips-vgg", 1.0, 0.5)
    assert base.loss.perceptual_input == "rgb" and base.model.norm_num_groups == 4
    assert base.data.path == FOLDERS["v2"]
    luma = _config("kl/preset-loss+luma+seed-2")
    assert luma.loss.perceptual_input == "luma" and luma.train.seed == 2
    assert _config("kl/preset-loss+no-gan").loss.disc_weight == 0
    disc_luma = _config("vq/preset-loss+disc-luma+seed-1")
    assert disc_luma.loss.disc_input == "luma" and disc_luma.loss.perceptual_input == "rgb"
    pixel = _config("fsq/preset-loss+colour-1+pool-1")
    assert (pixel.loss.colour_weight, pixel.loss.colour_pool, pixel.model.quantizer.type) == (1.0, 1, "fsq")
    shape = _config("klf8/recipe")  # the kl-f8 shape: its own GroupNorm groups win over FIXED's 4
    assert shape.model.block_out_channels == [32, 64, 64, 64] and shape.model.norm_num_groups == 8


def test_a_bad_override_names_its_key():
    with pytest.raises(ConfigError, match="loss.perceptual_inptu"):
        load_config(RunConfig, ROOT / "configs/demo-kl.yaml", ["loss.perceptual_inptu=luma"])


def test_half_colour_weight_row_overrides_the_pixel_term():
    half = _config("kl/groups-4+data-v2+luma+colour-0.5+pool-1+apart+seed-1")
    assert (half.loss.colour_weight, half.loss.colour_pool, half.loss.colour_in_adaptive_weight) == (0.5, 1, False)
    assert half.loss.perceptual_input == "luma" and half.train.seed == 1


class _Scaled(torch.nn.Module):
    """A stand-in tokenizer whose reconstruction is the input's chroma scaled by `gain` around its grey."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        grey = x.mean(dim=1, keepdim=True)
        return SimpleNamespace(sample=grey + self.gain * (x - grey))


def test_v2_scores_read_a_desaturation():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = ablate_colour.v2_scores(_Scaled(1.0), images)
    assert same["v2_delta_e"] < 1e-6 and abs(same["v2_chroma_ratio"] - 1) < 1e-6 and same["v2_psnr"] == 100.0
    grey = ablate_colour.v2_scores(_Scaled(0.5), images)
    assert 0.4 < grey["v2_chroma_ratio"] < 0.6 and grey["v2_delta_e"] > 5 and grey["v2_psnr"] < 40
    assert 0.4 < grey["v2_chroma_ratio_median"] < 0.6
