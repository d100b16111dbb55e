"""The priors: the GPT and its code layout (unit tests), and `train/prior_diffusion.py` / `train/prior_transformer.py`
run end to end under `accelerate launch --cpu` on tiny shards encoded here by tiny untrained tokenizers."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel, VQModel
from PIL import Image
from safetensors.torch import load_file

from ldtok.config import ConfigError, load_config
from ldtok.models import KLAutoencoder, ModelConfig
from ldtok.priors import GPT, CodeLayout, CodeLevel, KVCache, PriorDiffusionConfig, PriorTransformerConfig
from ldtok.shards import ShardWriter, load_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "1",
              "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
N_IMAGES, RES = 16, 32


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(**{"vocab_size": 24, "block_size": 12, "num_layers": 2, "num_heads": 2, "hidden_size": 32,
                  **overrides}).eval()


# ------------------------------------------------------------------------------------------------ GPT and layout
def test_gpt_shapes_unconditional_and_class_conditional():
    codes = torch.randint(0, 24, (3, 11))
    assert tiny_gpt()(codes).logits.shape == (3, 12, 24)  # the start token, then one position per code
    assert tiny_gpt()(codes[:, :0]).logits.shape == (3, 1, 24)
    model = tiny_gpt(num_classes=5)
    a = model(codes, class_labels=torch.tensor([0, 1, 2])).logits
    b = model(codes, class_labels=torch.tensor([4, 1, 2])).logits
    assert a.shape == (3, 12, 24)
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])  # the label conditions its own row only
    with pytest.raises(AssertionError, match="needs labels"):
        model(codes)
    with pytest.raises(AssertionError, match="block_size"):
        tiny_gpt()(torch.randint(0, 24, (1, 12)))  # start token + 12 codes > block_size 12


def test_gpt_is_causal():
    model = tiny_gpt()
    codes = torch.randint(0, 24, (2, 11))
    for t in (0, 4, 10):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 7) % 24
        a, b = model(codes).logits, model(changed).logits
        # logits at position i read codes < i: positions <= t cannot see code t, position t + 1 does
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_kv_cache_matches_the_full_forward_and_greedy_generation():
    model = tiny_gpt(num_classes=3)
    labels = torch.tensor([0, 2])
    codes = torch.randint(0, 24, (2, 11))
    full = model(codes, class_labels=labels).logits
    cache = KVCache(num_layers=2)
    pieces = [model(codes[:, :0], class_labels=labels, cache=cache).logits,
              model(codes[:, :5], cache=cache).logits,  # several tokens after a non-empty cache: explicit mask
              model(codes[:, 5:6], cache=cache).logits,
              model(codes[:, 6:], cache=cache).logits]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    greedy = model.generate(num_samples=2, length=12, class_labels=labels, top_k=1)
    again = model(greedy[:, :-1], class_labels=labels).logits.argmax(-1)  # (2, 12), no cache
    assert torch.equal(greedy, again)


def test_code_layout_packs_levels_with_offsets_and_generate_respects_them():
    layout = CodeLayout(levels=[CodeLevel(name="indices_top", height=2, width=2, codebook_size=5, offset=0),
                                CodeLevel(name="indices_bottom", height=2, width=4, codebook_size=7, offset=5)])
    assert (layout.length, layout.vocab_size) == (12, 12)
    top, bottom = torch.randint(0, 5, (3, 2, 2)), torch.randint(0, 7, (3, 2, 4))
    tokens = layout.pack({"indices_top": top.to(torch.uint8), "indices_bottom": bottom, "id": ["a", "b", "c"]})
    assert tokens.shape == (3, 12) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, :4], top.flatten(1)) and torch.equal(tokens[:, 4:], bottom.flatten(1) + 5)
    back = layout.unpack(tokens)
    assert torch.equal(back["indices_top"], top) and torch.equal(back["indices_bottom"], bottom)
    assert CodeLayout.from_json(json.loads(json.dumps(layout.to_json()))).to_json() == layout.to_json()
    allowed = layout.allowed_tokens()
    assert allowed[:4].sum(-1).eq(5).all() and allowed[4:, 5:].all() and not allowed[4:, :5].any()
    sampled = tiny_gpt(vocab_size=12).generate(num_samples=64, length=12, allowed_tokens=allowed,
                                               generator=torch.Generator().manual_seed(0))
    assert (sampled[:, :4] < 5).all() and (sampled[:, 4:] >= 5).all()
    with pytest.raises(AssertionError, match="overlapping"):
        CodeLayout(levels=[CodeLevel(name="a", height=1, width=1, codebook_size=5, offset=0),
                           CodeLevel(name="b", height=1, width=1, codebook_size=5, offset=4)])


def test_configs_load_demo_files_and_reject_unknown_keys():
    diffusion = load_config(PriorDiffusionConfig, ROOT / "configs/prior-diffusion-demo.yaml", ["train.max_steps=3"])
    assert diffusion.train.max_steps == 3 and diffusion.unet.attention == [False, True, True]
    transformer = load_config(PriorTransformerConfig, ROOT / "configs/prior-transformer-demo.yaml", ["top_k=5"])
    assert transformer.top_k == 5 and transformer.model.num_layers == 4
    with pytest.raises(ConfigError, match="unet.bogus"):
        load_config(PriorDiffusionConfig, ROOT / "configs/prior-diffusion-demo.yaml", ["unet.bogus=1"])
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(PriorTransformerConfig, ROOT / "configs/prior-transformer-demo.yaml", ["model.hidden_size=big"])
    with pytest.raises(ConfigError, match="unet.attention: needs one entry per level"):
        load_config(PriorDiffusionConfig, None, ["shards=x", "unet.attention=[true]"])
    with pytest.raises(ConfigError, match="train.ema_decay: must be < 1"):
        load_config(PriorDiffusionConfig, None, ["shards=x", "train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        load_config(PriorTransformerConfig, None, ["shards=x", "temperature=0"])


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lookup_from_codebook", [False, True])
def test_decode_fields_of_a_diffusers_vqmodel_equals_decoding_its_quantized_latents(tmp_path, lookup_from_codebook):
    from ldtok.models import load_tokenizer

    torch.manual_seed(0)
    vq = tiny_vqmodel(lookup_from_codebook=lookup_from_codebook).eval()
    vq.save_pretrained(tmp_path / "vq")
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    tokenizer = load_tokenizer(tmp_path / "vq")
    assert tokenizer.codebook_sizes == [32]
    with torch.no_grad():
        h = vq.encode(x).latents  # (2, 4, 8, 8)
        _, _, (_, _, indices) = vq.quantize(h)
        expected = vq.decode(h).sample  # quantizes h itself, whatever lookup_from_codebook says
        images = tokenizer.decode_fields({"indices": indices.reshape(2, 8, 8)})
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ tiny shards
def tiny_vqmodel(**overrides) -> VQModel:
    return VQModel(**{"block_out_channels": (32, 32, 32), "down_block_types": ("DownEncoderBlock2D",) * 3,
                      "up_block_types": ("UpDecoderBlock2D",) * 3, "layers_per_block": 1, "latent_channels": 4,
                      "num_vq_embeddings": 32, "norm_num_groups": 32, "sample_size": RES,
                      "mid_block_add_attention": False, **overrides})


def images(n: int = N_IMAGES) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, RES, RES, generator=g) * 2 - 1


def write_shards(out: Path, *, kind: str, batch: dict, model_dir: Path, codebook_size: int | None = None) -> Path:
    with ShardWriter(out, kind=kind, samples_per_shard=8, metadata={"resolution": str(RES)},
                     codebook_size=codebook_size) as writer:
        writer.add(batch, [f"img{i:03d}" for i in range(N_IMAGES)])
    write_manifest(out, model={"path": str(model_dir)})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """KL, VQ and VQ-VAE-2 shard directories of 16 random 32 px images, each with the model that encoded them."""
    root = tmp_path_factory.mktemp("priors")
    labels = torch.arange(N_IMAGES) % 4
    torch.manual_seed(0)
    KLAutoencoder.from_config(ModelConfig(type="kl", block_out_channels=[32, 64], layers_per_block=1,
                                          norm_num_groups=32, latent_channels=4, sample_size=RES,
                                          mid_block_add_attention=False)).export(root / "vae")
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        posterior = vae.encode(images()).latent_dist  # (16, 4, 16, 16)
    kl = write_shards(root / "kl", kind="kl", model_dir=root / "vae",
                      batch={"mean": posterior.mean, "logvar": posterior.logvar, "label": labels})

    vq = tiny_vqmodel().eval()
    vq.save_pretrained(root / "vq")
    with torch.no_grad():
        _, _, (_, _, indices) = vq.quantize(vq.encode(images()).latents)
    vq_shards = write_shards(root / "vq", kind="vq", model_dir=root / "vq", codebook_size=32,
                             batch={"indices": indices.reshape(N_IMAGES, 8, 8)})

    from ldtok.models.vqvae2 import VQVAE2

    vqvae2 = VQVAE2(block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=16, sample_size=RES,
                    mid_block_add_attention=False, top_codebook_size=16, top_codebook_dim=8, bottom_codebook_size=32,
                    bottom_codebook_dim=8, kmeans_init=False).eval()
    vqvae2.save_pretrained(root / "vqvae2")
    codes = vqvae2.encode_to_indices(images())  # top (16, 4, 4), bottom (16, 8, 8)
    vqvae2_shards = write_shards(root / "vqvae2", kind="vqvae2", model_dir=root / "vqvae2", codebook_size=32,
                                 batch={"indices_top": codes.top, "indices_bottom": codes.bottom, "label": labels})
    return {"kl": kl, "vq": vq_shards, "vqvae2": vqvae2_shards}


def launch(script: str, config: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*ACCELERATE, str(ROOT / "train" / script), "--config", str(ROOT / "configs" / config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def grid_size(n: int, cols: int, res: int = RES, padding: int = 2) -> tuple[int, int]:
    rows = -(-n // cols)
    return cols * (res + padding) + padding, rows * (res + padding) + padding


# ------------------------------------------------------------------------------------------------ scripts
TINY_UNET = ["unet.block_out_channels=[32, 32]", "unet.attention=[false, true]", "unet.layers_per_block=1",
             "unet.attention_head_dim=8", "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=0",
             "train.ema_decay=null", "train.checkpoint_every=0", "num_samples=6", "grid_columns=4",
             "num_inference_steps=4"]


@pytest.mark.slow
def test_prior_diffusion_trains_samples_decodes_and_exports(shards, tmp_path):
    out = tmp_path / "diffusion"
    result = launch("prior_diffusion.py", "prior-diffusion-demo.yaml", f"shards={shards['kl']}", f"output_dir={out}",
                    *TINY_UNET, "unet.num_classes=4", "train.max_steps=40", "train.log_every=10",
                    f"val_shards={shards['kl']}", "val_timesteps=3")
    entries = logged(out)
    assert [e["step"] for e in entries] == [10, 20, 30, 40]
    losses = [e["loss"] for e in entries]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(e["it_per_s"] > 0 for e in entries)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(losses[-1]) and "final loss" in result.stdout
    # the held-out denoising loss: at fixed timesteps and noise, in the range of the training loss
    assert 0 < summary["val_loss"] < 2 * losses[0] and "validation denoising loss" in result.stdout
    assert Image.open(summary["samples"]).size == grid_size(6, 4)  # 6 decoded 32 px samples, 4 per row
    unet, info = UNet2DModel.from_pretrained(out / "final" / "unet", output_loading_info=True)
    assert all(not v for v in info.values()), info
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert unet(latents, 10, class_labels=torch.tensor([0, 3])).sample.shape == latents.shape
    prior = json.loads((out / "final" / "prior.json").read_text())
    stats = load_manifest(shards["kl"])["stats"]
    assert prior["scaling_factor"] == pytest.approx(stats["scaling_factor"]) and prior["vae"] == str(
        shards["kl"].parent / "vae")
    # final/ is a diffusers pipeline: loaded whole, it samples images with the run's latent scaling
    from ldtok.priors.pipeline import LatentPriorPipeline

    pipe = LatentPriorPipeline.from_pretrained(out / "final")
    assert pipe.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    images = pipe(batch_size=2, num_inference_steps=2, class_labels=torch.tensor([0, 3]), output_type="pt",
                  generator=torch.manual_seed(0)).images
    assert images.shape == (2, 3, RES, RES) and 0 <= images.min() and images.max() <= 1


TINY_GPT = ["model.num_layers=2", "model.num_heads=2", "model.hidden_size=64", "model.dropout=0.0",
            "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=0", "train.weight_decay=0.0",
            "num_samples=6", "grid_columns=4", "top_k=null"]


@pytest.fixture(scope="module")
def vq_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("transformer") / "vq"
    launch("prior_transformer.py", "prior-transformer-demo.yaml", f"shards={shards['vq']}", f"output_dir={out}",
           *TINY_GPT, "train.max_steps=30", "train.log_every=5", "train.checkpoint_every=15")
    return out


@pytest.mark.slow
def test_prior_transformer_on_vq_codes_trains_samples_decodes_and_exports(vq_run, shards):
    losses = [e["loss"] for e in logged(vq_run)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.75 * losses[0], losses  # 16 sequences of 64 codes: the loss drops fast
    summary = json.loads((vq_run / "summary.json").read_text())
    assert Image.open(summary["samples"]).size == grid_size(6, 4)
    codes = load_file(summary["codes"])
    assert codes["indices"].shape == (6, 8, 8) and 0 <= int(codes["indices"].min()) <= int(codes["indices"].max()) < 32
    model, info = GPT.from_pretrained(vq_run / "final" / "transformer", output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert (model.config.vocab_size, model.config.block_size) == (32, 64)
    tokens = codes["indices"].flatten(1).long()  # (6, 64): raster order, no offset for a single level
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens.flatten())
    assert torch.isfinite(nll)
    layout = CodeLayout.from_json(json.loads((vq_run / "final" / "prior.json").read_text())["layout"])
    assert layout.length == 64


@pytest.mark.slow
def test_prior_transformer_resumes_from_its_checkpoint(vq_run, tmp_path):
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(vq_run, resumed)
    result = launch("prior_transformer.py", "prior-transformer-demo.yaml", f"output_dir={resumed}",
                    f"shards={json.loads((vq_run / 'final' / 'prior.json').read_text())['shards']}", *TINY_GPT,
                    "train.max_steps=40", "train.log_every=5", "train.checkpoint_every=15", "resume=latest")
    assert "resumed from" in result.stderr and "step 30" in result.stderr
    assert [e["step"] for e in logged(resumed)] == [5, 10, 15, 20, 25, 30, 35, 40]  # appended, not restarted
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]


@pytest.mark.slow
def test_a_prior_run_logs_its_scalars_and_config_to_tensorboard(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    launch("prior_transformer.py", "prior-transformer-demo.yaml", f"shards={shards['vq']}", f"output_dir={out}",
           *TINY_GPT, "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=0", "decode=false",
           "train.report_to=tensorboard")
    scalars, plugins = {}, set()
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events)).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
        try:
            plugins |= set(acc.PluginTagToContent("hparams"))
        except KeyError:  # this event file holds no hparams
            pass
    assert {"loss", "it_per_s", "lr"} <= set(scalars), scalars
    assert [step for step, _ in scalars["loss"]] == [e["step"] for e in logged(out)] == [2, 4]
    assert [v for _, v in scalars["loss"]] == pytest.approx([e["loss"] for e in logged(out)])  # the jsonl's values
    assert "_hparams_/session_start_info" in plugins  # the resolved config as hyperparameters


@pytest.mark.slow
def test_prior_transformer_on_vqvae2_codes_is_class_conditional_and_keeps_levels_apart(shards, tmp_path):
    out = tmp_path / "vqvae2"
    launch("prior_transformer.py", "prior-transformer-demo.yaml", f"shards={shards['vqvae2']}", f"output_dir={out}",
           *TINY_GPT, "model.num_classes=4", "train.max_steps=10", "train.log_every=5", "train.checkpoint_every=0")
    assert all(torch.isfinite(torch.tensor([e["loss"] for e in logged(out)])))
    summary = json.loads((out / "summary.json").read_text())
    assert Image.open(summary["samples"]).size == grid_size(6, 4)
    codes = load_file(summary["codes"])
    assert codes["indices_top"].shape == (6, 4, 4) and codes["indices_bottom"].shape == (6, 8, 8)
    assert int(codes["indices_top"].max()) < 16 and int(codes["indices_bottom"].max()) < 32  # per-level vocabularies
    assert codes["label"].tolist() == [0, 1, 2, 3, 0, 1]
    layout = json.loads((out / "final" / "prior.json").read_text())["layout"]
    assert [(lv["name"], lv["offset"], lv["codebook_size"]) for lv in layout["levels"]] == [
        ("indices_top", 0, 16), ("indices_bottom", 16, 32)]
    model = GPT.from_pretrained(out / "final" / "transformer")
    assert (model.config.vocab_size, model.config.block_size, model.config.num_classes) == (48, 80, 4)


def test_scripts_reject_wrong_shards_labels_and_decoders_before_building_anything(shards, tmp_path, monkeypatch):
    cases = [  # (script, overrides, message)
        ("prior_transformer", [f"shards={shards['kl']}"], "needs VQ codes"),
        ("prior_diffusion", [f"shards={shards['vq']}"], "needs KL latents"),
        ("prior_transformer", [f"shards={shards['vq']}", "model.num_classes=3"], "stores no labels"),
        ("prior_diffusion", [f"shards={shards['kl']}", f"vae={tmp_path}"], "no diffusers AutoencoderKL directory"),
        ("prior_diffusion", [f"shards={shards['kl']}", f"val_shards={shards['vq']}"], "val_shards must be KL latents"),
        ("prior_transformer", [f"shards={tmp_path}"], "index.json"),
        ("prior_transformer", [f"shards={shards['vq']}", "train.bogus=1"], "unknown config key 'train.bogus'"),
        ("prior_transformer", [f"shards={shards['vq']}", f"tokenizer={shards['vqvae2'].parent / 'vqvae2'}"],
         "not the model that encoded them"),
    ]
    for script, overrides, message in cases:
        config = ROOT / "configs" / ("prior-transformer-demo.yaml" if script == "prior_transformer"
                                     else "prior-diffusion-demo.yaml")
        monkeypatch.setattr(sys, "argv", [script, "--config", str(config), f"output_dir={tmp_path / 'run'}",
                                          *overrides])
        with pytest.raises(ConfigError, match=message):  # run_cli: one line, exit code 2
            load_script(script).main()
    assert not (tmp_path / "run").exists()  # nothing was built or written


@pytest.mark.slow
@pytest.mark.parametrize("script", ["prior_diffusion", "prior_transformer"])
def test_a_diverging_prior_stops_naming_the_step_and_writes_no_non_finite_weights(shards, tmp_path, script):
    out = tmp_path / script
    if script == "prior_diffusion":
        args = ["prior_diffusion.py", "prior-diffusion-demo.yaml", f"shards={shards['kl']}", *TINY_UNET]
    else:
        args = ["prior_transformer.py", "prior-transformer-demo.yaml", f"shards={shards['vq']}", *TINY_GPT]
    result = launch(*args, f"output_dir={out}", "train.lr=1e9", "train.max_steps=30", "train.checkpoint_every=1",
                    "train.max_nonfinite_steps=2", check=False)
    assert result.returncode != 0
    assert "error: training diverged: 2 optimizer steps in a row had non-finite values" in result.stderr, (
        result.stderr[-3000:])
    assert "last good checkpoint: " + str(out / "checkpoints") in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith('File "')
            and any(f'"{ROOT / part}' in line for part in ("tokenizers", "train"))]  # our code, not the in-repo .venv
    for checkpoint in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    assert not (out / "final").exists()


@pytest.mark.slow
def test_prior_transformer_resumes_a_two_process_run_with_ema(shards, tmp_path):
    from launch import launch as launch_processes

    out = tmp_path / "ddp"
    common = [f"shards={shards['vq']}", f"output_dir={out}", *TINY_GPT, "train.batch_size=4", "train.ema_decay=0.9",
              "train.checkpoint_every=2", "train.log_every=1", "decode=false"]
    kwargs = {"script": "train/prior_transformer.py", "config": "configs/prior-transformer-demo.yaml", "tiny": False,
              "processes": 2}
    launch_processes(*common, "train.max_steps=2", **kwargs)
    result = launch_processes(*common, "train.max_steps=3", "resume=latest", **kwargs)
    assert "resumed from" in result.stderr and "step 2" in result.stderr  # ema.safetensors loaded under `cpu:0`
    assert [e["step"] for e in logged(out)] == [1, 2, 3]


@pytest.mark.slow
def test_rerunning_a_finished_prior_run_changes_nothing(vq_run, tmp_path):
    import shutil

    finished = tmp_path / "finished"
    shutil.copytree(vq_run, finished)
    before = {p: p.read_bytes() for p in (finished / "summary.json", finished / "metrics.jsonl")}
    result = launch("prior_transformer.py", "prior-transformer-demo.yaml", f"output_dir={finished}",
                    f"shards={json.loads((vq_run / 'final' / 'prior.json').read_text())['shards']}", *TINY_GPT,
                    "train.max_steps=30", "train.log_every=5", "train.checkpoint_every=15", "resume=latest")
    assert "already finished at step 30" in result.stdout and "nothing to do" in result.stdout
    assert {p: p.read_bytes() for p in before} == before  # summary.json and the log untouched
