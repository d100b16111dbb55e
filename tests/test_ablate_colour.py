"""eval/ablate_colour.py: every row it can train is a valid config (a typo in a row's overrides would otherwise show
only when that row's turn comes, minutes into a run of many)."""

import sys
from pathlib import Path

import pytest

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
