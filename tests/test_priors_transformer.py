"""`train/prior_transformer.py` end to end on VQ and VQ-VAE-2 codes: training, samples, export, resume (one and two
processes), TensorBoard, reruns; under `accelerate launch --cpu` on tiny shards encoded by tiny untrained tokenizers."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from prior_helpers import TINY_GPT, grid_size, launch, logged, make_prior_shards
from safetensors.torch import load_file

from ldtok.priors import GPT, CodeLayout


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """KL, VQ and VQ-VAE-2 shard directories of 16 random 32 px images, each with the model that encoded them."""
    return make_prior_shards(tmp_path_factory.mktemp("priors"))


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
