"""The benchmark (`eval/bench.py`, `eval/_bench.py`): a CPU smoke run, and the baseline computing what ldtok does."""

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldtok.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))  # the benchmark code lives beside the library
from _bench_config import BenchConfig, model_config  # noqa: E402
from _bench_steps import BaselineTrainStep, LdtokTrainStep, loss_config, prepare_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--resolution", "32", "--batch-size", "2", "--disc-channels", "16", "--disc-layers", "2"]


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "eval" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_prints_the_table_and_writes_json(tmp_path, capsys):
    # custom bf16 + channels-last: also runs ldtok's option path (the fp32 path is the equivalence test's)
    out = tmp_path / "report" / "bench.json"
    _bench_script().main(["--preset", "demo-kl", *TINY, "--steps", "2", "--warmup", "1", "--settings", "equal",
                          "defaults", "custom", "--precision", "bf16", "--channels-last", "--out", str(out)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("name"))
    assert header.split() == ["name", "setting", "baseline", "img/s", "ldtok", "img/s", "ratio", "min-med-max",
                              "baseline", "img/s/core", "ldtok", "img/s/core", "baseline", "peak", "MiB", "ldtok",
                              "peak", "MiB", "MiB/img", "mem", "ratio"]
    assert "pnet_rand=True" in printed

    report = json.loads(out.read_text())
    assert report["config"]["precision"] == "bf16" and report["config"]["channels_last"]
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"], "the atomic write left a temporary file"
    rows = {(row["name"], row["setting"]): row for row in report["rows"]}
    assert set(rows) == {(task, setting) for task in ("train demo-kl", "encode demo-kl")
                         for setting in ("equal", "defaults", "custom")}
    assert rows[("train demo-kl", "equal")]["options"] == {"precision": "fp32", "channels_last": False,
                                                           "compile": False, "fused_adamw": False}
    assert rows[("train demo-kl", "custom")]["options"]["precision"] == "bf16"
    assert rows[("train demo-kl", "defaults")]["options"]["channels_last"]  # the trainer's default
    for (name, _), row in rows.items():
        assert name in printed
        for side in ("baseline", "ldtok"):
            result = row[side]
            assert result["images_per_s"] > 0 and result["peak_memory_mib"] > 0 and result["cpu_seconds"] > 0, result
            assert result["peak_scope"] == "steps"  # Linux: the high-water mark was reset after building
            assert result["flops_per_step"] > 0 and result["threads"] >= 1
        assert row["speedup"] == pytest.approx(row["ldtok"]["images_per_s"] / row["baseline"]["images_per_s"])
        low, median, high = row["speedup_min_median_max"]
        assert low <= median <= high
        assert row["memory_ratio"] > 0
    # one set of baseline runs serves every setting of a task
    assert rows[("train demo-kl", "equal")]["baseline"] == rows[("train demo-kl", "defaults")]["baseline"]
    # a training step costs more FLOPs than encoding the same batch
    assert rows[("train demo-kl", "equal")]["ldtok"]["flops_per_step"] > rows[("encode demo-kl", "equal")][
        "ldtok"]["flops_per_step"]
    for side in ("baseline", "ldtok"):
        assert math.isfinite(rows[("train demo-kl", "equal")][side]["loss"])
        assert rows[("encode demo-kl", "equal")][side]["loss"] is None
    # "equal": the same weights, inputs, recipe and fp32 eager compute on both sides, so after the same 3 steps both
    # report the same generator loss (a step that trained something else, or nothing, would not)
    equal = rows[("train demo-kl", "equal")]
    assert equal["ldtok"]["loss"] == pytest.approx(equal["baseline"]["loss"], rel=1e-4)
    # the throughput is what was measured: images over the timed seconds
    for row in rows.values():
        for side in ("baseline", "ldtok"):
            result = row[side]
            assert result["images_per_s"] == pytest.approx(2 * 2 / result["seconds"], rel=1e-6), result


@pytest.mark.parametrize("preset", ["demo-kl", "demo-vq"])
def test_baseline_and_ldtok_steps_compute_the_same_losses(tmp_path, preset):
    # VQ: a gradient-trained codebook without k-means or restarts, as diffusers' own quantizer has
    quantizer = {"codebook_size": 256, "codebook_dim": 4, "ema": False, "kmeans_init": False, "dead_code_steps": 0}
    overrides = {} if preset == "demo-kl" else {"quantizer": quantizer}
    config = BenchConfig(presets=[preset], resolution=32, batch_size=2, disc_channels=16, disc_layers=2)
    model = model_config(preset, 32, overrides)
    weights = prepare_weights(config, model, tmp_path)
    # weights that make every term visible at the tolerance (LDM's KL weight 1e-6 would hide a wrong KL scaling)
    loss = replace(loss_config(config), kl_weight=1.0, quant_weight=100.0, perceptual_weight=0.5, disc_weight=0.8)
    build = {"model": model, "loss": loss, "weights": weights, "device": torch.device("cpu")}
    ours, baseline = LdtokTrainStep(**build), BaselineTrainStep(**build)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    # step 0: same weights, inputs and posterior noise -> the same loss values (generator: reconstruction,
    # perceptual, KL or quantizer loss, adaptive-weight GAN term; discriminator: hinge)
    torch.manual_seed(0)
    a = ours(x, 0)
    torch.manual_seed(0)
    b = baseline(x, 0)
    assert a.generator.item() == pytest.approx(b.generator.item(), rel=1e-5)
    assert a.discriminator.item() == pytest.approx(b.discriminator.item(), rel=1e-5)

    # Step 1 compares the updates, for KL only. Diffusers' VQModel puts beta on the codebook term (legacy=True: the
    # same loss value, other gradients), and its straight-through output rounds differently, which Adam's first
    # step amplifies; the KL baseline runs bitwise the same computation.
    if preset == "demo-kl":
        torch.manual_seed(1)
        a = ours(x, 1)
        torch.manual_seed(1)
        b = baseline(x, 1)
        # after one Adam step: the one-backward gradients differ from the two-pass ones by float rounding, and
        # Adam's first update (about lr * sign(g)) turns that into ~1e-5 relative changes of the loss with 1 thread
        assert a.generator.item() == pytest.approx(b.generator.item(), rel=1e-4)
        assert a.discriminator.item() == pytest.approx(b.discriminator.item(), rel=1e-4)


def test_families_without_a_diffusers_baseline_are_refused():
    with pytest.raises(ConfigError, match="^presets: preset 'demo-vqvae2' is a vqvae2 model: no diffusers baseline"):
        BenchConfig(presets=["demo-vqvae2"], resolution=32)
    with pytest.raises(ConfigError, match="^presets: resolution 30 not divisible"):
        BenchConfig(presets=["demo-kl"], resolution=30)
    with pytest.raises(ConfigError, match=r"^tasks: unknown choice 'fit' \(allowed: train, encode\)"):
        BenchConfig(tasks=["encode", "fit"])
    with pytest.raises(ConfigError, match="^warmup: must be >= 0"):
        BenchConfig(warmup=-1)


def test_the_lightning_baseline_runs_the_autoencoder_once_per_optimizer(tmp_path):
    """`--baseline lightning` (taming / LDM under Lightning): the discriminator's `training_step` call starts with its
    own forward of the just-updated autoencoder; `single-forward` shares the generator's reconstruction."""
    config = BenchConfig(presets=["demo-vq"], resolution=32, batch_size=2, disc_channels=16, disc_layers=2)
    model = model_config("demo-vq", 32)
    weights = prepare_weights(config, model, tmp_path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    forwards = {}
    for lightning in (False, True):
        step = BaselineTrainStep(model=model, loss=loss_config(config), weights=weights, device=torch.device("cpu"),
                                 lightning=lightning)
        calls: list[int] = []
        step.vae.encoder.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        step(x, 0)
        forwards[lightning] = len(calls)
    assert forwards == {False: 1, True: 2}
    with pytest.raises(ConfigError, match="^baseline: "):
        BenchConfig(presets=["demo-kl"], baseline="taming")
