import subprocess
import sys
from pathlib import Path

import pytest

from ldtok.config import ConfigError, load_config, save_config
from ldtok.training import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo-kl.yaml"


def test_yaml_and_dotted_overrides():
    config = load_config(RunConfig, DEMO, ["train.max_steps=4", "output_dir=runs/x",
                                          "model.block_out_channels=[32, 64]",
                                           "loss.kl_weight=1e-5", "resume=latest"])
    assert config.train.max_steps == 4
    assert config.output_dir == "runs/x"
    assert config.model.block_out_channels == [32, 64]
    assert config.loss.kl_weight == 1e-5 and isinstance(config.loss.kl_weight, float)
    assert config.resume == "latest"
    # the preset filled in what the YAML did not say
    assert config.model.latent_channels == 4 and config.model.sample_size == 64


@pytest.mark.parametrize("override, key", [
    ("train.max_stepz=4", "train.max_stepz"),
    ("modle.type=kl", "modle"),
    ("data.resolutoin=32", "data.resolutoin"),
])
def test_unknown_key_is_an_error_naming_it(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, DEMO, [override])


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=four", "train.max_steps"),
    ("train.max_steps=4.5", "train.max_steps"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("model.block_out_channels=32", "model.block_out_channels"),
    ("data.flip=3", "data.flip"),
    ("model.preset=kl-f99", "model.preset"),
])
def test_wrong_type_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, DEMO, [override])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(RunConfig, DEMO, ["train.max_steps=7"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(RunConfig, tmp_path / "config.yaml")
    assert again == config


TRAINING_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("prior-"))


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_preset_config_is_valid(name):
    load_config(RunConfig, ROOT / "configs" / name)


def test_script_reports_the_bad_key():
    result = subprocess.run([sys.executable, str(ROOT / "train" / "vae.py"), "--config", str(DEMO),
                             "train.max_stepz=3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0
    assert "train.max_stepz" in result.stderr
    assert "Traceback" not in result.stderr


def test_import_tokenizers_is_hugging_faces():
    """The library lives in tokenizers/ldtok; `tokenizers/` must never shadow Hugging Face's package."""
    assert not (ROOT / "tokenizers" / "__init__.py").exists()
    code = "import tokenizers; print(tokenizers.__file__); print(tokenizers.Tokenizer.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    location, module = result.stdout.split()
    assert location != "None" and not Path(location).resolve().is_relative_to(ROOT.resolve() / "tokenizers")
    assert module.startswith("tokenizers")


def test_preset_sections_merge_key_by_key():
    config = load_config(RunConfig, None, ["model.preset=vq-f16-16k", "model.quantizer.codebook_size=4096"])
    assert config.model.type == "vqgan"
    assert config.model.quantizer.codebook_size == 4096  # the override
    assert config.model.quantizer.codebook_dim == 8 and config.model.quantizer.l2_normalize  # kept from the preset
